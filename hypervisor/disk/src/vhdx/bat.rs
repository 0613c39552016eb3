//! The block allocation table: 64-bit entries (state in bits 0..3, file offset in MiB in
//! bits 20..64), payload entries interleaved with one sector-bitmap entry after every
//! *chunk ratio* payload entries.

use super::format::{HEADER_SECTION_END, MAX_BAT_BYTES, MIB, corrupt, read_struct, unsupported};
use crate::DiskError;
use crate::storage::Storage;

/// Payload block: not present (zeros, or the parent's data).
pub const NOT_PRESENT: u64 = 0;
/// Payload block: undefined contents (read as zeros, or the parent's data).
pub const UNDEFINED: u64 = 1;
/// Payload block: reads as zeros.
pub const ZERO: u64 = 2;
/// Payload block: unmapped (trimmed); read as zeros, or the parent's data.
pub const UNMAPPED: u64 = 3;
/// The pre-1.0 (v0.95) value of UNMAPPED, still accepted by qemu.
pub const UNMAPPED_V095: u64 = 5;
/// Payload block: all data is in the file.
pub const FULLY_PRESENT: u64 = 6;
/// Payload block (differencing only): the sector bitmap says which sectors are here.
pub const PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap block: present.
pub const SB_PRESENT: u64 = 6;

/// Sectors described by one sector bitmap block (1 MiB of bits).
const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// The state bits of an entry.
pub fn state(e: u64) -> u64 {
    e & 7
}

/// The file offset of an entry.
pub fn offset(e: u64) -> u64 {
    e & !(MIB - 1)
}

/// An entry with `state` at file offset `off` (1 MiB aligned).
pub fn entry(state: u64, off: u64) -> u64 {
    (off & !(MIB - 1)) | state
}

/// The shape of the BAT for a virtual size, block size and sector size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Payload block size.
    pub block_size: u64,
    /// Logical sector size.
    pub logical: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Number of payload blocks.
    pub data_blocks: u64,
    /// Number of sector bitmap blocks (chunks).
    pub bitmap_blocks: u64,
    /// Number of BAT entries.
    pub entries: u64,
}

impl Geometry {
    /// The geometry of a disk; `block_size` and `logical` must already be validated.
    pub fn new(virtual_size: u64, block_size: u32, logical: u32, has_parent: bool) -> Self {
        let block_size = u64::from(block_size);
        let logical = u64::from(logical);
        let chunk_ratio = SECTORS_PER_BITMAP * logical / block_size;
        let data_blocks = virtual_size.div_ceil(block_size);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let entries = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        Geometry {
            block_size,
            logical,
            chunk_ratio,
            data_blocks,
            bitmap_blocks,
            entries,
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio) as usize
    }

    /// BAT index of the sector bitmap of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> usize {
        (chunk * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }

    /// Whether BAT index `i` is a sector bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// Payload block of BAT index `i` (which must not be a bitmap entry).
    pub fn block_of_index(&self, i: u64) -> u64 {
        i - i / (self.chunk_ratio + 1)
    }

    /// Bytes of block `block` that lie within a disk of `virtual_size`.
    pub fn block_extent(&self, block: u64, virtual_size: u64) -> u64 {
        virtual_size
            .saturating_sub(block * self.block_size)
            .min(self.block_size)
    }

    /// Sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical
    }
}

/// A file range that allocated blocks must not overlap.
#[derive(Debug, Clone, Copy)]
pub struct Reserved {
    /// Start.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// What it is.
    pub what: &'static str,
}

/// Read `geo.entries` entries from the BAT region at `region_offset` (`region_len` bytes).
pub fn load(
    storage: &dyn Storage,
    geo: &Geometry,
    region_offset: u64,
    region_len: u64,
) -> Result<Vec<u64>, DiskError> {
    let bytes = geo.entries.saturating_mul(8);
    if bytes > MAX_BAT_BYTES {
        return Err(unsupported(format!(
            "VHDX BAT of {bytes} bytes (Parvis loads at most {MAX_BAT_BYTES})"
        )));
    }
    if bytes > region_len {
        return Err(corrupt(
            "VHDX BAT region",
            region_offset,
            format!(
                "{} entries need {bytes:#x} bytes but the region has {region_len:#x}",
                geo.entries
            ),
        ));
    }
    let mut raw = vec![0u8; bytes as usize];
    read_struct(storage, &mut raw, region_offset, "VHDX BAT")?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Validate every entry: known states, blocks inside the file, no overlap with `reserved`
/// ranges or with each other, PARTIALLY_PRESENT only in differencing disks with a bitmap.
pub fn validate(
    bat: &[u64],
    geo: &Geometry,
    virtual_size: u64,
    has_parent: bool,
    file_len: u64,
    bat_offset: u64,
    reserved: &[Reserved],
) -> Result<(), DiskError> {
    let mut used: Vec<(u64, u64, usize)> = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        let at = bat_offset + i as u64 * 8;
        let what = || format!("VHDX BAT entry {i}");
        let st = state(e);
        let off = offset(e);
        let is_bitmap = geo.is_bitmap_index(i as u64);
        let len = if is_bitmap {
            match st {
                NOT_PRESENT => continue,
                // Bitmap entries of non-differencing disks are ignored.
                _ if !has_parent => continue,
                SB_PRESENT => MIB,
                _ => {
                    return Err(corrupt(
                        what(),
                        at,
                        format!("sector bitmap state {st} is invalid"),
                    ));
                }
            }
        } else {
            let block = geo.block_of_index(i as u64);
            match st {
                NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED | UNMAPPED_V095 => continue,
                FULLY_PRESENT => {}
                PARTIALLY_PRESENT if has_parent => {
                    let chunk = block / geo.chunk_ratio;
                    let b = bat.get(geo.bitmap_index(chunk)).copied().unwrap_or(0);
                    if state(b) != SB_PRESENT {
                        return Err(corrupt(
                            what(),
                            at,
                            "partially present block without a sector bitmap",
                        ));
                    }
                }
                _ => {
                    return Err(corrupt(
                        what(),
                        at,
                        format!("payload block state {st} is invalid here"),
                    ));
                }
            }
            // Only the part inside the virtual disk must exist in the file (qemu makes
            // fixed images whose last block is cut short at the end of the disk).
            geo.block_extent(block, virtual_size).max(1)
        };
        let end = off.checked_add(len).filter(|&end| end <= file_len);
        let Some(end) = end else {
            return Err(corrupt(
                what(),
                at,
                format!("block at {off:#x} lies beyond the end of the file ({file_len:#x})"),
            ));
        };
        if off < HEADER_SECTION_END {
            return Err(corrupt(
                what(),
                at,
                format!("block at {off:#x} overlaps the header section"),
            ));
        }
        if let Some(r) = reserved.iter().find(|r| off < r.end && r.start < end) {
            return Err(corrupt(
                what(),
                at,
                format!("block at {off:#x} overlaps the {}", r.what),
            ));
        }
        used.push((off, off + if is_bitmap { MIB } else { geo.block_size }, i));
    }
    used.sort_unstable();
    for w in used.windows(2) {
        // Compare only what must exist: a block may be cut short by the end of the file.
        let (a, b) = (w[0], w[1]);
        let a_end = a.1.min(file_len);
        if b.0 < a_end {
            return Err(corrupt(
                format!("VHDX BAT entry {}", b.2),
                bat_offset + b.2 as u64 * 8,
                format!(
                    "block at {:#x} overlaps the block of entry {} at {:#x}",
                    b.0, a.2, a.0
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_interleaving() {
        // 512-byte sectors, 32 MiB blocks: chunk ratio 128.
        let g = Geometry::new(10 << 30, 32 << 20, 512, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.data_blocks, 320);
        assert_eq!(g.entries, 320 + 319 / 128);
        assert_eq!(g.payload_index(127), 127);
        assert_eq!(g.payload_index(128), 129);
        assert!(g.is_bitmap_index(128));
        assert_eq!(g.block_of_index(129), 128);
        assert_eq!(g.bitmap_index(0), 128);
        // 4 KiB sectors, 1 MiB blocks: chunk ratio 32768.
        let g = Geometry::new(1 << 30, 1 << 20, 4096, true);
        assert_eq!(g.chunk_ratio, 32768);
        assert_eq!(g.entries, 32769);
        assert_eq!(Geometry::new(0, 1 << 20, 512, false).entries, 0);
        assert_eq!(entry(FULLY_PRESENT, 5 * MIB), (5 * MIB) | 6);
        assert_eq!(offset((5 * MIB) | 7 | 0x1000), 5 * MIB);
    }

    #[test]
    fn hostile_entries() {
        let g = Geometry::new(8 << 20, 1 << 20, 512, false);
        let file = 64 * MIB;
        let res = [Reserved {
            start: MIB,
            end: 2 * MIB,
            what: "log",
        }];
        let ok = |bat: &[u64]| validate(bat, &g, 8 << 20, false, file, 0, &res);
        let mut bat = vec![0u64; 8];
        assert!(ok(&bat).is_ok());
        bat[0] = entry(FULLY_PRESENT, 3 * MIB);
        bat[1] = entry(FULLY_PRESENT, 4 * MIB);
        assert!(ok(&bat).is_ok());
        bat[1] = entry(FULLY_PRESENT, 3 * MIB); // overlap
        assert!(matches!(ok(&bat), Err(DiskError::Corrupt { .. })));
        bat[1] = entry(FULLY_PRESENT, MIB); // log
        assert!(matches!(ok(&bat), Err(DiskError::Corrupt { .. })));
        bat[1] = entry(FULLY_PRESENT, 0); // headers
        assert!(matches!(ok(&bat), Err(DiskError::Corrupt { .. })));
        bat[1] = entry(FULLY_PRESENT, 64 * MIB); // beyond EOF
        assert!(matches!(ok(&bat), Err(DiskError::Corrupt { .. })));
        bat[1] = entry(PARTIALLY_PRESENT, 9 * MIB); // not differencing
        assert!(matches!(ok(&bat), Err(DiskError::Corrupt { .. })));
        bat[1] = 4; // reserved state
        assert!(matches!(ok(&bat), Err(DiskError::Corrupt { .. })));
        bat[1] = !1; // huge offset, state 6
        assert!(matches!(ok(&bat), Err(DiskError::Corrupt { .. })));
    }
}
