//! XFS, read-only, written here against the on-disk format (the Linux kernel's
//! `fs/xfs/libxfs/xfs_format.h` and `xfs_da_format.h`, and "XFS Algorithms & Data
//! Structures"): v4 and v5 (CRC) superblocks, inode cores v1–v3 (with or without large
//! extent counters), directories in every form (short form in the inode, single block,
//! leaf and node), symbolic links inline or in blocks, regular files through extent lists
//! and bmap btrees. Unwritten extents and holes read as zeros. The log is not replayed: what
//! only a dirty log holds is not seen.
//!
//! Nothing from the disk is trusted: the superblock and inode CRCs (v5) are checked, as are
//! the CRCs and magic numbers of directory, btree and symlink blocks; btrees are bounded in
//! depth, in blocks visited (each at most once) and in extents; directories in the bytes
//! scanned; all arithmetic on disk values is checked.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::crc32c::update as crc32c_update;
use super::{FileKind, FileSystem, components};
use crate::{Error, ReadAt, Result};

/// Incompatible v5 features this reader understands: ftype, sparse inodes, meta UUID,
/// bigtime, needsrepair, nrext64, exchange-range, parent pointers, metadir, zoned realtime.
/// Sparse inodes, bigtime, exchange-range and parent pointers change nothing it reads;
/// metadir and zoned concern metadata and realtime files, which it does not read.
const KNOWN_INCOMPAT: u32 = 0x3ff;
const INCOMPAT_FTYPE: u32 = 1;

/// A bmap btree deeper than this is corrupt (the kernel's own bound is lower for any real
/// file).
const MAX_BTREE_LEVEL: u16 = 8;
/// Btree blocks visited while mapping one file.
const MAX_BTREE_BLOCKS: usize = 1 << 16;
/// Extents kept for one file (a 1 GiB file of 4 KiB blocks has at most 262144).
const MAX_EXTENTS: usize = 1 << 20;
/// Bytes of directory blocks scanned for one directory.
const MAX_DIR_BYTES: u64 = 16 << 20;
/// XFS refuses longer symbolic links.
const MAX_LINK: u64 = 1024;
/// Directory data lives below this byte offset; leaf and free-index blocks above it.
const DIR_LEAF_OFFSET: u64 = 32 << 30;

const FMT_LOCAL: u8 = 1;
const FMT_EXTENTS: u8 = 2;
const FMT_BTREE: u8 = 3;

const S_IFMT: u16 = 0o170000;
const S_IFDIR: u16 = 0o040000;
const S_IFREG: u16 = 0o100000;
const S_IFLNK: u16 = 0o120000;

/// What the superblock says, checked.
#[derive(Debug, Clone)]
struct Super {
    block_log: u32,
    ag_blocks: u32,
    ag_count: u32,
    ag_blk_log: u32,
    inode_size: usize,
    inode_log: u32,
    inop_log: u32,
    dir_blk_log: u32,
    root_ino: u64,
    v5: bool,
    ftype: bool,
    ascii_ci: bool,
    uuid: [u8; 16],
    label: [u8; 12],
}

impl Super {
    fn block_size(&self) -> usize {
        1usize << self.block_log
    }
    fn dir_block_size(&self) -> usize {
        1usize << (self.block_log + self.dir_blk_log)
    }
}

/// An inode as far as reading needs it.
struct Inode {
    ino: u64,
    mode: u16,
    format: u8,
    size: u64,
    nextents: u64,
    realtime: bool,
    /// The data fork as it lies in the inode (its literal area up to the attribute fork).
    fork: Vec<u8>,
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

/// One mapping of file blocks to disk blocks.
#[derive(Debug, Clone, Copy)]
struct Extent {
    /// First file block.
    off: u64,
    /// First disk block (an AG number and a block in it, packed).
    start: u64,
    len: u64,
    unwritten: bool,
}

impl Extent {
    /// A packed 128-bit bmap record: flag (1), file offset (54), disk block (52), length (21).
    fn decode(rec: &[u8]) -> Extent {
        let l0 = be64(rec, 0);
        let l1 = be64(rec, 8);
        Extent {
            off: (l0 & !(1 << 63)) >> 9,
            start: ((l0 & 0x1ff) << 43) | (l1 >> 21),
            len: l1 & ((1 << 21) - 1),
            unwritten: l0 >> 63 == 1,
        }
    }
    fn end(&self) -> u64 {
        self.off.saturating_add(self.len)
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at.saturating_add(2)) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    match b
        .get(at..at.saturating_add(4))
        .and_then(|s| s.try_into().ok())
    {
        Some(s) => u32::from_be_bytes(s),
        None => 0,
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    match b
        .get(at..at.saturating_add(8))
        .and_then(|s| s.try_into().ok())
    {
        Some(s) => u64::from_be_bytes(s),
        None => 0,
    }
}

/// Whether the CRC32C of `buf`, with its 4-byte little-endian checksum at `at` taken as zero,
/// is that checksum (as XFS stamps its metadata).
fn crc_ok(buf: &[u8], at: usize) -> bool {
    let (Some(head), Some(sum), Some(tail)) = (
        buf.get(..at),
        buf.get(at..at.saturating_add(4)),
        buf.get(at.saturating_add(4)..),
    ) else {
        return false;
    };
    let mut crc = crc32c_update(!0, head);
    crc = crc32c_update(crc, &[0; 4]);
    crc = !crc32c_update(crc, tail);
    crc.to_le_bytes() == sum
}

/// Extents gathered in file order, checked as they come.
struct Extents {
    list: Vec<Extent>,
    /// Extents starting at or past this file block are not wanted.
    upto: u64,
    done: bool,
}

impl Extents {
    fn new(upto: u64) -> Extents {
        Extents {
            list: Vec::new(),
            upto,
            done: false,
        }
    }

    fn push(&mut self, e: Extent) -> std::result::Result<(), String> {
        if e.len == 0 {
            return Err("an extent of no blocks".into());
        }
        if let Some(prev) = self.list.last()
            && e.off < prev.end()
        {
            return Err("its extents overlap or are out of order".into());
        }
        if e.off >= self.upto {
            self.done = true;
            return Ok(());
        }
        if self.list.len() >= MAX_EXTENTS {
            return Err(format!("it has more than {MAX_EXTENTS} extents"));
        }
        self.list.push(e);
        Ok(())
    }
}

/// The extent that maps file block `b`, if any (`list` sorted and disjoint).
fn find_extent(list: &[Extent], b: u64) -> Option<&Extent> {
    let i = list.partition_point(|e| e.end() <= b);
    list.get(i).filter(|e| e.off <= b)
}

/// An XFS file system.
pub struct XfsFs {
    part: Arc<dyn ReadAt>,
    place: String,
    sb: Super,
}

impl XfsFs {
    /// Read and check the superblock of the XFS on `part` (`place` names it in errors).
    pub fn open(part: Arc<dyn ReadAt>, place: &str) -> Result<XfsFs> {
        let bad = |reason: String| Error::BadFs {
            fs: "xfs",
            place: place.to_string(),
            reason,
        };
        let mut b = vec![0u8; 512];
        part.read_at(&mut b, 0).map_err(|e| crate::io_error(0, e))?;
        if b[..4] != *b"XFSB" {
            return Err(bad("it has no XFS superblock".into()));
        }
        let version = be16(&b, 100) & 0xf;
        if version != 4 && version != 5 {
            return Err(bad(format!(
                "its superblock version {version} is not known"
            )));
        }
        let sect_size = be16(&b, 102) as usize;
        let sect_log = b[121] as u32;
        if !(512..=32768).contains(&sect_size) || sect_size != 1 << sect_log.min(16) {
            return Err(bad(format!("its sector size {sect_size} is not valid")));
        }
        if sect_size > b.len() {
            b = vec![0u8; sect_size];
            part.read_at(&mut b, 0).map_err(|e| crate::io_error(0, e))?;
        }
        let versionnum = be16(&b, 100);
        // Some old kernels wrote the second feature word one field late; the kernel merges
        // the two.
        let features2 = be32(&b, 200) | be32(&b, 204);
        let (v5, ftype) = if version == 5 {
            if !crc_ok(&b, 224) {
                return Err(bad("its superblock checksum is wrong".into()));
            }
            let incompat = be32(&b, 216);
            if incompat & !KNOWN_INCOMPAT != 0 {
                return Err(bad(format!(
                    "it uses features this reader does not know (incompatible feature \
                         bits {:#x})",
                    incompat & !KNOWN_INCOMPAT
                )));
            }
            (true, incompat & INCOMPAT_FTYPE != 0)
        } else {
            if versionnum & 0x2000 == 0 {
                return Err(bad("it uses version 1 directories, from before 2003".into()));
            }
            let morebits = versionnum & 0x8000 != 0;
            (false, morebits && features2 & 0x200 != 0)
        };
        if b[126] != 0 {
            return Err(bad("mkfs.xfs did not finish making it".into()));
        }
        let block_size = be32(&b, 4) as usize;
        let block_log = b[120] as u32;
        if !(512..=65536).contains(&block_size) || block_size != 1 << block_log.min(16) {
            return Err(bad(format!("its block size {block_size} is not valid")));
        }
        let inode_size = be16(&b, 104) as usize;
        let inode_log = b[122] as u32;
        let min_inode = if v5 { 512 } else { 256 };
        if !(min_inode..=2048).contains(&inode_size)
            || inode_size != 1 << inode_log.min(11)
            || inode_size > block_size
        {
            return Err(bad(format!("its inode size {inode_size} is not valid")));
        }
        let inop_log = b[123] as u32;
        if be16(&b, 106) as usize != block_size / inode_size || inop_log != block_log - inode_log {
            return Err(bad("its inodes per block do not match its sizes".into()));
        }
        let ag_blocks = be32(&b, 84);
        let ag_count = be32(&b, 88);
        let ag_blk_log = b[124] as u32;
        // The block number within an AG takes exactly agblklog bits: log2 rounded up.
        let want_log = 32 - ag_blocks.saturating_sub(1).leading_zeros();
        if ag_blocks < 2 || ag_count == 0 || ag_blk_log != want_log {
            return Err(bad("its allocation group geometry is not valid".into()));
        }
        let dir_blk_log = b[192] as u32;
        if block_log + dir_blk_log > 16 {
            return Err(bad("its directory block size is not valid".into()));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[32..48]);
        let mut label = [0u8; 12];
        label.copy_from_slice(&b[108..120]);
        let sb = Super {
            block_log,
            ag_blocks,
            ag_count,
            ag_blk_log,
            inode_size,
            inode_log,
            inop_log,
            dir_blk_log,
            root_ino: be64(&b, 56),
            v5,
            ftype,
            ascii_ci: versionnum & 0x4000 != 0,
            uuid,
            label,
        };
        let fs = XfsFs {
            part,
            place: place.to_string(),
            sb,
        };
        let root = fs
            .inode(fs.sb.root_ino)
            .map_err(|e| bad(format!("its root directory cannot be read ({e})")))?;
        if root.kind() != FileKind::Dir {
            return Err(bad("its root is not a directory".into()));
        }
        Ok(fs)
    }

    fn bad(&self, path: &str, why: impl std::fmt::Display) -> Error {
        Error::BadFs {
            fs: "xfs",
            place: self.place.clone(),
            reason: format!("reading {path}: {why}"),
        }
    }

    /// `buf.len()` bytes from byte `offset` of the partition.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.part
            .read_at(buf, offset)
            .map_err(|e| crate::io_error(offset, e))
    }

    /// Where disk block `fsb` starts, in bytes, when `count` blocks from it stay in its AG.
    fn block_offset(&self, fsb: u64, count: u64) -> std::result::Result<u64, String> {
        let s = &self.sb;
        let agno = fsb >> s.ag_blk_log;
        let agbno = fsb & ((1u64 << s.ag_blk_log) - 1);
        let fits = agbno
            .checked_add(count)
            .is_some_and(|end| end <= s.ag_blocks as u64);
        if agno >= s.ag_count as u64 || !fits {
            return Err(format!("block {fsb} lies outside the file system"));
        }
        agno.checked_mul(s.ag_blocks as u64)
            .and_then(|b| b.checked_add(agbno))
            .and_then(|b| b.checked_mul(1 << s.block_log))
            .ok_or_else(|| format!("block {fsb} lies outside the file system"))
    }

    /// `count` disk blocks from `fsb`.
    fn read_blocks(&self, fsb: u64, count: u64) -> std::result::Result<Vec<u8>, Error> {
        let at = self
            .block_offset(fsb, count)
            .map_err(|why| self.bad("metadata", why))?;
        let len = count
            .checked_mul(self.sb.block_size() as u64)
            .filter(|&l| l <= 1 << 20)
            .ok_or_else(|| self.bad("metadata", "a block run is too long"))?;
        let mut buf = vec![0u8; len as usize];
        self.read_at(&mut buf, at)?;
        Ok(buf)
    }

    /// Inode number `ino`, checked.
    fn inode(&self, ino: u64) -> Result<Inode> {
        let s = &self.sb;
        let bad = |why: &str| self.bad(&format!("inode {ino}"), why);
        let agno = ino >> (s.ag_blk_log + s.inop_log);
        let agbno = (ino >> s.inop_log) & ((1u64 << s.ag_blk_log) - 1);
        let index = ino & ((1u64 << s.inop_log) - 1);
        let at = self
            .block_offset((agno << s.ag_blk_log) | agbno, 1)
            .ok()
            .filter(|_| agno < s.ag_count as u64)
            .and_then(|b| b.checked_add(index << s.inode_log))
            .ok_or_else(|| bad("its number lies outside the file system"))?;
        let mut b = vec![0u8; s.inode_size];
        self.read_at(&mut b, at)?;
        if be16(&b, 0) != 0x494e {
            return Err(bad("it has no inode magic number"));
        }
        let version = b[4];
        let core = match (s.v5, version) {
            (true, 3) => {
                if !crc_ok(&b, 100) {
                    return Err(bad("its checksum is wrong"));
                }
                if be64(&b, 152) != ino {
                    return Err(bad("it says it is another inode"));
                }
                176
            }
            (false, 1 | 2) => 100,
            _ => return Err(bad("its version does not match the file system's")),
        };
        let literal = s.inode_size - core;
        let forkoff = b[82] as usize * 8;
        let fork_len = if forkoff == 0 { literal } else { forkoff };
        if fork_len > literal {
            return Err(bad("its attribute fork offset is past its end"));
        }
        let size = be64(&b, 56);
        if size >> 63 != 0 {
            return Err(bad("its size is negative"));
        }
        // Large extent counters (nrext64): the data fork's count is 64 bits in the old pad.
        let nrext64 = version == 3 && be64(&b, 120) & (1 << 4) != 0;
        let nextents = if nrext64 {
            be64(&b, 24)
        } else {
            be32(&b, 76) as u64
        };
        Ok(Inode {
            ino,
            mode: be16(&b, 2),
            format: b[5],
            size,
            nextents,
            realtime: be16(&b, 90) & 1 != 0,
            fork: b[core..core + fork_len].to_vec(),
        })
    }

    /// The data fork's extents that start before file block `upto`, in file order.
    fn extents(&self, node: &Inode, upto: u64) -> Result<Vec<Extent>> {
        let path = format!("inode {}", node.ino);
        let mut out = Extents::new(upto);
        match node.format {
            FMT_EXTENTS => {
                let n = node.nextents;
                if n.saturating_mul(16) > node.fork.len() as u64 {
                    return Err(self.bad(&path, "its extent count does not fit in it"));
                }
                for rec in node.fork.chunks_exact(16).take(n as usize) {
                    out.push(Extent::decode(rec))
                        .map_err(|why| self.bad(&path, why))?;
                    if out.done {
                        break;
                    }
                }
            }
            FMT_BTREE => {
                let f = &node.fork;
                let level = be16(f, 0);
                let numrecs = be16(f, 2) as usize;
                let maxrecs = f.len().saturating_sub(4) / 16;
                if level == 0 || level > MAX_BTREE_LEVEL || numrecs == 0 || numrecs > maxrecs {
                    return Err(self.bad(&path, "its extent btree root is corrupt"));
                }
                let mut seen = BTreeSet::new();
                for i in 0..numrecs {
                    let ptr = be64(f, 4 + maxrecs * 8 + i * 8);
                    self.btree_block(node.ino, ptr, level - 1, &mut seen, &mut out)?;
                    if out.done {
                        break;
                    }
                }
            }
            _ => return Err(self.bad(&path, "its data is in a form that holds no blocks")),
        }
        Ok(out.list)
    }

    /// Walk the bmap btree block `fsb`, which must be at `level`, into `out`.
    fn btree_block(
        &self,
        ino: u64,
        fsb: u64,
        level: u16,
        seen: &mut BTreeSet<u64>,
        out: &mut Extents,
    ) -> Result<()> {
        let path = format!("inode {ino}");
        if !seen.insert(fsb) || seen.len() > MAX_BTREE_BLOCKS {
            return Err(self.bad(&path, "its extent btree loops or is too large"));
        }
        let b = self.read_blocks(fsb, 1)?;
        let (magic, hdr): (&[u8], usize) = if self.sb.v5 {
            (b"BMA3", 72)
        } else {
            (b"BMAP", 24)
        };
        if b.get(..4) != Some(magic) {
            return Err(self.bad(&path, "an extent btree block has no magic number"));
        }
        if self.sb.v5 && (!crc_ok(&b, 64) || be64(&b, 56) != ino) {
            return Err(self.bad(&path, "an extent btree block's checksum or owner is wrong"));
        }
        if be16(&b, 4) != level {
            return Err(self.bad(&path, "an extent btree block is at the wrong level"));
        }
        let numrecs = be16(&b, 6) as usize;
        let maxrecs = (b.len() - hdr) / 16;
        if numrecs == 0 || numrecs > maxrecs {
            return Err(self.bad(&path, "an extent btree block has a wrong record count"));
        }
        for i in 0..numrecs {
            if level == 0 {
                let at = hdr + i * 16;
                out.push(Extent::decode(&b[at..at + 16]))
                    .map_err(|why| self.bad(&path, why))?;
            } else {
                let ptr = be64(&b, hdr + maxrecs * 8 + i * 8);
                self.btree_block(ino, ptr, level - 1, seen, out)?;
            }
            if out.done {
                break;
            }
        }
        Ok(())
    }

    /// `count` file blocks from file block `first`, through `list`; None when any is a hole
    /// (or unwritten).
    fn read_file_blocks(&self, list: &[Extent], first: u64, count: u64) -> Result<Option<Vec<u8>>> {
        let bs = self.sb.block_size();
        let mut out = Vec::with_capacity(bs * count as usize);
        let mut b = first;
        let end = first.saturating_add(count);
        while b < end {
            let Some(e) = find_extent(list, b) else {
                return Ok(None);
            };
            if e.unwritten {
                return Ok(None);
            }
            let n = e.end().min(end) - b;
            let fsb = e.start.saturating_add(b - e.off);
            out.extend_from_slice(&self.read_blocks(fsb, n)?);
            b += n;
        }
        Ok(Some(out))
    }

    /// A regular file's first `len` bytes (its size, at most the caller's cap).
    fn file_data(&self, path: &str, node: &Inode, len: u64) -> Result<Vec<u8>> {
        if node.realtime {
            return Err(self.bad(path, "it lies on the realtime device, which is not read"));
        }
        if node.format == FMT_LOCAL {
            return node
                .fork
                .get(..len as usize)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| self.bad(path, "its inline data is shorter than its size"));
        }
        let bs = self.sb.block_size() as u64;
        let blocks = len.div_ceil(bs);
        let list = self.extents(node, blocks)?;
        let len_usize = usize::try_from(len).map_err(|_| self.bad(path, "it is too large"))?;
        let mut out = vec![0u8; len_usize];
        for e in &list {
            if e.unwritten {
                continue;
            }
            // Extents are in order and below `blocks`, so these do not overflow.
            let from = e.off * bs;
            let to = e.end().saturating_mul(bs).min(len);
            let at = self
                .block_offset(e.start, (to - from).div_ceil(bs))
                .map_err(|why| self.bad(path, why))?;
            self.read_at(&mut out[from as usize..to as usize], at)?;
        }
        Ok(out)
    }

    /// Call `f` with each entry's name and inode number until it returns true; `.` and `..`
    /// are left out.
    fn scan_dir(
        &self,
        path: &str,
        dir: &Inode,
        f: &mut dyn FnMut(&[u8], u64) -> bool,
    ) -> Result<()> {
        if dir.format == FMT_LOCAL {
            return self.scan_short_dir(path, dir, f);
        }
        let s = &self.sb;
        let leaf_block = DIR_LEAF_OFFSET >> s.block_log;
        let list = self.extents(dir, leaf_block)?;
        let per = 1u64 << s.dir_blk_log;
        let max_blocks = MAX_DIR_BYTES / s.dir_block_size() as u64;
        let mut done_upto = 0u64; // directory blocks below this one were scanned
        let mut scanned = 0u64;
        for e in &list {
            let first = (e.off >> s.dir_blk_log).max(done_upto);
            let last = e.end().min(leaf_block).saturating_sub(1) >> s.dir_blk_log;
            let mut d = first;
            while d <= last {
                scanned += 1;
                if scanned > max_blocks {
                    return Err(self.bad(path, "the directory is too large"));
                }
                if let Some(block) = self.read_file_blocks(&list, d * per, per)?
                    && self.dir_block(path, &block, f)?
                {
                    return Ok(());
                }
                d += 1;
            }
            done_upto = done_upto.max(last.saturating_add(1));
        }
        Ok(())
    }

    /// A directory in the inode itself.
    fn scan_short_dir(
        &self,
        path: &str,
        dir: &Inode,
        f: &mut dyn FnMut(&[u8], u64) -> bool,
    ) -> Result<()> {
        let b = &dir.fork;
        let bad = || self.bad(path, "its short-form directory is corrupt");
        let count = *b.first().ok_or_else(bad)? as usize;
        let wide = *b.get(1).ok_or_else(bad)? != 0;
        let ino_len = if wide { 8 } else { 4 };
        let mut at = 2 + ino_len;
        for _ in 0..count {
            let len = *b.get(at).ok_or_else(bad)? as usize;
            let name_at = at + 3;
            let name = b.get(name_at..name_at + len).ok_or_else(bad)?;
            let ino_at = name_at + len + self.sb.ftype as usize;
            let ino_bytes = b.get(ino_at..ino_at + ino_len).ok_or_else(bad)?;
            if len == 0 {
                return Err(bad());
            }
            let ino = if wide {
                be64(ino_bytes, 0) & ((1 << 56) - 1)
            } else {
                be32(ino_bytes, 0) as u64
            };
            if f(name, ino) {
                return Ok(());
            }
            at = ino_at + ino_len;
        }
        Ok(())
    }

    /// One directory data block (or the single block of a block directory); true when `f`
    /// asked to stop.
    fn dir_block(
        &self,
        path: &str,
        b: &[u8],
        f: &mut dyn FnMut(&[u8], u64) -> bool,
    ) -> Result<bool> {
        let bad = |why: &str| self.bad(path, why);
        let (hdr, single) = match (self.sb.v5, b.get(..4)) {
            (true, Some(b"XDB3")) => (64, true),
            (true, Some(b"XDD3")) => (64, false),
            (false, Some(b"XD2B")) => (16, true),
            (false, Some(b"XD2D")) => (16, false),
            _ => return Err(bad("a directory block has no magic number")),
        };
        if self.sb.v5 && !crc_ok(b, 4) {
            return Err(bad("a directory block's checksum is wrong"));
        }
        // A single-block directory ends with its hash index: entries of 8 bytes, then a
        // tail with their count.
        let end = if single {
            let tail = b.len() - 8;
            (be32(b, tail) as usize)
                .checked_mul(8)
                .and_then(|leaf| tail.checked_sub(leaf))
                .filter(|&e| e >= hdr)
                .ok_or_else(|| bad("a directory block's index is larger than the block"))?
        } else {
            b.len()
        };
        let ftype = self.sb.ftype as usize;
        let mut at = hdr;
        while at < end {
            if at + 8 > end {
                return Err(bad("a directory entry runs past its block"));
            }
            if be16(b, at) == 0xffff {
                let len = be16(b, at + 2) as usize;
                if len < 8 || !len.is_multiple_of(8) || at + len > end {
                    return Err(bad("a free directory region is corrupt"));
                }
                at += len;
                continue;
            }
            let ino = be64(b, at);
            let len = b.get(at + 8).copied().unwrap_or(0) as usize;
            let size = (8 + 1 + len + ftype + 2).next_multiple_of(8);
            if len == 0 || at + size > end {
                return Err(bad("a directory entry is corrupt"));
            }
            let name = &b[at + 9..at + 9 + len];
            if name != b"." && name != b".." && f(name, ino) {
                return Ok(true);
            }
            at += size;
        }
        Ok(false)
    }

    /// The inode at `path` (a final symbolic link not followed).
    fn lookup(&self, path: &str) -> Result<Inode> {
        let parts = components(path);
        let mut node = self.inode(self.sb.root_ino)?;
        for (i, name) in parts.iter().enumerate() {
            if node.kind() != FileKind::Dir {
                return Err(Error::WrongKind {
                    path: format!("/{}", parts[..i].join("/")),
                    what: "not a directory",
                });
            }
            let here = format!("/{}", parts[..i].join("/"));
            let mut found = None;
            let ci = self.sb.ascii_ci;
            self.scan_dir(&here, &node, &mut |n, ino| {
                let hit = if ci {
                    n.eq_ignore_ascii_case(name.as_bytes())
                } else {
                    n == name.as_bytes()
                };
                if hit {
                    found = Some(ino);
                }
                hit
            })?;
            match found {
                Some(ino) => node = self.inode(ino)?,
                None => return Err(Error::NotFound(path.to_string())),
            }
        }
        Ok(node)
    }

    /// A symbolic link's target bytes.
    fn link_target(&self, path: &str, node: &Inode) -> Result<Vec<u8>> {
        let size = node.size;
        if size == 0 || size > MAX_LINK {
            return Err(self.bad(path, "the link's length is not valid"));
        }
        if node.format == FMT_LOCAL {
            return node
                .fork
                .get(..size as usize)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| self.bad(path, "the link is longer than its inode"));
        }
        // Remote: each extent's blocks hold a piece; on v5 each piece starts with a header
        // (magic, offset in the target, byte count, CRC, ...).
        let hdr = if self.sb.v5 { 56 } else { 0 };
        let list = self.extents(node, 8)?;
        let mut out: Vec<u8> = Vec::new();
        let mut next = 0u64;
        for e in &list {
            if out.len() as u64 >= size {
                break;
            }
            if e.off != next || e.unwritten {
                return Err(self.bad(path, "the link's blocks have a hole"));
            }
            let b = self.read_blocks(e.start, e.len)?;
            next = e.end();
            let room = b.len() - hdr;
            let want = (size as usize - out.len()).min(room);
            let piece = if self.sb.v5 {
                let ok = b.get(..4) == Some(&b"XSLM"[..])
                    && crc_ok(&b, 12)
                    && be32(&b, 4) as usize == out.len()
                    && be32(&b, 8) as usize == want;
                if !ok {
                    return Err(self.bad(path, "the link's block header is corrupt"));
                }
                &b[hdr..hdr + want]
            } else {
                &b[..want]
            };
            out.extend_from_slice(piece);
        }
        if out.len() as u64 != size {
            return Err(self.bad(path, "the link's blocks are shorter than the link"));
        }
        Ok(out)
    }
}

impl FileSystem for XfsFs {
    fn kind(&self) -> &'static str {
        "xfs"
    }

    /// The user-visible `sb_uuid`, as blkid shows it (a v5 file system whose UUID was
    /// changed keeps the old one in `sb_meta_uuid` for its metadata; that is not this one).
    fn uuid(&self) -> Option<String> {
        let u = &self.sb.uuid;
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
        let end = self.sb.label.iter().position(|&c| c == 0).unwrap_or(12);
        let l = std::str::from_utf8(&self.sb.label[..end]).ok()?.trim();
        (!l.is_empty()).then(|| l.to_string())
    }

    fn kind_of(&self, path: &str) -> Result<FileKind> {
        Ok(self.lookup(path)?.kind())
    }

    fn read_link(&self, path: &str) -> Result<String> {
        let node = self.lookup(path)?;
        if node.kind() != FileKind::Symlink {
            return Err(Error::WrongKind {
                path: path.to_string(),
                what: "not a symbolic link",
            });
        }
        String::from_utf8(self.link_target(path, &node)?)
            .map_err(|_| self.bad(path, "the link is not UTF-8"))
    }

    fn read(&self, path: &str, cap: u64) -> Result<Vec<u8>> {
        let node = self.lookup(path)?;
        match node.kind() {
            FileKind::File { size } if size > cap => Err(Error::TooLarge {
                path: path.to_string(),
                limit: cap,
            }),
            FileKind::File { size } => self.file_data(path, &node, size),
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
        let node = self.lookup(path)?;
        if node.kind() != FileKind::Dir {
            return Err(Error::WrongKind {
                path: path.to_string(),
                what: "not a directory",
            });
        }
        let mut names = Vec::new();
        self.scan_dir(path, &node, &mut |n, _| {
            if names.len() >= cap {
                return true;
            }
            if let Ok(n) = std::str::from_utf8(n) {
                names.push(n.to_string());
            }
            false
        })?;
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_records_unpack() {
        // flag 1, offset 5, a 52-bit block number (split across both words), length 7.
        let block: u64 = 0x8_1234_5678_9abc;
        let l0: u64 = (1 << 63) | (5 << 9) | (block >> 43);
        let l1: u64 = ((block & ((1 << 43) - 1)) << 21) | 7;
        let mut rec = l0.to_be_bytes().to_vec();
        rec.extend_from_slice(&l1.to_be_bytes());
        let e = Extent::decode(&rec);
        assert_eq!((e.off, e.start, e.len, e.unwritten), (5, block, 7, true));
    }
}
