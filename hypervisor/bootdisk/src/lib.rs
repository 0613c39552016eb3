//! The boot-disk reader: what a guest disk says about how it boots, read without trusting it.
//!
//! A disk a user imports is hostile input. This crate reads only: the partition table (MBR
//! with extended partitions, or GPT), the file systems `/boot` lives on (vfat, ext2/3/4,
//! xfs, btrfs), and from them the distribution's own default boot entry (kernel, initrd,
//! command line). Every structure is bounds-checked, every loop bounded, every read capped
//! ([`Limits`]); errors are one sentence a person can act on ([`Error`]). It runs in the
//! worker's confined reader child process, never in the agent or the worker themselves.
//!
//! May depend on: std and the crates.io crates in its Cargo.toml. Nothing of Parvis: the
//! worker adapts its disk backends to [`ReadAt`].

#![forbid(unsafe_code)]

pub mod entry;
pub mod fs;
pub mod part;

#[cfg(test)]
pub(crate) mod testutil;

use std::sync::Arc;

/// A disk (or a byte range of one) that can be read at any offset.
pub trait ReadAt: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill all of `buf` from `offset`; a read past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.as_slice().read_at(buf, offset)
    }
}

impl ReadAt for &[u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= self.len() as u64 => {
                buf.copy_from_slice(&self[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(past_end()),
        }
    }
}

impl ReadAt for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        (**self).read_at(buf, offset)
    }
}

/// A byte range of a disk: a partition.
#[derive(Clone)]
pub struct Slice {
    disk: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
}

impl Slice {
    /// `len` bytes of `disk` from `start`; clipped to the disk's end.
    pub fn new(disk: Arc<dyn ReadAt>, start: u64, len: u64) -> Slice {
        let size = disk.size();
        let start = start.min(size);
        let len = len.min(size - start);
        Slice { disk, start, len }
    }
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slice({}+{})", self.start, self.len)
    }
}

impl ReadAt for Slice {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.disk.read_at(buf, self.start + offset),
            _ => Err(past_end()),
        }
    }
}

fn past_end() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end")
}

/// Caps on what a disk can make the reader do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest kernel image read.
    pub kernel: u64,
    /// Largest initrd read.
    pub initrd: u64,
    /// Largest configuration file read (grub.cfg, BLS entries, fstab, ...).
    pub config: u64,
    /// Symbolic links followed while resolving one path.
    pub symlinks: u32,
    /// Entries read from one directory.
    pub dir_entries: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            kernel: 64 << 20,
            initrd: 1 << 30,
            config: 1 << 20,
            symlinks: 40,
            dir_entries: 4096,
        }
    }
}

/// Why a disk cannot be read or booted, as one sentence.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// Reading the disk itself failed.
    #[error("the disk could not be read at byte {offset}: {reason}")]
    Io { offset: u64, reason: String },
    /// The partition table is damaged.
    #[error("the disk's partition table is damaged: {0}")]
    BadTable(String),
    /// A file system is damaged or of an unsupported kind.
    #[error("the {fs} file system on {place} cannot be read: {reason}")]
    BadFs {
        fs: &'static str,
        place: String,
        reason: String,
    },
    /// A path does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// A path is not what it should be (a directory where a file was expected, ...).
    #[error("{path} is {what}")]
    WrongKind { path: String, what: &'static str },
    /// A file is larger than the reader accepts.
    #[error("{path} is larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    /// Symbolic links loop or nest too deeply.
    #[error("{0} has too many levels of symbolic links")]
    SymlinkLoop(String),
    /// The disk holds no Linux the reader can boot; says why.
    #[error("{0}")]
    NotBootable(String),
}

/// Shorthand for this crate's results.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_error(offset: u64, e: std::io::Error) -> Error {
    Error::Io {
        offset,
        reason: e.to_string(),
    }
}
