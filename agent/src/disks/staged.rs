//! Sequential, staged writes of upload data, with direct I/O where the filesystem takes it.
//!
//! Writing through the page cache and then `fdatasync` is slow (the writeback path) and costs
//! a kernel copy of every byte, so [`StagedFile`] gathers the data in aligned buffers of
//! [`STAGE`] bytes and writes them with `O_DIRECT` at aligned offsets. What cannot be aligned,
//! the bytes before the first [`ALIGN`] boundary of a resumed stream and the last partial
//! block of a stream, goes through a normal descriptor. If the filesystem refuses direct
//! I/O (`EINVAL` at open or at a write), the rest of the stream goes through the normal
//! descriptor instead. Aligned runs of zeros are not written at all: the file stays sparse.
//!
//! The writes happen on a thread of their own, one staging buffer at a time, while the
//! caller fills the next buffer ([`BUFFERS`] of them take turns). The caller sees every
//! piece of data right after it is staged ([`StagedFile::write`]'s `seen`), while it is
//! still in the CPU's cache: hashing it there costs about half of what hashing the same
//! bytes from memory does.
//!
//! Writing is not durability: the caller still `fdatasync`s before it counts any byte as
//! verified.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Offset and memory alignment of direct writes (covers 512- and 4096-byte sectors).
pub(super) const ALIGN: usize = 4096;
/// One staging buffer: one direct write.
pub(super) const STAGE: usize = 8 << 20;
/// Staging buffers per stream: one is filled while the others are written.
const BUFFERS: usize = 3;
/// Zeros are skipped in runs of this many aligned bytes.
const HOLE: usize = 64 << 10;
/// Data is staged and shown to `seen` in pieces of at most this size, which stay in cache.
const PIECE: usize = 256 << 10;

// A stage's non-zero pieces are the bits of a u128.
const _: () = assert!(STAGE / HOLE == 128 && STAGE.is_multiple_of(HOLE));

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

/// A staging buffer and which of its [`HOLE`]-sized pieces hold anything but zeros (bit
/// `i` for `buf[i * HOLE..(i + 1) * HOLE]`).
struct Stage {
    buf: AlignedBuf,
    nonzero: u128,
}

impl Stage {
    fn new() -> Self {
        Stage {
            buf: AlignedBuf::new(STAGE),
            nonzero: 0,
        }
    }

    /// Note which pieces of `buf[from..to]`, just staged, are not all zeros.
    fn mark(&mut self, from: usize, to: usize) {
        let mut i = from;
        while i < to {
            let end = ((i / HOLE + 1) * HOLE).min(to);
            if !is_zero(&self.buf.as_slice()[i..end]) {
                self.nonzero |= 1 << (i / HOLE);
            }
            i = end;
        }
    }

    fn is_nonzero(&self, at: usize) -> bool {
        self.nonzero & (1 << (at / HOLE)) != 0
    }
}

/// A write for the I/O thread: `stage.buf[..direct_len]` (aligned) directly where it can,
/// `stage.buf[direct_len..len]` through the normal descriptor, at file offset `base`.
struct Job {
    stage: Stage,
    base: u64,
    direct_len: usize,
    len: usize,
}

/// A finished [`Job`]: its buffer comes back.
struct Done {
    stage: Stage,
    /// The file offset after the job's data.
    end: u64,
    result: io::Result<()>,
    /// Direct writes are still in use.
    direct: bool,
}

/// Appends data to a file from a start offset on (see the module doc).
pub(super) struct StagedFile {
    /// The buffer being filled; `None` only while every buffer is with the I/O thread.
    stage: Option<Stage>,
    /// Buffers back from the I/O thread.
    spare: Vec<Stage>,
    /// Jobs sent and not yet back.
    in_flight: usize,
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    io: Option<JoinHandle<()>>,
    /// File offset of the current stage's first byte: everything before it has been
    /// handed to the I/O thread.
    base: u64,
    /// Bytes staged in the current stage.
    fill: usize,
    /// Everything before this offset has been written to the file (not made durable), and
    /// the file is at least this long.
    written: u64,
    /// The first write error; nothing more is written after it.
    error: Option<io::Error>,
    direct: bool,
}

impl StagedFile {
    /// Append to `file` (opened for writing at `path`, `start` bytes long, nothing past
    /// them) from `start` on; `direct`: try direct I/O. The I/O thread calls `on_written`
    /// with the new [`StagedFile::written`] offset after each write (the caller need not
    /// be writing more for it to move).
    pub(super) fn new(
        file: File,
        path: &Path,
        start: u64,
        direct: bool,
        on_written: impl Fn(u64) + Send + 'static,
    ) -> io::Result<Self> {
        Self::with_sink(file, path, start, direct, false, on_written)
    }

    fn with_sink(
        file: File,
        path: &Path,
        start: u64,
        direct: bool,
        refuse_direct_writes: bool,
        on_written: impl Fn(u64) + Send + 'static,
    ) -> io::Result<Self> {
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
        let is_direct = direct.is_some();
        let sink = Sink {
            file,
            direct,
            file_len: start,
            refuse_direct_writes,
        };
        let (jobs, job_rx) = sync_channel::<Job>(BUFFERS);
        let (done_tx, done) = sync_channel::<Done>(BUFFERS);
        let io = std::thread::Builder::new()
            .name("upload-io".into())
            .spawn(move || sink.run(job_rx, done_tx, on_written))?;
        Ok(StagedFile {
            stage: Some(Stage::new()),
            spare: Vec::new(),
            in_flight: 0,
            jobs: Some(jobs),
            done,
            io: Some(io),
            base: start,
            fill: 0,
            written: start,
            error: None,
            direct: is_direct,
        })
    }

    /// Whether direct writes are (still) in use, as far as finished writes tell.
    pub(super) fn is_direct(&self) -> bool {
        self.direct
    }

    /// Where the next byte goes.
    pub(super) fn offset(&self) -> u64 {
        self.base + self.fill as u64
    }

    /// Everything before this offset has been written to the file (not made durable), and
    /// the file is at least this long (the upload learns it from `on_written`).
    #[cfg(test)]
    fn written(&self) -> u64 {
        self.written
    }

    /// Append `data`. `seen` gets all of it, in order, in pieces right after each is staged
    /// (while it is in the CPU's cache).
    pub(super) fn write(&mut self, mut data: &[u8], mut seen: impl FnMut(&[u8])) -> io::Result<()> {
        self.check()?;
        while !data.is_empty() {
            let mut stage = self.take_stage()?;
            let head = self.fill == 0 && !self.base.is_multiple_of(ALIGN as u64);
            // A stream resumed at an unaligned offset goes up to the next boundary through
            // the normal descriptor.
            let room = if head {
                (ALIGN as u64 - self.base % ALIGN as u64) as usize
            } else {
                STAGE - self.fill
            };
            let n = room.min(data.len()).min(PIECE);
            let (part, rest) = data.split_at(n);
            let at = self.fill;
            stage.buf.as_mut_slice()[at..at + n].copy_from_slice(part);
            seen(&stage.buf.as_slice()[at..at + n]);
            stage.mark(at, at + n);
            self.fill += n;
            data = rest;
            if head {
                let len = self.fill;
                self.submit(stage, 0, len)?;
            } else if self.fill == STAGE {
                self.submit(stage, STAGE, STAGE)?;
            } else {
                self.stage = Some(stage);
            }
        }
        self.collect(false)?;
        Ok(())
    }

    /// Write everything staged and wait for every write: afterwards
    /// [`StagedFile::written`] is [`StagedFile::offset`] and `fdatasync` makes it all durable.
    pub(super) fn finish(&mut self) -> io::Result<()> {
        self.check()?;
        if self.fill > 0 {
            let stage = self.take_stage()?;
            let len = self.fill;
            self.submit(stage, len & !(ALIGN - 1), len)?;
        }
        while self.in_flight > 0 {
            self.collect(true)?;
        }
        self.check()?;
        debug_assert_eq!(self.written, self.offset());
        Ok(())
    }

    /// The first write error, again.
    fn check(&self) -> io::Result<()> {
        match &self.error {
            Some(e) => Err(match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            }),
            None => Ok(()),
        }
    }

    /// The stage to fill: the current one, a spare, or the next to come back.
    fn take_stage(&mut self) -> io::Result<Stage> {
        if let Some(s) = self.stage.take() {
            return Ok(s);
        }
        if let Some(mut s) = self.spare.pop() {
            s.nonzero = 0;
            return Ok(s);
        }
        if self.in_flight < BUFFERS {
            return Ok(Stage::new());
        }
        self.collect(true)?;
        self.check()?;
        let mut s = self
            .spare
            .pop()
            .expect("collect(true) brings a buffer back");
        s.nonzero = 0;
        Ok(s)
    }

    /// Hand `stage` (`fill` bytes, the first `direct_len` of them aligned) to the I/O
    /// thread and start a new one after it.
    fn submit(&mut self, stage: Stage, direct_len: usize, len: usize) -> io::Result<()> {
        let job = Job {
            stage,
            base: self.base,
            direct_len,
            len,
        };
        let sent = self.jobs.as_ref().map(|j| j.send(job));
        if !matches!(sent, Some(Ok(()))) {
            return Err(io::Error::other("the upload's I/O thread has stopped"));
        }
        self.in_flight += 1;
        self.base += len as u64;
        self.fill = 0;
        Ok(())
    }

    /// Take finished jobs back; `wait`: block for at least one (if any is in flight).
    fn collect(&mut self, mut wait: bool) -> io::Result<()> {
        while self.in_flight > 0 {
            let d = if wait {
                wait = false;
                match self.done.recv() {
                    Ok(d) => d,
                    Err(_) => return Err(io::Error::other("the upload's I/O thread has stopped")),
                }
            } else {
                match self.done.try_recv() {
                    Ok(d) => d,
                    Err(_) => break,
                }
            };
            self.in_flight -= 1;
            self.direct = d.direct;
            self.spare.push(d.stage);
            match d.result {
                Ok(()) if self.error.is_none() => self.written = d.end,
                Ok(()) => {}
                Err(e) => {
                    if self.error.is_none() {
                        self.error = Some(e);
                    }
                }
            }
        }
        self.check()
    }
}

impl Drop for StagedFile {
    /// Writes still queued finish before the file is let go (a new stream may cut it back).
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
    }
}

/// The I/O thread's side: the descriptors.
struct Sink {
    /// The normal descriptor: unaligned pieces, and everything without direct I/O.
    file: File,
    /// The `O_DIRECT` descriptor, while direct writes work.
    direct: Option<File>,
    /// The file's length as far as writes and `set_len` made it.
    file_len: u64,
    /// Tests: make direct writes fail as a filesystem without direct I/O would.
    refuse_direct_writes: bool,
}

impl Sink {
    fn run(mut self, jobs: Receiver<Job>, done: SyncSender<Done>, on_written: impl Fn(u64)) {
        let mut failed = false;
        for job in jobs {
            let end = job.base + job.len as u64;
            // After a failure nothing more is written: the stream is over.
            let result = if failed {
                Err(io::Error::other("an earlier write failed"))
            } else {
                self.write(&job)
            };
            failed |= result.is_err();
            if !failed {
                on_written(end);
            }
            let d = Done {
                stage: job.stage,
                end,
                result,
                direct: self.direct.is_some(),
            };
            if done.send(d).is_err() {
                return;
            }
        }
    }

    /// Write a job's data, skipping runs of zeros, and make the file at least as long as it.
    fn write(&mut self, job: &Job) -> io::Result<()> {
        let Job {
            stage,
            base,
            direct_len,
            len,
        } = job;
        let (base, direct_len, len) = (*base, *direct_len, *len);
        debug_assert!(direct_len.is_multiple_of(ALIGN) && direct_len <= len);
        let data = stage.buf.as_slice();
        let mut i = 0;
        while i < direct_len {
            let end = (i + HOLE).min(direct_len);
            if !stage.is_nonzero(i) {
                i = end;
                continue;
            }
            // A run of non-zero pieces.
            let mut j = end;
            while j < direct_len && stage.is_nonzero(j) {
                j = (j + HOLE).min(direct_len);
            }
            self.write_run(&data[i..j], base + i as u64)?;
            i = j;
        }
        if len > direct_len {
            let tail = &data[direct_len..len];
            let off = base + direct_len as u64;
            if !is_zero(tail) {
                self.file.write_all_at(tail, off)?;
                self.file_len = self.file_len.max(off + tail.len() as u64);
            }
        }
        // Zeros at the end are holes: the length must cover them.
        let end = base + len as u64;
        if self.file_len < end {
            self.file.set_len(end)?;
            self.file_len = end;
        }
        Ok(())
    }

    /// Write `data` (aligned) at `off`, directly if possible.
    fn write_run(&mut self, data: &[u8], off: u64) -> io::Result<()> {
        if let Some(d) = &self.direct {
            let r = if self.refuse_direct_writes {
                Err(rustix::io::Errno::INVAL.into())
            } else {
                d.write_all_at(data, off)
            };
            match r {
                Ok(()) => {
                    self.file_len = self.file_len.max(off + data.len() as u64);
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
        self.file.write_all_at(data, off)?;
        self.file_len = self.file_len.max(off + data.len() as u64);
        Ok(())
    }
}

/// Whether `b` is all zeros (vectorizes well: OR-folds 4 KiB at a time).
pub(super) fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

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
        let last = Arc::new(AtomicU64::new(start as u64));
        let reported = last.clone();
        let mut s = StagedFile::with_sink(f, path, start as u64, direct, refuse, move |w| {
            // Offsets only grow, and cover the stages written.
            assert!(w > reported.swap(w, Ordering::SeqCst));
        })
        .unwrap();
        let mut seen = Vec::with_capacity(data.len() - start);
        for p in data[start..].chunks(piece) {
            s.write(p, |b| {
                assert!(b.len() <= PIECE);
                seen.extend_from_slice(b)
            })
            .unwrap();
            assert!(s.written() <= s.offset());
            assert!(s.written().is_multiple_of(ALIGN as u64) || s.written() < start as u64 + 4096);
        }
        assert_eq!(s.offset(), data.len() as u64);
        s.finish().unwrap();
        assert_eq!(s.written(), data.len() as u64);
        assert_eq!(last.load(Ordering::SeqCst), data.len() as u64);
        // The file is at least as long as what was written, holes at the end included.
        assert!(std::fs::metadata(path).unwrap().len() >= data.len() as u64);
        if refuse {
            assert!(!s.is_direct());
        }
        // `seen` got every byte, in order.
        assert!(seen == data[start..]);
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

    #[test]
    fn a_failed_write_stops_the_stream_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"").unwrap();
        // A descriptor that cannot write, and no direct I/O: every write fails (EBADF).
        let f = File::open(&p).unwrap();
        let mut s = StagedFile::new(f, &p, 0, false, |w| panic!("{w} written")).unwrap();
        let d = data(3 * STAGE);
        let mut failed = None;
        for (i, piece) in d.chunks(1 << 20).enumerate() {
            if let Err(e) = s.write(piece, |_| {}) {
                failed = Some((i, e));
                break;
            }
        }
        let err = match failed {
            // The error came back from the I/O thread before the data ran out.
            Some((i, e)) => {
                assert!(
                    i + 1 >= STAGE >> 20,
                    "failed at piece {i}, before a stage was full"
                );
                e
            }
            None => s.finish().unwrap_err(),
        };
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::BADF.raw_os_error())
        );
        // Nothing counts as written, and it stays an error.
        assert_eq!(s.written(), 0);
        assert!(s.write(b"more", |_| {}).is_err());
        assert!(s.finish().is_err());
        drop(s);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    }
}
