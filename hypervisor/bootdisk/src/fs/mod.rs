//! The file systems `/boot` lives on, read-only, behind one small trait; and a [`Namespace`]
//! that mounts several of them (root, a separate /boot, the ESP) and resolves paths the way
//! the guest would, following symbolic links across mounts with a bounded depth.

mod btrfs;
mod crc32c;
mod ext4;
mod fat;
mod xfs;

use std::sync::Arc;

use crate::{Error, Limits, ReadAt, Result};

pub use btrfs::BtrfsFs;
pub use ext4::Ext4Fs;
pub use fat::FatFs;
pub use xfs::XfsFs;

/// What a path names (the last component not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File { size: u64 },
    Dir,
    Symlink,
    Other,
}

/// One read-only file system. Paths are absolute, `/`-separated, and free of symbolic links
/// except perhaps the last component ([`Namespace`] resolves them).
pub trait FileSystem {
    /// "ext4", "vfat", ...
    fn kind(&self) -> &'static str;
    /// The UUID as Linux shows it (`blkid`, `root=UUID=`), lower case.
    fn uuid(&self) -> Option<String>;
    /// The volume label.
    fn label(&self) -> Option<String>;
    /// What `path` is, not following a final symbolic link.
    fn kind_of(&self, path: &str) -> Result<FileKind>;
    /// A symbolic link's target.
    fn read_link(&self, path: &str) -> Result<String>;
    /// A regular file's contents; fails when it is larger than `cap`.
    fn read(&self, path: &str, cap: u64) -> Result<Vec<u8>>;
    /// A directory's entry names (not `.` or `..`), at most `cap` of them.
    fn list(&self, path: &str, cap: usize) -> Result<Vec<String>>;
}

/// Open the file system on `part`, whichever of the supported kinds it is; None when it is
/// none of them (or has no file system at all).
pub fn open(part: Arc<dyn ReadAt>, place: &str) -> Result<Option<Box<dyn FileSystem>>> {
    let mut sb = [0u8; 2048];
    let n = part.size().min(sb.len() as u64) as usize;
    part.read_at(&mut sb[..n], 0)
        .map_err(|e| crate::io_error(0, e))?;
    let sb = &sb[..n];
    // In the order sniff() looks.
    if sb.starts_with(b"XFSB") {
        return Ok(Some(Box::new(XfsFs::open(part, place)?)));
    }
    let mut magic = [0u8; 8];
    if part.read_at(&mut magic, 0x10040).is_ok() && magic == *b"_BHRfS_M" {
        return Ok(Some(Box::new(BtrfsFs::open(part, place)?)));
    }
    if n >= 1082 && sb[1080] == 0x53 && sb[1081] == 0xEF {
        return Ok(Some(Box::new(Ext4Fs::open(part, place)?)));
    }
    if n >= 512 && sb[510] == 0x55 && sb[511] == 0xAA && fat::looks_like_fat(sb) {
        return Ok(Some(Box::new(FatFs::open(part, place)?)));
    }
    Ok(None)
}

/// What kind of file system, if any, `part` starts with, by its magic numbers: names the
/// ones a boot disk may use, read here or not (LUKS, LVM, NTFS), for the error sentence.
pub fn sniff(part: &dyn ReadAt) -> Option<&'static str> {
    let mut b = vec![0u8; 0x10100];
    let n = part.size().min(b.len() as u64) as usize;
    part.read_at(&mut b[..n], 0).ok()?;
    let b = &b[..n];
    let at = |off: usize, magic: &[u8]| b.get(off..off + magic.len()) == Some(magic);
    if at(0, b"XFSB") {
        Some("xfs")
    } else if at(0x10040, b"_BHRfS_M") {
        Some("btrfs")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("LUKS")
    } else if at(0x218, b"LVM2 001") || at(0x018, b"LVM2 001") {
        Some("LVM")
    } else if at(1080, &[0x53, 0xEF]) {
        Some("ext4")
    } else if at(3, b"NTFS    ") {
        Some("NTFS")
    } else if at(0xff6, b"SWAPSPACE2") {
        Some("swap")
    } else if n >= 512 && at(510, &[0x55, 0xAA]) && fat::looks_like_fat(b) {
        Some("vfat")
    } else {
        None
    }
}

/// Normalise a path: absolute, no empty, `.` or `..` components beyond the root.
fn components(path: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// File systems mounted at paths, as the guest's fstab would mount them. Each mount carries a
/// tag (the caller's volume number) so that a resolved path can name where it really lies.
pub struct Namespace<'a> {
    /// (mount point components, file system, tag), longest mount point first.
    mounts: Vec<(Vec<String>, &'a dyn FileSystem, usize)>,
    limits: Limits,
}

/// Where a resolved path really lies: the tag of its file system and the path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub tag: usize,
    pub path: String,
}

impl<'a> Namespace<'a> {
    /// A namespace with `root` (tagged `tag`) at `/`.
    pub fn new(root: &'a dyn FileSystem, tag: usize, limits: Limits) -> Namespace<'a> {
        Namespace {
            mounts: vec![(Vec::new(), root, tag)],
            limits,
        }
    }

    /// Mount `fs` (tagged `tag`) at `at` (e.g. "/boot", "/boot/efi").
    pub fn mount(&mut self, at: &str, fs: &'a dyn FileSystem, tag: usize) {
        let at: Vec<String> = components(at).into_iter().map(String::from).collect();
        self.mounts.retain(|(m, _, _)| *m != at);
        self.mounts.push((at, fs, tag));
        self.mounts
            .sort_by_key(|(m, _, _)| std::cmp::Reverse(m.len()));
    }

    /// The file system holding `path` (already resolved), its tag and the path inside it.
    fn locate(&self, path: &[String]) -> (&'a dyn FileSystem, usize, String) {
        for (m, fs, tag) in &self.mounts {
            if path.len() >= m.len() && path[..m.len()] == m[..] {
                return (*fs, *tag, format!("/{}", path[m.len()..].join("/")));
            }
        }
        unreachable!("the root mount matches every path")
    }

    /// Where `path` really lies, every link followed.
    pub fn locate_path(&self, path: &str) -> Result<(Located, FileKind)> {
        let (real, kind) = self.resolve(path)?;
        let c: Vec<String> = components(&real).into_iter().map(String::from).collect();
        let (_, tag, inner) = self.locate(&c);
        Ok((Located { tag, path: inner }, kind))
    }

    /// `path` with every symbolic link followed: the final path and what it names.
    pub fn resolve(&self, path: &str) -> Result<(String, FileKind)> {
        let mut todo: Vec<String> = components(path)
            .into_iter()
            .rev()
            .map(String::from)
            .collect();
        let mut done: Vec<String> = Vec::new();
        let mut links = 0;
        let mut kind = FileKind::Dir;
        while let Some(c) = todo.pop() {
            match c.as_str() {
                "." => continue,
                ".." => {
                    done.pop();
                    kind = FileKind::Dir;
                    continue;
                }
                _ => {}
            }
            if kind != FileKind::Dir {
                return Err(Error::WrongKind {
                    path: format!("/{}", done.join("/")),
                    what: "not a directory",
                });
            }
            done.push(c);
            let (fs, _, inner) = self.locate(&done);
            kind = fs.kind_of(&inner)?;
            if kind == FileKind::Symlink {
                links += 1;
                if links > self.limits.symlinks {
                    return Err(Error::SymlinkLoop(path.to_string()));
                }
                let target = fs.read_link(&inner)?;
                done.pop();
                if target.starts_with('/') {
                    done.clear();
                }
                // The target's own `..` climb from the link's directory: keep them for the
                // loop above rather than normalising them away.
                todo.extend(
                    target
                        .split('/')
                        .filter(|c| !c.is_empty())
                        .rev()
                        .map(String::from),
                );
                kind = FileKind::Dir;
                // An empty target or "/" leaves us at a directory.
            }
        }
        Ok((format!("/{}", done.join("/")), kind))
    }

    /// Whether `path` exists (after following links).
    pub fn exists(&self, path: &str) -> bool {
        self.resolve(path).is_ok()
    }

    /// The contents of the file at `path`, at most `cap` bytes.
    pub fn read(&self, path: &str, cap: u64) -> Result<Vec<u8>> {
        let (real, kind) = self.resolve(path)?;
        match kind {
            FileKind::File { size } if size > cap => Err(Error::TooLarge {
                path: path.to_string(),
                limit: cap,
            }),
            FileKind::File { .. } => {
                let c: Vec<String> = components(&real).into_iter().map(String::from).collect();
                let (fs, _, inner) = self.locate(&c);
                fs.read(&inner, cap)
            }
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

    /// A configuration file as text (capped by [`Limits::config`]; invalid UTF-8 replaced).
    pub fn read_text(&self, path: &str) -> Result<String> {
        let b = self.read(path, self.limits.config)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// The names in the directory at `path`.
    pub fn list(&self, path: &str) -> Result<Vec<String>> {
        let (real, kind) = self.resolve(path)?;
        if kind != FileKind::Dir {
            return Err(Error::WrongKind {
                path: path.to_string(),
                what: "not a directory",
            });
        }
        let c: Vec<String> = components(&real).into_iter().map(String::from).collect();
        let (fs, _, inner) = self.locate(&c);
        fs.list(&inner, self.limits.dir_entries)
    }

    /// The limits this namespace reads with.
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

#[cfg(test)]
mod tests;
