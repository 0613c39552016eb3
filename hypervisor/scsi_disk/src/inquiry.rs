//! INQUIRY (standard data and the VPD pages) and READ CAPACITY.

use crate::cdb::Cdb;
use crate::sense::{Sense, Xfer, put};
use crate::{MAX_TRANSFER_BYTES, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BYTES, ScsiDisk};

/// T10 vendor identification, product identification and revision of standard INQUIRY
/// data. Azure's udev rules and Linux's storvsc match on "Msft" / "Virtual Disk".
pub(crate) const VENDOR: &[u8; 8] = b"Msft    ";
pub(crate) const PRODUCT: &[u8; 16] = b"Virtual Disk    ";
const REVISION: &[u8; 4] = b"1.0 ";

/// Standard INQUIRY data length (SPC: bytes 0-35; nothing optional after that).
pub(crate) const STANDARD_INQUIRY_LEN: usize = 36;

/// Peripheral device type of a direct-access block device (qualifier 000b).
const DIRECT_ACCESS: u8 = 0x00;

/// VERSION: the disk claims SPC-3.
const VERSION_SPC3: u8 = 0x05;

/// The VPD pages implemented, ascending (page 00h lists exactly these).
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// Length of the Block Limits and Block Device Characteristics pages (page length 3Ch).
const VPD_B0_B1_LEN: usize = 64;

/// Standard INQUIRY data with peripheral byte `peripheral` (qualifier and device type).
/// `identify` fills in vendor, product and revision; otherwise they are blank.
pub(crate) fn standard_inquiry(peripheral: u8, identify: bool) -> [u8; STANDARD_INQUIRY_LEN] {
    let mut d = [b' '; STANDARD_INQUIRY_LEN];
    d[0] = peripheral;
    d[1] = 0x00; // not removable
    d[2] = VERSION_SPC3;
    d[3] = 0x02; // response data format 2
    d[4] = (STANDARD_INQUIRY_LEN - 5) as u8; // additional length
    d[5] = 0x00;
    d[6] = 0x00;
    d[7] = 0x02; // CMDQUE: command queuing
    if identify {
        d[8..16].copy_from_slice(VENDOR);
        d[16..32].copy_from_slice(PRODUCT);
        d[32..36].copy_from_slice(REVISION);
    }
    d
}

/// Parsed INQUIRY CDB: `(evpd, page code, allocation length)`. CMDDT (obsolete) and a page
/// code without EVPD are refused.
pub(crate) fn parse_inquiry(cdb: &Cdb) -> Result<(bool, u8, usize), Sense> {
    let flags = cdb.u8(1);
    if flags & 0x02 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(1)));
    }
    let evpd = flags & 0x01 != 0;
    let page = cdb.u8(2);
    if !evpd && page != 0 {
        return Err(Sense::invalid_cdb_field(2, None));
    }
    Ok((evpd, page, usize::from(cdb.be16(3))))
}

impl ScsiDisk {
    pub(crate) fn inquiry(&self, cdb: &Cdb, data_in: &mut [u8]) -> Result<Xfer, Sense> {
        let (evpd, page, alloc) = parse_inquiry(cdb)?;
        if !evpd {
            let data = standard_inquiry(DIRECT_ACCESS, true);
            return Ok(Xfer::data_in(put(data_in, &data, alloc)));
        }
        let data = match page {
            0x00 => vpd(page, &VPD_PAGES),
            0x80 => vpd(page, self.identity.serial().as_bytes()),
            0x83 => vpd(page, &self.device_identification()),
            0xB0 => vpd(page, &self.block_limits()),
            0xB1 => vpd(page, &block_device_characteristics()),
            0xB2 => vpd(page, &self.logical_block_provisioning()),
            _ => return Err(Sense::invalid_cdb_field(2, None)),
        };
        Ok(Xfer::data_in(put(data_in, &data, alloc)))
    }

    /// VPD 83h: one designator, the NAA WWN, associated with the logical unit. No T10
    /// vendor ID designator beside it: Linux ranks a locally assigned NAA (3h) no higher
    /// than a T10 vendor ID and then takes the longer one, so `/sys/block/*/device/wwid` and
    /// udev's `wwn-` links would show the vendor string instead of the WWN.
    fn device_identification(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(12);
        // Code set 1 (binary); association 0 (LU), designator type 3 (NAA); 8 bytes.
        d.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
        d.extend_from_slice(&self.identity.wwn().to_be_bytes());
        d
    }

    /// VPD B0h (SBC-3 Block Limits), the page body after the 4-byte header.
    fn block_limits(&self) -> [u8; VPD_B0_B1_LEN - 4] {
        let mut p = [0u8; VPD_B0_B1_LEN - 4];
        let bs = u64::from(self.block_size());
        // Offsets below are page offsets minus the 4-byte header.
        // Byte 4: WSNZ: WRITE SAME with 0 blocks is refused.
        p[0] = 0x01;
        // Bytes 6-7: optimal transfer length granularity = one physical block.
        p[2..4].copy_from_slice(&(1u16 << self.phys_exponent).to_be_bytes());
        // Bytes 8-11: maximum transfer length. Bytes 12-15 (optimal transfer length) 0:
        // not reported.
        let max_xfer = (MAX_TRANSFER_BYTES as u64 / bs) as u32;
        p[4..8].copy_from_slice(&max_xfer.to_be_bytes());
        if self.unmap_enabled() {
            // Bytes 20-23: maximum unmap LBA count; 24-27: maximum descriptor count.
            p[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
            p[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            // Bytes 28-31: optimal unmap granularity: a physical block, at least 4 KiB
            // (what a host filesystem can punch); 32-35: UGAVALID with alignment 0.
            let phys = bs << self.phys_exponent;
            let granularity = (phys.max(4096) / bs) as u32;
            p[24..28].copy_from_slice(&granularity.to_be_bytes());
            p[28] = 0x80;
        }
        if self.options.write_same_16 {
            // Bytes 36-43: maximum WRITE SAME length.
            p[32..40].copy_from_slice(&(MAX_WRITE_SAME_BYTES / bs).to_be_bytes());
        }
        p
    }

    /// VPD B2h (Logical Block Provisioning), the body after the header.
    fn logical_block_provisioning(&self) -> [u8; 4] {
        let mut p = [0u8; 4];
        // Byte 4: threshold exponent 0 (no thresholds).
        if self.unmap_enabled() {
            // Byte 5: LBPU; LBPWS when WRITE SAME(16) is accepted. LBPRZ 0: unmapped
            // blocks read back unspecified data (the backend's discard contract).
            p[1] = 0x80;
            if self.options.write_same_16 {
                p[1] |= 0x40;
            }
            // Byte 6: provisioning type 2 (thin).
            p[2] = 0x02;
        }
        p
    }

    pub(crate) fn read_capacity_10(&self, cdb: &Cdb, data_in: &mut [u8]) -> Result<Xfer, Sense> {
        // PMI (byte 8 bit 0) is obsolete; without it the LBA field must be 0.
        if cdb.u8(8) & 0x01 == 0 && cdb.be32(2) != 0 {
            return Err(Sense::invalid_cdb_field(2, None));
        }
        let last = self.capacity_blocks().saturating_sub(1);
        // A disk with more than 2^32 blocks reports FFFFFFFFh: use READ CAPACITY(16).
        let last = u32::try_from(last).unwrap_or(u32::MAX);
        let mut d = [0u8; 8];
        d[0..4].copy_from_slice(&last.to_be_bytes());
        d[4..8].copy_from_slice(&self.block_size().to_be_bytes());
        Ok(Xfer::data_in(put(data_in, &d, d.len())))
    }

    pub(crate) fn read_capacity_16(&self, cdb: &Cdb, data_in: &mut [u8]) -> Result<Xfer, Sense> {
        if cdb.u8(14) & 0x01 == 0 && cdb.be64(2) != 0 {
            return Err(Sense::invalid_cdb_field(2, None));
        }
        let alloc = cdb.be32(10) as usize;
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&self.capacity_blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.block_size().to_be_bytes());
        // Byte 12: no protection. Byte 13: logical blocks per physical block exponent.
        d[13] = self.phys_exponent & 0x0F;
        // Byte 14: LBPME (LBPRZ 0); lowest aligned LBA 0.
        if self.unmap_enabled() {
            d[14] = 0x80;
        }
        Ok(Xfer::data_in(put(data_in, &d, alloc)))
    }
}

/// A VPD page: the 4-byte header (device type, page code, page length) and `body`.
fn vpd(page: u8, body: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + body.len());
    d.push(DIRECT_ACCESS);
    d.push(page);
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// VPD B1h (Block Device Characteristics): medium rotation rate 1 = non-rotating.
fn block_device_characteristics() -> [u8; VPD_B0_B1_LEN - 4] {
    let mut p = [0u8; VPD_B0_B1_LEN - 4];
    p[0..2].copy_from_slice(&1u16.to_be_bytes());
    p
}
