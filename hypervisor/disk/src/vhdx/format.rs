//! On-disk constants, GUIDs and little-endian helpers shared by the VHDX modules.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::DiskError;

/// One KiB.
pub const KIB: u64 = 1024;
/// One MiB: the alignment of every VHDX object.
pub const MIB: u64 = 1024 * 1024;
/// The file identifier signature at offset 0.
pub const FILE_ID_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Offsets of the two headers.
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// Size of a header (the CRC covers all of it).
pub const HEADER_SIZE: usize = 4096;
/// Offsets of the two region table copies.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// Size of a region table (the CRC covers all of it).
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// End of the header section (file identifier, headers, region tables).
pub const HEADER_SECTION_END: u64 = MIB;
/// Size of a log sector, and the granularity of log descriptors.
pub const LOG_SECTOR: usize = 4096;
/// The largest virtual disk VHDX allows (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;
/// The largest BAT Parvis loads into memory (64 TiB at 8 MiB blocks, or 8 TiB at 1 MiB).
pub const MAX_BAT_BYTES: u64 = 64 * MIB;
/// The largest log Parvis reads into memory for replay.
pub const MAX_LOG_BYTES: u64 = 64 * MIB;
/// Smallest and largest payload block sizes.
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

/// A Microsoft GUID, stored in its on-disk byte order (first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid([0; 16]);

    /// A GUID from its textual fields (`{d1-d2-d3-d4[0..2]-d4[2..8]}`).
    pub const fn new(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// Read a GUID at `off` of `buf` (which must hold 16 bytes there).
    pub fn read(buf: &[u8], off: usize) -> Self {
        let mut g = [0u8; 16];
        g.copy_from_slice(&buf[off..off + 16]);
        Guid(g)
    }

    /// Whether this is the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A new random (version 4) GUID.
    pub fn random() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut out = [0u8; 16];
        for half in out.chunks_mut(8) {
            let mut h = RandomState::new().build_hasher();
            h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            h.write_u64(now);
            h.write_u32(std::process::id());
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
        out[7] = (out[7] & 0x0f) | 0x40; // version 4 (high nibble of data3)
        out[8] = (out[8] & 0x3f) | 0x80; // RFC 4122 variant
        Guid(out)
    }

    /// Parse `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let s = s.strip_prefix('{').unwrap_or(s);
        let s = s.strip_suffix('}').unwrap_or(s);
        let parts: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
            return None;
        }
        let d1 = u32::from_str_radix(parts[0], 16).ok()?;
        let d2 = u16::from_str_radix(parts[1], 16).ok()?;
        let d3 = u16::from_str_radix(parts[2], 16).ok()?;
        let rest = format!("{}{}", parts[3], parts[4]);
        let mut d4 = [0u8; 8];
        for (i, b) in d4.iter_mut().enumerate() {
            *b = u8::from_str_radix(rest.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(Guid::new(d1, d2, d3, d4))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
        let d2 = u16::from_le_bytes([g[4], g[5]]);
        let d3 = u16::from_le_bytes([g[6], g[7]]);
        write!(f, "{{{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-", g[8], g[9])?;
        for b in &g[10..] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "}}")
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Region: the block allocation table.
pub const BAT_GUID: Guid = Guid::new(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Region: the metadata region.
pub const METADATA_GUID: Guid = Guid::new(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// Metadata item: file parameters (block size, flags).
pub const FILE_PARAMETERS_GUID: Guid = Guid::new(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Metadata item: virtual disk size.
pub const VIRTUAL_DISK_SIZE_GUID: Guid = Guid::new(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Metadata item: SCSI page 83 data (the virtual disk id).
pub const PAGE83_GUID: Guid = Guid::new(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_GUID: Guid = Guid::new(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_GUID: Guid = Guid::new(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Metadata item: parent locator.
pub const PARENT_LOCATOR_GUID: Guid = Guid::new(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// Parent locator type: a VHDX parent.
pub const VHDX_PARENT_TYPE_GUID: Guid = Guid::new(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// Little-endian u16 at `off` (the caller guarantees the bytes exist).
pub fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Little-endian u32 at `off`.
pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Little-endian u64 at `off`.
pub fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Store a little-endian u16 at `off`.
pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Store a little-endian u32 at `off`.
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Store a little-endian u64 at `off`.
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// A [`DiskError::Corrupt`] for `structure` at file offset `offset`.
pub fn corrupt(structure: impl Into<String>, offset: u64, reason: impl Into<String>) -> DiskError {
    DiskError::Corrupt {
        structure: structure.into(),
        offset,
        reason: reason.into(),
    }
}

/// A [`DiskError::Unsupported`].
pub fn unsupported(what: impl Into<String>) -> DiskError {
    DiskError::Unsupported { what: what.into() }
}

/// Maps an I/O error from `op` at `offset` to [`DiskError::Io`].
pub fn io_err(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> DiskError {
    move |source| DiskError::Io { op, offset, source }
}

/// Read `buf.len()` bytes of a structure; a file too short to hold it is corrupt, not an I/O
/// failure.
pub fn read_struct(
    storage: &dyn crate::storage::Storage,
    buf: &mut [u8],
    offset: u64,
    structure: &str,
) -> Result<(), DiskError> {
    storage.read_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(structure, offset, "the file ends inside this structure")
        } else {
            DiskError::Io {
                op: "read",
                offset,
                source: e,
            }
        }
    })
}

/// `v` rounded up to a multiple of `to` (a power of two), or `None` on overflow.
pub fn round_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x & !(to - 1))
}

/// Encode a string as UTF-16LE bytes.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_round_trip() {
        assert_eq!(
            BAT_GUID.to_string(),
            "{2dc27766-f623-4200-9d64-115e9bfd4a08}"
        );
        assert_eq!(
            Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}"),
            Some(BAT_GUID)
        );
        assert_eq!(
            Guid::parse("2dc27766-f623-4200-9d64-115e9bfd4a08"),
            Some(BAT_GUID)
        );
        assert_eq!(Guid::parse("{2dc27766-f623-4200-9d64-115e9bfd4a0}"), None);
        assert_eq!(Guid::parse("{2dc27766-f623-4200-9d64-115e9bfd4a0g}"), None);
        let r = Guid::random();
        assert_ne!(r, Guid::random());
        assert_eq!(Guid::parse(&r.to_string()), Some(r));
    }
}
