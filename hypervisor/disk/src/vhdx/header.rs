//! The file identifier and the two VHDX headers.
//!
//! A header is 4 KiB (CRC-32C over all of it, checksum field zeroed) holding a sequence
//! number, the FileWriteGuid, DataWriteGuid and LogGuid, the log version (0), the format
//! version (1) and the log's place. Of the two copies the valid one with the higher sequence
//! number is current; an update writes the *other* copy with sequence + 1 and flushes, so a
//! torn write leaves the current header intact.

use super::crc;
use super::format::{
    FILE_ID_SIGNATURE, Guid, HEADER_OFFSETS, HEADER_SECTION_END, HEADER_SIZE, MIB, corrupt, io_err,
    le16, le32, le64, put16, put32, put64, read_struct, utf16le,
};
use crate::DiskError;
use crate::storage::Storage;

/// The header signature, "head".
const SIGNATURE: &[u8; 4] = b"head";

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Sequence number; the higher valid one is current.
    pub sequence: u64,
    /// Changed before the first write to the file in a session.
    pub file_write_guid: Guid,
    /// Changed before the first change visible through the virtual disk.
    pub data_write_guid: Guid,
    /// Non-zero: the log holds entries with this GUID that must be replayed.
    pub log_guid: Guid,
    /// Log format version (0).
    pub log_version: u16,
    /// File format version (1).
    pub version: u16,
    /// Log length in bytes (a multiple of 1 MiB).
    pub log_length: u32,
    /// Log offset in bytes (a multiple of 1 MiB, at least 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parse a header; `None` if its signature, checksum or version is wrong.
    pub fn parse(buf: &[u8]) -> Option<Header> {
        if buf.len() != HEADER_SIZE || &buf[0..4] != SIGNATURE || !crc::verify(buf, 4) {
            return None;
        }
        let h = Header {
            sequence: le64(buf, 8),
            file_write_guid: Guid::read(buf, 16),
            data_write_guid: Guid::read(buf, 32),
            log_guid: Guid::read(buf, 48),
            log_version: le16(buf, 64),
            version: le16(buf, 66),
            log_length: le32(buf, 68),
            log_offset: le64(buf, 72),
        };
        (h.version == 1).then_some(h)
    }

    /// The 4 KiB on-disk form, checksum included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(SIGNATURE);
        put64(&mut b, 8, self.sequence);
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        put16(&mut b, 64, self.log_version);
        put16(&mut b, 66, self.version);
        put32(&mut b, 68, self.log_length);
        put64(&mut b, 72, self.log_offset);
        crc::seal(&mut b, 4);
        b
    }

    /// Check the fields that describe the log's place; `offset` is where this header is.
    pub fn validate(&self, offset: u64) -> Result<(), DiskError> {
        let bad = |reason: String| Err(corrupt("VHDX header", offset, reason));
        if self.log_version != 0 {
            return bad(format!("log version {} (expected 0)", self.log_version));
        }
        let len = u64::from(self.log_length);
        if !len.is_multiple_of(MIB) || !self.log_offset.is_multiple_of(MIB) {
            return bad(format!(
                "log at {:#x} of {len:#x} bytes is not 1 MiB aligned",
                self.log_offset
            ));
        }
        if len > 0 && self.log_offset < HEADER_SECTION_END {
            return bad(format!(
                "log at {:#x} overlaps the header section",
                self.log_offset
            ));
        }
        if self.log_offset.checked_add(len).is_none() {
            return bad("log end overflows".into());
        }
        Ok(())
    }
}

/// Which header is current, and its contents.
#[derive(Debug, Clone)]
pub struct Headers {
    /// The current header.
    pub current: Header,
    /// Its index: 0 (at 64 KiB) or 1 (at 128 KiB).
    pub index: usize,
    /// Whether the other copy is valid too (for `check`).
    pub other_valid: bool,
}

/// Check the file identifier.
pub fn check_file_identifier(storage: &dyn Storage) -> Result<(), DiskError> {
    let mut sig = [0u8; 8];
    read_struct(storage, &mut sig, 0, "VHDX file identifier")?;
    if &sig != FILE_ID_SIGNATURE {
        return Err(corrupt(
            "VHDX file identifier",
            0,
            "signature is not \"vhdxfile\"",
        ));
    }
    Ok(())
}

/// The creator string stored in the file identifier (diagnostic only).
pub fn read_creator(storage: &dyn Storage) -> String {
    let mut b = [0u8; 512];
    if storage.read_at(&mut b, 8).is_err() {
        return String::new();
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// The 64 KiB file identifier block naming `creator`.
pub fn file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 64 * 1024];
    b[0..8].copy_from_slice(FILE_ID_SIGNATURE);
    let c = utf16le(creator);
    let n = c.len().min(510);
    b[8..8 + n].copy_from_slice(&c[..n]);
    b
}

/// Read both headers and choose the current one.
pub fn read_headers(storage: &dyn Storage) -> Result<Headers, DiskError> {
    let mut parsed = [None, None];
    for (i, &off) in HEADER_OFFSETS.iter().enumerate() {
        let mut buf = vec![0u8; HEADER_SIZE];
        read_struct(storage, &mut buf, off, "VHDX header")?;
        parsed[i] = Header::parse(&buf);
    }
    let [h0, h1] = parsed;
    let (current, index, other_valid) = match (h0, h1) {
        (None, None) => {
            return Err(corrupt(
                "VHDX header",
                HEADER_OFFSETS[0],
                "neither header has a valid signature, checksum and version",
            ));
        }
        (Some(a), None) => (a, 0, false),
        (None, Some(b)) => (b, 1, false),
        (Some(a), Some(b)) => {
            if a.sequence > b.sequence {
                (a, 0, true)
            } else if b.sequence > a.sequence {
                (b, 1, true)
            } else if a == b {
                // Disk2VHD writes two identical headers with equal sequence numbers.
                (a, 0, true)
            } else {
                return Err(corrupt(
                    "VHDX header",
                    HEADER_OFFSETS[1],
                    "both headers are valid with the same sequence number but differ",
                ));
            }
        }
    };
    current.validate(HEADER_OFFSETS[index])?;
    Ok(Headers {
        current,
        index,
        other_valid,
    })
}

/// Write `new` as the next header: into the non-current slot with the sequence number after
/// the current one, then flush. Updates `headers` to point at it.
pub fn update(
    storage: &dyn Storage,
    headers: &mut Headers,
    mut new: Header,
) -> Result<(), DiskError> {
    let slot = 1 - headers.index;
    new.sequence = headers.current.sequence.wrapping_add(1);
    let off = HEADER_OFFSETS[slot];
    storage
        .write_at(&new.to_bytes(), off)
        .map_err(io_err("write VHDX header", off))?;
    storage.sync().map_err(io_err("flush VHDX header", off))?;
    headers.current = new;
    headers.index = slot;
    headers.other_valid = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn sample(seq: u64) -> Header {
        Header {
            sequence: seq,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn chooses_highest_valid_sequence() {
        let s = MemStorage::new(vec![0; 1 << 20], 1 << 20);
        s.write_at(&sample(5).to_bytes(), HEADER_OFFSETS[0])
            .unwrap();
        s.write_at(&sample(9).to_bytes(), HEADER_OFFSETS[1])
            .unwrap();
        let h = read_headers(&s).unwrap();
        assert_eq!((h.index, h.current.sequence), (1, 9));
        // Damage the newer one: the older wins.
        s.write_at(&[1], HEADER_OFFSETS[1] + 100).unwrap();
        let mut h = read_headers(&s).unwrap();
        assert_eq!((h.index, h.current.sequence), (0, 5));
        let next = h.current.clone();
        update(&s, &mut h, next).unwrap();
        let h2 = read_headers(&s).unwrap();
        assert_eq!((h2.index, h2.current.sequence), (1, 6));
        // Equal sequence numbers with different contents are corrupt.
        s.write_at(&sample(6).to_bytes(), HEADER_OFFSETS[0])
            .unwrap();
        assert!(matches!(read_headers(&s), Err(DiskError::Corrupt { .. })));
        s.write_at(&[0; 8192], HEADER_OFFSETS[0]).unwrap();
        s.write_at(&[0; 8192], HEADER_OFFSETS[1]).unwrap();
        assert!(matches!(read_headers(&s), Err(DiskError::Corrupt { .. })));
    }
}
