//! The metadata region: a 64 KiB table of items keyed by GUID, then the items.
//!
//! Known items: file parameters (block size, LeaveBlocksAllocated, HasParent), virtual disk
//! size, page 83 data, logical and physical sector sizes, and the parent locator of a
//! differencing disk (UTF-16LE key/value pairs such as `parent_linkage` and
//! `relative_path`).

use super::format::{
    FILE_PARAMETERS_GUID, Guid, KIB, LOGICAL_SECTOR_GUID, MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE, MIB,
    MIN_BLOCK_SIZE, PAGE83_GUID, PARENT_LOCATOR_GUID, PHYSICAL_SECTOR_GUID, VHDX_PARENT_TYPE_GUID,
    VIRTUAL_DISK_SIZE_GUID, corrupt, le16, le32, le64, put16, put32, read_struct, unsupported,
    utf16le,
};
use super::region::Region;
use crate::DiskError;
use crate::storage::Storage;

/// The metadata table signature.
const SIGNATURE: &[u8; 8] = b"metadata";
/// Size of the metadata table.
pub const TABLE_SIZE: usize = 64 * 1024;
/// The most entries the table may have.
const MAX_ENTRIES: usize = 2047;
/// Entry flag: the item describes the virtual disk (not the file).
const IS_VIRTUAL_DISK: u32 = 2;
/// Entry flag: a parser must understand the item.
const IS_REQUIRED: u32 = 4;
/// File parameters flag: a fixed disk (blocks stay allocated).
pub const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameters flag: a differencing disk.
pub const HAS_PARENT: u32 = 2;

/// The parsed metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Payload block size.
    pub block_size: u32,
    /// LeaveBlocksAllocated: a fixed disk.
    pub leave_allocated: bool,
    /// HasParent: a differencing disk.
    pub has_parent: bool,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// File offset of the 8-byte virtual size item (rewritten by resize).
    pub virtual_size_offset: u64,
    /// The SCSI page 83 identifier.
    pub page83: Guid,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// The parent locator's key/value pairs (differencing disks).
    pub parent_locator: Option<Vec<(String, String)>>,
    /// Unknown optional items (for `check`).
    pub unknown_items: usize,
}

impl Metadata {
    /// The value of parent locator key `key`.
    pub fn locator(&self, key: &str) -> Option<&str> {
        self.parent_locator
            .as_ref()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

struct Item {
    offset: u32,
    length: u32,
    at: u64,
}

/// Read and validate the metadata region `region`.
pub fn read(storage: &dyn Storage, region: Region) -> Result<Metadata, DiskError> {
    let base = region.offset;
    let rlen = u64::from(region.length);
    if rlen < TABLE_SIZE as u64 {
        return Err(corrupt(
            "VHDX metadata region",
            base,
            "region too small for its table",
        ));
    }
    let mut t = vec![0u8; TABLE_SIZE];
    read_struct(storage, &mut t, base, "VHDX metadata table")?;
    if &t[0..8] != SIGNATURE {
        return Err(corrupt(
            "VHDX metadata table",
            base,
            "signature is not \"metadata\"",
        ));
    }
    let count = le16(&t, 10) as usize;
    if count > MAX_ENTRIES {
        return Err(corrupt(
            "VHDX metadata table",
            base,
            format!("{count} entries (at most {MAX_ENTRIES} allowed)"),
        ));
    }
    let known = [
        FILE_PARAMETERS_GUID,
        VIRTUAL_DISK_SIZE_GUID,
        PAGE83_GUID,
        LOGICAL_SECTOR_GUID,
        PHYSICAL_SECTOR_GUID,
        PARENT_LOCATOR_GUID,
    ];
    let mut items: [Option<Item>; 6] = Default::default();
    let mut unknown_items = 0;
    for i in 0..count {
        let e = 32 + i * 32;
        let at = base + e as u64;
        let what = || format!("VHDX metadata entry {i}");
        let id = Guid::read(&t, e);
        let item = Item {
            offset: le32(&t, e + 16),
            length: le32(&t, e + 20),
            at,
        };
        let flags = le32(&t, e + 24);
        if item.length > 0 {
            let end = u64::from(item.offset) + u64::from(item.length);
            if u64::from(item.offset) < 64 * KIB || end > rlen || u64::from(item.length) > MIB {
                return Err(corrupt(
                    what(),
                    at,
                    format!(
                        "item at {:#x} of {:#x} bytes lies outside the metadata region's {rlen:#x} item area",
                        item.offset, item.length
                    ),
                ));
            }
        }
        match known.iter().position(|k| *k == id) {
            Some(k) => {
                if items[k].is_some() {
                    return Err(corrupt(what(), at, format!("duplicate item {id}")));
                }
                items[k] = Some(item);
            }
            None if flags & IS_REQUIRED != 0 => {
                return Err(unsupported(format!("VHDX required metadata item {id}")));
            }
            None => unknown_items += 1,
        }
    }
    let [fp, vs, p83, ls, ps, pl] = items;
    let need = |it: Option<Item>, name: &str| {
        it.ok_or_else(|| {
            corrupt(
                "VHDX metadata table",
                base,
                format!("required item {name} is missing"),
            )
        })
    };
    let read_item = |it: &Item, min: usize, name: &str| -> Result<Vec<u8>, DiskError> {
        if (it.length as usize) < min {
            return Err(corrupt(
                format!("VHDX metadata item {name}"),
                it.at,
                format!("{} bytes, need {min}", it.length),
            ));
        }
        let mut b = vec![0u8; it.length as usize];
        read_struct(
            storage,
            &mut b,
            base + u64::from(it.offset),
            "VHDX metadata item",
        )?;
        Ok(b)
    };
    let fp = need(fp, "file parameters")?;
    let b = read_item(&fp, 8, "file parameters")?;
    let (block_size, flags) = (le32(&b, 0), le32(&b, 4));
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(corrupt(
            "VHDX file parameters",
            base + u64::from(fp.offset),
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    let vs = need(vs, "virtual disk size")?;
    let virtual_size = le64(&read_item(&vs, 8, "virtual disk size")?, 0);
    let virtual_size_offset = base + u64::from(vs.offset);
    let p83 = need(p83, "page 83 data")?;
    let page83 = Guid::read(&read_item(&p83, 16, "page 83 data")?, 0);
    let mut sizes = [0u32; 2];
    for (s, (it, name)) in sizes.iter_mut().zip([
        (need(ls, "logical sector size")?, "logical sector size"),
        (need(ps, "physical sector size")?, "physical sector size"),
    ]) {
        *s = le32(&read_item(&it, 4, name)?, 0);
        if *s != 512 && *s != 4096 {
            return Err(corrupt(
                format!("VHDX {name}"),
                base + u64::from(it.offset),
                format!("{s} (must be 512 or 4096)"),
            ));
        }
    }
    let [logical_sector_size, physical_sector_size] = sizes;
    if virtual_size > MAX_VIRTUAL_SIZE
        || !virtual_size.is_multiple_of(u64::from(logical_sector_size))
    {
        return Err(corrupt(
            "VHDX virtual disk size",
            virtual_size_offset,
            format!(
                "{virtual_size:#x} is above 64 TiB or not a multiple of the {logical_sector_size}-byte sector"
            ),
        ));
    }
    let has_parent = flags & HAS_PARENT != 0;
    let parent_locator = match (has_parent, pl) {
        (false, _) => None,
        (true, None) => {
            return Err(corrupt(
                "VHDX metadata table",
                base,
                "HasParent is set but there is no parent locator",
            ));
        }
        (true, Some(it)) => {
            let at = base + u64::from(it.offset);
            Some(parse_locator(&read_item(&it, 20, "parent locator")?, at)?)
        }
    };
    Ok(Metadata {
        block_size,
        leave_allocated: flags & LEAVE_BLOCKS_ALLOCATED != 0,
        has_parent,
        virtual_size,
        virtual_size_offset,
        page83,
        logical_sector_size,
        physical_sector_size,
        parent_locator,
        unknown_items,
    })
}

/// Parse a parent locator item read from `at`.
fn parse_locator(b: &[u8], at: u64) -> Result<Vec<(String, String)>, DiskError> {
    let bad = |reason: String| corrupt("VHDX parent locator", at, reason);
    let ty = Guid::read(b, 0);
    if ty != VHDX_PARENT_TYPE_GUID {
        return Err(unsupported(format!("VHDX parent locator type {ty}")));
    }
    let count = le16(b, 18) as usize;
    if 20 + count * 12 > b.len() {
        return Err(bad(format!("{count} entries do not fit the item")));
    }
    let text = |off: u32, len: u16| -> Result<String, DiskError> {
        let (off, len) = (off as usize, len as usize);
        let s = b
            .get(off..off.saturating_add(len))
            .filter(|_| len > 0 && len.is_multiple_of(2) && off >= 20 + count * 12)
            .ok_or_else(|| {
                bad(format!(
                    "string at {off:#x} of {len} bytes is out of bounds"
                ))
            })?;
        let units: Vec<u16> = s
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).map_err(|_| bad("string is not valid UTF-16".into()))
    };
    let mut out: Vec<(String, String)> = Vec::with_capacity(count);
    for i in 0..count {
        let e = 20 + i * 12;
        let key = text(le32(b, e), le16(b, e + 8))?;
        let value = text(le32(b, e + 4), le16(b, e + 10))?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(bad(format!("duplicate key {key:?}")));
        }
        out.push((key, value));
    }
    if !out.iter().any(|(k, _)| k == "parent_linkage") {
        return Err(bad("no parent_linkage entry".into()));
    }
    Ok(out)
}

/// Everything needed to write a fresh metadata region.
pub struct NewMetadata<'a> {
    /// Payload block size.
    pub block_size: u32,
    /// File parameter flags ([`LEAVE_BLOCKS_ALLOCATED`], [`HAS_PARENT`]).
    pub flags: u32,
    /// Virtual size.
    pub virtual_size: u64,
    /// Page 83 identifier.
    pub page83: Guid,
    /// Logical sector size.
    pub logical: u32,
    /// Physical sector size.
    pub physical: u32,
    /// Parent locator pairs, for differencing disks.
    pub locator: Option<&'a [(String, String)]>,
}

/// The first `len` bytes of a new metadata region (table followed by items at 64 KiB).
pub fn build(m: &NewMetadata<'_>) -> Vec<u8> {
    let mut items: Vec<(Guid, u32, Vec<u8>)> = Vec::new();
    let mut fp = vec![0u8; 8];
    put32(&mut fp, 0, m.block_size);
    put32(&mut fp, 4, m.flags);
    items.push((FILE_PARAMETERS_GUID, IS_REQUIRED, fp));
    let vd = IS_REQUIRED | IS_VIRTUAL_DISK;
    items.push((
        VIRTUAL_DISK_SIZE_GUID,
        vd,
        m.virtual_size.to_le_bytes().to_vec(),
    ));
    items.push((PAGE83_GUID, vd, m.page83.0.to_vec()));
    items.push((LOGICAL_SECTOR_GUID, vd, m.logical.to_le_bytes().to_vec()));
    items.push((PHYSICAL_SECTOR_GUID, vd, m.physical.to_le_bytes().to_vec()));
    if let Some(pairs) = m.locator {
        items.push((PARENT_LOCATOR_GUID, vd, locator_bytes(pairs)));
    }
    let mut b = vec![0u8; TABLE_SIZE];
    b[0..8].copy_from_slice(SIGNATURE);
    put16(&mut b, 10, items.len() as u16);
    for (i, (id, flags, data)) in items.into_iter().enumerate() {
        let e = 32 + i * 32;
        let off = b.len() as u32;
        b[e..e + 16].copy_from_slice(&id.0);
        put32(&mut b, e + 16, off);
        put32(&mut b, e + 20, data.len() as u32);
        put32(&mut b, e + 24, flags);
        b.extend_from_slice(&data);
        // Keep each item 8-byte aligned.
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b
}

/// Serialise a parent locator.
fn locator_bytes(pairs: &[(String, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + pairs.len() * 12];
    b[0..16].copy_from_slice(&VHDX_PARENT_TYPE_GUID.0);
    put16(&mut b, 18, pairs.len() as u16);
    for (i, (k, v)) in pairs.iter().enumerate() {
        let e = 20 + i * 12;
        let (kb, vb) = (utf16le(k), utf16le(v));
        let at = b.len() as u32;
        put32(&mut b, e, at);
        put16(&mut b, e + 8, kb.len() as u16);
        b.extend_from_slice(&kb);
        let at = b.len() as u32;
        put32(&mut b, e + 4, at);
        put16(&mut b, e + 10, vb.len() as u16);
        b.extend_from_slice(&vb);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn image(locator: Option<&[(String, String)]>, flags: u32) -> MemStorage {
        let md = build(&NewMetadata {
            block_size: 32 << 20,
            flags,
            virtual_size: 1 << 30,
            page83: Guid::random(),
            logical: 512,
            physical: 4096,
            locator,
        });
        let s = MemStorage::new(vec![0; 2 << 20], 4 << 20);
        s.write_at(&md, MIB).unwrap();
        s
    }

    fn region() -> Region {
        Region {
            guid: super::super::format::METADATA_GUID,
            offset: MIB,
            length: MIB as u32,
            required: true,
        }
    }

    #[test]
    fn round_trip_with_locator() {
        let pairs = vec![
            ("parent_linkage".to_string(), Guid::random().to_string()),
            ("relative_path".to_string(), "..\\base.vhdx".to_string()),
        ];
        let s = image(Some(&pairs), HAS_PARENT);
        let m = read(&s, region()).unwrap();
        assert_eq!(m.block_size, 32 << 20);
        assert!(m.has_parent && !m.leave_allocated);
        assert_eq!(m.virtual_size, 1 << 30);
        assert_eq!(m.locator("relative_path"), Some("..\\base.vhdx"));
        assert_eq!(m.virtual_size_offset, MIB + 64 * KIB + 8);
    }

    #[test]
    fn hostile_metadata() {
        // HasParent without a locator.
        let s = image(None, HAS_PARENT);
        assert!(matches!(read(&s, region()), Err(DiskError::Corrupt { .. })));
        // Item offset outside the region.
        let s = image(None, 0);
        s.write_at(&(2 * MIB as u32).to_le_bytes(), MIB + 32 + 16)
            .unwrap();
        assert!(matches!(read(&s, region()), Err(DiskError::Corrupt { .. })));
        // Block size not a power of two.
        let s = image(None, 0);
        s.write_at(&(3u32 << 20).to_le_bytes(), MIB + 64 * KIB)
            .unwrap();
        assert!(matches!(read(&s, region()), Err(DiskError::Corrupt { .. })));
        // Unknown required item.
        let s = image(None, 0);
        s.write_at(&Guid::random().0, MIB + 32).unwrap();
        assert!(matches!(
            read(&s, region()),
            Err(DiskError::Unsupported { .. })
        ));
        // Absurd virtual size.
        let s = image(None, 0);
        s.write_at(&(MAX_VIRTUAL_SIZE + 512).to_le_bytes(), MIB + 64 * KIB + 8)
            .unwrap();
        assert!(matches!(read(&s, region()), Err(DiskError::Corrupt { .. })));
        // Too many entries.
        let s = image(None, 0);
        s.write_at(&3000u16.to_le_bytes(), MIB + 10).unwrap();
        assert!(matches!(read(&s, region()), Err(DiskError::Corrupt { .. })));
    }
}
