//! Command descriptor blocks: operation codes and a bounds-checked view of one CDB.

use crate::sense::Sense;

pub const TEST_UNIT_READY: u8 = 0x00;
pub const REQUEST_SENSE: u8 = 0x03;
pub const READ_6: u8 = 0x08;
pub const WRITE_6: u8 = 0x0A;
pub const INQUIRY: u8 = 0x12;
pub const MODE_SELECT_6: u8 = 0x15;
pub const MODE_SENSE_6: u8 = 0x1A;
pub const START_STOP_UNIT: u8 = 0x1B;
pub const READ_CAPACITY_10: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const WRITE_10: u8 = 0x2A;
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
pub const UNMAP: u8 = 0x42;
pub const MODE_SELECT_10: u8 = 0x55;
pub const MODE_SENSE_10: u8 = 0x5A;
pub const READ_16: u8 = 0x88;
pub const WRITE_16: u8 = 0x8A;
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
pub const WRITE_SAME_16: u8 = 0x93;
pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
pub const REPORT_LUNS: u8 = 0xA0;
pub const READ_12: u8 = 0xA8;
pub const WRITE_12: u8 = 0xAA;

/// SERVICE ACTION IN(16) service action of READ CAPACITY(16).
pub const SA_READ_CAPACITY_16: u8 = 0x10;

/// The longest CDB this disk parses; longer ones (32-byte variable-length commands) have an
/// operation code it refuses anyway.
const MAX_CDB: usize = 16;

/// One CDB, copied into a fixed 16-byte array after its length was checked against its
/// operation code's group, so every field accessor indexes inside the array.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cdb {
    b: [u8; MAX_CDB],
}

impl Cdb {
    /// Check the length the operation code's group needs (SPC "operation code" groups: 0 →
    /// 6 bytes, 1-2 → 10, 4 → 16, 5 → 12) and the control byte. Group 3 (variable length)
    /// and the vendor groups 6-7 are refused as unknown operation codes. Bytes past the
    /// group's length (a transport that always sends 16) are ignored.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Cdb, Sense> {
        let Some(&op) = bytes.first() else {
            return Err(Sense::invalid_opcode());
        };
        let len = match op >> 5 {
            0 => 6,
            1 | 2 => 10,
            4 => 16,
            5 => 12,
            _ => return Err(Sense::invalid_opcode()),
        };
        if bytes.len() < len {
            // The transport delivered less CDB than the operation code implies; the
            // control byte is missing, so point at the first absent byte.
            return Err(Sense::invalid_cdb_field(bytes.len() as u16, None));
        }
        let mut b = [0u8; MAX_CDB];
        b[..len].copy_from_slice(&bytes[..len]);
        let cdb = Cdb { b };
        // Control byte: NACA (bit 2) needs NORMACA support, LINK (bit 0) linked commands;
        // this disk has neither.
        let control = cdb.b[len - 1];
        if control & 0x04 != 0 {
            return Err(Sense::invalid_cdb_field((len - 1) as u16, Some(2)));
        }
        if control & 0x01 != 0 {
            return Err(Sense::invalid_cdb_field((len - 1) as u16, Some(0)));
        }
        Ok(cdb)
    }

    pub(crate) fn op(&self) -> u8 {
        self.b[0]
    }

    pub(crate) fn u8(&self, i: usize) -> u8 {
        self.b[i]
    }

    pub(crate) fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.b[i], self.b[i + 1]])
    }

    pub(crate) fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.b[i], self.b[i + 1], self.b[i + 2], self.b[i + 3]])
    }

    pub(crate) fn be64(&self, i: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.b[i..i + 8]);
        u64::from_be_bytes(a)
    }
}

/// Read a big-endian u16 at `i` of a parameter list the caller has bounds-checked.
pub(crate) fn be16_at(buf: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([buf[i], buf[i + 1]])
}

/// Read a big-endian u32 at `i` of a parameter list the caller has bounds-checked.
pub(crate) fn be32_at(buf: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]])
}

/// Read a big-endian u64 at `i` of a parameter list the caller has bounds-checked.
pub(crate) fn be64_at(buf: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&buf[i..i + 8]);
    u64::from_be_bytes(a)
}
