//! Creating and resizing VHD images.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use super::dynamic::{
    self, Locator, MAX_BAT_ENTRIES, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, NewHeader, PLAT_W2KU, PLAT_W2RU,
};
use super::footer::{self, DiskType, FOOTER_SIZE, Footer, SizeRule};
use super::{Vhd, io_err, parent, round_up};
use crate::storage::{FileStorage, Storage};
use crate::{BlockDevice, DiskError, SECTOR_SIZE};

/// The default block size of dynamic and differencing images (the only one every
/// Microsoft tool accepts).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;

/// What kind of image to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhdKind {
    /// Data followed by a footer; created sparse.
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// A child of `parent` (a VHD); blocks allocated on first write.
    Differencing {
        /// The parent image.
        parent: PathBuf,
    },
}

/// Options for [`Vhd::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdCreateOptions {
    /// Image kind.
    pub kind: VhdKind,
    /// Virtual size in bytes, a multiple of 512. For a differencing image 0 means "the
    /// parent's size"; a non-zero size must not exceed the parent's.
    pub size: u64,
    /// Block size of dynamic and differencing images: a power of two from 4 KiB to 256 MiB.
    pub block_size: u32,
}

impl VhdCreateOptions {
    /// Options for `kind` with `size` bytes and the default 2 MiB block size.
    pub fn new(kind: VhdKind, size: u64) -> Self {
        Self {
            kind,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }

    /// A dynamic image of `size` bytes with 2 MiB blocks.
    pub fn dynamic(size: u64) -> Self {
        Self {
            kind: VhdKind::Dynamic,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }

    /// A fixed image of `size` bytes.
    pub fn fixed(size: u64) -> Self {
        Self {
            kind: VhdKind::Fixed,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }

    /// A differencing image over `parent`, of the parent's size.
    pub fn differencing(parent: impl Into<PathBuf>) -> Self {
        Self {
            kind: VhdKind::Differencing {
                parent: parent.into(),
            },
            size: 0,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

fn unsupported(what: impl Into<String>) -> DiskError {
    DiskError::Unsupported { what: what.into() }
}

/// Data for a differencing header: parent id, timestamp, name and locator payloads.
struct ParentLink {
    uuid: [u8; 16],
    timestamp: u32,
    name: String,
    payloads: Vec<(u32, Vec<u8>)>,
}

fn parent_link(parent_path: &Path, child: &Path, parent: &Vhd) -> Result<ParentLink, DiskError> {
    let canon = parent_path.canonicalize().map_err(io_err("open", 0))?;
    let child_dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()
        .map_err(io_err("open", 0))?;
    let mtime = std::fs::metadata(&canon)
        .and_then(|m| m.modified())
        .map_err(io_err("stat", 0))?;
    let rel = parent::relative_windows_path(&child_dir, &canon);
    Ok(ParentLink {
        uuid: parent.read_state().footer.uuid,
        timestamp: footer::to_timestamp(mtime),
        name: canon
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        payloads: vec![
            (PLAT_W2KU, parent::encode_utf16le(&canon.to_string_lossy())),
            (PLAT_W2RU, parent::encode_utf16le(&rel)),
        ],
    })
}

impl Vhd {
    /// Create a new image at `path` (which must not exist) and open it read-write.
    ///
    /// Parvis writes creator `pvis` on `Wi2k`, the exact size as current (and original)
    /// size, and CHS geometry from the size by the VHD spec's algorithm; Parvis always
    /// sizes its own images by current size (see the module docs for how qemu reads them).
    pub fn create(path: &Path, opts: &VhdCreateOptions) -> Result<Vhd, DiskError> {
        let bs = opts.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(unsupported(format!(
                "VHD block size {bs} (must be a power of two from 4 KiB to 256 MiB)"
            )));
        }
        let (link, size) = match &opts.kind {
            VhdKind::Differencing { parent } => {
                let p = Vhd::open(parent, true)?;
                if p.chain_depth() >= super::MAX_CHAIN_DEPTH {
                    return Err(DiskError::ParentChain {
                        path: parent.display().to_string(),
                        limit: super::MAX_CHAIN_DEPTH,
                    });
                }
                let psize = p.size();
                let size = if opts.size == 0 { psize } else { opts.size };
                if size > psize {
                    return Err(unsupported(format!(
                        "a differencing VHD of {size} bytes over a parent of {psize} bytes"
                    )));
                }
                (Some(parent_link(parent, path, &p)?), size)
            }
            _ => (None, opts.size),
        };
        if !size.is_multiple_of(u64::from(SECTOR_SIZE)) {
            return Err(DiskError::UnalignedSize {
                size,
                sector_size: SECTOR_SIZE,
            });
        }
        if size > footer::MAX_SIZE {
            return Err(unsupported(format!(
                "VHD size {size} (the maximum is 2040 GiB)"
            )));
        }
        let entries = size.div_ceil(u64::from(bs));
        if entries > u64::from(MAX_BAT_ENTRIES) {
            return Err(unsupported(format!(
                "{entries} VHD BAT entries (the limit is {MAX_BAT_ENTRIES})"
            )));
        }
        let disk_type = match opts.kind {
            VhdKind::Fixed => DiskType::Fixed,
            VhdKind::Dynamic => DiskType::Dynamic,
            VhdKind::Differencing { .. } => DiskType::Differencing,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err("create", 0))?;
        let storage = FileStorage(file);
        let result = write_new(&storage, disk_type, size, bs, entries as u32, link.as_ref());
        drop(storage);
        if let Err(e) = result {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Vhd::open(path, false)
    }

    /// Grow the virtual disk to `new_size` bytes. Fixed images move their footer; dynamic
    /// and differencing images extend their BAT, in place when the space after it is free
    /// and otherwise by relocating it to the end of the file (see `grow_bat`); a
    /// differencing image cannot outgrow its parent.
    /// Shrinking is `Unsupported`. If the creator's size rule is CHS and the geometry
    /// cannot express the new size exactly, the creator becomes `pvis` (current size).
    pub fn resize(&self, new_size: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        if !new_size.is_multiple_of(u64::from(SECTOR_SIZE)) {
            return Err(DiskError::UnalignedSize {
                size: new_size,
                sector_size: SECTOR_SIZE,
            });
        }
        let mut st = self.write_state();
        if new_size < st.size {
            return Err(unsupported("shrinking a VHD"));
        }
        if new_size == st.size {
            return Ok(());
        }
        if new_size > footer::MAX_SIZE {
            return Err(unsupported(format!(
                "VHD size {new_size} (the maximum is 2040 GiB)"
            )));
        }
        let mut f = st.footer.clone();
        f.set_size(new_size);
        if f.size_rule() == SizeRule::Chs && f.virtual_size() != new_size {
            f.set_creator_app(b"pvis");
        }
        let s = &self.storage;
        match &self.dynamic {
            None => {
                let data_end = st.next_free;
                if new_size <= data_end {
                    s.write_at(&f.raw, data_end)
                        .map_err(io_err("write VHD footer", data_end))?;
                } else {
                    // New footer first: a crash leaves a valid (if larger) image.
                    s.write_at(&f.raw, new_size)
                        .map_err(io_err("write VHD footer", new_size))?;
                    let old = FOOTER_SIZE as u64;
                    let zeros = vec![0u8; old.min(new_size - data_end) as usize];
                    s.write_at(&zeros, data_end)
                        .map_err(io_err("write", data_end))?;
                    st.next_free = new_size;
                }
                st.end_footer_len = FOOTER_SIZE;
            }
            Some(d) => {
                if let Some(p) = &self.parent
                    && new_size > p.size()
                {
                    return Err(unsupported("growing a differencing VHD beyond its parent"));
                }
                // Entries of blocks allocated since the last flush go to the current table
                // first (after their data is synced), so whatever the table becomes it
                // only references durable blocks.
                self.write_bat(&mut st)?;
                let need = new_size.div_ceil(d.block_size);
                let have = st.bat.len() as u64;
                if need > have {
                    self.grow_bat(&mut st, need)?;
                }
                let end = st.next_free;
                s.write_at(&f.raw, end)
                    .map_err(io_err("write VHD footer", end))?;
                s.write_at(&f.raw, 0)
                    .map_err(io_err("write VHD footer copy", 0))?;
                st.end_footer_len = FOOTER_SIZE;
            }
        }
        s.sync().map_err(io_err("flush", 0))?;
        st.footer = f;
        st.size = new_size;
        Ok(())
    }
}

impl Vhd {
    /// Give the BAT `need` entries (more than it has), rewriting the dynamic header.
    ///
    /// The table grows in place when the space after it is free: up to the nearest
    /// structure that follows it (another metadata structure or a data block), or without
    /// limit when it is the last thing before the trailing footer (which then moves
    /// behind it). Otherwise the whole table is relocated to the end of the file. The
    /// alternative, moving the data blocks that follow the table out of its way, would copy
    /// guest data and, in a differencing image, the parent locators; those are described in
    /// the header's second sector, so the header could no longer be switched by one sector
    /// write.
    ///
    /// Crash safety: the caller has written the dirty BAT entries (so every entry copied is
    /// durable). The new entries (or the relocated table) and a footer behind them are
    /// written and synced first, while the header still describes the old table, which is
    /// intact; then the first sector of the header (table offset, entry count and checksum
    /// all lie in it) is rewritten and synced. A crash at any point leaves an image that
    /// Parvis and qemu open with either the old or the new table. The space of a relocated
    /// table is not reused.
    fn grow_bat(&self, st: &mut super::State, need: u64) -> Result<(), DiskError> {
        let Some(d) = &self.dynamic else {
            return Ok(());
        };
        if need > u64::from(MAX_BAT_ENTRIES) {
            return Err(unsupported(format!(
                "{need} VHD BAT entries (the limit is {MAX_BAT_ENTRIES})"
            )));
        }
        let s = &self.storage;
        let toff = st.table_offset;
        let have = st.bat.len() as u64;
        let end = toff + have * 4;
        let span = d.bitmap_size + d.block_size;
        // The nearest structure starting at or after the table: the header, locator
        // payloads (of any disk type, to be safe) and data blocks.
        let hoff = d.header_offset;
        let next_structure = std::iter::once((hoff, hoff + dynamic::HEADER_SIZE as u64))
            .chain(
                d.header
                    .locators
                    .iter()
                    .filter(|l| l.data_length > 0)
                    .map(|l| (l.data_offset, l.data_offset + u64::from(l.data_length))),
            )
            .chain(
                st.bat
                    .iter()
                    .filter(|&&e| e != dynamic::UNALLOCATED)
                    .map(|&e| (u64::from(e) * 512, u64::from(e) * 512 + span)),
            )
            .filter(|&(_, e)| e > toff)
            .map(|(start, _)| start)
            .min();
        let new_bytes = round_up(need * 4, 512);
        let in_place = match next_structure {
            // Something overlaps the table's start (never in a valid image): relocate.
            Some(start) if start <= toff => false,
            Some(start) => toff.is_multiple_of(512) && round_up(toff + need * 4, 512) <= start,
            None => toff.is_multiple_of(512),
        };
        let (new_toff, table_end) = if in_place {
            let table_end = round_up(toff + need * 4, 512);
            // The table may reach over the trailing footer: put a footer behind it first.
            if table_end > st.next_free {
                s.write_at(&st.footer.raw, table_end)
                    .map_err(io_err("write VHD footer", table_end))?;
            }
            let fill = vec![0xffu8; (table_end - end) as usize];
            s.write_at(&fill, end)
                .map_err(io_err("write VHD BAT", end))?;
            (toff, table_end)
        } else {
            let at = st.next_free;
            let mut table = vec![0xffu8; new_bytes as usize];
            for (i, e) in st.bat.iter().enumerate() {
                table[i * 4..i * 4 + 4].copy_from_slice(&e.to_be_bytes());
            }
            s.write_at(&st.footer.raw, at + new_bytes)
                .map_err(io_err("write VHD footer", at + new_bytes))?;
            s.write_at(&table, at)
                .map_err(io_err("write VHD BAT", at))?;
            (at, at + new_bytes)
        };
        s.sync().map_err(io_err("flush", 0))?;
        let mut raw = st.header_raw.clone();
        raw[16..24].copy_from_slice(&new_toff.to_be_bytes());
        raw[28..32].copy_from_slice(&(need as u32).to_be_bytes());
        let sum = footer::checksum(&raw[..], 36);
        raw[36..40].copy_from_slice(&sum.to_be_bytes());
        s.write_at(&raw[..512], hoff)
            .map_err(io_err("write VHD dynamic header", hoff))?;
        s.sync().map_err(io_err("flush", 0))?;
        st.header_raw = raw;
        st.table_offset = new_toff;
        st.bat.resize(need as usize, dynamic::UNALLOCATED);
        if table_end > st.next_free {
            st.next_free = table_end;
            st.end_footer_len = FOOTER_SIZE;
        }
        Ok(())
    }
}

/// Write the structures of a new image to `s`.
fn write_new(
    s: &FileStorage,
    disk_type: DiskType,
    size: u64,
    block_size: u32,
    entries: u32,
    link: Option<&ParentLink>,
) -> Result<(), DiskError> {
    let mut f = Footer::new(disk_type, size, footer::now_timestamp(), footer::new_uuid());
    if disk_type == DiskType::Fixed {
        s.set_len(size + FOOTER_SIZE as u64)
            .map_err(io_err("set_len", size))?;
        s.write_at(&f.raw, size)
            .map_err(io_err("write VHD footer", size))?;
        return s.sync().map_err(io_err("flush", 0));
    }
    f.set_size(size);
    let table_offset = 3 * 512u64;
    let bat_bytes = round_up(u64::from(entries) * 4, 512);
    let mut next = table_offset + bat_bytes;
    let mut locators = Vec::new();
    let mut payloads = Vec::new();
    if let Some(l) = link {
        for (platform, data) in &l.payloads {
            let space = round_up(data.len() as u64, 512).max(512);
            locators.push(Locator {
                platform: *platform,
                data_space: space as u32,
                data_length: data.len() as u32,
                data_offset: next,
            });
            payloads.push((next, data));
            next += space;
        }
    }
    let header = NewHeader {
        table_offset,
        max_table_entries: entries,
        block_size,
        parent_uuid: link.map_or([0; 16], |l| l.uuid),
        parent_timestamp: link.map_or(0, |l| l.timestamp),
        parent_name: link.map_or("", |l| l.name.as_str()),
        locators: &locators,
    }
    .to_bytes();
    s.write_at(&f.raw, 0)
        .map_err(io_err("write VHD footer copy", 0))?;
    s.write_at(&header, 512)
        .map_err(io_err("write VHD dynamic header", 512))?;
    let bat = vec![0xffu8; bat_bytes as usize];
    s.write_at(&bat, table_offset)
        .map_err(io_err("write VHD BAT", table_offset))?;
    for (at, data) in payloads {
        s.write_at(data, at)
            .map_err(io_err("write VHD parent locator", at))?;
    }
    s.write_at(&f.raw, next)
        .map_err(io_err("write VHD footer", next))?;
    s.sync().map_err(io_err("flush", 0))
}
