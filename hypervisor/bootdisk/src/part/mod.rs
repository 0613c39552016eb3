//! Partition tables: GPT (primary header, or the backup when the primary is damaged) and MBR
//! with extended partitions; a disk with neither is one file system on the whole disk.
//!
//! Bounds: at most [`MAX_GPT_ENTRIES`] GPT entries of at most [`MAX_GPT_ENTRY_SIZE`] bytes,
//! at most [`MAX_LOGICAL`] logical partitions (a looping extended chain ends there), and every
//! partition must lie inside the disk.

use crate::{Error, ReadAt, Result, io_error};

/// GPT entries read at most (the usual table has 128).
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// Largest GPT entry accepted (the usual entry is 128 bytes).
pub const MAX_GPT_ENTRY_SIZE: u32 = 1024;
/// Logical partitions followed at most in an MBR extended partition.
pub const MAX_LOGICAL: u32 = 128;

/// Which table the disk has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Gpt,
    Mbr,
    /// No partition table: a file system (or nothing) on the whole disk.
    None,
}

/// What a partition's type says it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// EFI system partition.
    Esp,
    /// Linux file system data (GPT's generic Linux type, MBR 0x83).
    Linux,
    /// The Boot Loader Specification's extended boot partition (a separate /boot).
    XbootLdr,
    /// A discoverable-partitions root (x86-64).
    LinuxRoot,
    /// LVM physical volume.
    Lvm,
    /// Linux software RAID member.
    Raid,
    /// LUKS (dm-crypt) container.
    Luks,
    Swap,
    /// GRUB's BIOS boot partition (core.img, no file system).
    BiosBoot,
    /// Windows basic data (also FAT data partitions on MBR).
    BasicData,
    /// Any other type: the GPT type GUID or the MBR type byte, as text.
    Other(String),
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its number as Linux numbers it: GPT entries from 1, MBR primaries 1-4, logicals from 5.
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    pub kind: Kind,
    /// Its PARTUUID as Linux shows it (GPT: the entry's GUID; MBR: disk signature and number).
    pub partuuid: Option<String>,
    /// The GPT partition name, if any.
    pub name: Option<String>,
}

/// A disk's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub table: Table,
    /// Logical sector size the table was found with.
    pub sector_size: u32,
    pub partitions: Vec<Partition>,
}

fn read(disk: &dyn ReadAt, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0; len];
    disk.read_at(&mut buf, offset)
        .map_err(|e| io_error(offset, e))?;
    Ok(buf)
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A GUID in its usual text form (lower case), from its on-disk mixed-endian bytes.
pub fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32le(b, 0),
        u16le(b, 4),
        u16le(b, 6),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// Read the partition table of `disk`.
pub fn read_layout(disk: &dyn ReadAt) -> Result<Layout> {
    let size = disk.size();
    if size < 512 {
        return Err(Error::BadTable(
            "the disk is smaller than one sector".into(),
        ));
    }
    let mbr = read(disk, 0, 512)?;
    let signed = mbr[510] == 0x55 && mbr[511] == 0xAA;
    let protective = signed && (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xEE);
    // A GPT is looked for even without a protective MBR (some tools leave a hybrid or none).
    for ss in [512u32, 4096] {
        if let Some(l) = gpt(disk, ss)? {
            return Ok(l);
        }
    }
    if protective {
        return Err(Error::BadTable(
            "its protective MBR announces a GPT, but neither GPT header is valid".into(),
        ));
    }
    if signed && let Some(l) = mbr_layout(disk, &mbr)? {
        return Ok(l);
    }
    Ok(Layout {
        table: Table::None,
        sector_size: 512,
        partitions: Vec::new(),
    })
}

/// A GPT header at `lba` that is valid for a disk with `ss`-byte sectors.
fn gpt_header(disk: &dyn ReadAt, ss: u32, lba: u64) -> Result<Option<Vec<u8>>> {
    let off = match lba.checked_mul(ss as u64) {
        Some(o) if o + ss as u64 <= disk.size() => o,
        _ => return Ok(None),
    };
    let h = read(disk, off, ss as usize)?;
    if &h[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let hsize = u32le(&h, 12) as usize;
    if !(92..=ss as usize).contains(&hsize) {
        return Ok(None);
    }
    let mut c = h[..hsize].to_vec();
    c[16..20].fill(0);
    if crc32fast::hash(&c) != u32le(&h, 16) || u64le(&h, 24) != lba {
        return Ok(None);
    }
    Ok(Some(h))
}

fn gpt(disk: &dyn ReadAt, ss: u32) -> Result<Option<Layout>> {
    // A disk smaller than two sectors of this size has no GPT at this size.
    let Some(last) = (disk.size() / ss as u64).checked_sub(1).filter(|&l| l > 1) else {
        return Ok(None);
    };
    let mut found = None;
    for lba in [1, last] {
        if let Some(h) = gpt_header(disk, ss, lba)?
            && let Some(parts) = gpt_entries(disk, ss, &h)?
        {
            found = Some(parts);
            break;
        }
    }
    Ok(found.map(|partitions| Layout {
        table: Table::Gpt,
        sector_size: ss,
        partitions,
    }))
}

/// The entries a valid header points at, or None when their checksum fails.
fn gpt_entries(disk: &dyn ReadAt, ss: u32, h: &[u8]) -> Result<Option<Vec<Partition>>> {
    let entries_lba = u64le(h, 72);
    let count = u32le(h, 80);
    let esize = u32le(h, 84);
    if count > MAX_GPT_ENTRIES {
        return Err(Error::BadTable(format!(
            "its GPT claims {count} entries (at most {MAX_GPT_ENTRIES} are read)"
        )));
    }
    if !(128..=MAX_GPT_ENTRY_SIZE).contains(&esize) || !esize.is_multiple_of(8) {
        return Err(Error::BadTable(format!(
            "its GPT entries are {esize} bytes each"
        )));
    }
    let len = count as u64 * esize as u64;
    let off = entries_lba
        .checked_mul(ss as u64)
        .filter(|o| o.checked_add(len).is_some_and(|e| e <= disk.size()))
        .ok_or_else(|| Error::BadTable("its GPT entries lie outside the disk".into()))?;
    let table = read(disk, off, len as usize)?;
    if crc32fast::hash(&table) != u32le(h, 88) {
        return Ok(None);
    }
    let (first_usable, last_usable) = (u64le(h, 40), u64le(h, 48));
    let sectors = disk.size() / ss as u64;
    let mut parts = Vec::new();
    for (i, e) in table.chunks_exact(esize as usize).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (u64le(e, 32), u64le(e, 40));
        let number = i as u32 + 1;
        if first > last || first < first_usable || last > last_usable || last >= sectors {
            return Err(Error::BadTable(format!(
                "GPT partition {number} (sectors {first}-{last}) lies outside the disk's usable space"
            )));
        }
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        let name = String::from_utf16_lossy(&name);
        parts.push(Partition {
            number,
            start: first * ss as u64,
            len: (last - first + 1) * ss as u64,
            kind: gpt_kind(&guid(&e[..16])),
            partuuid: Some(guid(&e[16..32])),
            name: (!name.is_empty()).then_some(name),
        });
    }
    Ok(Some(parts))
}

fn gpt_kind(t: &str) -> Kind {
    match t {
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" => Kind::Esp,
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => Kind::Linux,
        "bc13c2ff-59e6-4262-a352-b275fd6f7172" => Kind::XbootLdr,
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => Kind::LinuxRoot,
        "e6d6d379-f507-44c2-a23c-238f2a3df928" => Kind::Lvm,
        "a19d880f-05fc-4d3b-a006-743f0f84911e" => Kind::Raid,
        "ca7d7ccb-63ed-4c53-861c-1742536059cc" => Kind::Luks,
        "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" => Kind::Swap,
        "21686148-6449-6e6f-744e-656564454649" => Kind::BiosBoot,
        "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7" => Kind::BasicData,
        other => Kind::Other(other.to_string()),
    }
}

fn mbr_kind(t: u8) -> Kind {
    match t {
        0x83 => Kind::Linux,
        0x8e => Kind::Lvm,
        0xfd => Kind::Raid,
        0x82 => Kind::Swap,
        0xef => Kind::Esp,
        0xea => Kind::XbootLdr,
        0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e | 0x07 => Kind::BasicData,
        other => Kind::Other(format!("0x{other:02x}")),
    }
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

/// The MBR's partitions, or None when sector 0 does not look like a partition table (a bare
/// FAT or NTFS boot sector carries the same 55AA signature).
fn mbr_layout(disk: &dyn ReadAt, mbr: &[u8]) -> Result<Option<Layout>> {
    let sectors = disk.size() / 512;
    let sig = u32le(mbr, 440);
    let entry = |b: &[u8], i: usize| {
        let e = &b[446 + i * 16..446 + i * 16 + 16];
        (e[0], e[4], u32le(e, 8) as u64, u32le(e, 12) as u64)
    };
    // Every status byte is 0 or 0x80 in a partition table; a boot sector's code is not.
    if (0..4).any(|i| !matches!(entry(mbr, i).0, 0 | 0x80)) {
        return Ok(None);
    }
    let inside = |start: u64, count: u64| start > 0 && count > 0 && start + count <= sectors;
    let mut parts = Vec::new();
    let partuuid = |n: u32| (sig != 0).then(|| format!("{sig:08x}-{n:02x}"));
    let mut extended = None;
    for i in 0..4 {
        let (_, t, start, count) = entry(mbr, i);
        if t == 0 || count == 0 {
            continue;
        }
        let number = i as u32 + 1;
        if !inside(start, count) {
            return Err(Error::BadTable(format!(
                "MBR partition {number} (sectors {start}+{count}) lies outside the disk"
            )));
        }
        if is_extended(t) {
            if extended.is_some() {
                return Err(Error::BadTable(
                    "its MBR has two extended partitions".into(),
                ));
            }
            extended = Some((start, count));
            continue;
        }
        parts.push(Partition {
            number,
            start: start * 512,
            len: count * 512,
            kind: mbr_kind(t),
            partuuid: partuuid(number),
            name: None,
        });
    }
    if parts.is_empty() && extended.is_none() {
        return Ok(None);
    }
    if let Some((ext_start, ext_len)) = extended {
        let mut ebr = ext_start;
        let mut number = 5;
        let mut seen = std::collections::HashSet::from([ext_start]);
        loop {
            if seen.len() as u32 > MAX_LOGICAL {
                return Err(Error::BadTable(format!(
                    "its extended partition chains more than {MAX_LOGICAL} logical partitions"
                )));
            }
            let b = read(disk, ebr * 512, 512)?;
            if b[510] != 0x55 || b[511] != 0xAA {
                return Err(Error::BadTable(format!(
                    "the extended boot record at sector {ebr} has no signature"
                )));
            }
            let (_, t, rel, count) = entry(&b, 0);
            if t != 0 && count > 0 {
                let start = ebr + rel;
                if rel == 0 || !inside(start, count) || start + count > ext_start + ext_len {
                    return Err(Error::BadTable(format!(
                        "logical partition {number} lies outside its extended partition"
                    )));
                }
                parts.push(Partition {
                    number,
                    start: start * 512,
                    len: count * 512,
                    kind: mbr_kind(t),
                    partuuid: partuuid(number),
                    name: None,
                });
                number += 1;
            }
            let (_, nt, next, _) = entry(&b, 1);
            if nt == 0 || next == 0 {
                break;
            }
            let next = ext_start + next;
            if next >= ext_start + ext_len || !seen.insert(next) {
                return Err(Error::BadTable(format!(
                    "the extended partition's chain loops or leaves it at sector {next}"
                )));
            }
            ebr = next;
        }
    }
    Ok(Some(Layout {
        table: Table::Mbr,
        sector_size: 512,
        partitions: parts,
    }))
}

#[cfg(test)]
mod tests;
