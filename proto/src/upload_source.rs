//! The client's side of an upload's data: a file read in order into `UploadChunk` data,
//! hashed (SHA-256) as it is read, so the checksum can be declared after the data
//! (`FinishUpload`) and the file is read once. Shared by the CLI and the console.
//!
//! Bytes sent twice (a stream resent from an earlier offset after a break) are hashed once;
//! a resumed upload first hashes the part the agent already has, from the file as it is now,
//! so a file edited in between fails the agent's check instead of becoming a disk.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Upload data goes in messages of this size.
pub const CHUNK: usize = 1 << 20;
/// Files are read, and hashed, this much at a time: each piece is hashed right after it is
/// read, while it is still in the core's cache.
const PIECE: usize = CHUNK / 4;

/// Reading the file failed.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("cannot read the file at offset {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the file ended at {0} bytes while it was being uploaded")]
    Shrank(u64),
    #[error("internal error: the checksum would skip bytes {0}..{1}")]
    Gap(u64, u64),
}

/// SHA-256 over the file's first [`FileHash::at`] bytes.
#[derive(Debug, Clone, Default)]
pub struct FileHash {
    h: Sha256,
    at: u64,
}

/// A [`FileHash`] shared by the streams of one upload.
pub type SharedHash = Arc<Mutex<FileHash>>;

/// A new, empty shared hash.
pub fn shared_hash() -> SharedHash {
    Arc::new(Mutex::new(FileHash::default()))
}

/// Lock a shared hash (a panic elsewhere does not poison it for good).
pub fn lock(h: &SharedHash) -> MutexGuard<'_, FileHash> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

impl FileHash {
    /// How many bytes are hashed.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// The checksum of what is hashed, as lower-case hex.
    pub fn hex(&self) -> String {
        hex::encode(self.h.clone().finalize())
    }

    /// Take in `buf`, the file's bytes at `off`: the part past what is hashed already.
    pub fn take(&mut self, off: u64, buf: &[u8]) -> Result<(), SourceError> {
        let end = off + buf.len() as u64;
        if off > self.at {
            return Err(SourceError::Gap(self.at, off));
        }
        if end > self.at {
            self.h.update(&buf[(self.at - off) as usize..]);
            self.at = end;
        }
        Ok(())
    }

    /// Read and hash the file up to `to`, telling `progress` how far it got; false when
    /// `stop` said so.
    pub fn read_to(
        &mut self,
        file: &File,
        to: u64,
        stop: &dyn Fn() -> bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<bool, SourceError> {
        if self.at >= to {
            return Ok(true);
        }
        let mut f = file;
        f.seek(SeekFrom::Start(self.at))
            .map_err(|source| SourceError::Read {
                offset: self.at,
                source,
            })?;
        let mut buf = Vec::with_capacity(PIECE);
        while self.at < to {
            if stop() {
                return Ok(false);
            }
            buf.clear();
            let off = self.at;
            read_piece(f, &mut buf, off, PIECE.min((to - off) as usize))?;
            self.take(off, &buf)?;
            progress(self.at);
        }
        Ok(true)
    }
}

/// Append `n` bytes read from `f` (positioned at `off`) to `buf`, without zeroing them first.
fn read_piece(f: &File, buf: &mut Vec<u8>, off: u64, n: usize) -> Result<(), SourceError> {
    let start = buf.len();
    let got = f
        .take(n as u64)
        .read_to_end(buf)
        .map_err(|source| SourceError::Read {
            offset: off,
            source,
        })?;
    if got < n {
        return Err(SourceError::Shrank(off + (buf.len() - start) as u64));
    }
    Ok(())
}

/// Reads the file in order into upload data. Buffers come back for reuse once the
/// transport has sent them, so they are still in the CPU's last-level cache and nothing is
/// zeroed or faulted in.
pub struct ChunkReader {
    file: File,
    off: u64,
    hash: Option<SharedHash>,
    /// Data handed out, oldest first.
    sent: VecDeque<Bytes>,
}

impl ChunkReader {
    /// Buffers in flight before a new one is taken rather than waited for (a stream's
    /// channel holds a few, the transport a few more).
    const POOL: usize = 12;

    /// Read `file` from `from`, hashing into `hash` when given (which is first brought up
    /// to `from` if it is behind: a resumed upload).
    pub fn new(file: File, from: u64, hash: Option<SharedHash>) -> Result<Self, SourceError> {
        if let Some(h) = &hash {
            lock(h).read_to(&file, from, &|| false, &mut |_| {})?;
        }
        (&file)
            .seek(SeekFrom::Start(from))
            .map_err(|source| SourceError::Read {
                offset: from,
                source,
            })?;
        Ok(ChunkReader {
            file,
            off: from,
            hash,
            sent: VecDeque::new(),
        })
    }

    /// Where the next read starts.
    pub fn offset(&self) -> u64 {
        self.off
    }

    /// The next `n` bytes (at most [`CHUNK`] are read into one buffer).
    pub fn next(&mut self, n: usize) -> Result<Bytes, SourceError> {
        let mut buf = match self.sent.pop_front().map(Bytes::try_into_mut) {
            Some(Ok(m)) if m.capacity() >= n => Vec::from(m),
            Some(Err(busy)) if self.sent.len() + 1 < Self::POOL => {
                self.sent.push_front(busy);
                Vec::with_capacity(n.max(CHUNK))
            }
            _ => Vec::with_capacity(n.max(CHUNK)),
        };
        buf.clear();
        while buf.len() < n {
            let start = buf.len();
            let off = self.off + start as u64;
            read_piece(&self.file, &mut buf, off, PIECE.min(n - start))?;
            if let Some(h) = &self.hash {
                lock(h).take(off, &buf[start..])?;
            }
        }
        self.off += n as u64;
        let data = Bytes::from(buf);
        self.sent.push_back(data.clone());
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(data: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let f = File::open(&path).unwrap();
        (dir, f)
    }

    #[test]
    fn resent_and_reread_bytes_are_hashed_once() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let (_dir, file) = file_with(&data);
        let h = shared_hash();
        // Hashed up to 700 000 from the file (a resume, with progress), then a stream from
        // 500 000 that breaks at 1 600 000, and its retry from 1 000 000 (the agent kept
        // less than was sent).
        let mut seen = 0;
        assert!(
            lock(&h)
                .read_to(&file, 700_000, &|| false, &mut |at| seen = at)
                .unwrap()
        );
        assert_eq!(seen, 700_000);
        let mut r = ChunkReader::new(file.try_clone().unwrap(), 500_000, Some(h.clone())).unwrap();
        while r.offset() < 1_600_000 {
            let off = r.offset() as usize;
            let n = CHUNK.min(1_600_000 - off);
            let got = r.next(n).unwrap();
            assert_eq!(&got[..], &data[off..off + n]);
        }
        let mut r =
            ChunkReader::new(file.try_clone().unwrap(), 1_000_000, Some(h.clone())).unwrap();
        // Buffers come back once nobody holds them: all of these reuse one.
        while (r.offset() as usize) < data.len() {
            let n = CHUNK.min(data.len() - r.offset() as usize);
            let off = r.offset() as usize;
            assert_eq!(&r.next(n).unwrap()[..], &data[off..off + n]);
        }
        let g = lock(&h);
        assert_eq!(g.at(), data.len() as u64);
        assert_eq!(g.hex(), hex::encode(Sha256::digest(&data)));
    }

    #[test]
    fn a_reader_from_further_on_catches_the_hash_up_and_stop_stops() {
        let data: Vec<u8> = (0..1_500_000u32).map(|i| (i % 241) as u8).collect();
        let (_dir, file) = file_with(&data);
        let h = shared_hash();
        assert!(
            !lock(&h)
                .read_to(&file, 1_000_000, &|| true, &mut |_| {})
                .unwrap()
        );
        assert_eq!(lock(&h).at(), 0);
        let mut r = ChunkReader::new(file, 1_200_000, Some(h.clone())).unwrap();
        assert_eq!(lock(&h).at(), 1_200_000);
        r.next(300_000).unwrap();
        assert_eq!(lock(&h).hex(), hex::encode(Sha256::digest(&data)));
    }

    #[test]
    fn gaps_and_shrinking_files_are_errors() {
        let data = vec![7u8; 10_000];
        let (_dir, file) = file_with(&data);
        let mut h = FileHash::default();
        assert!(matches!(
            h.take(10, &data[10..20]),
            Err(SourceError::Gap(0, 10))
        ));
        let mut r = ChunkReader::new(file, 9_900, None).unwrap();
        match r.next(200) {
            Err(SourceError::Shrank(at)) => assert_eq!(at, 10_000),
            other => panic!("{other:?}"),
        }
    }
}
