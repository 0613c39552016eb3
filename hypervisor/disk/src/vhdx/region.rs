//! The region table: where the BAT and the metadata region are (two 64 KiB copies at
//! 192 KiB and 256 KiB, each with a CRC-32C over all 64 KiB).

use super::crc;
use super::format::{
    BAT_GUID, Guid, HEADER_SECTION_END, METADATA_GUID, MIB, REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE, corrupt, le32, le64, put32, put64, read_struct, unsupported,
};
use crate::DiskError;
use crate::storage::Storage;

/// The region table signature, "regi".
const SIGNATURE: &[u8; 4] = b"regi";
/// The most entries a region table may have.
pub const MAX_ENTRIES: u32 = 2047;

/// One region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What the region is.
    pub guid: Guid,
    /// Where it starts (1 MiB aligned).
    pub offset: u64,
    /// Its length (a multiple of 1 MiB).
    pub length: u32,
    /// Whether a parser must understand it to open the file.
    pub required: bool,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.length)
    }
}

/// A parsed region table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    /// All entries, in table order.
    pub entries: Vec<Region>,
}

impl RegionTable {
    /// Parse and validate one 64 KiB copy read from `at`.
    pub fn parse(buf: &[u8], at: u64) -> Result<RegionTable, DiskError> {
        let bad = |reason: String| Err(corrupt("VHDX region table", at, reason));
        if &buf[0..4] != SIGNATURE {
            return bad("signature is not \"regi\"".into());
        }
        if !crc::verify(buf, 4) {
            return bad("CRC-32C mismatch".into());
        }
        let count = le32(buf, 8);
        if count > MAX_ENTRIES {
            return bad(format!("{count} entries (at most {MAX_ENTRIES} allowed)"));
        }
        let mut entries: Vec<Region> = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let e = 16 + i * 32;
            let r = Region {
                guid: Guid::read(buf, e),
                offset: le64(buf, e + 16),
                length: le32(buf, e + 24),
                required: le32(buf, e + 28) & 1 != 0,
            };
            let eoff = at + e as u64;
            let what = format!("VHDX region table entry {i}");
            if !r.offset.is_multiple_of(MIB)
                || !u64::from(r.length).is_multiple_of(MIB)
                || r.length == 0
            {
                return Err(corrupt(
                    what,
                    eoff,
                    format!(
                        "region at {:#x} of {:#x} bytes is not 1 MiB aligned",
                        r.offset, r.length
                    ),
                ));
            }
            if r.offset < HEADER_SECTION_END || r.offset.checked_add(u64::from(r.length)).is_none()
            {
                return Err(corrupt(
                    what,
                    eoff,
                    format!("region at {:#x} overlaps the header section", r.offset),
                ));
            }
            if let Some(o) = entries
                .iter()
                .find(|o| r.offset < o.end() && o.offset < r.end())
            {
                return Err(corrupt(
                    what,
                    eoff,
                    format!(
                        "region at {:#x} overlaps region at {:#x}",
                        r.offset, o.offset
                    ),
                ));
            }
            if (r.guid == BAT_GUID || r.guid == METADATA_GUID)
                && entries.iter().any(|o| o.guid == r.guid)
            {
                return Err(corrupt(what, eoff, format!("duplicate region {}", r.guid)));
            }
            if r.guid != BAT_GUID && r.guid != METADATA_GUID && r.required {
                return Err(unsupported(format!(
                    "VHDX required region {} (not understood)",
                    r.guid
                )));
            }
            entries.push(r);
        }
        let t = RegionTable { entries };
        if t.find(BAT_GUID).is_none() || t.find(METADATA_GUID).is_none() {
            return bad("the BAT or the metadata region is missing".into());
        }
        Ok(t)
    }

    /// The region with `guid`.
    pub fn find(&self, guid: Guid) -> Option<Region> {
        self.entries.iter().copied().find(|r| r.guid == guid)
    }

    /// The 64 KiB on-disk form, checksum included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[0..4].copy_from_slice(SIGNATURE);
        put32(&mut b, 8, self.entries.len() as u32);
        for (i, r) in self.entries.iter().enumerate() {
            let e = 16 + i * 32;
            b[e..e + 16].copy_from_slice(&r.guid.0);
            put64(&mut b, e + 16, r.offset);
            put32(&mut b, e + 24, r.length);
            put32(&mut b, e + 28, u32::from(r.required));
        }
        crc::seal(&mut b, 4);
        b
    }
}

/// Read the region table: the first valid copy. `other_ok` tells whether both are valid
/// and equal (for `check`).
pub fn read(storage: &dyn Storage) -> Result<(RegionTable, bool), DiskError> {
    let mut results = Vec::with_capacity(2);
    for &off in &REGION_TABLE_OFFSETS {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        read_struct(storage, &mut buf, off, "VHDX region table")?;
        results.push(RegionTable::parse(&buf, off));
    }
    let second = results.pop().expect("two copies");
    let first = results.pop().expect("two copies");
    match (first, second) {
        (Ok(a), Ok(b)) => {
            let same = a == b;
            Ok((a, same))
        }
        (Ok(a), Err(_)) => Ok((a, false)),
        (Err(DiskError::Corrupt { .. }), Ok(b)) => Ok((b, false)),
        (Err(e), _) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RegionTable {
        RegionTable {
            entries: vec![
                Region {
                    guid: BAT_GUID,
                    offset: 2 * MIB,
                    length: MIB as u32,
                    required: true,
                },
                Region {
                    guid: METADATA_GUID,
                    offset: 3 * MIB,
                    length: MIB as u32,
                    required: true,
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_hostile_tables() {
        let t = table();
        let b = t.to_bytes();
        assert_eq!(RegionTable::parse(&b, 0).unwrap(), t);

        let mut bad = b.clone();
        put32(&mut bad, 8, 2048);
        crc::seal(&mut bad, 4);
        assert!(matches!(
            RegionTable::parse(&bad, 0),
            Err(DiskError::Corrupt { .. })
        ));

        let mut t2 = t.clone();
        t2.entries[1].offset = 2 * MIB; // overlap
        assert!(matches!(
            RegionTable::parse(&t2.to_bytes(), 0),
            Err(DiskError::Corrupt { .. })
        ));

        let mut t3 = t.clone();
        t3.entries.push(Region {
            guid: Guid::random(),
            offset: 9 * MIB,
            length: MIB as u32,
            required: true,
        });
        assert!(matches!(
            RegionTable::parse(&t3.to_bytes(), 0),
            Err(DiskError::Unsupported { .. })
        ));
        t3.entries[2].required = false;
        assert!(RegionTable::parse(&t3.to_bytes(), 0).is_ok());

        let mut crc_bad = b;
        crc_bad[100] ^= 1;
        assert!(matches!(
            RegionTable::parse(&crc_bad, 0),
            Err(DiskError::Corrupt { .. })
        ));
    }
}
