//! Creating and resizing VHDX images.
//!
//! New images are laid out like qemu's and Hyper-V's: header section, a 1 MiB log at 1 MiB,
//! the BAT at 2 MiB (rounded up to whole MiB, which leaves room to grow), a 1 MiB metadata
//! region, then payload blocks. Fixed images get every block FULLY_PRESENT and a sparse file
//! of the full size.
//!
//! **Resize.** Growing extends the BAT in place when its region has room, otherwise writes a
//! new, larger BAT at the end of the file and switches both region table copies to it
//! through the log; fixed images get their new blocks allocated. Shrinking zeroes the part
//! of a kept block past the new end (so growing again reads zeros there), drops (marks
//! NOT_PRESENT, through the log) every block wholly past the new end and the sector bitmaps
//! of chunks wholly past it, and once that is durable gives their space back: the file is
//! truncated after the last structure still in use, and dropped blocks before that become
//! holes (`fallocate` punch, where the file system can). The new virtual size is written
//! through the log afterwards, so it changes atomically.

use std::fs::OpenOptions;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;

use super::bat::{self, FULLY_PRESENT, Geometry, NOT_PRESENT, PARTIALLY_PRESENT};
use super::format::{
    Guid, HEADER_OFFSETS, LOG_SECTOR, MAX_BAT_BYTES, MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE, MIB,
    MIN_BLOCK_SIZE, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, io_err, round_up, unsupported,
};
use super::header::{self, Header};
use super::metadata::{self, HAS_PARENT, LEAVE_BLOCKS_ALLOCATED, NewMetadata};
use super::region::{Region, RegionTable};
use super::{Vhdx, VhdxOpenOptions, format};
use crate::{BlockDevice, DiskError};

/// The default payload block size (32 MiB, as qemu and Hyper-V use for dynamic disks).
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;

/// What kind of image to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhdxKind {
    /// Every block allocated up front (the file is sparse where the file system allows).
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// A child of `parent` (a VHDX); size and sector size come from the parent.
    Differencing {
        /// The parent image.
        parent: PathBuf,
    },
}

/// How to create a VHDX image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxCreateOptions {
    /// Fixed, dynamic or differencing.
    pub kind: VhdxKind,
    /// Virtual size in bytes (a multiple of the logical sector size, at most 64 TiB);
    /// 0 for a differencing image means the parent's size.
    pub size: u64,
    /// Payload block size: a power of two from 1 MiB to 256 MiB.
    pub block_size: u32,
    /// 512 or 4096 (differencing images take the parent's).
    pub logical_sector_size: u32,
    /// 512 or 4096, at least the logical sector size.
    pub physical_sector_size: u32,
}

impl VhdxCreateOptions {
    /// Options with the defaults: 32 MiB blocks, 512-byte logical and 4 KiB physical sectors.
    pub fn new(kind: VhdxKind, size: u64) -> Self {
        Self {
            kind,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
            logical_sector_size: 512,
            physical_sector_size: 4096,
        }
    }

    /// A dynamic image of `size` bytes.
    pub fn dynamic(size: u64) -> Self {
        Self::new(VhdxKind::Dynamic, size)
    }

    /// A fixed image of `size` bytes.
    pub fn fixed(size: u64) -> Self {
        Self::new(VhdxKind::Fixed, size)
    }

    /// A differencing image over `parent` (2 MiB blocks, as Hyper-V uses for checkpoints).
    pub fn differencing(parent: impl Into<PathBuf>) -> Self {
        Self {
            block_size: 2 << 20,
            ..Self::new(
                VhdxKind::Differencing {
                    parent: parent.into(),
                },
                0,
            )
        }
    }
}

/// `target` relative to directory `from`, Windows style (`..\dir\parent.vhdx`).
fn relative_windows_path(from: &Path, target: &Path) -> String {
    let a: Vec<Component<'_>> = from.components().collect();
    let b: Vec<Component<'_>> = target.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec![".".into()];
    if common < a.len() {
        parts = vec!["..".into(); a.len() - common];
    }
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("\\")
}

fn check_size(size: u64, logical: u32) -> Result<(), DiskError> {
    if size == 0 || size > MAX_VIRTUAL_SIZE {
        return Err(unsupported(format!(
            "VHDX virtual size {size} (must be from 1 sector to 64 TiB)"
        )));
    }
    if !size.is_multiple_of(u64::from(logical)) {
        return Err(DiskError::UnalignedSize {
            size,
            sector_size: logical,
        });
    }
    Ok(())
}

impl Vhdx {
    /// Create a new image at `path` (which must not exist) and open it writable.
    pub fn create(path: &Path, opts: &VhdxCreateOptions) -> Result<Vhdx, DiskError> {
        let mut logical = opts.logical_sector_size;
        let mut physical = opts.physical_sector_size;
        let mut size = opts.size;
        let mut locator = None;
        if let VhdxKind::Differencing { parent } = &opts.kind {
            let p = Vhdx::open(
                parent,
                &VhdxOpenOptions {
                    read_only: true,
                    allow_replay: false,
                },
            )
            .map_err(|e| DiskError::Parent {
                path: parent.display().to_string(),
                source: Box::new(e),
            })?;
            logical = p.logical;
            physical = p.physical;
            if size == 0 {
                size = p.size();
            }
            let parent_abs = parent.canonicalize().map_err(io_err("open", 0))?;
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let dir = dir.canonicalize().map_err(io_err("open", 0))?;
            locator = Some(vec![
                ("parent_linkage".to_string(), p.data_write_guid()),
                (
                    "relative_path".to_string(),
                    relative_windows_path(&dir, &parent_abs),
                ),
                (
                    "absolute_win32_path".to_string(),
                    parent_abs.display().to_string(),
                ),
            ]);
        }
        let ok = |s: u32| s == 512 || s == 4096;
        if !ok(logical) || !ok(physical) || physical < logical {
            return Err(DiskError::InvalidSectorSize { logical, physical });
        }
        let bs = opts.block_size;
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
            return Err(unsupported(format!(
                "VHDX block size {bs} (must be a power of two from 1 MiB to 256 MiB)"
            )));
        }
        check_size(size, logical)?;
        let has_parent = locator.is_some();
        let fixed = opts.kind == VhdxKind::Fixed;
        let geo = Geometry::new(size, bs, logical, has_parent);
        let bat_bytes = geo.entries * 8;
        if bat_bytes > MAX_BAT_BYTES {
            return Err(unsupported(format!(
                "VHDX BAT of {bat_bytes} bytes (use a larger block size)"
            )));
        }
        let (log_off, log_len) = (MIB, MIB);
        let bat_off = 2 * MIB;
        let bat_len = round_up(bat_bytes.max(1), MIB).expect("bounded");
        let meta_off = bat_off + bat_len;
        let data_off = meta_off + MIB;

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err("create", 0))?;
        // Remove the half-written file on any failure.
        let written = (|| -> Result<(), DiskError> {
            let w = |buf: &[u8], at: u64| -> Result<(), DiskError> {
                std::os::unix::fs::FileExt::write_all_at(&file, buf, at)
                    .map_err(io_err("write", at))
            };
            w(&header::file_identifier("Parvis"), 0)?;
            let mut h = Header {
                sequence: 1,
                file_write_guid: Guid::random(),
                data_write_guid: Guid::random(),
                log_guid: Guid::ZERO,
                log_version: 0,
                version: 1,
                log_length: log_len as u32,
                log_offset: log_off,
            };
            w(&h.to_bytes(), HEADER_OFFSETS[0])?;
            h.sequence = 2;
            w(&h.to_bytes(), HEADER_OFFSETS[1])?;
            let rt = RegionTable {
                entries: vec![
                    Region {
                        guid: format::BAT_GUID,
                        offset: bat_off,
                        length: bat_len as u32,
                        required: true,
                    },
                    Region {
                        guid: format::METADATA_GUID,
                        offset: meta_off,
                        length: MIB as u32,
                        required: true,
                    },
                ],
            };
            let rtb = rt.to_bytes();
            for &off in &REGION_TABLE_OFFSETS {
                w(&rtb, off)?;
            }
            let flags = if fixed { LEAVE_BLOCKS_ALLOCATED } else { 0 }
                | if has_parent { HAS_PARENT } else { 0 };
            w(
                &metadata::build(&NewMetadata {
                    block_size: bs,
                    flags,
                    virtual_size: size,
                    page83: Guid::random(),
                    logical,
                    physical,
                    locator: locator.as_deref(),
                }),
                meta_off,
            )?;
            let mut end = data_off;
            if fixed {
                let mut table = vec![0u8; bat_bytes as usize];
                for block in 0..geo.data_blocks {
                    let e = bat::entry(FULLY_PRESENT, data_off + block * geo.block_size);
                    let i = geo.payload_index(block);
                    table[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
                }
                w(&table, bat_off)?;
                end = data_off + geo.data_blocks * geo.block_size;
            }
            file.set_len(end).map_err(io_err("set_len", end))?;
            file.sync_all().map_err(io_err("flush", 0))?;
            Ok(())
        })();
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        drop(file);
        let opened = Vhdx::open(
            path,
            &VhdxOpenOptions {
                read_only: false,
                allow_replay: false,
            },
        );
        if opened.is_err() {
            let _ = std::fs::remove_file(path);
        }
        opened
    }

    /// Change the virtual size (see the module docs for what shrinking does).
    pub fn resize(&self, new_size: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_size(new_size, self.logical)?;
        let mut st = self.write_state();
        let st = &mut *st;
        let old = st.geo;
        let old_size = st.meta.virtual_size;
        if new_size == old_size {
            return Ok(());
        }
        let geo = Geometry::new(
            new_size,
            st.meta.block_size,
            self.logical,
            st.meta.has_parent,
        );
        if geo.entries * 8 > MAX_BAT_BYTES {
            return Err(unsupported(format!(
                "VHDX BAT of {} bytes (use a larger block size)",
                geo.entries * 8
            )));
        }
        self.begin_session(st)?;
        self.flush_locked(st)?;
        let s = self.storage.as_ref();
        let bs = geo.block_size;
        if new_size < old_size {
            // Zero what a kept block holds past the new end.
            let block = new_size / bs;
            let inb = new_size % bs;
            if inb != 0 {
                let e = st.bat[geo.payload_index(block)];
                let st_ = bat::state(e);
                if st_ == FULLY_PRESENT || st_ == PARTIALLY_PRESENT {
                    let len = (old_size.min((block + 1) * bs) - new_size) as usize;
                    let at = bat::offset(e) + inb;
                    s.write_at(&vec![0u8; len], at)
                        .map_err(io_err("write", at))?;
                }
            }
            // Drop every block past the new end (payload blocks, and the sector bitmaps of
            // chunks wholly past it), remembering the file space they held.
            let mut freed = Vec::new();
            let mut drop_entry = |st: &mut super::State, idx: usize| {
                let e = st.bat[idx];
                let state = bat::state(e);
                let len = if old.is_bitmap_index(idx as u64) {
                    (st.meta.has_parent && state == bat::SB_PRESENT).then_some(MIB)
                } else {
                    (state == FULLY_PRESENT || state == PARTIALLY_PRESENT).then_some(bs)
                };
                if let Some(len) = len {
                    freed.push((bat::offset(e), len));
                }
                if e != 0 {
                    st.bat[idx] = bat::entry(NOT_PRESENT, 0);
                    st.dirty_bat.insert(idx as u64 * 8 / LOG_SECTOR as u64);
                }
            };
            for b in geo.data_blocks..old.data_blocks {
                drop_entry(st, old.payload_index(b));
            }
            for idx in geo.entries..old.entries {
                drop_entry(st, idx as usize);
            }
            // The entries go through the log (after the data sync) like any metadata
            // update; only once they are durable is the space given back.
            self.flush_locked(st)?;
            self.release(st, &freed)?;
        }
        let mut table = st.bat.clone();
        table.resize(geo.entries as usize, 0);
        let first_new = old.entries.min(geo.entries);
        let mut next_free = st.next_free;
        if st.meta.leave_allocated {
            for b in old.data_blocks..geo.data_blocks {
                table[geo.payload_index(b)] = bat::entry(FULLY_PRESENT, next_free);
                next_free += bs;
            }
        }
        let need_len = next_free.max(st.next_free);
        if s.len().map_err(io_err("stat", 0))? < need_len {
            s.set_len(need_len).map_err(io_err("extend", need_len))?;
        }
        st.next_free = need_len;
        if geo.entries * 8 > st.bat_len {
            // Relocate: write the whole new BAT past the end, then switch the region tables.
            let len = round_up(geo.entries * 8, MIB).expect("bounded") + MIB;
            let off = st.next_free;
            let mut bytes = vec![0u8; len as usize];
            for (i, e) in table.iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
            s.write_at(&bytes, off).map_err(io_err("write", off))?;
            s.sync().map_err(io_err("flush", 0))?;
            st.next_free = off + len;
            for r in st
                .regions
                .entries
                .iter_mut()
                .filter(|r| r.guid == format::BAT_GUID)
            {
                r.offset = off;
                r.length = len as u32;
            }
            let rtb = st.regions.to_bytes();
            for &rt in &REGION_TABLE_OFFSETS {
                for k in 0..REGION_TABLE_SIZE / LOG_SECTOR {
                    let at = rt + (k * LOG_SECTOR) as u64;
                    st.pending_meta
                        .insert(at, rtb[k * LOG_SECTOR..(k + 1) * LOG_SECTOR].to_vec());
                }
            }
            st.bat_offset = off;
            st.bat_len = len;
            st.dirty_bat.clear();
        } else {
            if first_new < geo.entries {
                let pages =
                    first_new * 8 / LOG_SECTOR as u64..=(geo.entries * 8 - 1) / LOG_SECTOR as u64;
                st.dirty_bat.extend(pages);
            }
            if st.meta.leave_allocated {
                for b in old.data_blocks..geo.data_blocks {
                    st.dirty_bat
                        .insert(geo.payload_index(b) as u64 * 8 / LOG_SECTOR as u64);
                }
            }
        }
        let vs_at = st.meta.virtual_size_offset;
        let sector_at = vs_at & !(LOG_SECTOR as u64 - 1);
        let mut sector = vec![0u8; LOG_SECTOR];
        self.read_meta(st, &mut sector, sector_at)?;
        let k = (vs_at - sector_at) as usize;
        sector[k..k + 8].copy_from_slice(&new_size.to_le_bytes());
        st.pending_meta.insert(sector_at, sector);
        st.bat = table;
        st.geo = geo;
        st.meta.virtual_size = new_size;
        self.size.store(new_size, Ordering::Relaxed);
        self.flush_locked(st)
    }
}

impl Vhdx {
    /// Give back the file space of blocks no BAT entry refers to any more (`freed`: file
    /// offset and length of each). The file is cut after the last structure still in use
    /// (blocks, log, regions), so dropped blocks at its end go with the tail; the others
    /// become holes. Called only once the entries that referred to them are durable.
    fn release(&self, st: &mut super::State, freed: &[(u64, u64)]) -> Result<(), DiskError> {
        if freed.is_empty() {
            return Ok(());
        }
        let s = self.storage.as_ref();
        let h = &st.headers.current;
        let mut used = format::HEADER_SECTION_END.max(h.log_offset + u64::from(h.log_length));
        for r in &st.regions.entries {
            used = used.max(r.end());
        }
        for (i, &e) in st.bat.iter().enumerate() {
            let off = bat::offset(e);
            if off == 0 {
                continue;
            }
            // Payload entries in any state that names an offset keep their space (ZERO or
            // UNMAPPED blocks may keep it allocated); sector bitmaps only in differencing
            // images (elsewhere the entries are ignored).
            let len = if st.geo.is_bitmap_index(i as u64) {
                if !st.meta.has_parent || bat::state(e) != bat::SB_PRESENT {
                    continue;
                }
                MIB
            } else {
                st.geo.block_size
            };
            used = used.max(off.saturating_add(len));
        }
        let keep = round_up(used, MIB).unwrap_or(u64::MAX);
        let file_len = s.len().map_err(io_err("stat", 0))?;
        for &(off, len) in freed {
            let end = off.saturating_add(len).min(file_len).min(keep);
            if off < end {
                s.punch_hole(off, end - off)
                    .map_err(io_err("punch hole", off))?;
            }
        }
        if file_len > keep {
            s.set_len(keep).map_err(io_err("truncate", keep))?;
        }
        st.next_free = st.next_free.min(keep);
        s.sync().map_err(io_err("flush", 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            relative_windows_path(&p("/a/b"), &p("/a/b/x.vhdx")),
            ".\\x.vhdx"
        );
        assert_eq!(
            relative_windows_path(&p("/a/b"), &p("/a/c/x.vhdx")),
            "..\\c\\x.vhdx"
        );
    }
}
