//! What a SCSI controller (the storvsp) answers itself rather than a disk: REPORT LUNS for
//! the LUNs of a target, and commands addressed to a LUN with no disk.
//!
//! Linux scans every target and LUN it may (storvsc: 8 channels, 2 targets, 256 LUNs) with
//! INQUIRY and REPORT LUNS. For a LUN without a disk the standard INQUIRY data says
//! "peripheral qualifier 3, device type 1Fh" (byte 0 = 7Fh), which Linux takes as "no
//! device here". Other commands to such a LUN are better answered at the transport level:
//! storvsc turns `SRB_STATUS_INVALID_LUN` into DID_NO_CONNECT and drops the LUN, which is
//! what a storvsp should send; [`absent_lun`]'s CHECK CONDITION (LOGICAL UNIT NOT
//! SUPPORTED) is the SCSI-level answer for a transport that needs one.

use crate::cdb::{self, Cdb};
use crate::inquiry::{STANDARD_INQUIRY_LEN, parse_inquiry, standard_inquiry};
use crate::sense::{Asc, Outcome, Sense, SenseKey, Xfer, put};

/// Highest LUN REPORT LUNS can encode here (flat space addressing, 14 bits).
pub const MAX_LUN: u16 = 0x3FFF;

/// Peripheral qualifier 3 (no device possible at this LUN), device type 1Fh (unknown).
pub const NO_DEVICE: u8 = 0x7F;

/// Answer REPORT LUNS for a target whose disks sit at `luns` (unsorted, duplicates and LUNs
/// above [`MAX_LUN`] are dropped). SELECT REPORT 00h and 02h list them, 01h (well-known
/// LUNs only) lists none; an allocation length under 16 bytes is refused (SPC-3). A `cdb`
/// that is not REPORT LUNS is refused as an invalid operation code.
pub fn report_luns(cdb: &[u8], luns: &[u16], data_in: &mut [u8]) -> Outcome {
    let result = Cdb::parse(cdb).and_then(|c| {
        if c.op() != cdb::REPORT_LUNS {
            return Err(Sense::invalid_opcode());
        }
        report_luns_into(&c, luns, data_in)
    });
    Outcome::from_result(result, data_in.len(), 0)
}

pub(crate) fn report_luns_into(cdb: &Cdb, luns: &[u16], data_in: &mut [u8]) -> Result<Xfer, Sense> {
    let select = cdb.u8(2);
    let alloc = cdb.be32(6) as usize;
    if alloc < 16 {
        return Err(Sense::invalid_cdb_field(6, None));
    }
    let mut list: Vec<u16> = match select {
        0x00 | 0x02 => luns.iter().copied().filter(|&l| l <= MAX_LUN).collect(),
        0x01 => Vec::new(),
        _ => return Err(Sense::invalid_cdb_field(2, None)),
    };
    list.sort_unstable();
    list.dedup();
    let mut d = Vec::with_capacity(8 + 8 * list.len());
    d.extend_from_slice(&((8 * list.len()) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for lun in list {
        d.extend_from_slice(&encode_lun(lun));
    }
    Ok(Xfer::data_in(put(data_in, &d, alloc)))
}

/// The 8-byte SAM LUN of a single-level LUN: peripheral device addressing below 256, flat
/// space addressing (01b) up to [`MAX_LUN`].
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut l = [0u8; 8];
    if lun < 256 {
        l[1] = lun as u8;
    } else {
        let [hi, lo] = (lun & MAX_LUN).to_be_bytes();
        l[0] = 0x40 | hi;
        l[1] = lo;
    }
    l
}

/// Answer a command addressed to a LUN with no disk: standard INQUIRY returns 36 bytes with
/// byte 0 = [`NO_DEVICE`] and blank identification (VPD pages are refused with INVALID
/// FIELD IN CDB); REQUEST SENSE returns ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED as
/// data with GOOD status; everything else ends in CHECK CONDITION with that sense.
pub fn absent_lun(cdb: &[u8], data_in: &mut [u8]) -> Outcome {
    let not_supported = Sense::new(SenseKey::IllegalRequest, Asc::LOGICAL_UNIT_NOT_SUPPORTED);
    let result = Cdb::parse(cdb).and_then(|c| match c.op() {
        cdb::INQUIRY => {
            let (evpd, _, alloc) = parse_inquiry(&c)?;
            if evpd {
                return Err(Sense::invalid_cdb_field(1, Some(0)));
            }
            let data: [u8; STANDARD_INQUIRY_LEN] = standard_inquiry(NO_DEVICE, false);
            Ok(Xfer::data_in(put(data_in, &data, alloc)))
        }
        cdb::REQUEST_SENSE => {
            if c.u8(1) & 0x01 != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(0)));
            }
            let n = put(data_in, &not_supported.to_fixed(), usize::from(c.u8(4)));
            Ok(Xfer::data_in(n))
        }
        _ => Err(not_supported),
    });
    Outcome::from_result(result, data_in.len(), 0)
}
