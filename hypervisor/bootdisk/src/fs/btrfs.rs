//! btrfs, read-only, written here against the on-disk format (the Linux kernel's
//! `include/uapi/linux/btrfs_tree.h` and the btrfs documentation): the superblock and its
//! system chunk array, the chunk tree (logical to physical addresses, single and DUP
//! profiles), the root tree, and the file system trees of the default subvolume and of the
//! subvolumes it reaches. Directory items, inode items, inline and regular file extents
//! (holes and preallocated extents read as zeros) and symbolic links. Compressed extents
//! are refused with their reason; so are RAID profiles and data on another device.
//!
//! Nothing from the disk is trusted: CRC32C checksums (the default) of the superblock and of
//! every tree block are checked (other checksum kinds are not verified, the structure still
//! is), as are each block's address, file system id and level; trees are bounded in depth
//! and in blocks visited (each at most once); file extents must not overlap; all arithmetic
//! on disk values is checked.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::crc32c::update as crc32c_update;
use super::{FileKind, FileSystem, components};
use crate::{Error, ReadAt, Result};

const SUPER_AT: u64 = 0x10000;
const HEADER: usize = 0x65;
const ITEM: usize = 25;
const KEY_PTR: usize = 33;
/// Tree levels run 0 (leaves) to 7.
const MAX_LEVEL: u8 = 7;
/// Tree blocks one search may visit.
const MAX_SEARCH_BLOCKS: usize = 1 << 12;
/// Chunks kept.
const MAX_CHUNKS: usize = 1 << 16;
/// Longer symbolic links are refused (btrfs keeps them inline, under a page).
const MAX_LINK: u64 = 4096;

const INODE_ITEM: u8 = 1;
const DIR_ITEM: u8 = 84;
const DIR_INDEX: u8 = 96;
const EXTENT_DATA: u8 = 108;
const ROOT_ITEM: u8 = 132;
const CHUNK_ITEM: u8 = 228;

const FS_TREE: u64 = 5;
const ROOT_TREE_DIR: u64 = 6;

/// Incompatible features read here: mixed backrefs, a default subvolume, mixed block
/// groups, LZO and zstd (refused per extent), big metadata, extended inode refs, RAID5/6
/// and RAID1C3/4 (refused per chunk), skinny metadata, no holes, a metadata UUID, zoned.
const KNOWN_INCOMPAT: u64 = 0x1fff;
const INCOMPAT_METADATA_UUID: u64 = 0x400;

/// Chunk profile bits other than single and DUP.
const RAID_PROFILES: u64 = 0x8 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

fn le16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at.saturating_add(2)) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    match b
        .get(at..at.saturating_add(4))
        .and_then(|s| s.try_into().ok())
    {
        Some(s) => u32::from_le_bytes(s),
        None => 0,
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    match b
        .get(at..at.saturating_add(8))
        .and_then(|s| s.try_into().ok())
    {
        Some(s) => u64::from_le_bytes(s),
        None => 0,
    }
}

/// A btree key: (object id, item type, offset), ordered in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    id: u64,
    ty: u8,
    off: u64,
}

impl Key {
    fn new(id: u64, ty: u8, off: u64) -> Key {
        Key { id, ty, off }
    }
    fn read(b: &[u8], at: usize) -> Key {
        Key {
            id: le64(b, at),
            ty: b.get(at + 8).copied().unwrap_or(0),
            off: le64(b, at + 9),
        }
    }
}

/// A tree's root block and its level.
#[derive(Debug, Clone, Copy)]
struct Root {
    bytenr: u64,
    level: u8,
}

/// A subvolume: its tree and the inode of its top directory.
#[derive(Debug, Clone, Copy)]
struct Subvol {
    tree: Root,
    dir: u64,
}

/// A range of logical addresses and where it lies on this device.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    logical: u64,
    len: u64,
    /// None when its (first) stripe is on another device.
    physical: Option<u64>,
    raid: bool,
}

/// What the superblock says, checked.
struct Super {
    nodesize: usize,
    crc: bool,
    /// The id tree block headers carry (the metadata UUID when there is one).
    meta_fsid: [u8; 16],
    fsid: [u8; 16],
    label: Vec<u8>,
    root: Root,
}

/// An inode as far as reading needs it.
struct Inode {
    mode: u32,
    size: u64,
}

impl Inode {
    fn kind(&self) -> FileKind {
        match self.mode & S_IFMT {
            S_IFDIR => FileKind::Dir,
            S_IFREG => FileKind::File { size: self.size },
            S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }
}

/// A btrfs file system, seen from its default subvolume.
pub struct BtrfsFs {
    part: Arc<dyn ReadAt>,
    place: String,
    sb: Super,
    /// Sorted by logical address, disjoint.
    chunks: Vec<Chunk>,
    top: Subvol,
}

type Visit<'f> = dyn FnMut(Key, &[u8]) -> std::result::Result<bool, Error> + 'f;

impl BtrfsFs {
    /// Read and check the superblock, the chunk tree and the default subvolume of the btrfs
    /// on `part` (`place` names it in errors).
    pub fn open(part: Arc<dyn ReadAt>, place: &str) -> Result<BtrfsFs> {
        let bad = |reason: String| Error::BadFs {
            fs: "btrfs",
            place: place.to_string(),
            reason,
        };
        let mut b = vec![0u8; 4096];
        part.read_at(&mut b, SUPER_AT)
            .map_err(|e| crate::io_error(SUPER_AT, e))?;
        if b[0x40..0x48] != *b"_BHRfS_M" {
            return Err(bad("it has no btrfs superblock".into()));
        }
        let crc = match le16(&b, 0xc4) {
            0 => {
                if !crc32c_ok(&b, 0x20) {
                    return Err(bad("its superblock checksum is wrong".into()));
                }
                true
            }
            1..=3 => false,
            t => return Err(bad(format!("its checksum kind {t} is not known"))),
        };
        if le64(&b, 0x30) != SUPER_AT {
            return Err(bad("its superblock is not where it says it is".into()));
        }
        let incompat = le64(&b, 0xbc);
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(bad(format!(
                "it uses features this reader does not know (incompatible feature bits \
                 {:#x})",
                incompat & !KNOWN_INCOMPAT
            )));
        }
        let sectorsize = le32(&b, 0x90) as usize;
        let nodesize = le32(&b, 0x94) as usize;
        if !sectorsize.is_power_of_two()
            || !(4096..=65536).contains(&sectorsize)
            || !nodesize.is_power_of_two()
            || !(sectorsize..=65536).contains(&nodesize)
        {
            return Err(bad("its sector or node size is not valid".into()));
        }
        let mut fsid = [0u8; 16];
        fsid.copy_from_slice(&b[0x20..0x30]);
        let mut meta_fsid = fsid;
        if incompat & INCOMPAT_METADATA_UUID != 0 {
            meta_fsid.copy_from_slice(&b[0x23b..0x24b]);
        }
        let label_area = &b[0x12b..0x22b];
        let label_len = label_area.iter().position(|&c| c == 0).unwrap_or(256);
        let level = |at: usize| -> std::result::Result<u8, Error> {
            let l = b[at];
            if l > MAX_LEVEL {
                return Err(bad("a tree's level is not valid".into()));
            }
            Ok(l)
        };
        let sb = Super {
            nodesize,
            crc,
            meta_fsid,
            fsid,
            label: label_area[..label_len].to_vec(),
            root: Root {
                bytenr: le64(&b, 0x50),
                level: level(0xc6)?,
            },
        };
        let chunk_root = Root {
            bytenr: le64(&b, 0x58),
            level: level(0xc7)?,
        };
        let devid = le64(&b, 0xc9);
        // The system chunk array: (key, chunk) pairs that map the chunk tree itself.
        let array_len = le32(&b, 0xa0) as usize;
        let array = b
            .get(0x32b..0x32b + array_len.min(2048))
            .filter(|_| array_len <= 2048)
            .ok_or_else(|| bad("its system chunk array is too long".into()))?;
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < array.len() {
            let key = Key::read(array, at);
            let chunk = array.get(at + 17..).unwrap_or(&[]);
            let used = parse_chunk(key, chunk, devid, &mut chunks)
                .map_err(|why| bad(format!("its system chunk array is corrupt: {why}")))?;
            at += 17 + used;
        }
        let mut fs = BtrfsFs {
            part,
            place: place.to_string(),
            sb,
            chunks: Vec::new(),
            top: Subvol {
                tree: chunk_root,
                dir: 0,
            },
        };
        fs.set_chunks(chunks).map_err(&bad)?;
        // The whole chunk tree, through the system chunks.
        let mut all = Vec::new();
        fs.search(
            chunk_root,
            Key::new(0, CHUNK_ITEM, 0),
            Key::new(u64::MAX, CHUNK_ITEM, u64::MAX),
            &mut |key, data| {
                if key.ty == CHUNK_ITEM {
                    parse_chunk(key, data, devid, &mut all).map_err(|why| Error::BadFs {
                        fs: "btrfs",
                        place: place.to_string(),
                        reason: format!("its chunk tree is corrupt: {why}"),
                    })?;
                }
                Ok(false)
            },
        )
        .map_err(|e| bad(format!("its chunk tree cannot be read ({e})")))?;
        fs.set_chunks(all).map_err(&bad)?;
        if fs.chunks.iter().any(|c| c.raid) {
            return Err(bad(
                "it uses a RAID profile; only single and DUP file systems are read".into(),
            ));
        }
        // The default subvolume: the root tree's "default" entry, else the top level.
        let mut default = FS_TREE;
        let name = b"default";
        let hash = crc32c_update(!1, name) as u64;
        fs.search(
            fs.sb.root,
            Key::new(ROOT_TREE_DIR, DIR_ITEM, hash),
            Key::new(ROOT_TREE_DIR, DIR_ITEM, hash),
            &mut |_, data| {
                if let Some(loc) = dir_items(data).find(|(n, _)| *n == name).map(|(_, l)| l) {
                    default = loc.id;
                }
                Ok(true)
            },
        )
        .map_err(|e| bad(format!("its root tree cannot be read ({e})")))?;
        fs.top = fs
            .subvol(default)
            .map_err(|e| bad(format!("its default subvolume cannot be read ({e})")))?;
        let root = fs
            .inode(fs.top, fs.top.dir)
            .map_err(|e| bad(format!("its top directory cannot be read ({e})")))?;
        if root.kind() != FileKind::Dir {
            return Err(bad("its top directory is not a directory".into()));
        }
        Ok(fs)
    }

    /// Sort the chunks and check that they do not overlap.
    fn set_chunks(&mut self, mut chunks: Vec<Chunk>) -> std::result::Result<(), String> {
        chunks.sort_by_key(|c| c.logical);
        chunks.dedup_by_key(|c| c.logical);
        for w in chunks.windows(2) {
            if w[0].logical.saturating_add(w[0].len) > w[1].logical {
                return Err("its chunks overlap".into());
            }
        }
        self.chunks = chunks;
        Ok(())
    }

    fn bad(&self, path: &str, why: impl std::fmt::Display) -> Error {
        Error::BadFs {
            fs: "btrfs",
            place: self.place.clone(),
            reason: format!("reading {path}: {why}"),
        }
    }

    /// Fill `buf` from logical address `logical`, through the chunks.
    fn read_logical(&self, buf: &mut [u8], logical: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = logical
                .checked_add(done as u64)
                .ok_or_else(|| self.bad("metadata", "an address overflows"))?;
            let i = self.chunks.partition_point(|c| c.logical <= at);
            let chunk = i
                .checked_sub(1)
                .and_then(|i| self.chunks.get(i))
                .filter(|c| at - c.logical < c.len)
                .ok_or_else(|| self.bad("metadata", format!("address {at} is in no chunk")))?;
            let physical = chunk.physical.ok_or_else(|| {
                self.bad(
                    "metadata",
                    format!("address {at} lies on another device of the file system"),
                )
            })?;
            let into = at - chunk.logical;
            let n = ((chunk.len - into).min((buf.len() - done) as u64)) as usize;
            let offset = physical
                .checked_add(into)
                .ok_or_else(|| self.bad("metadata", "an address overflows"))?;
            self.part
                .read_at(&mut buf[done..done + n], offset)
                .map_err(|e| crate::io_error(offset, e))?;
            done += n;
        }
        Ok(())
    }

    /// The tree block at `bytenr`, which must be at `level`, checked.
    fn block(&self, bytenr: u64, level: u8) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.sb.nodesize];
        self.read_logical(&mut b, bytenr)?;
        let bad = |why: &str| self.bad(&format!("tree block {bytenr}"), why);
        if self.sb.crc && !crc32c_ok(&b, 0x20) {
            return Err(bad("its checksum is wrong"));
        }
        if le64(&b, 0x30) != bytenr || b[0x20..0x30] != self.sb.meta_fsid {
            return Err(bad("it is not the block it should be"));
        }
        if b[0x64] != level {
            return Err(bad("it is at the wrong level"));
        }
        let n = le32(&b, 0x60) as usize;
        let each = if level == 0 { ITEM } else { KEY_PTR };
        if n > (b.len() - HEADER) / each {
            return Err(bad("its item count is too large"));
        }
        Ok(b)
    }

    /// Call `f` with each item whose key is in `lo..=hi`, in key order, until it returns
    /// true.
    fn search(&self, root: Root, lo: Key, hi: Key, f: &mut Visit<'_>) -> Result<()> {
        let mut seen = BTreeSet::new();
        self.search_in(root.bytenr, root.level, lo, hi, &mut seen, f)
            .map(|_| ())
    }

    fn search_in(
        &self,
        bytenr: u64,
        level: u8,
        lo: Key,
        hi: Key,
        seen: &mut BTreeSet<u64>,
        f: &mut Visit<'_>,
    ) -> Result<bool> {
        if !seen.insert(bytenr) || seen.len() > MAX_SEARCH_BLOCKS {
            return Err(self.bad("metadata", "a tree loops or is too large"));
        }
        let b = self.block(bytenr, level)?;
        let n = le32(&b, 0x60) as usize;
        if level == 0 {
            for i in 0..n {
                let at = HEADER + i * ITEM;
                let key = Key::read(&b, at);
                if key < lo {
                    continue;
                }
                if key > hi {
                    return Ok(true);
                }
                let off = le32(&b, at + 17) as usize;
                let size = le32(&b, at + 21) as usize;
                let data = off
                    .checked_add(HEADER)
                    .and_then(|s| b.get(s..s.checked_add(size)?))
                    .ok_or_else(|| self.bad("metadata", "a tree item lies outside its block"))?;
                if f(key, data)? {
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        for i in 0..n {
            let at = HEADER + i * KEY_PTR;
            let key = Key::read(&b, at);
            if key > hi {
                return Ok(true);
            }
            // Child i holds the keys from its own up to the next child's.
            if i + 1 < n && Key::read(&b, at + KEY_PTR) <= lo {
                continue;
            }
            let child = le64(&b, at + 17);
            if self.search_in(child, level - 1, lo, hi, seen, f)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The item at exactly `key`, if any.
    fn item(&self, root: Root, key: Key) -> Result<Option<Vec<u8>>> {
        let mut out = None;
        self.search(root, key, key, &mut |_, data| {
            out = Some(data.to_vec());
            Ok(true)
        })?;
        Ok(out)
    }

    /// Subvolume `id`: its tree root and top directory.
    fn subvol(&self, id: u64) -> Result<Subvol> {
        let mut found = None;
        self.search(
            self.sb.root,
            Key::new(id, ROOT_ITEM, 0),
            Key::new(id, ROOT_ITEM, u64::MAX),
            &mut |_, data| {
                found = Some(data.to_vec());
                Ok(true)
            },
        )?;
        let r = found.ok_or_else(|| self.bad("metadata", format!("subvolume {id} is missing")))?;
        if r.len() < 239 {
            return Err(self.bad("metadata", format!("subvolume {id}'s root item is short")));
        }
        let level = r[238];
        if level > MAX_LEVEL {
            return Err(self.bad("metadata", format!("subvolume {id}'s level is not valid")));
        }
        Ok(Subvol {
            tree: Root {
                bytenr: le64(&r, 176),
                level,
            },
            dir: le64(&r, 168),
        })
    }

    /// Inode `ino` of subvolume `sv`.
    fn inode(&self, sv: Subvol, ino: u64) -> Result<Inode> {
        let item = self
            .item(sv.tree, Key::new(ino, INODE_ITEM, 0))?
            .ok_or_else(|| self.bad(&format!("inode {ino}"), "it is missing"))?;
        if item.len() < 160 {
            return Err(self.bad(&format!("inode {ino}"), "its item is short"));
        }
        Ok(Inode {
            mode: le32(&item, 52),
            size: le64(&item, 16),
        })
    }

    /// The inode at `path` (a final symbolic link not followed), with its subvolume and
    /// number.
    fn lookup(&self, path: &str) -> Result<(Subvol, u64, Inode)> {
        let parts = components(path);
        let mut sv = self.top;
        let mut ino = sv.dir;
        let mut node = self.inode(sv, ino)?;
        for (i, name) in parts.iter().enumerate() {
            let here = format!("/{}", parts[..i].join("/"));
            if node.kind() != FileKind::Dir {
                return Err(Error::WrongKind {
                    path: here,
                    what: "not a directory",
                });
            }
            let hash = crc32c_update(!1, name.as_bytes()) as u64;
            let mut found = None;
            self.search(
                sv.tree,
                Key::new(ino, DIR_ITEM, hash),
                Key::new(ino, DIR_ITEM, hash),
                &mut |_, data| {
                    found = dir_items(data)
                        .find(|(n, _)| *n == name.as_bytes())
                        .map(|(_, loc)| loc);
                    Ok(true)
                },
            )?;
            let loc = found.ok_or_else(|| Error::NotFound(path.to_string()))?;
            match loc.ty {
                INODE_ITEM => ino = loc.id,
                ROOT_ITEM => {
                    sv = self.subvol(loc.id)?;
                    ino = sv.dir;
                }
                _ => return Err(self.bad(&here, "a directory entry points at nothing known")),
            }
            node = self.inode(sv, ino)?;
        }
        Ok((sv, ino, node))
    }

    /// The first `len` bytes of inode `ino`'s data.
    fn data(&self, path: &str, sv: Subvol, ino: u64, len: u64) -> Result<Vec<u8>> {
        let len_usize = usize::try_from(len).map_err(|_| self.bad(path, "it is too large"))?;
        let mut out = vec![0u8; len_usize];
        let mut next = 0u64; // file offsets below this are already mapped
        self.search(
            sv.tree,
            Key::new(ino, EXTENT_DATA, 0),
            Key::new(ino, EXTENT_DATA, u64::MAX),
            &mut |key, e| {
                let at = key.off;
                if at >= len {
                    return Ok(true);
                }
                if at < next {
                    return Err(self.bad(path, "its extents overlap"));
                }
                if e.len() < 21 {
                    return Err(self.bad(path, "an extent item is short"));
                }
                let compression = e[16];
                if compression != 0 {
                    let how = match compression {
                        1 => "zlib",
                        2 => "LZO",
                        3 => "zstd",
                        _ => "an unknown method",
                    };
                    return Err(self.bad(
                        path,
                        format!(
                            "it is compressed with {how}, which this reader does not decompress"
                        ),
                    ));
                }
                if e[17] != 0 || le16(e, 18) != 0 {
                    return Err(self.bad(path, "it is encrypted or encoded"));
                }
                let room = len - at; // what is left of the file from here
                match e[20] {
                    0 => {
                        let inline = &e[21..];
                        let n = (inline.len() as u64).min(room) as usize;
                        out[at as usize..at as usize + n].copy_from_slice(&inline[..n]);
                        next = at + inline.len() as u64;
                    }
                    ty @ (1 | 2) => {
                        if e.len() < 53 {
                            return Err(self.bad(path, "an extent item is short"));
                        }
                        let disk = le64(e, 21);
                        let offset = le64(e, 37);
                        let num = le64(e, 45);
                        next = at
                            .checked_add(num)
                            .ok_or_else(|| self.bad(path, "an extent is too long"))?;
                        // A hole (no disk block) or a preallocated extent reads as zeros.
                        if ty == 1 && disk != 0 {
                            let n = num.min(room) as usize;
                            let from = disk
                                .checked_add(offset)
                                .ok_or_else(|| self.bad(path, "an extent's address overflows"))?;
                            self.read_logical(&mut out[at as usize..at as usize + n], from)?;
                        }
                    }
                    _ => return Err(self.bad(path, "an extent is of an unknown kind")),
                }
                Ok(false)
            },
        )?;
        Ok(out)
    }
}

/// Whether the CRC32C of `b[from..]` is the little-endian checksum at the start of `b`.
fn crc32c_ok(b: &[u8], from: usize) -> bool {
    match b.get(from..) {
        Some(data) => (!crc32c_update(!0, data)).to_le_bytes()[..] == b[..4],
        None => false,
    }
}

/// Parse one chunk item (`key` names its logical start) into `out`; the bytes it took.
fn parse_chunk(
    key: Key,
    c: &[u8],
    devid: u64,
    out: &mut Vec<Chunk>,
) -> std::result::Result<usize, String> {
    if key.ty != CHUNK_ITEM {
        return Err("an entry is not a chunk".into());
    }
    let stripes = le16(c, 44) as usize;
    let used = 48 + stripes * 32;
    if stripes == 0 || c.len() < used {
        return Err("a chunk has no stripes or is short".into());
    }
    let len = le64(c, 0);
    let ty = le64(c, 24);
    if len == 0 || key.off.checked_add(len).is_none() {
        return Err("a chunk's length is not valid".into());
    }
    if out.len() >= MAX_CHUNKS {
        return Err("there are too many chunks".into());
    }
    // Single has one stripe and DUP two copies on the same device: the first will do.
    let physical = (le64(c, 48) == devid).then(|| le64(c, 56));
    out.push(Chunk {
        logical: key.off,
        len,
        physical,
        raid: ty & RAID_PROFILES != 0,
    });
    Ok(used)
}

/// The (name, location key) pairs packed in a directory item.
fn dir_items(mut d: &[u8]) -> impl Iterator<Item = (&[u8], Key)> {
    std::iter::from_fn(move || {
        let name_len = le16(d, 27) as usize;
        let data_len = le16(d, 25) as usize;
        let name = d.get(30..30 + name_len)?;
        let loc = Key::read(d, 0);
        d = d.get(30 + name_len + data_len..).unwrap_or(&[]);
        Some((name, loc))
    })
}

impl FileSystem for BtrfsFs {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    fn uuid(&self) -> Option<String> {
        let u = &self.sb.fsid;
        let h = |r: std::ops::Range<usize>| -> String {
            u[r].iter().map(|b| format!("{b:02x}")).collect()
        };
        Some(format!(
            "{}-{}-{}-{}-{}",
            h(0..4),
            h(4..6),
            h(6..8),
            h(8..10),
            h(10..16)
        ))
    }

    fn label(&self) -> Option<String> {
        let l = std::str::from_utf8(&self.sb.label).ok()?.trim();
        (!l.is_empty()).then(|| l.to_string())
    }

    fn kind_of(&self, path: &str) -> Result<FileKind> {
        Ok(self.lookup(path)?.2.kind())
    }

    fn read_link(&self, path: &str) -> Result<String> {
        let (sv, ino, node) = self.lookup(path)?;
        if node.kind() != FileKind::Symlink {
            return Err(Error::WrongKind {
                path: path.to_string(),
                what: "not a symbolic link",
            });
        }
        if node.size == 0 || node.size > MAX_LINK {
            return Err(self.bad(path, "the link's length is not valid"));
        }
        String::from_utf8(self.data(path, sv, ino, node.size)?)
            .map_err(|_| self.bad(path, "the link is not UTF-8"))
    }

    fn read(&self, path: &str, cap: u64) -> Result<Vec<u8>> {
        let (sv, ino, node) = self.lookup(path)?;
        match node.kind() {
            FileKind::File { size } if size > cap => Err(Error::TooLarge {
                path: path.to_string(),
                limit: cap,
            }),
            FileKind::File { size } => self.data(path, sv, ino, size),
            FileKind::Dir => Err(Error::WrongKind {
                path: path.to_string(),
                what: "a directory",
            }),
            _ => Err(Error::WrongKind {
                path: path.to_string(),
                what: "not a regular file",
            }),
        }
    }

    fn list(&self, path: &str, cap: usize) -> Result<Vec<String>> {
        let (sv, ino, node) = self.lookup(path)?;
        if node.kind() != FileKind::Dir {
            return Err(Error::WrongKind {
                path: path.to_string(),
                what: "not a directory",
            });
        }
        let mut names = Vec::new();
        self.search(
            sv.tree,
            Key::new(ino, DIR_INDEX, 0),
            Key::new(ino, DIR_INDEX, u64::MAX),
            &mut |_, data| {
                if names.len() >= cap {
                    return Ok(true);
                }
                if let Some((n, _)) = dir_items(data).next()
                    && let Ok(n) = std::str::from_utf8(n)
                {
                    names.push(n.to_string());
                }
                Ok(false)
            },
        )?;
        Ok(names)
    }
}
