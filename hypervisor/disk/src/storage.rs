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
    }
}
