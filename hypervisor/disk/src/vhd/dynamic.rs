//! The dynamic disk header (cookie `cxsparse`, 1024 bytes, big-endian) and the block
//! allocation table (BAT) of dynamic and differencing VHDs.
//!
//! | off | len | field |
//! |----:|----:|-------|
//! |   0 |   8 | cookie `cxsparse` |
//! |   8 |   8 | data offset (unused, all ones) |
//! |  16 |   8 | table (BAT) offset |
//! |  24 |   4 | header version `0x00010000` |
//! |  28 |   4 | max table entries |
//! |  32 |   4 | block size |
//! |  36 |   4 | checksum |
//! |  40 |  16 | parent unique id |
//! |  56 |   4 | parent timestamp |
//! |  64 | 512 | parent unicode name (UTF-16 big-endian) |
//! | 576 | 8×24 | parent locators: platform code, data space, data length, reserved, data offset |

use super::footer::{be32, be64, checksum, corrupt};
use crate::DiskError;
use crate::storage::Storage;

/// Size of the dynamic header.
pub const HEADER_SIZE: usize = 1024;
/// Header cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// BAT value of an unallocated block.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// Smallest accepted block size: one byte of sector bitmap.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest accepted block size.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest accepted BAT, in entries (16 MiB of table: 2040 GiB at 512 KiB blocks).
pub const MAX_BAT_ENTRIES: u32 = 4 << 20;
/// Largest parent locator payload Parvis reads.
pub const MAX_LOCATOR_LEN: u32 = 64 * 1024;

const CHECKSUM_OFF: usize = 36;

/// Platform code: Windows absolute path, UTF-16LE.
pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// Platform code: Windows relative path, UTF-16LE.
pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
/// Platform code: Mac OS X file URL, UTF-8.
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");

/// One parent locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    /// Platform code (`W2ku`, `W2ru`, `MacX`, ... as a big-endian u32).
    pub platform: u32,
    /// Platform data space as stored (bytes for Windows tools, sectors per the spec).
    pub data_space: u32,
    /// Length of the locator payload in bytes.
    pub data_length: u32,
    /// File offset of the payload.
    pub data_offset: u64,
}

/// A parsed dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    /// The bytes, with a valid checksum.
    pub raw: Box<[u8; HEADER_SIZE]>,
    /// File offset of the BAT.
    pub table_offset: u64,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes (a power of two).
    pub block_size: u32,
    /// Parent's unique id (differencing disks).
    pub parent_uuid: [u8; 16],
    /// Parent's modification time (VHD epoch).
    pub parent_timestamp: u32,
    /// Parent file name, decoded from UTF-16BE (empty when absent).
    pub parent_name: String,
    /// Non-empty locator entries.
    pub locators: Vec<Locator>,
}

impl DynHeader {
    /// Parse and validate the header read at `offset`.
    pub fn parse(buf: &[u8; HEADER_SIZE], offset: u64) -> Result<Self, DiskError> {
        const S: &str = "VHD dynamic header";
        if &buf[..8] != HEADER_COOKIE {
            return Err(corrupt(S, offset, "no \"cxsparse\" cookie"));
        }
        let stored = be32(buf, CHECKSUM_OFF);
        let computed = checksum(buf, CHECKSUM_OFF);
        if stored != computed {
            return Err(corrupt(
                S,
                offset,
                format!("checksum {stored:#010x} does not match computed {computed:#010x}"),
            ));
        }
        let block_size = be32(buf, 32);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(corrupt(
                S,
                offset,
                format!("block size {block_size} is not a power of two from 4 KiB to 256 MiB"),
            ));
        }
        let max_table_entries = be32(buf, 28);
        if max_table_entries > MAX_BAT_ENTRIES {
            return Err(corrupt(
                S,
                offset,
                format!("{max_table_entries} BAT entries exceed the limit of {MAX_BAT_ENTRIES}"),
            ));
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&buf[40..56]);
        let name_units: Vec<u16> = buf[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let locators = (0..8)
            .map(|i| {
                let b = &buf[576 + i * 24..576 + (i + 1) * 24];
                Locator {
                    platform: be32(b, 0),
                    data_space: be32(b, 4),
                    data_length: be32(b, 8),
                    data_offset: be64(b, 16),
                }
            })
            .filter(|l| l.platform != 0)
            .collect();
        Ok(Self {
            raw: Box::new(*buf),
            table_offset: be64(buf, 16),
            max_table_entries,
            block_size,
            parent_uuid,
            parent_timestamp: be32(buf, 56),
            parent_name: String::from_utf16_lossy(&name_units),
            locators,
        })
    }

    /// Bytes of the per-block sector bitmap, padded to whole sectors.
    pub fn bitmap_size(&self) -> u32 {
        bitmap_size(self.block_size)
    }
}

/// Bytes of the sector bitmap of a block of `block_size` bytes, padded to whole sectors.
pub fn bitmap_size(block_size: u32) -> u32 {
    (block_size / 512 / 8).div_ceil(512) * 512
}

/// Everything needed to build a new dynamic header.
pub struct NewHeader<'a> {
    /// BAT offset.
    pub table_offset: u64,
    /// BAT entries.
    pub max_table_entries: u32,
    /// Block size.
    pub block_size: u32,
    /// Parent unique id (zeros for a dynamic disk).
    pub parent_uuid: [u8; 16],
    /// Parent timestamp.
    pub parent_timestamp: u32,
    /// Parent file name (truncated to 255 UTF-16 units).
    pub parent_name: &'a str,
    /// Locators.
    pub locators: &'a [Locator],
}

impl NewHeader<'_> {
    /// Serialise with a valid checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_uuid);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, u) in self.parent_name.encode_utf16().take(255).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().take(8).enumerate() {
            let e = &mut b[576 + i * 24..576 + (i + 1) * 24];
            e[0..4].copy_from_slice(&l.platform.to_be_bytes());
            e[4..8].copy_from_slice(&l.data_space.to_be_bytes());
            e[8..12].copy_from_slice(&l.data_length.to_be_bytes());
            e[16..24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let sum = checksum(&b, CHECKSUM_OFF);
        b[CHECKSUM_OFF..CHECKSUM_OFF + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// Read `entries` big-endian BAT entries at `offset`, in bounded chunks. The caller has
/// checked that the table lies inside the file, so the allocation is bounded by the file.
pub fn read_bat(storage: &dyn Storage, offset: u64, entries: u32) -> Result<Vec<u32>, DiskError> {
    const CHUNK: usize = 1 << 20;
    let total = entries as usize * 4;
    let mut bat = Vec::with_capacity(entries as usize);
    let mut buf = vec![0u8; CHUNK.min(total)];
    let mut done = 0usize;
    while done < total {
        let n = CHUNK.min(total - done);
        let at = offset + done as u64;
        storage
            .read_at(&mut buf[..n], at)
            .map_err(|source| DiskError::Io {
                op: "read VHD BAT",
                offset: at,
                source,
            })?;
        bat.extend(buf[..n].chunks_exact(4).map(|c| be32(c, 0)));
        done += n;
    }
    Ok(bat)
}

/// A byte range of the file occupied by a metadata structure, for overlap checks.
#[derive(Debug, Clone)]
pub struct Region {
    /// What it is ("VHD dynamic header", ...).
    pub name: String,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Check the allocated BAT entries: each block (bitmap + data) must lie within
/// `data_end` (the file length less the trailing footer), must not overlap a metadata
/// region and must not overlap another block. Returns the end of the last block (or 0).
pub fn validate_bat(
    bat: &[u32],
    bat_offset: u64,
    block_size: u32,
    data_end: u64,
    regions: &[Region],
) -> Result<u64, DiskError> {
    let span = u64::from(bitmap_size(block_size)) + u64::from(block_size);
    let mut blocks: Vec<(u64, usize)> = Vec::new();
    let mut last_end = 0;
    for (i, &e) in bat.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let structure = || format!("VHD BAT entry {i}");
        let at = bat_offset + 4 * i as u64;
        let start = u64::from(e) * 512;
        let end = start + span;
        if end > data_end {
            return Err(corrupt(
                structure(),
                at,
                format!(
                    "block at {start:#x}..{end:#x} lies past the end of the data ({data_end:#x})"
                ),
            ));
        }
        if let Some(r) = regions.iter().find(|r| start < r.end && r.start < end) {
            return Err(corrupt(
                structure(),
                at,
                format!("block at {start:#x}..{end:#x} overlaps the {}", r.name),
            ));
        }
        blocks.push((start, i));
        last_end = last_end.max(end);
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        let (a, ia) = w[0];
        let (b, ib) = w[1];
        if b < a + span {
            let (i, other) = if ia > ib { (ia, ib) } else { (ib, ia) };
            return Err(corrupt(
                format!("VHD BAT entry {i}"),
                bat_offset + 4 * i as u64,
                format!("block overlaps the block of BAT entry {other}"),
            ));
        }
    }
    Ok(last_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let loc = Locator {
            platform: PLAT_W2RU,
            data_space: 512,
            data_length: 20,
            data_offset: 4096,
        };
        let b = NewHeader {
            table_offset: 1536,
            max_table_entries: 10,
            block_size: 2 << 20,
            parent_uuid: [3; 16],
            parent_timestamp: 77,
            parent_name: "base.vhd",
            locators: &[loc],
        }
        .to_bytes();
        let h = DynHeader::parse(&b, 512).unwrap();
        assert_eq!(h.table_offset, 1536);
        assert_eq!(h.max_table_entries, 10);
        assert_eq!(h.bitmap_size(), 512);
        assert_eq!(h.parent_name, "base.vhd");
        assert_eq!(h.locators, vec![loc]);
        assert_eq!(h.parent_timestamp, 77);
        let mut bad = b;
        bad[32..36].copy_from_slice(&3000u32.to_be_bytes());
        assert!(DynHeader::parse(&bad, 512).is_err());
    }

    #[test]
    fn bitmap_sizes() {
        assert_eq!(bitmap_size(4096), 512);
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(256 << 20), 64 * 1024);
    }

    #[test]
    fn bat_validation() {
        let regions = [Region {
            name: "VHD BAT".into(),
            start: 1536,
            end: 2048,
        }];
        let bs = 4096;
        // Entry 0 at sector 4 (2048): ok; entry 1 overlapping entry 0.
        assert_eq!(
            validate_bat(&[4, UNALLOCATED], 1536, bs, 1 << 20, &regions).unwrap(),
            2048 + 4608
        );
        let e = validate_bat(&[4, 5], 1536, bs, 1 << 20, &regions).unwrap_err();
        assert!(e.to_string().contains("VHD BAT entry 1"), "{e}");
        let e = validate_bat(&[3], 1536, bs, 1 << 20, &regions).unwrap_err();
        assert!(e.to_string().contains("overlaps the VHD BAT"), "{e}");
        let e = validate_bat(&[UNALLOCATED, 4000], 1536, bs, 1 << 20, &regions).unwrap_err();
        assert!(
            matches!(e, DiskError::Corrupt { ref structure, offset: 1540, .. } if structure == "VHD BAT entry 1")
        );
    }
}
