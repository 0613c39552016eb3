//! VHDX: fixed, dynamic and differencing images, with log replay.
//!
//! Layout (all fields little-endian, structures 1 MiB aligned): a 1 MiB header section (the
//! `vhdxfile` identifier, two [headers](header) at 64 and 128 KiB, two
//! [region tables](region) at 192 and 256 KiB), then the [log](log), the [BAT](bat) and the
//! [metadata region](metadata) wherever the region table and header say, then payload blocks
//! and (differencing disks) 1 MiB sector bitmap blocks.
//!
//! **Opening.** The current header is the valid one with the higher sequence number. A
//! non-zero LogGuid means the log may hold updates that must be replayed before the BAT or
//! metadata are trusted: if it has an active sequence, Parvis replays it only when the image
//! is opened writable *and* [`VhdxOpenOptions::allow_replay`] is set, and otherwise fails
//! with [`DiskError::NeedsLogReplay`] (use [`replay_to_copy`] to leave the original alone).
//! Every structure is bounds-checked; damage gives [`DiskError::Corrupt`] naming the
//! structure and its file offset.
//!
//! **Reads.** FULLY_PRESENT blocks come from the file; NOT_PRESENT, UNDEFINED and UNMAPPED
//! blocks read as zeros (differencing: from the parent), ZERO blocks as zeros, and
//! PARTIALLY_PRESENT blocks per sector from the file or the parent as the sector bitmap says
//! (runs of equal bits are read with one request each).
//!
//! **Writes and what a flush guarantees.** The first write of a session writes a new header
//! (fresh FileWriteGuid and DataWriteGuid) and flushes it. New blocks are appended at the
//! 1 MiB aligned end of the file (the file is extended to cover the whole block first, so
//! unwritten parts read as zeros) and the data goes there at once; the BAT entry changes in
//! memory. [`BlockDevice::flush`] then (1) syncs the data, (2) writes every changed BAT
//! page, sector bitmap sector and metadata sector as one log entry (more if the log is
//! short) and syncs it, (3) activates it by writing a header carrying its LogGuid, (4)
//! writes the sectors in place and syncs, (5) writes a header with a zero LogGuid. So after
//! a completed flush the image is clean (no log to replay, readable read-only by any tool);
//! a crash during a flush leaves either the old metadata, or a log that any VHDX
//! implementation replays to the new metadata; the on-disk BAT never points at data that is
//! not durable. Dropping a writable [`Vhdx`] flushes. Images whose header names no log (log
//! length 0) get the in-place writes after the data sync, without the log.

mod bat;
mod check;
mod crc;
mod create;
mod format;
mod header;
mod io;
mod log;
mod metadata;
mod region;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::DiskError;
use crate::storage::{FileStorage, Storage};
use bat::Geometry;
use format::{Guid, MIB, corrupt, io_err, round_up};
use header::Headers;
use metadata::Metadata;
use region::RegionTable;

pub use create::{DEFAULT_BLOCK_SIZE, VhdxCreateOptions, VhdxKind};

/// The deepest differencing chain Parvis opens (the child counts as one).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// How to open a VHDX image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VhdxOpenOptions {
    /// Refuse writes (the file is opened read-only too).
    pub read_only: bool,
    /// Replay a dirty log when opened writable. Without it, a dirty image fails with
    /// [`DiskError::NeedsLogReplay`] and is left untouched.
    pub allow_replay: bool,
}

/// Which kind of VHDX an image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// LeaveBlocksAllocated: every block present.
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// HasParent: unallocated sectors come from the parent.
    Differencing,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Fixed => "fixed",
            Variant::Dynamic => "dynamic",
            Variant::Differencing => "differencing",
        }
    }
}

/// An open VHDX image. All [`crate::BlockDevice`] methods take `&self`; the BAT and
/// metadata sit behind an `RwLock`, so reads proceed in parallel, and so do writes that
/// only touch FULLY_PRESENT blocks (anything that changes metadata takes the lock
/// exclusively).
pub struct Vhdx {
    storage: Box<dyn Storage>,
    read_only: bool,
    variant: Variant,
    logical: u32,
    physical: u32,
    size: AtomicU64,
    parent: Option<Box<Vhdx>>,
    parent_path: Option<PathBuf>,
    /// Whether a log was replayed when this image was opened.
    replayed: bool,
    creator: String,
    /// Whether both region table copies were valid and equal at open.
    regions_agree: bool,
    state: RwLock<State>,
}

impl std::fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("storage", &self.storage)
            .field("variant", &self.variant)
            .field("read_only", &self.read_only)
            .field("parent_path", &self.parent_path)
            .finish_non_exhaustive()
    }
}

/// Mutable metadata.
#[derive(Debug)]
struct State {
    headers: Headers,
    regions: RegionTable,
    bat_offset: u64,
    bat_len: u64,
    meta: Metadata,
    geo: Geometry,
    bat: Vec<u64>,
    /// BAT pages (4 KiB units from the BAT's start) changed since the last flush.
    dirty_bat: BTreeSet<u64>,
    /// Changed sector bitmap sectors (file offset → 4 KiB), written before the BAT pages.
    pending_bitmap: BTreeMap<u64, Vec<u8>>,
    /// Changed metadata/region table sectors, written after the BAT pages.
    pending_meta: BTreeMap<u64, Vec<u8>>,
    /// 1 MiB aligned end of everything allocated: where the next block goes.
    next_free: u64,
    /// Whether this session's header (new write GUIDs) has been written.
    session_started: bool,
    /// Sequence number of the last log entry written or replayed.
    log_seq: u64,
}

impl Vhdx {
    /// Whether `storage` starts with the VHDX file identifier.
    pub fn detect(storage: &dyn Storage) -> Result<bool, DiskError> {
        let mut sig = [0u8; 8];
        match storage.read_at(&mut sig, 0) {
            Ok(()) => Ok(&sig == format::FILE_ID_SIGNATURE),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(source) => Err(DiskError::Io {
                op: "read",
                offset: 0,
                source,
            }),
        }
    }

    /// Open the image at `path` (a differencing image's parents are found relative to its
    /// directory and opened read-only).
    pub fn open(path: &Path, opts: &VhdxOpenOptions) -> Result<Vhdx, DiskError> {
        let canon = path.canonicalize().map_err(|source| DiskError::Io {
            op: "open",
            offset: 0,
            source,
        })?;
        let mut chain = vec![canon.clone()];
        Self::open_path(&canon, opts, &mut chain)
    }

    fn open_path(
        path: &Path,
        opts: &VhdxOpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Vhdx, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(io_err("open", 0))?;
        Self::open_inner(Box::new(FileStorage(file)), opts, path.parent(), chain)
    }

    /// Open an image held in `storage`; `dir` is where a differencing image's parent
    /// locator paths are resolved from (without it a differencing image fails to open).
    pub fn open_storage(
        storage: Box<dyn Storage>,
        opts: &VhdxOpenOptions,
        dir: Option<&Path>,
    ) -> Result<Vhdx, DiskError> {
        Self::open_inner(storage, opts, dir, &mut Vec::new())
    }

    fn open_inner(
        storage: Box<dyn Storage>,
        opts: &VhdxOpenOptions,
        dir: Option<&Path>,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Vhdx, DiskError> {
        let s = storage.as_ref();
        header::check_file_identifier(s)?;
        let mut headers = header::read_headers(s)?;
        let mut replayed = false;
        let mut log_seq = 0;
        if let Some(active) = log::scan(s, &headers.current)? {
            if opts.read_only || !opts.allow_replay {
                return Err(DiskError::NeedsLogReplay);
            }
            log::apply(s, &headers.current, &active)?;
            let mut h = headers.current.clone();
            h.log_guid = Guid::ZERO;
            h.file_write_guid = Guid::random();
            header::update(s, &mut headers, h)?;
            replayed = true;
            log_seq = active.head_sequence();
        }
        let (regions, regions_agree) = region::read(s)?;
        let bat_region = regions.find(format::BAT_GUID).expect("validated");
        let meta_region = regions.find(format::METADATA_GUID).expect("validated");
        let meta = metadata::read(s, meta_region)?;
        let geo = Geometry::new(
            meta.virtual_size,
            meta.block_size,
            meta.logical_sector_size,
            meta.has_parent,
        );
        let file_len = s.len().map_err(io_err("stat", 0))?;
        let log_start = headers.current.log_offset;
        let log_end = log_start + u64::from(headers.current.log_length);
        if let Some(r) = regions
            .entries
            .iter()
            .find(|r| log_start < r.end() && r.offset < log_end)
        {
            return Err(corrupt(
                "VHDX header",
                format::HEADER_OFFSETS[headers.index],
                format!(
                    "the log at {log_start:#x} overlaps the region at {:#x}",
                    r.offset
                ),
            ));
        }
        let bat = bat::load(s, &geo, bat_region.offset, u64::from(bat_region.length))?;
        let mut reserved = vec![bat::Reserved {
            start: log_start,
            end: log_end,
            what: "log",
        }];
        reserved.extend(regions.entries.iter().map(|r| bat::Reserved {
            start: r.offset,
            end: r.end(),
            what: if r.guid == format::BAT_GUID {
                "BAT"
            } else if r.guid == format::METADATA_GUID {
                "metadata region"
            } else {
                "region"
            },
        }));
        bat::validate(
            &bat,
            &geo,
            meta.virtual_size,
            meta.has_parent,
            file_len,
            bat_region.offset,
            &reserved,
        )?;
        let mut end = file_len.max(log_end);
        for r in &reserved {
            end = end.max(r.end);
        }
        for (i, &e) in bat.iter().enumerate() {
            let st = bat::state(e);
            if st == bat::FULLY_PRESENT || st == bat::PARTIALLY_PRESENT {
                let len = if geo.is_bitmap_index(i as u64) {
                    MIB
                } else {
                    geo.block_size
                };
                end = end.max(bat::offset(e) + len);
            }
        }
        let next_free =
            round_up(end, MIB).ok_or_else(|| corrupt("VHDX file", 0, "size overflows"))?;
        let variant = if meta.has_parent {
            Variant::Differencing
        } else if meta.leave_allocated {
            Variant::Fixed
        } else {
            Variant::Dynamic
        };
        let (parent, parent_path) = if meta.has_parent {
            let (p, path) = open_parent(&meta, dir, chain)?;
            (Some(Box::new(p)), Some(path))
        } else {
            (None, None)
        };
        let creator = header::read_creator(s);
        Ok(Vhdx {
            read_only: opts.read_only,
            variant,
            logical: meta.logical_sector_size,
            physical: meta.physical_sector_size,
            size: AtomicU64::new(meta.virtual_size),
            parent,
            parent_path,
            replayed,
            creator,
            regions_agree,
            state: RwLock::new(State {
                headers,
                regions,
                bat_offset: bat_region.offset,
                bat_len: u64::from(bat_region.length),
                meta,
                geo,
                bat,
                dirty_bat: BTreeSet::new(),
                pending_bitmap: BTreeMap::new(),
                pending_meta: BTreeMap::new(),
                next_free,
                session_started: false,
                log_seq,
            }),
            storage,
        })
    }

    /// The kind of image.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The resolved parent path of a differencing image.
    pub fn parent_path(&self) -> Option<&Path> {
        self.parent_path.as_deref()
    }

    /// Whether a log was replayed when the image was opened.
    pub fn log_replayed(&self) -> bool {
        self.replayed
    }

    /// The current DataWriteGuid (what a child's `parent_linkage` must match).
    pub fn data_write_guid(&self) -> String {
        self.read_state()
            .headers
            .current
            .data_write_guid
            .to_string()
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Vhdx {
    fn drop(&mut self) {
        if !self.read_only {
            let mut st = self.write_state();
            let _ = self.flush_locked(&mut st);
        }
    }
}

/// Copy the image at `src` to `dst` (which must not exist) and replay its log on the copy,
/// leaving `src` untouched. Returns whether a log was replayed. A differencing image's
/// parent is resolved relative to `dst`'s directory.
pub fn replay_to_copy(src: &Path, dst: &Path) -> Result<bool, DiskError> {
    let mut from = std::fs::File::open(src).map_err(io_err("open", 0))?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err("create", 0))?;
    std::io::copy(&mut from, &mut to).map_err(io_err("copy", 0))?;
    to.sync_all().map_err(io_err("flush", 0))?;
    drop(to);
    let v = Vhdx::open(
        dst,
        &VhdxOpenOptions {
            read_only: false,
            allow_replay: true,
        },
    )?;
    Ok(v.log_replayed())
}

/// Where a parent locator may point, in the order tried.
fn parent_candidates(meta: &Metadata, dir: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let (Some(rel), Some(dir)) = (meta.locator("relative_path"), dir) {
        let rel = rel.replace('\\', "/");
        let rel = rel.trim_start_matches("./");
        if !rel.is_empty() && !rel.starts_with('/') {
            out.push(dir.join(rel));
        }
    }
    for key in ["absolute_win32_path", "volume_path"] {
        if let Some(p) = meta.locator(key) {
            // Only host-style absolute paths mean anything here.
            let p = p.strip_prefix("\\\\?\\").unwrap_or(p);
            if p.starts_with('/') {
                out.push(PathBuf::from(p));
            }
        }
    }
    out
}

/// Find, open (read-only) and verify the parent of a differencing image.
fn open_parent(
    meta: &Metadata,
    dir: Option<&Path>,
    chain: &mut Vec<PathBuf>,
) -> Result<(Vhdx, PathBuf), DiskError> {
    let candidates = parent_candidates(meta, dir);
    let Some(path) = candidates.iter().find(|p| p.exists()).cloned() else {
        let tried = candidates.first().map_or_else(
            || meta.locator("relative_path").unwrap_or("").to_string(),
            |p| p.display().to_string(),
        );
        return Err(DiskError::Parent {
            path: tried,
            source: Box::new(DiskError::Io {
                op: "open",
                offset: 0,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no parent locator path exists",
                ),
            }),
        });
    };
    let shown = path.display().to_string();
    let wrap = |e: DiskError| match e {
        e @ DiskError::ParentChain { .. } => e,
        e => DiskError::Parent {
            path: shown.clone(),
            source: Box::new(e),
        },
    };
    let canon = path
        .canonicalize()
        .map_err(io_err("open", 0))
        .map_err(wrap)?;
    if chain.contains(&canon) || chain.len() >= MAX_CHAIN_DEPTH {
        return Err(DiskError::ParentChain {
            path: shown,
            limit: MAX_CHAIN_DEPTH,
        });
    }
    chain.push(canon.clone());
    let parent = Vhdx::open_path(
        &canon,
        &VhdxOpenOptions {
            read_only: true,
            allow_replay: false,
        },
        chain,
    )
    .map_err(wrap)?;
    let linkage = meta.locator("parent_linkage").unwrap_or("");
    let linkage2 = meta.locator("parent_linkage2");
    let actual = parent.read_state().headers.current.data_write_guid;
    let matches = |s: &str| Guid::parse(s) == Some(actual);
    if !matches(linkage) && !linkage2.is_some_and(matches) {
        return Err(wrap(corrupt(
            "VHDX parent locator",
            0,
            format!(
                "parent_linkage {linkage} does not match the parent's DataWriteGuid {actual} (the parent was modified)"
            ),
        )));
    }
    if parent.logical != meta.logical_sector_size {
        return Err(wrap(format::unsupported(format!(
            "parent with {}-byte sectors under a child with {}-byte sectors",
            parent.logical, meta.logical_sector_size
        ))));
    }
    Ok((parent, path))
}
