//! FAT12/16/32 (the EFI system partition) through the `fatfs` crate, read-only: the storage
//! adapter refuses every write, and each call is guarded so that a panic inside the crate on
//! a corrupt volume becomes an error.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use super::{FileKind, FileSystem};
use crate::{Error, ReadAt, Result};

/// Whether a boot sector looks like a FAT BPB (a jump, a sane sector and cluster size, one or
/// two FATs).
pub(crate) fn looks_like_fat(b: &[u8]) -> bool {
    if b.len() < 512 {
        return false;
    }
    let jump = b[0] == 0xEB && b[2] == 0x90 || b[0] == 0xE9;
    let bps = u16::from_le_bytes([b[11], b[12]]);
    let spc = b[13];
    let reserved = u16::from_le_bytes([b[14], b[15]]);
    jump && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && reserved >= 1
        && matches!(b[16], 1 | 2)
}

/// The partition as a read-only, seekable stream for `fatfs`.
struct Storage {
    part: Arc<dyn ReadAt>,
    pos: u64,
}

impl Read for Storage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.part.size().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        self.part.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Storage {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Storage {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let size = self.part.size() as i128;
        let new = match to {
            SeekFrom::Start(o) => o as i128,
            SeekFrom::End(d) => size + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if new < 0 || new > size {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "seek outside"));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

/// A FAT file system.
pub struct FatFs {
    fs: fatfs::FileSystem<Storage>,
    place: String,
}

impl FatFs {
    /// Mount the FAT volume on `part` (`place` names it in errors).
    pub fn open(part: Arc<dyn ReadAt>, place: &str) -> Result<FatFs> {
        let storage = Storage { part, pos: 0 };
        let fs = catch_unwind(AssertUnwindSafe(|| {
            fatfs::FileSystem::new(storage, fatfs::FsOptions::new())
        }))
        .map_err(|_| "its boot sector is corrupt".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|reason| Error::BadFs {
            fs: "vfat",
            place: place.to_string(),
            reason,
        })?;
        Ok(FatFs {
            fs,
            place: place.to_string(),
        })
    }

    /// Run `f` on the volume, turning a panic or an I/O error into this crate's error.
    fn guard<T>(
        &self,
        path: &str,
        f: impl FnOnce(&fatfs::FileSystem<Storage>) -> io::Result<T>,
    ) -> Result<T> {
        match catch_unwind(AssertUnwindSafe(|| f(&self.fs))) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                Err(Error::NotFound(path.to_string()))
            }
            Ok(Err(e)) => Err(self.bad(path, &e.to_string())),
            Err(_) => Err(self.bad(path, "its structures are corrupt")),
        }
    }

    fn bad(&self, path: &str, why: &str) -> Error {
        Error::BadFs {
            fs: "vfat",
            place: self.place.clone(),
            reason: format!("reading {path}: {why}"),
        }
    }
}

/// `path` without its leading slash, as `fatfs` takes it.
fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// Split `path` into its parent and last name.
fn split(path: &str) -> (&str, &str) {
    let p = rel(path).trim_end_matches('/');
    match p.rfind('/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => ("", p),
    }
}

fn not_found(path: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, path.to_string())
}

impl FileSystem for FatFs {
    fn kind(&self) -> &'static str {
        "vfat"
    }

    fn uuid(&self) -> Option<String> {
        let id = self.fs.volume_id();
        Some(format!("{:04x}-{:04x}", id >> 16, id & 0xffff))
    }

    fn label(&self) -> Option<String> {
        let l = self.fs.volume_label().trim().to_string();
        (!l.is_empty() && l != "NO NAME").then_some(l)
    }

    fn kind_of(&self, path: &str) -> Result<FileKind> {
        let (parent, name) = split(path);
        if name.is_empty() {
            return Ok(FileKind::Dir);
        }
        self.guard(path, |fs| {
            let dir = if parent.is_empty() {
                fs.root_dir()
            } else {
                fs.root_dir().open_dir(parent)?
            };
            // A corrupt FAT can chain a directory into a loop: look at so many entries only.
            for e in dir.iter().take(1 << 16) {
                let e = e?;
                if e.file_name().eq_ignore_ascii_case(name) {
                    return Ok(if e.is_dir() {
                        FileKind::Dir
                    } else {
                        FileKind::File { size: e.len() }
                    });
                }
            }
            Err(not_found(path))
        })
    }

    fn read_link(&self, path: &str) -> Result<String> {
        Err(Error::WrongKind {
            path: path.to_string(),
            what: "not a symbolic link (FAT has none)",
        })
    }

    fn read(&self, path: &str, cap: u64) -> Result<Vec<u8>> {
        match self.kind_of(path)? {
            FileKind::File { size } if size > cap => Err(Error::TooLarge {
                path: path.to_string(),
                limit: cap,
            }),
            FileKind::File { size } => self.guard(path, |fs| {
                let mut f = fs.root_dir().open_file(rel(path))?;
                let mut out = Vec::with_capacity(size as usize);
                (&mut f).take(cap).read_to_end(&mut out)?;
                Ok(out)
            }),
            _ => Err(Error::WrongKind {
                path: path.to_string(),
                what: "a directory",
            }),
        }
    }

    fn list(&self, path: &str, cap: usize) -> Result<Vec<String>> {
        self.guard(path, |fs| {
            let dir = if rel(path).is_empty() {
                fs.root_dir()
            } else {
                fs.root_dir().open_dir(rel(path).trim_end_matches('/'))?
            };
            let mut names = Vec::new();
            for e in dir.iter() {
                let name = e?.file_name();
                if name == "." || name == ".." {
                    continue;
                }
                if names.len() >= cap {
                    break;
                }
                names.push(name);
            }
            Ok(names)
        })
    }
}
