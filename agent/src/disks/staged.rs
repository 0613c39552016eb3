//! Sequential, staged writes of upload data, with direct I/O where the filesystem takes it.
//!
//! Writing through the page cache and then `fdatasync` is slow (the writeback path) and costs
//! a kernel copy of every byte, so [`StagedFile`] gathers the data in an aligned buffer of
//! [`STAGE`] bytes and writes it with `O_DIRECT` at aligned offsets. What cannot be aligned,
//! the bytes before the first [`ALIGN`] boundary of a resumed stream and the last partial
//! block of a stream, goes through a normal descriptor. If the filesystem refuses direct
//! I/O (`EINVAL` at open or at a write), the rest of the stream goes through the normal
//! descriptor instead. Aligned runs of zeros are not written at all: the file stays sparse.
//!
//! Writing is not durability: the caller still `fdatasync`s before it counts any byte as
//! verified.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Offset and memory alignment of direct writes (covers 512- and 4096-byte sectors).
pub(super) const ALIGN: usize = 4096;
/// The staging buffer: one direct write.
pub(super) const STAGE: usize = 8 << 20;
/// Zeros are skipped in runs of this many aligned bytes.
const HOLE: usize = 64 << 10;

/// A zeroed heap buffer of `len` bytes starting at an [`ALIGN`]ed address.
struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let vec = vec![0u8; len + ALIGN];
        let addr = vec.as_ptr() as usize;
        let start = (ALIGN - addr % ALIGN) % ALIGN;
        AlignedBuf { vec, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

/// Appends data to a file from a start offset on (see the module doc).
pub(super) struct StagedFile {
    /// The normal descriptor: unaligned pieces, and everything without direct I/O.
    file: File,
    /// The `O_DIRECT` descriptor, while direct writes work.
    direct: Option<File>,
    buf: AlignedBuf,
    /// File offset of `buf[0]`: everything before it has been written to the file.
    base: u64,
    /// Bytes staged in `buf`.
    fill: usize,
    /// The file's length as far as writes and `set_len` made it.
    file_len: u64,
    /// Tests: make direct writes fail as a filesystem without direct I/O would.
    #[cfg(test)]
    refuse_direct_writes: bool,
}

impl StagedFile {
    /// Append to `file` (opened for writing at `path`, `start` bytes long, nothing past
    /// them) from `start` on; `direct`: try direct I/O.
    pub(super) fn new(file: File, path: &Path, start: u64, direct: bool) -> io::Result<Self> {
        let direct = if direct {
            match OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(path)
            {
                Ok(f) => Some(f),
                // EINVAL: the filesystem has no direct I/O. Anything else would be odd when
                // `file` could be opened, but buffered writes still work.
                Err(e) => {
                    tracing::debug!("{}: no direct I/O ({e}); writing buffered", path.display());
                    None
                }
            }
        } else {
            None
        };
        Ok(StagedFile {
            file,
            direct,
            buf: AlignedBuf::new(STAGE),
            base: start,
            fill: 0,
            file_len: start,
            #[cfg(test)]
            refuse_direct_writes: false,
        })
    }

    /// Whether direct writes are (still) in use.
    pub(super) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Where the next byte goes.
    pub(super) fn offset(&self) -> u64 {
        self.base + self.fill as u64
    }

    /// Everything before this offset has been written to the file (not made durable).
    pub(super) fn written(&self) -> u64 {
        self.base
    }

    /// Append `data`.
    pub(super) fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.fill == 0 && !self.base.is_multiple_of(ALIGN as u64) {
                // A stream resumed at an unaligned offset: up to the next boundary by hand.
                let n = ((ALIGN as u64 - self.base % ALIGN as u64) as usize).min(data.len());
                let (head, rest) = data.split_at(n);
                write_buffered(&self.file, &mut self.file_len, head, self.base)?;
                self.base += n as u64;
                data = rest;
                continue;
            }
            let n = (STAGE - self.fill).min(data.len());
            let (part, rest) = data.split_at(n);
            self.buf.as_mut_slice()[self.fill..self.fill + n].copy_from_slice(part);
            self.fill += n;
            data = rest;
            if self.fill == STAGE {
                self.flush_aligned(STAGE)?;
            }
        }
        Ok(())
    }

    /// Write everything staged and give the file its full length: afterwards
    /// [`StagedFile::written`] is [`StagedFile::offset`] and `fdatasync` makes it all durable.
    pub(super) fn finish(&mut self) -> io::Result<()> {
        let aligned = self.fill & !(ALIGN - 1);
        if aligned > 0 {
            self.flush_aligned(aligned)?;
        }
        if self.fill > 0 {
            // The last partial block; `flush_aligned` moved it to the front.
            let tail = self.fill;
            write_buffered(
                &self.file,
                &mut self.file_len,
                &self.buf.as_slice()[..tail],
                self.base,
            )?;
            self.base += tail as u64;
            self.fill = 0;
        }
        self.extend_to(self.base)
    }

    /// Make the file at least `len` bytes long (zeros left as holes at its end count too).
    pub(super) fn extend_to(&mut self, len: u64) -> io::Result<()> {
        if self.file_len < len {
            self.file.set_len(len)?;
            self.file_len = len;
        }
        Ok(())
    }

    /// Write the first `n` (aligned) staged bytes, skipping runs of zeros, and keep the rest.
    fn flush_aligned(&mut self, n: usize) -> io::Result<()> {
        debug_assert!(n.is_multiple_of(ALIGN) && n <= self.fill);
        let mut i = 0;
        while i < n {
            let end = (i + HOLE).min(n);
            if is_zero(&self.buf.as_slice()[i..end]) {
                i = end;
                continue;
            }
            // A run of non-zero pieces.
            let mut j = end;
            while j < n {
                let e = (j + HOLE).min(n);
                if is_zero(&self.buf.as_slice()[j..e]) {
                    break;
                }
                j = e;
            }
            self.write_run(i, j)?;
            i = j;
        }
        let keep = self.fill - n;
        if keep > 0 {
            self.buf.as_mut_slice().copy_within(n..self.fill, 0);
        }
        self.base += n as u64;
        self.fill = keep;
        Ok(())
    }

    /// Write `buf[from..to]` at its place in the file, directly if possible.
    fn write_run(&mut self, from: usize, to: usize) -> io::Result<()> {
        let off = self.base + from as u64;
        if let Some(d) = &self.direct {
            let r = self.direct_write(d, &self.buf.as_slice()[from..to], off);
            match r {
                Ok(()) => {
                    self.file_len = self.file_len.max(off + (to - from) as u64);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    // Whatever part went through is written again, with the same bytes.
                    tracing::debug!("direct write refused ({e}); writing buffered");
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        self.file
            .write_all_at(&self.buf.as_slice()[from..to], off)?;
        self.file_len = self.file_len.max(off + (to - from) as u64);
        Ok(())
    }

    fn direct_write(&self, d: &File, data: &[u8], off: u64) -> io::Result<()> {
        #[cfg(test)]
        if self.refuse_direct_writes {
            return Err(rustix::io::Errno::INVAL.into());
        }
        d.write_all_at(data, off)
    }
}

/// Write unaligned bytes through the normal descriptor (zeros are left as holes).
fn write_buffered(file: &File, file_len: &mut u64, data: &[u8], off: u64) -> io::Result<()> {
    if !is_zero(data) {
        file.write_all_at(data, off)?;
        *file_len = (*file_len).max(off + data.len() as u64);
    }
    Ok(())
}

/// Whether `b` is all zeros (vectorizes well: OR-folds 4 KiB at a time).
pub(super) fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::pattern;

    /// Data with holes of several sizes, aligned and not.
    fn data(len: usize) -> Vec<u8> {
        let mut d = pattern(len, 3);
        let holes = [
            (100, 70_000),
            (STAGE - HOLE, STAGE + 3 * HOLE),
            (2 * STAGE + 5, 2 * STAGE + 5 + HOLE * 2 + 17),
            (len.saturating_sub(3 * HOLE), len.saturating_sub(1000)),
        ];
        for (a, b) in holes {
            d[a.min(len)..b.min(len)].fill(0);
        }
        d
    }

    /// Write `data[start..]` in `piece`-byte pieces to a file holding `data[..start]`, as
    /// `upload_stream` does: the file is cut back to `start` first.
    fn append(path: &Path, data: &[u8], start: usize, piece: usize, direct: bool, refuse: bool) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        f.set_len(start as u64).unwrap();
        let mut s = StagedFile::new(f, path, start as u64, direct).unwrap();
        s.refuse_direct_writes = refuse;
        for p in data[start..].chunks(piece) {
            s.write(p).unwrap();
            assert!(s.written() <= s.offset());
            assert!(s.written().is_multiple_of(ALIGN as u64) || s.written() < start as u64 + 4096);
        }
        assert_eq!(s.offset(), data.len() as u64);
        s.finish().unwrap();
        assert_eq!(s.written(), data.len() as u64);
        if refuse {
            assert!(!s.is_direct());
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 10000]));
        let mut v = vec![0u8; 10000];
        v[9999] = 1;
        assert!(!is_zero(&v));
        v[9999] = 0;
        v[0] = 0x80;
        assert!(!is_zero(&v));
    }

    #[test]
    fn the_staging_buffer_is_aligned() {
        for len in [0, 1, 4096, STAGE] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_mut_slice().as_ptr() as usize % ALIGN, 0);
            assert!(is_zero(b.as_slice()));
        }
    }

    #[test]
    fn streams_in_any_pieces_give_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(3 * STAGE + 12_345 * 512);
        for (i, (piece, direct, refuse)) in [
            (1 << 20, true, false),
            (1 << 20, false, false),
            (777_777, true, false),
            (STAGE * 2, true, false),
            (1 << 20, true, true),
        ]
        .into_iter()
        .enumerate()
        {
            let p = dir.path().join(format!("f{i}"));
            append(&p, &d, 0, piece, direct, refuse);
            assert!(std::fs::read(&p).unwrap() == d, "case {i}");
        }
    }

    #[test]
    fn resuming_at_unaligned_offsets_gives_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(2 * STAGE + 3 * 512 + 7);
        let p = dir.path().join("f");
        // Each stream stops at an odd offset (and what follows is thrown away, as after a
        // crash past the verified offset); the next resumes there.
        let stops = [
            1,
            513,
            4095,
            4097,
            STAGE - 1,
            STAGE + 4096 * 3 + 100,
            d.len(),
        ];
        let mut start = 0;
        for (i, &stop) in stops.iter().enumerate() {
            append(&p, &d[..stop], start, 1 << 20, true, i == 4);
            assert!(std::fs::read(&p).unwrap() == d[..stop], "stop {stop}");
            // Garbage past the end, as a crash could leave: the next stream cuts it off.
            let mut f = OpenOptions::new().append(true).open(&p).unwrap();
            std::io::Write::write_all(&mut f, b"garbage").unwrap();
            start = stop;
        }
    }

    #[test]
    fn zeros_stay_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut d = vec![0u8; 2 * STAGE + 8192];
        d[STAGE + 10] = 1;
        let p = dir.path().join("f");
        append(&p, &d, 0, 1 << 20, true, false);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), d.len() as u64);
        // One 64 KiB piece is written (blocks are 512 bytes).
        assert!(m.blocks() * 512 <= 2 * HOLE as u64, "{} blocks", m.blocks());
        assert!(std::fs::read(&p).unwrap() == d);
    }
}
