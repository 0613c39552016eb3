//! VHD (Virtual PC / VHD1): fixed, dynamic and differencing images.
//!
//! Layout (all fields big-endian, 512-byte sectors):
//! - *fixed*: the disk's bytes, then the 512-byte [footer](footer) (511 bytes in images older
//!   than Virtual PC 2004);
//! - *dynamic*: a copy of the footer at offset 0, the [dynamic header](dynamic) (normally at
//!   512), the BAT (u32 sector offsets, `0xFFFFFFFF` = unallocated), then blocks (a sector
//!   bitmap padded to 512 bytes followed by `block_size` bytes of data), then the footer;
//! - *differencing*: like dynamic, plus parent locators; a clear bitmap bit means "read this
//!   sector from the parent".
//!
//! **Virtual size.** Parvis follows qemu 7.2 (`vpc_open`): images made by Hyper-V (`win `),
//! qemu with `force_size` (`qem2`), Disk2VHD (`d2v `), XenConverter (`CTXS`), XenServer
//! (`tap\0`) and Parvis itself (`pvis`) are sized by the footer's current size; all others
//! (Virtual PC `vpc `, plain qemu `qemu`, unknown) by CHS geometry × 512, except that a
//! saturated geometry (65535 × 16 × 255) always means the current size. Images Parvis
//! creates store the exact size as current size and the geometry from the VHD spec's
//! algorithm; qemu reads such an image (unknown creator) by geometry, so a size CHS cannot
//! express exactly looks slightly smaller there unless qemu is given
//! `force_size_calc=current_size`.
//!
//! **Footer choice.** The trailing footer (last 512, then last 511 bytes) wins; if it is
//! missing or damaged, a valid dynamic/differencing copy at offset 0 is used (this is the
//! state after a crash during block allocation) and [`Vhd::check`] reports it.
//!
//! **Writes.** A first write to a block appends bitmap + data at the end of the file and
//! rewrites the footer after them. BAT entries are updated in memory and written at
//! [`BlockDevice::flush`] (and on drop) *after* syncing the data and footer they point at,
//! so the on-disk BAT only ever references durable blocks. Dynamic blocks get all bitmap
//! bits set (as qemu does) and are read without consulting the bitmap; differencing blocks
//! set exactly the bits of the sectors written.

mod check;
mod create;
pub mod dynamic;
pub mod footer;
mod io;
pub mod parent;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::storage::{FileStorage, Storage};
use crate::{BlockDevice, DiskError, ImageFormat, ImageInfo, SECTOR_SIZE};
use dynamic::{DynHeader, HEADER_SIZE, Region, UNALLOCATED};
use footer::{DiskType, FOOTER_SIZE, Footer, OLD_FOOTER_SIZE, corrupt};

pub use create::{DEFAULT_BLOCK_SIZE, VhdCreateOptions, VhdKind};

/// The deepest differencing chain Parvis opens (the child counts as one).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// An open VHD image. All [`crate::BlockDevice`] methods take `&self`; block metadata sits
/// behind an `RwLock` so reads of allocated blocks proceed in parallel.
pub struct Vhd {
    storage: Box<dyn Storage>,
    read_only: bool,
    disk_type: DiskType,
    /// Dynamic and differencing images: where the header is, and what it says.
    dynamic: Option<Dyn>,
    /// The opened parent of a differencing image (None when not resolved).
    parent: Option<Box<Vhd>>,
    parent_path: Option<PathBuf>,
    state: RwLock<State>,
}

impl std::fmt::Debug for Vhd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd")
            .field("storage", &self.storage)
            .field("disk_type", &self.disk_type)
            .field("read_only", &self.read_only)
            .field("parent_path", &self.parent_path)
            .finish_non_exhaustive()
    }
}

/// Fixed facts about a dynamic or differencing image.
#[derive(Debug)]
struct Dyn {
    header_offset: u64,
    header: DynHeader,
    block_size: u64,
    bitmap_size: u64,
}

/// Mutable metadata.
#[derive(Debug)]
struct State {
    /// Virtual size in bytes.
    size: u64,
    /// The footer as it is (to be) written.
    footer: Footer,
    /// Length of the trailing footer found at open (0: none valid, the copy at 0 was used).
    end_footer_len: usize,
    /// The in-memory BAT (empty for fixed images).
    bat: Vec<u32>,
    /// Dynamic: where the next block goes (the trailing footer sits there). Fixed: the
    /// length of the data area (where the footer sits).
    next_free: u64,
    /// BAT sectors (512-byte units from the table offset) changed since the last flush.
    dirty: BTreeSet<u64>,
    /// Dynamic and differencing images: the file offset of the BAT (it moves when a grow
    /// relocates the table) and the dynamic header as on disk.
    table_offset: u64,
    header_raw: Box<[u8; HEADER_SIZE]>,
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> DiskError {
    move |source| DiskError::Io { op, offset, source }
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The footer of an image: (footer, length of the trailing footer, or 0 when the copy at
/// offset 0 had to be used).
fn find_footer(storage: &dyn Storage, file_len: u64) -> Result<(Footer, usize), DiskError> {
    if file_len < OLD_FOOTER_SIZE as u64 {
        return Err(corrupt(
            "VHD footer",
            0,
            format!("file of {file_len} bytes is too small"),
        ));
    }
    let mut first_err = None;
    for len in [FOOTER_SIZE, OLD_FOOTER_SIZE] {
        let Some(at) = file_len.checked_sub(len as u64) else {
            continue;
        };
        let mut buf = vec![0u8; len];
        storage
            .read_at(&mut buf, at)
            .map_err(io_err("read VHD footer", at))?;
        match Footer::parse(&buf, at) {
            Ok(f) => return Ok((f, len)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if file_len >= FOOTER_SIZE as u64 {
        let mut buf = [0u8; FOOTER_SIZE];
        storage
            .read_at(&mut buf, 0)
            .map_err(io_err("read VHD footer", 0))?;
        if let Ok(f) = Footer::parse(&buf, 0)
            && f.disk_type != DiskType::Fixed
        {
            return Ok((f, 0));
        }
    }
    Err(first_err.unwrap_or_else(|| corrupt("VHD footer", 0, "not found")))
}

impl Vhd {
    /// Whether `storage` holds a VHD: a valid footer at its end, or a valid dynamic or
    /// differencing footer copy at offset 0.
    pub fn detect(storage: &dyn Storage) -> Result<bool, DiskError> {
        let len = storage.len().map_err(io_err("stat", 0))?;
        match find_footer(storage, len) {
            Ok(_) => Ok(true),
            Err(DiskError::Corrupt { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Open the image at `path`. Parents of a differencing image are opened read-only,
    /// recursively, resolved against this image's directory.
    pub fn open(path: &Path, read_only: bool) -> Result<Vhd, DiskError> {
        let canon = path.canonicalize().map_err(io_err("open", 0))?;
        Self::open_chain(&canon, read_only, &mut Vec::new())
    }

    fn open_chain(
        path: &Path,
        read_only: bool,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Vhd, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(io_err("open", 0))?;
        chain.push(path.to_path_buf());
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        Self::open_inner(Box::new(FileStorage(file)), read_only, Some(&dir), chain)
    }

    /// Open an image held by `storage` (fuzzing, tests, or a pre-opened file). The parent of
    /// a differencing image is resolved against `dir` when given; without it the parent is
    /// not opened and sectors absent from the child read as zeros.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        read_only: bool,
        dir: Option<&Path>,
    ) -> Result<Vhd, DiskError> {
        Self::open_inner(storage, read_only, dir, &mut Vec::new())
    }

    fn open_inner(
        storage: Box<dyn Storage>,
        read_only: bool,
        dir: Option<&Path>,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Vhd, DiskError> {
        let file_len = storage.len().map_err(io_err("stat", 0))?;
        let (footer, end_footer_len) = find_footer(storage.as_ref(), file_len)?;
        let footer_at = file_len - end_footer_len as u64;
        let size = footer.virtual_size();
        if size > footer::MAX_SIZE {
            return Err(corrupt(
                "VHD footer",
                footer_at,
                format!("virtual size {size} exceeds the VHD maximum of 2040 GiB"),
            ));
        }
        let data_end = footer_at;
        if footer.disk_type == DiskType::Fixed {
            if size > data_end {
                return Err(corrupt(
                    "VHD footer",
                    footer_at,
                    format!("virtual size {size} exceeds the {data_end} bytes of data in the file"),
                ));
            }
            return Ok(Vhd {
                storage,
                read_only,
                disk_type: DiskType::Fixed,
                dynamic: None,
                parent: None,
                parent_path: None,
                state: RwLock::new(State {
                    size,
                    footer,
                    end_footer_len,
                    bat: Vec::new(),
                    next_free: data_end,
                    dirty: BTreeSet::new(),
                    table_offset: 0,
                    header_raw: Box::new([0; HEADER_SIZE]),
                }),
            });
        }

        // Dynamic header.
        let hoff = footer.data_offset;
        if hoff < FOOTER_SIZE as u64
            || hoff
                .checked_add(HEADER_SIZE as u64)
                .is_none_or(|e| e > data_end)
        {
            return Err(corrupt(
                "VHD footer",
                footer_at,
                format!("dynamic header offset {hoff:#x} is outside the file"),
            ));
        }
        let mut hbuf = [0u8; HEADER_SIZE];
        storage
            .read_at(&mut hbuf, hoff)
            .map_err(io_err("read VHD dynamic header", hoff))?;
        let header = DynHeader::parse(&hbuf, hoff)?;
        let block_size = u64::from(header.block_size);
        let entries = u64::from(header.max_table_entries);
        if entries * block_size < size {
            return Err(corrupt(
                "VHD dynamic header",
                hoff,
                format!(
                    "{entries} BAT entries of {block_size} bytes cover less than the virtual size {size}"
                ),
            ));
        }
        let toff = header.table_offset;
        let bat_bytes = entries * 4;
        if toff.checked_add(bat_bytes).is_none_or(|e| e > data_end) {
            return Err(corrupt(
                "VHD BAT",
                toff,
                "the table lies past the end of the file",
            ));
        }
        let mut regions = vec![
            Region {
                name: "VHD footer copy".into(),
                start: 0,
                end: FOOTER_SIZE as u64,
            },
            Region {
                name: "VHD dynamic header".into(),
                start: hoff,
                end: hoff + HEADER_SIZE as u64,
            },
        ];
        if let Some(r) = regions
            .iter()
            .find(|r| toff < r.end && r.start < toff + bat_bytes)
        {
            return Err(corrupt(
                "VHD BAT",
                toff,
                format!("the table overlaps the {}", r.name),
            ));
        }
        regions.push(Region {
            name: "VHD BAT".into(),
            start: toff,
            end: toff + bat_bytes,
        });
        let differencing = footer.disk_type == DiskType::Differencing;
        if differencing {
            for (i, l) in header.locators.iter().enumerate() {
                let end = l.data_offset.checked_add(u64::from(l.data_length));
                if end.is_none_or(|e| e > data_end) {
                    return Err(corrupt(
                        format!("VHD parent locator {i}"),
                        hoff + 576 + 24 * i as u64,
                        format!(
                            "payload at {:#x} lies past the end of the data",
                            l.data_offset
                        ),
                    ));
                }
                if l.data_length > 0 {
                    regions.push(Region {
                        name: format!("VHD parent locator {i}"),
                        start: l.data_offset,
                        end: l.data_offset + u64::from(l.data_length),
                    });
                }
            }
        }
        let bat = dynamic::read_bat(storage.as_ref(), toff, header.max_table_entries)?;
        let last_block_end =
            dynamic::validate_bat(&bat, toff, header.block_size, data_end, &regions)?;
        let meta_end = regions.iter().map(|r| r.end).max().unwrap_or(0);
        let tail = if end_footer_len == 0 {
            file_len
        } else {
            footer_at
        };
        let next_free = round_up(meta_end.max(last_block_end).max(tail), 512);

        let (parent, parent_path) = match (differencing, dir) {
            (true, Some(dir)) => {
                let (p, path) = open_parent(storage.as_ref(), file_len, &header, hoff, dir, chain)?;
                if p.size() < size {
                    return Err(DiskError::Parent {
                        path: path.display().to_string(),
                        source: Box::new(corrupt(
                            "VHD footer",
                            0,
                            format!(
                                "parent size {} is smaller than the child's {size}",
                                p.size()
                            ),
                        )),
                    });
                }
                (Some(Box::new(p)), Some(path))
            }
            _ => (None, None),
        };
        let bitmap_size = u64::from(header.bitmap_size());
        let header_raw = header.raw.clone();
        Ok(Vhd {
            storage,
            read_only,
            disk_type: footer.disk_type,
            dynamic: Some(Dyn {
                header_offset: hoff,
                header,
                block_size,
                bitmap_size,
            }),
            parent,
            parent_path,
            state: RwLock::new(State {
                size,
                footer,
                end_footer_len,
                bat,
                next_free,
                dirty: BTreeSet::new(),
                table_offset: toff,
                header_raw,
            }),
        })
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The resolved parent path of a differencing image.
    pub fn parent_path(&self) -> Option<&Path> {
        self.parent_path.as_deref()
    }

    /// Number of images in the opened chain, this one included.
    pub fn chain_depth(&self) -> usize {
        1 + self.parent.as_ref().map_or(0, |p| p.chain_depth())
    }

    /// What `parvis disk info` shows. `allocated` counts whole allocated blocks (clipped to
    /// the virtual size), also for differencing images (bitmaps are not read).
    pub fn info(&self) -> ImageInfo {
        let st = self.read_state();
        let f = &st.footer;
        let file_size = self.storage.len().unwrap_or(0);
        let allocated = match &self.dynamic {
            None => st.size,
            Some(d) => {
                let n = st.bat.iter().filter(|&&e| e != UNALLOCATED).count() as u64;
                (n * d.block_size).min(st.size)
            }
        };
        let g = f.geometry;
        let mut details = vec![
            ("creator".to_string(), footer::tag(&f.creator_app)),
            (
                "creator version".to_string(),
                format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
            ),
            ("creator os".to_string(), footer::tag(&f.creator_os)),
            ("disk id".to_string(), footer::uuid_string(&f.uuid)),
            (
                "timestamp".to_string(),
                (u64::from(f.timestamp) + footer::VHD_EPOCH).to_string(),
            ),
            ("current size".to_string(), f.current_size.to_string()),
            ("original size".to_string(), f.original_size.to_string()),
            (
                "geometry".to_string(),
                format!("{}/{}/{}", g.cylinders, g.heads, g.sectors),
            ),
            (
                "size from".to_string(),
                match f.size_rule() {
                    footer::SizeRule::Chs => "chs".to_string(),
                    footer::SizeRule::CurrentSize => "current_size".to_string(),
                },
            ),
            (
                "footer".to_string(),
                match st.end_footer_len {
                    0 => "trailing footer missing; copy at offset 0 used".to_string(),
                    n => format!("{n} bytes"),
                },
            ),
            ("saved state".to_string(), f.saved_state.to_string()),
        ];
        if let Some(d) = &self.dynamic {
            details.push(("bat entries".to_string(), st.bat.len().to_string()));
            if self.disk_type == DiskType::Differencing {
                details.push((
                    "parent id".to_string(),
                    footer::uuid_string(&d.header.parent_uuid),
                ));
                details.push(("parent name".to_string(), d.header.parent_name.clone()));
            }
        }
        ImageInfo {
            format: ImageFormat::Vhd,
            variant: self.disk_type.name(),
            virtual_size: st.size,
            file_size,
            allocated,
            block_size: self.dynamic.as_ref().map(|d| d.header.block_size),
            logical_sector_size: SECTOR_SIZE,
            physical_sector_size: SECTOR_SIZE,
            parent: self.parent_path.clone(),
            details,
        }
    }
}

/// Open the parent of a differencing image: try each candidate path, guard against loops
/// and over-deep chains, check the parent's unique id.
fn open_parent(
    storage: &dyn Storage,
    file_len: u64,
    header: &DynHeader,
    hoff: u64,
    dir: &Path,
    chain: &mut Vec<PathBuf>,
) -> Result<(Vhd, PathBuf), DiskError> {
    let cands = parent::candidates(storage, file_len, header, dir)?;
    let Some(found) = cands.iter().find(|p| p.is_file()) else {
        let path = cands
            .first()
            .cloned()
            .unwrap_or_else(|| dir.join(&header.parent_name));
        return Err(DiskError::Parent {
            path: path.display().to_string(),
            source: Box::new(DiskError::Io {
                op: "open",
                offset: 0,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no parent locator names an existing file",
                ),
            }),
        });
    };
    let wrap = |path: &Path, e: DiskError| match e {
        e @ DiskError::ParentChain { .. } => e,
        e => DiskError::Parent {
            path: path.display().to_string(),
            source: Box::new(e),
        },
    };
    let canon = found.canonicalize().map_err(|e| {
        wrap(
            found,
            DiskError::Io {
                op: "open",
                offset: 0,
                source: e,
            },
        )
    })?;
    if chain.contains(&canon) || chain.len() >= MAX_CHAIN_DEPTH {
        return Err(DiskError::ParentChain {
            path: canon.display().to_string(),
            limit: MAX_CHAIN_DEPTH,
        });
    }
    let parent = Vhd::open_chain(&canon, true, chain).map_err(|e| wrap(&canon, e))?;
    let want = header.parent_uuid;
    let got = parent.read_state().footer.uuid;
    if want != [0; 16] && want != got {
        return Err(wrap(
            &canon,
            corrupt(
                "VHD dynamic header",
                hoff + 40,
                format!(
                    "parent unique id {} does not match {} of the parent found",
                    footer::uuid_string(&want),
                    footer::uuid_string(&got)
                ),
            ),
        ));
    }
    Ok((parent, canon))
}
