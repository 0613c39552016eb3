//! Where an image's bytes live: a host file, or memory (for fuzzing and tests). Image
//! formats (VHD, VHDX) parse and write their container through this trait, so the same code
//! runs on a file and on an in-memory buffer.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Positional byte storage. All methods take `&self`; implementations are thread-safe.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Read exactly `buf.len()` bytes at `offset`; reading past the end is an
    /// `UnexpectedEof` error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend (extension reads as zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Make completed writes durable.
    fn sync(&self) -> io::Result<()>;
    /// Release the space of `len` bytes at `offset` without changing the length. The range
    /// reads as zeros where the space was released; storage that cannot release space
    /// leaves it as it is (the default). Callers only punch ranges nothing refers to.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Start writing back `len` bytes at `offset` without waiting (see
    /// [`crate::BlockDevice::start_writeback`]); the default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
    /// Start reading `len` bytes at `offset` into the cache without waiting (see
    /// [`crate::BlockDevice::prefetch`]); the default does nothing.
    fn prefetch(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
}

/// A host file.
#[derive(Debug)]
pub struct FileStorage(pub File);

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`; a no-op where the file system cannot.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        use rustix::io::Errno;
        if len == 0 {
            return Ok(());
        }
        match fallocate(
            &self.0,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS || e == Errno::NODEV => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        start_writeback(&self.0, offset, len);
    }
    fn prefetch(&self, offset: u64, len: u64) {
        prefetch(&self.0, offset, len);
    }
}

/// `posix_fadvise(WILLNEED)`: Linux starts asynchronous readahead of the range. Errors are
/// ignored: it is only a hint.
pub(crate) fn prefetch(file: &File, offset: u64, len: u64) {
    if let Some(len) = std::num::NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::WillNeed);
    }
}

/// `posix_fadvise(DONTNEED)`: Linux starts asynchronous writeback of the range's dirty pages
/// (and drops its clean ones from the page cache, which a converter's output does not
/// need). Errors are ignored: it is only a hint.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    if let Some(len) = std::num::NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
    }
}

/// Bytes in memory, with a size cap so hostile inputs cannot make it allocate without bound.
#[derive(Debug)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    max_len: u64,
}

impl MemStorage {
    /// Storage holding `data`, allowed to grow to `max_len` bytes.
    pub fn new(data: Vec<u8>, max_len: u64) -> Self {
        Self {
            data: Mutex::new(data),
            max_len,
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, end: Option<u64>) -> io::Result<usize> {
        match end {
            Some(e) if e <= self.max_len => Ok(e as usize),
            _ => Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "in-memory image size cap",
            )),
        }
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= d.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&d[offset as usize..end as usize]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = self.check(offset.checked_add(buf.len() as u64))?;
        let mut d = self.lock();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = self.check(Some(len))?;
        self.lock().resize(len, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.lock();
        let n = d.len() as u64;
        let start = offset.min(n) as usize;
        let end = offset.saturating_add(len).min(n) as usize;
        d[start..end].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_reads_writes_grows_and_caps() {
        let s = MemStorage::new(vec![1, 2, 3], 16);
        let mut b = [0u8; 2];
        s.read_at(&mut b, 1).unwrap();
        assert_eq!(b, [2, 3]);
        assert!(s.read_at(&mut b, 2).is_err());
        assert!(s.read_at(&mut b, u64::MAX).is_err());
        s.write_at(&[9, 9], 6).unwrap();
        assert_eq!(s.contents(), vec![1, 2, 3, 0, 0, 0, 9, 9]);
        assert!(s.write_at(&[0; 10], 8).is_err());
        assert!(s.set_len(17).is_err());
        s.punch_hole(1, 100).unwrap();
        assert_eq!(s.contents(), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        s.set_len(2).unwrap();
        assert_eq!(s.len().unwrap(), 2);
    }

    #[test]
    fn file_storage_round_trip() {
        let f = tempfile::tempfile().unwrap();
        let s = FileStorage(f);
        s.write_at(b"hello", 10).unwrap();
        assert_eq!(s.len().unwrap(), 15);
        let mut b = [0u8; 5];
        s.read_at(&mut b, 10).unwrap();
        assert_eq!(&b, b"hello");
        assert!(s.read_at(&mut b, 12).is_err());
        // Punching a hole keeps the length and reads zeros where it succeeded.
        s.write_at(&[7; 8192], 4096).unwrap();
        s.punch_hole(4096, 4096).unwrap();
        assert_eq!(s.len().unwrap(), 4096 + 8192);
        let mut z = [1u8; 4096];
        s.read_at(&mut z, 4096).unwrap();
        assert!(z == [0; 4096] || z == [7; 4096]);
        s.read_at(&mut z, 8192).unwrap();
        assert_eq!(z, [7; 4096]);
    }
}
