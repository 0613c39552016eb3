//! Copying one virtual disk into another, sparse-aware and in parallel.
//!
//! The source's allocation map decides what is read at all: unallocated extents are skipped.
//! What is read is split into chunks; a chunk that is entirely zero is not written, so the
//! destination (a fresh image, which reads as zeros) stays sparse. Several worker threads
//! each take the next chunk, read it, test it and write it: reading and writing overlap
//! across threads, which is what makes conversion of large images fast on one disk.
//!
//! Two hints keep the host busy: each worker asks the source to [prefetch] the chunk the
//! next round of workers will take, and the destination to [start writing back] what it
//! has just written. Without the latter, all the data would sit dirty in the page cache
//! (below the kernel's background writeback threshold for images of a few GiB) and be
//! written only by the final flush, after the copy instead of during it.
//!
//! [prefetch]: BlockDevice::prefetch
//! [start writing back]: BlockDevice::start_writeback

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{AllocationState, BlockDevice, DiskError};

/// How to convert.
#[derive(Debug, Clone, Copy)]
pub struct ConvertOptions {
    /// Worker threads (at least 1).
    pub threads: usize,
    /// Bytes per chunk (a multiple of 4096; it is also the unit of zero detection).
    pub chunk_size: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)),
            chunk_size: 2 << 20,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written to the destination.
    pub written: u64,
    /// Bytes skipped because the source had nothing there.
    pub skipped_unallocated: u64,
    /// Bytes skipped because they were zero.
    pub skipped_zero: u64,
}

/// Why a conversion stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The destination is smaller than the source.
    #[error("destination ({dst} bytes) is smaller than the source ({src} bytes)")]
    TooSmall {
        /// Source size.
        src: u64,
        /// Destination size.
        dst: u64,
    },
    /// The caller cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Reading the source failed.
    #[error("reading the source")]
    Read(#[source] DiskError),
    /// Writing the destination failed.
    #[error("writing the destination")]
    Write(#[source] DiskError),
}

/// Copy the whole of `src` into `dst` (which must be at least as large and read as zeros
/// where nothing is written). `progress(done, total)` is called from worker threads as bytes
/// of the virtual disk are processed; setting `cancel` stops the copy soon after.
pub fn convert(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    opts: ConvertOptions,
    cancel: &AtomicBool,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ConvertStats, ConvertError> {
    let total = src.size();
    if dst.size() < total {
        return Err(ConvertError::TooSmall {
            src: total,
            dst: dst.size(),
        });
    }
    let chunk = opts.chunk_size.max(4096) as u64 / 4096 * 4096;
    let lookahead = chunk * opts.threads.max(1) as u64;
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let stats = Mutex::new(ConvertStats::default());
    let failure: Mutex<Option<ConvertError>> = Mutex::new(None);
    let stop = AtomicBool::new(false);

    std::thread::scope(|s| {
        for _ in 0..opts.threads.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; chunk as usize];
                let mut local = ConvertStats::default();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if cancel.load(Ordering::Relaxed) {
                        stop.store(true, Ordering::Relaxed);
                        failure
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(ConvertError::Cancelled);
                        break;
                    }
                    let start = next.fetch_add(chunk, Ordering::Relaxed);
                    if start >= total {
                        break;
                    }
                    let len = chunk.min(total - start);
                    // Ask for the chunk the next round of workers will take, so the host
                    // reads ahead while this one is copied.
                    let ahead = start + lookahead;
                    if ahead < total {
                        src.prefetch(ahead, chunk.min(total - ahead));
                    }
                    if let Err(e) = copy_chunk(src, dst, start, len, &mut buf, &mut local) {
                        stop.store(true, Ordering::Relaxed);
                        failure
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                    let d = done.fetch_add(len, Ordering::Relaxed) + len;
                    progress(d, total);
                }
                let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                s.read += local.read;
                s.written += local.written;
                s.skipped_unallocated += local.skipped_unallocated;
                s.skipped_zero += local.skipped_zero;
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    dst.flush().map_err(ConvertError::Write)?;
    Ok(stats.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// Copy `[start, start+len)`: walk the source's extents, read allocated ones, write the
/// non-zero 4 KiB-aligned runs.
fn copy_chunk(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    start: u64,
    len: u64,
    buf: &mut [u8],
    stats: &mut ConvertStats,
) -> Result<(), ConvertError> {
    let mut off = start;
    let end = start + len;
    while off < end {
        let ext = src.allocation(off, end - off).map_err(ConvertError::Read)?;
        let ext_len = ext.len.clamp(1, end - off);
        if ext.state == AllocationState::Unallocated && ext.len > 0 {
            stats.skipped_unallocated += ext_len;
        } else {
            let b = &mut buf[..ext_len as usize];
            src.read_at(b, off).map_err(ConvertError::Read)?;
            stats.read += ext_len;
            if write_nonzero(dst, b, off, stats)? {
                // Let the host write this back now rather than all at the final flush.
                dst.start_writeback(off, ext_len);
            }
        }
        off += ext_len;
    }
    Ok(())
}

/// Write the parts of `data` (at disk offset `off`) that are not all zero, in runs of whole
/// 4 KiB pieces (512-byte pieces at the edges when the data is not 4 KiB aligned). Returns
/// whether anything was written.
fn write_nonzero(
    dst: &dyn BlockDevice,
    data: &[u8],
    off: u64,
    stats: &mut ConvertStats,
) -> Result<bool, ConvertError> {
    let piece = if off.is_multiple_of(4096) && data.len().is_multiple_of(4096) {
        4096
    } else {
        512
    };
    let before = stats.written;
    let mut run_start: Option<usize> = None;
    let flush_run = |from: usize, to: usize, stats: &mut ConvertStats| {
        stats.written += (to - from) as u64;
        dst.write_at(&data[from..to], off + from as u64)
            .map_err(ConvertError::Write)
    };
    let mut i = 0;
    while i < data.len() {
        let p_end = (i + piece).min(data.len());
        let zero = is_zero(&data[i..p_end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(r)) => {
                flush_run(r, i, stats)?;
                run_start = None;
            }
            _ => {}
        }
        if zero {
            stats.skipped_zero += (p_end - i) as u64;
        }
        i = p_end;
    }
    if let Some(r) = run_start {
        flush_run(r, data.len(), stats)?;
    }
    Ok(stats.written > before)
}

/// Whether every byte is zero (word at a time).
pub fn is_zero(b: &[u8]) -> bool {
    let mid = b.len() / 8 * 8;
    let (words, tail) = b.split_at(mid);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && tail.iter().all(|x| *x == 0)
}

/// Compare two disks' contents over `range` (both must cover it), skipping ranges both
/// report as unallocated. Returns the offset of the first difference. `progress` gets the
/// offset reached and the end of the range.
pub fn first_difference(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    range: std::ops::Range<u64>,
    cancel: &AtomicBool,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Option<u64>, DiskError> {
    let chunk = 4u64 << 20;
    let mut ba = vec![0u8; chunk as usize];
    let mut bb = vec![0u8; chunk as usize];
    let len = range.end;
    let mut off = range.start;
    while off < len {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let n = chunk.min(len - off);
        let ea = a.allocation(off, n)?;
        let eb = b.allocation(off, n)?;
        let n = ea.len.min(eb.len).max(1).min(n);
        if !(ea.state == AllocationState::Unallocated && eb.state == AllocationState::Unallocated) {
            a.read_at(&mut ba[..n as usize], off)?;
            b.read_at(&mut bb[..n as usize], off)?;
            if let Some(i) = ba[..n as usize]
                .iter()
                .zip(&bb[..n as usize])
                .position(|(x, y)| x != y)
            {
                return Ok(Some(off + i as u64));
            }
        }
        off += n;
        progress(off, len);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RawFile;

    fn raw(dir: &std::path::Path, name: &str, size: u64) -> RawFile {
        RawFile::create(dir.join(name), size).unwrap()
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16u64 << 20;
        let src = raw(dir.path(), "src", size);
        // Data, a zero-filled but allocated range, and holes.
        src.write_at(&[0xab; 1 << 20], 1 << 20).unwrap();
        src.write_at(&[0; 1 << 20], 4 << 20).unwrap();
        src.write_at(&[0xcd; 4096], (9 << 20) + 4096).unwrap();
        src.write_at(&[0x01; 512], size - 512).unwrap();
        let dst = raw(dir.path(), "dst", size);
        let cancel = AtomicBool::new(false);
        let last = AtomicU64::new(0);
        let opts = ConvertOptions {
            threads: 3,
            chunk_size: 1 << 20,
        };
        let st = convert(&src, &dst, opts, &cancel, &|d, t| {
            assert!(d <= t);
            last.fetch_max(d, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(last.load(Ordering::Relaxed), size);
        // Data written in 4 KiB pieces: the trailing 512 bytes cost one piece.
        assert!(
            (1 << 20) + 4096 + 512 <= st.written && st.written <= (1 << 20) + 2 * 4096,
            "{st:?}"
        );
        assert!(st.skipped_unallocated > 8 << 20, "{st:?}");
        assert_eq!(
            first_difference(&src, &dst, 0..size, &cancel, &|_, _| {}).unwrap(),
            None
        );
        // The zero-filled range stayed a hole in the destination.
        assert_eq!(
            dst.allocation(4 << 20, 1 << 20).unwrap().state,
            AllocationState::Unallocated
        );
        dst.write_at(&[7; 512], 3 << 20).unwrap();
        assert_eq!(
            first_difference(&src, &dst, 0..size, &cancel, &|_, _| {}).unwrap(),
            Some(3 << 20)
        );
    }

    /// A device that records the hints it is given.
    struct Hinted {
        dev: RawFile,
        writeback: Mutex<Vec<(u64, u64)>>,
        prefetch: Mutex<Vec<(u64, u64)>>,
    }

    impl BlockDevice for Hinted {
        fn size(&self) -> u64 {
            self.dev.size()
        }
        fn logical_sector_size(&self) -> u32 {
            512
        }
        fn physical_sector_size(&self) -> u32 {
            512
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
            self.dev.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
            self.dev.write_at(buf, offset)
        }
        fn flush(&self) -> Result<(), DiskError> {
            self.dev.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.dev.discard(offset, len)
        }
        fn allocation(&self, offset: u64, len: u64) -> Result<crate::Allocation, DiskError> {
            self.dev.allocation(offset, len)
        }
        fn start_writeback(&self, offset: u64, len: u64) {
            self.writeback.lock().unwrap().push((offset, len));
            self.dev.start_writeback(offset, len);
        }
        fn prefetch(&self, offset: u64, len: u64) {
            self.prefetch.lock().unwrap().push((offset, len));
            self.dev.prefetch(offset, len);
        }
    }

    #[test]
    fn hints_run_ahead_of_reads_and_behind_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mib = 1u64 << 20;
        let hinted = |name: &str| Hinted {
            dev: raw(dir.path(), name, 8 * mib),
            writeback: Mutex::new(Vec::new()),
            prefetch: Mutex::new(Vec::new()),
        };
        let src = hinted("src");
        // Data in chunk 2, an allocated but zero chunk 5, holes elsewhere.
        src.write_at(&[9; 4096], 2 * mib + 8192).unwrap();
        src.write_at(&vec![0; mib as usize], 5 * mib).unwrap();
        let dst = hinted("dst");
        let opts = ConvertOptions {
            threads: 1,
            chunk_size: mib as usize,
        };
        convert(&src, &dst, opts, &AtomicBool::new(false), &|_, _| {}).unwrap();
        // Each chunk asks for the next one; the last has nothing ahead.
        let want: Vec<(u64, u64)> = (1..8).map(|k| (k * mib, mib)).collect();
        assert_eq!(*src.prefetch.lock().unwrap(), want);
        // Write-back is requested only where something was written (the source's data
        // extent: the rest of the chunk is a hole).
        assert_eq!(*dst.writeback.lock().unwrap(), vec![(2 * mib + 8192, 4096)]);
        assert!(dst.prefetch.lock().unwrap().is_empty());
        assert!(src.writeback.lock().unwrap().is_empty());
        let mut b = vec![0u8; 4096];
        dst.read_at(&mut b, 2 * mib + 8192).unwrap();
        assert_eq!(b, vec![9; 4096]);
    }

    #[test]
    fn too_small_and_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", 8 << 20);
        let small = raw(dir.path(), "small", 4 << 20);
        let cancel = AtomicBool::new(false);
        assert!(matches!(
            convert(&src, &small, ConvertOptions::default(), &cancel, &|_, _| {}),
            Err(ConvertError::TooSmall { .. })
        ));
        let dst = raw(dir.path(), "dst", 8 << 20);
        cancel.store(true, Ordering::Relaxed);
        assert!(matches!(
            convert(&src, &dst, ConvertOptions::default(), &cancel, &|_, _| {}),
            Err(ConvertError::Cancelled)
        ));
    }
}
