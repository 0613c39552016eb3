//! The storvsc ↔ storvsp wire format (Linux `drivers/scsi/storvsc_drv.c`; IMPORTED-GUESTS.md
//! §2.1): every message is a 64-byte `vstor_packet` (operation, flags, status, then a 52-byte
//! union), inband or, for an SRB with data, GPA-direct. Parsing never trusts a length.

/// `vstor_packet` operations.
pub mod op {
    pub const COMPLETE_IO: u32 = 1;
    pub const REMOVE_DEVICE: u32 = 2;
    pub const EXECUTE_SRB: u32 = 3;
    pub const RESET_LUN: u32 = 4;
    pub const RESET_ADAPTER: u32 = 5;
    pub const RESET_BUS: u32 = 6;
    pub const BEGIN_INITIALIZATION: u32 = 7;
    pub const END_INITIALIZATION: u32 = 8;
    pub const QUERY_PROTOCOL_VERSION: u32 = 9;
    pub const QUERY_PROPERTIES: u32 = 10;
    pub const ENUMERATE_BUS: u32 = 11;
    pub const FCHBA_DATA: u32 = 12;
    pub const CREATE_SUB_CHANNELS: u32 = 13;
}

/// NT status codes the host puts in `vstor_packet.status` (0 = success).
pub mod status {
    pub const SUCCESS: u32 = 0;
    /// STATUS_INVALID_PARAMETER.
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    /// STATUS_REVISION_MISMATCH: a protocol version we do not speak.
    pub const REVISION_MISMATCH: u32 = 0xC000_0059;
    /// STATUS_INVALID_DEVICE_STATE: an operation out of order.
    pub const INVALID_DEVICE_STATE: u32 = 0xC000_0184;
    /// STATUS_NOT_SUPPORTED.
    pub const NOT_SUPPORTED: u32 = 0xC000_00BB;
}

/// SRB status bytes (`vmscsi_request.srb_status`).
pub mod srb_status {
    pub const SUCCESS: u8 = 0x01;
    pub const ERROR: u8 = 0x04;
    pub const INVALID_REQUEST: u8 = 0x06;
    pub const INVALID_LUN: u8 = 0x20;
    pub const AUTOSENSE_VALID: u8 = 0x80;
}

/// Protocol versions (major << 8 | minor).
pub mod version {
    /// Windows 8: the first with the 52-byte SRB and the 20-byte sense buffer.
    pub const WIN8: u16 = 0x0501;
    /// Windows 8.1.
    pub const WIN8_1: u16 = 0x0600;
    /// Windows 10: Linux then sends WRITE SAME(16) to "Msft" disks; not offered until that
    /// path is tested end to end.
    pub const WIN10: u16 = 0x0602;
    /// What this storvsp accepts.
    pub const ACCEPTED: [u16; 2] = [WIN8_1, WIN8];
}

/// Size of a `vstor_packet`.
pub const PACKET_LEN: usize = 64;
/// Offset of the union in a `vstor_packet`.
const UNION: usize = 12;
/// Size of a `vmscsi_request` with the Windows 8 extension.
pub const SRB_LEN: usize = 52;
/// Shortest SRB accepted: without the Windows 8 extension (which only carries hints).
const SRB_MIN_LEN: usize = 36;
/// The CDB / sense area of an SRB.
pub const CDB_AREA: usize = 20;
/// Longest CDB (STORVSC_MAX_CMD_LEN).
pub const MAX_CDB: usize = 16;

/// `vmscsi_request.data_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Guest → disk (WRITE_TYPE 0).
    Out,
    /// Disk → guest (READ_TYPE 1).
    In,
    /// No data (UNKNOWN_TYPE 2).
    None,
}

/// The guest's SCSI request block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srb {
    /// The request's 52 bytes as sent (zero-extended), echoed in the completion.
    pub raw: [u8; SRB_LEN],
    pub path_id: u8,
    pub target_id: u8,
    pub lun: u8,
    pub cdb: [u8; MAX_CDB],
    pub cdb_len: u8,
    /// Sense bytes the guest can take.
    pub sense_len: u8,
    pub direction: Direction,
    /// Bytes in the guest's data buffer.
    pub transfer_len: u32,
}

/// A guest message that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("a {0}-byte storage packet is shorter than its header")]
    Short(usize),
    #[error("an SRB packet of {0} bytes is too short for its request block")]
    ShortSrb(usize),
    #[error("CDB length {0} is outside 1..=16")]
    CdbLength(u8),
    #[error("data direction {0} is not 0, 1 or 2")]
    Direction(u8),
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// A `vstor_packet` header: operation, flags, status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub operation: u32,
    pub flags: u32,
}

/// The header of a guest packet.
pub fn header(payload: &[u8]) -> Result<Header, ProtocolError> {
    if payload.len() < UNION {
        return Err(ProtocolError::Short(payload.len()));
    }
    Ok(Header {
        operation: u32_at(payload, 0),
        flags: u32_at(payload, 4),
    })
}

/// The version a QUERY_PROTOCOL_VERSION asks for (0 if the packet is too short to say).
pub fn requested_version(payload: &[u8]) -> u16 {
    if payload.len() < UNION + 2 {
        return 0;
    }
    u16_at(payload, UNION)
}

/// The SRB of an EXECUTE_SRB packet.
pub fn parse_srb(payload: &[u8]) -> Result<Srb, ProtocolError> {
    let body = payload.get(UNION..).unwrap_or(&[]);
    if body.len() < SRB_MIN_LEN {
        return Err(ProtocolError::ShortSrb(payload.len()));
    }
    let mut raw = [0u8; SRB_LEN];
    let n = body.len().min(SRB_LEN);
    raw[..n].copy_from_slice(&body[..n]);
    let cdb_len = raw[8];
    if cdb_len == 0 || usize::from(cdb_len) > MAX_CDB {
        return Err(ProtocolError::CdbLength(cdb_len));
    }
    let direction = match raw[10] {
        0 => Direction::Out,
        1 => Direction::In,
        2 => Direction::None,
        d => return Err(ProtocolError::Direction(d)),
    };
    let mut cdb = [0u8; MAX_CDB];
    cdb[..usize::from(cdb_len)].copy_from_slice(&raw[16..16 + usize::from(cdb_len)]);
    Ok(Srb {
        path_id: raw[5],
        target_id: raw[6],
        lun: raw[7],
        cdb,
        cdb_len,
        sense_len: raw[9],
        direction,
        transfer_len: u32_at(&raw, 12),
        raw,
    })
}

impl Srb {
    /// The CDB bytes the guest sent.
    pub fn cdb(&self) -> &[u8] {
        &self.cdb[..usize::from(self.cdb_len)]
    }
}

/// How an SRB ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrbResult {
    pub srb_status: u8,
    pub scsi_status: u8,
    /// Bytes moved (the guest computes the residual from it).
    pub transferred: u32,
    /// Sense data, sent with AUTOSENSE_VALID.
    pub sense: Option<Vec<u8>>,
}

impl SrbResult {
    /// Answered at the transport level, no SCSI status: an absent LUN or a request the
    /// controller refuses.
    pub fn transport(srb_status: u8) -> Self {
        SrbResult {
            srb_status,
            scsi_status: 0,
            transferred: 0,
            sense: None,
        }
    }
}

fn packet(operation: u32, status: u32) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0..4].copy_from_slice(&operation.to_le_bytes());
    p[8..12].copy_from_slice(&status.to_le_bytes());
    p
}

/// A completion for a control operation: COMPLETE_IO with `status`.
pub fn complete(status: u32) -> [u8; PACKET_LEN] {
    packet(op::COMPLETE_IO, status)
}

/// The completion of QUERY_PROTOCOL_VERSION, echoing the version asked for.
pub fn complete_version(status: u32, asked: u16) -> [u8; PACKET_LEN] {
    let mut p = packet(op::COMPLETE_IO, status);
    p[UNION..UNION + 2].copy_from_slice(&asked.to_le_bytes());
    p
}

/// The completion of QUERY_PROPERTIES (`vmstorage_channel_properties`).
pub fn complete_properties(max_channels: u16, flags: u32, max_transfer: u32) -> [u8; PACKET_LEN] {
    let mut p = packet(op::COMPLETE_IO, status::SUCCESS);
    p[UNION + 4..UNION + 6].copy_from_slice(&max_channels.to_le_bytes());
    p[UNION + 8..UNION + 12].copy_from_slice(&flags.to_le_bytes());
    p[UNION + 12..UNION + 16].copy_from_slice(&max_transfer.to_le_bytes());
    p
}

/// The completion of an SRB: the request block echoed with its outcome.
pub fn complete_srb(srb: &Srb, r: &SrbResult) -> [u8; PACKET_LEN] {
    let mut p = packet(op::COMPLETE_IO, status::SUCCESS);
    let mut b = srb.raw;
    b[2] = r.srb_status;
    b[3] = r.scsi_status;
    b[12..16].copy_from_slice(&r.transferred.to_le_bytes());
    match &r.sense {
        Some(s) => {
            let n = s.len().min(usize::from(srb.sense_len)).min(CDB_AREA);
            b[16..16 + CDB_AREA].fill(0);
            b[16..16 + n].copy_from_slice(&s[..n]);
            b[9] = n as u8;
            b[2] |= srb_status::AUTOSENSE_VALID;
        }
        None => b[9] = 0,
    }
    p[UNION..UNION + SRB_LEN].copy_from_slice(&b);
    p
}

/// The host's unsolicited "scan the bus again" (sent with transaction id 0).
pub fn enumerate_bus() -> [u8; PACKET_LEN] {
    packet(op::ENUMERATE_BUS, status::SUCCESS)
}

/// An EXECUTE_SRB packet as storvsc_queuecommand builds it (for tests).
#[cfg(test)]
pub(crate) fn srb_packet(lun: u8, cdb: &[u8], dir: u8, len: u32) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0..4].copy_from_slice(&op::EXECUTE_SRB.to_le_bytes());
    p[4..8].copy_from_slice(&1u32.to_le_bytes());
    let s = &mut p[UNION..];
    s[0..2].copy_from_slice(&(SRB_LEN as u16).to_le_bytes());
    s[7] = lun;
    s[8] = cdb.len() as u8;
    s[9] = 20;
    s[10] = dir;
    s[12..16].copy_from_slice(&len.to_le_bytes());
    s[16..16 + cdb.len()].copy_from_slice(cdb);
    s[40..44].copy_from_slice(&0x40u32.to_le_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_request_block_linux_sends() {
        let p = srb_packet(3, &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0], 1, 4096);
        let s = parse_srb(&p).unwrap();
        assert_eq!((s.path_id, s.target_id, s.lun), (0, 0, 3));
        assert_eq!(s.cdb(), &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]);
        assert_eq!(
            (s.direction, s.transfer_len, s.sense_len),
            (Direction::In, 4096, 20)
        );
        assert_eq!(header(&p).unwrap().operation, op::EXECUTE_SRB);
    }

    #[test]
    fn refuses_malformed_request_blocks() {
        assert_eq!(header(&[0; 11]), Err(ProtocolError::Short(11)));
        assert_eq!(parse_srb(&[0; 40]), Err(ProtocolError::ShortSrb(40)));
        let mut p = srb_packet(0, &[0], 2, 0);
        p[UNION + 8] = 17;
        assert_eq!(parse_srb(&p), Err(ProtocolError::CdbLength(17)));
        p[UNION + 8] = 0;
        assert_eq!(parse_srb(&p), Err(ProtocolError::CdbLength(0)));
        let mut p = srb_packet(0, &[0], 3, 0);
        assert_eq!(parse_srb(&p), Err(ProtocolError::Direction(3)));
        // A pre-Windows 8 request block (36 bytes) is zero-extended.
        p[UNION + 10] = 2;
        let s = parse_srb(&p[..UNION + 36]).unwrap();
        assert_eq!(s.raw[36..], [0; 16]);
    }

    #[test]
    fn completions_echo_the_request_with_status_length_and_sense() {
        let p = srb_packet(1, &[0x12, 0, 0, 0, 36, 0], 1, 255);
        let s = parse_srb(&p).unwrap();
        let c = complete_srb(
            &s,
            &SrbResult {
                srb_status: srb_status::ERROR,
                scsi_status: 2,
                transferred: 0,
                sense: Some(vec![0x70; 18]),
            },
        );
        assert_eq!(u32_at(&c, 0), op::COMPLETE_IO);
        assert_eq!(u32_at(&c, 8), 0);
        let b = &c[UNION..];
        assert_eq!(b[2], srb_status::ERROR | srb_status::AUTOSENSE_VALID);
        assert_eq!((b[3], b[7], b[9]), (2, 1, 18));
        assert_eq!(u32_at(b, 12), 0);
        assert_eq!(&b[16..34], &[0x70; 18]);
        assert_eq!(&b[34..36], &[0, 0]);
        // Sense is cut to what the guest can take.
        let mut short = s.clone();
        short.sense_len = 8;
        let c = complete_srb(
            &short,
            &SrbResult {
                srb_status: srb_status::ERROR,
                scsi_status: 2,
                transferred: 0,
                sense: Some(vec![0x70; 18]),
            },
        );
        assert_eq!(c[UNION + 9], 8);
        assert_eq!(&c[UNION + 24..UNION + 34], &[0; 10]);
    }

    #[test]
    fn properties_and_version_layouts() {
        let p = complete_properties(0, 0, 0x10_0000);
        assert_eq!(u32_at(&p, UNION + 12), 0x10_0000);
        assert_eq!(u16_at(&p, UNION + 4), 0);
        let v = complete_version(status::REVISION_MISMATCH, version::WIN10);
        assert_eq!(u32_at(&v, 8), status::REVISION_MISMATCH);
        assert_eq!(u16_at(&v, UNION), 0x0602);
        assert_eq!(requested_version(&v), 0x0602);
        assert_eq!(requested_version(&v[..13]), 0);
    }
}
