//! ext2/3/4 through the `ext4-view` crate (Google's read-only reader: no unsafe, checks its
//! metadata checksums, fails with errors rather than panics on corrupt input).

use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Ext4Read};

use super::{FileKind, FileSystem};
use crate::{Error, ReadAt, Result};

/// An ext2/3/4 file system.
pub struct Ext4Fs {
    fs: Ext4,
    place: String,
}

struct Reader(Arc<dyn ReadAt>);

impl Ext4Read for Reader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.0.read_at(dst, start_byte)?)
    }
}

impl Ext4Fs {
    /// Load the file system on `part` (`place` names it in errors: "partition 2").
    pub fn open(part: Arc<dyn ReadAt>, place: &str) -> Result<Ext4Fs> {
        let bad = |reason: String| Error::BadFs {
            fs: "ext4",
            place: place.to_string(),
            reason,
        };
        check_group_count(part.as_ref()).map_err(bad)?;
        let fs = Ext4::load(Box::new(Reader(part))).map_err(|e| bad(e.to_string()))?;
        Ok(Ext4Fs {
            fs,
            place: place.to_string(),
        })
    }

    fn err(&self, path: &str, e: Ext4Error) -> Error {
        match e {
            Ext4Error::NotFound => Error::NotFound(path.to_string()),
            Ext4Error::IsADirectory => Error::WrongKind {
                path: path.to_string(),
                what: "a directory",
            },
            Ext4Error::NotADirectory => Error::WrongKind {
                path: path.to_string(),
                what: "not a directory",
            },
            Ext4Error::IsASpecialFile => Error::WrongKind {
                path: path.to_string(),
                what: "not a regular file",
            },
            e => Error::BadFs {
                fs: "ext4",
                place: self.place.clone(),
                reason: format!("reading {path}: {e}"),
            },
        }
    }
}

/// ext4-view reserves memory for every block group the superblock claims before it reads
/// any descriptor, so a hostile count (up to 2^32) aborts the process on allocation (found by
/// the ext4 fuzz target). Refuse counts whose descriptors could not fit on the partition.
fn check_group_count(part: &dyn ReadAt) -> std::result::Result<(), String> {
    let mut sb = [0u8; 1024];
    part.read_at(&mut sb, 1024)
        .map_err(|e| format!("its superblock cannot be read: {e}"))?;
    let le32 = |at: usize| u32::from_le_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]]);
    let is_64bit = le32(0x60) & 0x80 != 0;
    let mut blocks = le32(0x04) as u64;
    if is_64bit {
        blocks |= (le32(0x150) as u64) << 32;
    }
    let per_group = le32(0x20) as u64;
    let desc_size = if is_64bit {
        u16::from_le_bytes([sb[0xfe], sb[0xff]]) as u64
    } else {
        32
    };
    // Zero blocks per group and the like are ext4-view's to refuse, with its own words.
    let groups = blocks
        .saturating_sub(le32(0x14) as u64)
        .checked_div(per_group)
        .unwrap_or(0);
    if groups.saturating_mul(desc_size) > part.size() {
        return Err(format!(
            "its superblock claims {groups} block groups, more than the partition can hold"
        ));
    }
    Ok(())
}

impl FileSystem for Ext4Fs {
    fn kind(&self) -> &'static str {
        "ext4"
    }

    fn uuid(&self) -> Option<String> {
        Some(self.fs.uuid().to_string().to_lowercase())
    }

    fn label(&self) -> Option<String> {
        let l = self
            .fs
            .label()
            .to_str()
            .ok()?
            .trim_end_matches('\0')
            .to_string();
        (!l.is_empty()).then_some(l)
    }

    fn kind_of(&self, path: &str) -> Result<FileKind> {
        let m = self
            .fs
            .symlink_metadata(path)
            .map_err(|e| self.err(path, e))?;
        let t = m.file_type();
        Ok(if t.is_symlink() {
            FileKind::Symlink
        } else if t.is_dir() {
            FileKind::Dir
        } else if t.is_regular_file() {
            FileKind::File { size: m.len() }
        } else {
            FileKind::Other
        })
    }

    fn read_link(&self, path: &str) -> Result<String> {
        // ext4-view reads a link kept in blocks into a buffer of the size its inode claims,
        // allocated first: a hostile size aborts on allocation (found by the ext4 fuzz
        // target). Linux's links are at most a page.
        let m = self
            .fs
            .symlink_metadata(path)
            .map_err(|e| self.err(path, e))?;
        if m.file_type().is_symlink() && m.len() > 4096 {
            return Err(Error::BadFs {
                fs: "ext4",
                place: self.place.clone(),
                reason: format!("the link {path} claims {} bytes", m.len()),
            });
        }
        let t = self.fs.read_link(path).map_err(|e| self.err(path, e))?;
        t.to_str().map(String::from).map_err(|_| Error::BadFs {
            fs: "ext4",
            place: self.place.clone(),
            reason: format!("the link {path} is not UTF-8"),
        })
    }

    fn read(&self, path: &str, cap: u64) -> Result<Vec<u8>> {
        match self.kind_of(path)? {
            FileKind::File { size } if size > cap => Err(Error::TooLarge {
                path: path.to_string(),
                limit: cap,
            }),
            FileKind::File { .. } => self.fs.read(path).map_err(|e| self.err(path, e)),
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
        let mut names = Vec::new();
        for e in self.fs.read_dir(path).map_err(|e| self.err(path, e))? {
            let e = e.map_err(|e| self.err(path, e))?;
            let name = e.file_name();
            let Ok(name) = name.as_str() else { continue };
            if name == "." || name == ".." {
                continue;
            }
            if names.len() >= cap {
                break;
            }
            names.push(name.to_string());
        }
        Ok(names)
    }
}
