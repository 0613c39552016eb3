//! Raw disk images: the file (or host block device) is the disk, byte for byte.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Allocation, AllocationState, BlockDevice, DiskError, SECTOR_SIZE, check_range};

/// How to open a [`RawFile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFileOptions {
    /// Refuse writes and discards (the file is opened read-only too).
    pub read_only: bool,
    /// Logical sector size reported to the guest: 512 (the default) or 4096. The image size
    /// must be a multiple of it.
    pub logical_sector_size: u32,
    /// Physical sector size reported to the guest; `None` means the same as the logical one.
    /// Must be 512 or 4096 and not smaller than the logical sector size.
    pub physical_sector_size: Option<u32>,
}

impl Default for RawFileOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            logical_sector_size: SECTOR_SIZE,
            physical_sector_size: None,
        }
    }
}

impl RawFileOptions {
    /// Validated (logical, physical) sector sizes.
    fn sector_sizes(&self) -> Result<(u32, u32), DiskError> {
        let logical = self.logical_sector_size;
        let physical = self.physical_sector_size.unwrap_or(logical);
        let ok = |s: u32| s == 512 || s == 4096;
        if !ok(logical) || !ok(physical) || physical < logical {
            return Err(DiskError::InvalidSectorSize { logical, physical });
        }
        Ok((logical, physical))
    }
}

/// A raw image file. Reads and writes are positional (`pread`/`pwrite`), so the file can be
/// shared by several threads without locking.
///
/// Sparse-aware: [`BlockDevice::allocation`] reports holes, [`BlockDevice::discard`] punches
/// them.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    logical: u32,
    physical: u32,
    read_only: bool,
}

impl RawFile {
    /// Open an existing image with 512-byte sectors.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self, DiskError> {
        Self::open_with(
            path,
            &RawFileOptions {
                read_only,
                ..RawFileOptions::default()
            },
        )
    }

    /// Open an existing image with explicit options.
    pub fn open_with(path: impl AsRef<Path>, options: &RawFileOptions) -> Result<Self, DiskError> {
        options.sector_sizes()?;
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(path)
            .map_err(|source| io_err("open", 0, source))?;
        Self::from_file(file, options)
    }

    /// Create a new image of `size` bytes (sparse where the filesystem allows) with 512-byte
    /// sectors. Fails if the file already exists.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Self, DiskError> {
        Self::create_with(path, size, &RawFileOptions::default())
    }

    /// Create a new image of `size` bytes with explicit options. Fails if the file already
    /// exists; `options.read_only` only affects the returned handle.
    pub fn create_with(
        path: impl AsRef<Path>,
        size: u64,
        options: &RawFileOptions,
    ) -> Result<Self, DiskError> {
        let (logical, _) = options.sector_sizes()?;
        if !size.is_multiple_of(u64::from(logical)) {
            return Err(DiskError::UnalignedSize {
                size,
                sector_size: logical,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| io_err("create", 0, source))?;
        file.set_len(size)
            .map_err(|source| io_err("set_len", size, source))?;
        Self::from_file(file, options)
    }

    /// Wrap an already open file (e.g. one passed over a socket). It must be readable, and
    /// writable unless `options.read_only`. The size is taken from the file's metadata, or by
    /// seeking to the end for a host block device.
    pub fn from_file(mut file: File, options: &RawFileOptions) -> Result<Self, DiskError> {
        let (logical, physical) = options.sector_sizes()?;
        let meta = file
            .metadata()
            .map_err(|source| io_err("stat", 0, source))?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            file.seek(SeekFrom::End(0))
                .map_err(|source| io_err("seek", 0, source))?
        };
        if !size.is_multiple_of(u64::from(logical)) {
            return Err(DiskError::UnalignedSize {
                size,
                sector_size: logical,
            });
        }
        Ok(Self {
            file,
            size,
            logical,
            physical,
            read_only: options.read_only,
        })
    }
}

fn io_err(op: &'static str, offset: u64, source: std::io::Error) -> DiskError {
    DiskError::Io { op, offset, source }
}

impl BlockDevice for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn logical_sector_size(&self) -> u32 {
        self.logical
    }

    fn physical_sector_size(&self) -> u32 {
        self.physical
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| io_err("read", offset, source))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| io_err("write", offset, source))
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|source| io_err("flush", 0, source))
    }

    /// Punches a hole (the range then reads as zeros and uses no space) in a regular file;
    /// a no-op where the file system or device cannot.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NODEV => Ok(()),
            Err(e) => Err(io_err("discard", offset, e.into())),
        }
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        if !self.read_only {
            crate::storage::start_writeback(&self.file, offset, len);
        }
    }

    fn prefetch(&self, offset: u64, len: u64) {
        if check_range(offset, len, self.size).is_ok() {
            crate::storage::prefetch(&self.file, offset, len);
        }
    }

    /// Holes in a sparse file are [`AllocationState::Unallocated`], found with
    /// `SEEK_DATA`/`SEEK_HOLE`; where those are not supported, everything is data.
    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation, DiskError> {
        use rustix::fs::{SeekFrom, seek};
        check_range(offset, len, self.size)?;
        let data = |len| {
            Ok(Allocation {
                state: AllocationState::Data,
                len,
            })
        };
        let hole = |len| {
            Ok(Allocation {
                state: AllocationState::Unallocated,
                len,
            })
        };
        if len == 0 {
            return data(0);
        }
        match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(start) if start > offset => hole((start - offset).min(len)),
            Ok(_) => match seek(&self.file, SeekFrom::Hole(offset)) {
                Ok(end) if end > offset => data((end - offset).min(len)),
                _ => data(len),
            },
            // No data at or after `offset`.
            Err(e) if e == rustix::io::Errno::NXIO => hole(len),
            Err(_) => data(len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_disk(size: u64) -> (tempfile::TempDir, std::path::PathBuf, RawFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let disk = RawFile::create(&path, size).unwrap();
        (dir, path, disk)
    }

    #[test]
    fn round_trip() {
        let (_dir, path, disk) = new_disk(1 << 20);
        assert_eq!(disk.size(), 1 << 20);
        assert_eq!(disk.logical_sector_size(), 512);
        assert_eq!(disk.physical_sector_size(), 512);
        assert!(!disk.read_only());
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        disk.write_at(&data, 8192).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0u8; 4096];
        disk.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);
        // Fresh space reads as zeros; the file really holds the data.
        disk.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[8192..8192 + 4096], &data[..]);
        // Reopen and read again.
        drop(disk);
        let disk = RawFile::open(&path, true).unwrap();
        disk.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn out_of_range() {
        let (_dir, _path, disk) = new_disk(4096);
        let mut buf = [0u8; 512];
        disk.read_at(&mut buf, 3584).unwrap();
        assert!(matches!(
            disk.read_at(&mut buf, 3585),
            Err(DiskError::OutOfRange {
                offset: 3585,
                len: 512,
                size: 4096
            })
        ));
        assert!(matches!(
            disk.write_at(&buf, 4096),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(&mut buf, u64::MAX - 10),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(disk.discard(4096, 512).is_err());
        assert!(disk.allocation(0, 8192).is_err());
        assert_eq!(disk.allocation(512, 1024).unwrap().len, 1024);
        disk.discard(0, 4096).unwrap();
    }

    #[test]
    fn allocation_follows_holes_and_discard_punches_them() {
        let (_dir, _path, disk) = new_disk(4 << 20);
        let hole = |len| Allocation {
            state: AllocationState::Unallocated,
            len,
        };
        let data = |len| Allocation {
            state: AllocationState::Data,
            len,
        };
        assert_eq!(disk.allocation(0, 4 << 20).unwrap(), hole(4 << 20));
        disk.write_at(&[0x11; 1 << 20], 1 << 20).unwrap();
        disk.flush().unwrap();
        assert_eq!(disk.allocation(0, 4 << 20).unwrap(), hole(1 << 20));
        assert_eq!(disk.allocation(1 << 20, 3 << 20).unwrap(), data(1 << 20));
        assert_eq!(disk.allocation(2 << 20, 2 << 20).unwrap(), hole(2 << 20));
        // Clipped to the query.
        assert_eq!(disk.allocation(1 << 20, 4096).unwrap(), data(4096));
        disk.discard(1 << 20, 1 << 20).unwrap();
        assert_eq!(disk.allocation(0, 4 << 20).unwrap(), hole(4 << 20));
        let mut buf = vec![0xffu8; 4096];
        disk.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
    }

    #[test]
    fn read_only_refuses_writes() {
        let (_dir, path, disk) = new_disk(4096);
        disk.write_at(&[0xaa; 512], 0).unwrap();
        drop(disk);
        let disk = RawFile::open(&path, true).unwrap();
        assert!(disk.read_only());
        assert!(matches!(
            disk.write_at(&[0; 512], 0),
            Err(DiskError::ReadOnly)
        ));
        assert!(matches!(disk.discard(0, 512), Err(DiskError::ReadOnly)));
        disk.flush().unwrap();
        let mut buf = [0u8; 512];
        disk.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0xaa; 512]);
    }

    #[test]
    fn sector_size_validation() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RawFileOptions {
            logical_sector_size: 4096,
            ..RawFileOptions::default()
        };
        // 4096-byte sectors need a size that is a multiple of 4096.
        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![0u8; 4096 + 512]).unwrap();
        assert!(matches!(
            RawFile::open_with(&odd, &opts),
            Err(DiskError::UnalignedSize {
                size: 4608,
                sector_size: 4096
            })
        ));
        assert!(RawFile::open(&odd, false).is_ok());
        assert!(matches!(
            RawFile::create_with(dir.path().join("x.img"), 4608, &opts),
            Err(DiskError::UnalignedSize { .. })
        ));
        let good = RawFile::create_with(dir.path().join("good.img"), 8192, &opts).unwrap();
        assert_eq!(good.logical_sector_size(), 4096);
        assert_eq!(good.physical_sector_size(), 4096);
        // Bad sector sizes.
        for (logical, physical) in [(1024, None), (4096, Some(512)), (512, Some(8192))] {
            let opts = RawFileOptions {
                read_only: false,
                logical_sector_size: logical,
                physical_sector_size: physical,
            };
            assert!(matches!(
                RawFile::open_with(&odd, &opts),
                Err(DiskError::InvalidSectorSize { .. })
            ));
        }
        // 512e: 512 logical on 4096 physical.
        let opts = RawFileOptions {
            read_only: true,
            logical_sector_size: 512,
            physical_sector_size: Some(4096),
        };
        let disk = RawFile::open_with(dir.path().join("good.img"), &opts).unwrap();
        assert_eq!(
            (disk.logical_sector_size(), disk.physical_sector_size()),
            (512, 4096)
        );
        // Unaligned images are refused for 512-byte sectors too.
        let tiny = dir.path().join("tiny.img");
        std::fs::write(&tiny, [0u8; 100]).unwrap();
        assert!(matches!(
            RawFile::open(&tiny, true),
            Err(DiskError::UnalignedSize { .. })
        ));
        // create never clobbers an existing file.
        assert!(matches!(
            RawFile::create(&tiny, 4096),
            Err(DiskError::Io { op: "create", .. })
        ));
    }

    #[test]
    fn shared_between_threads() {
        let (_dir, _path, disk) = new_disk(64 * 512);
        let disk = std::sync::Arc::new(disk);
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let disk = disk.clone();
                std::thread::spawn(move || {
                    let off = u64::from(i) * 4096;
                    disk.write_at(&[i; 4096], off).unwrap();
                    let mut buf = [0u8; 4096];
                    disk.read_at(&mut buf, off).unwrap();
                    assert_eq!(buf, [i; 4096]);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
