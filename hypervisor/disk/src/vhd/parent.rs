//! Finding the parent of a differencing VHD, and writing locators for a new child.
//!
//! Candidates are tried in this order: the relative Windows path (`W2ru`), the absolute
//! Windows path (`W2ku`), the Mac OS X file URL (`MacX`), then the parent unicode name of the
//! dynamic header, then the file name of the absolute path. Relative paths (and bare names)
//! are resolved against the child's directory. Windows separators (`\`) become `/` when the
//! path as written does not exist. The first candidate that exists wins; the parent's unique
//! id is then checked against the child's header by the caller.

use std::path::{Component, Path, PathBuf};

use super::dynamic::{DynHeader, Locator, MAX_LOCATOR_LEN, PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use super::footer::corrupt;
use crate::DiskError;
use crate::storage::Storage;

/// Read and bounds-check a locator payload. `index` names the locator in errors.
fn read_locator(
    storage: &dyn Storage,
    file_len: u64,
    loc: &Locator,
    index: usize,
) -> Result<Vec<u8>, DiskError> {
    let structure = format!("VHD parent locator {index}");
    if loc.data_length > MAX_LOCATOR_LEN {
        return Err(corrupt(
            structure,
            loc.data_offset,
            format!("length {} exceeds {MAX_LOCATOR_LEN}", loc.data_length),
        ));
    }
    let end = loc.data_offset.checked_add(u64::from(loc.data_length));
    if end.is_none_or(|e| e > file_len) {
        return Err(corrupt(
            structure,
            loc.data_offset,
            "payload lies past the end of the file",
        ));
    }
    let mut buf = vec![0u8; loc.data_length as usize];
    storage
        .read_at(&mut buf, loc.data_offset)
        .map_err(|source| DiskError::Io {
            op: "read VHD parent locator",
            offset: loc.data_offset,
            source,
        })?;
    Ok(buf)
}

fn utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Decode a `file://` URL (as written in `MacX` locators) to a path.
fn file_url(b: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(b).ok()?.trim_end_matches('\0');
    let rest = s.strip_prefix("file://")?;
    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The candidate parent paths of a differencing image, in the order they are tried.
/// Locator payloads are bounds-checked against `file_len` (a bad one is `Corrupt`).
pub fn candidates(
    storage: &dyn Storage,
    file_len: u64,
    header: &DynHeader,
    dir: &Path,
) -> Result<Vec<PathBuf>, DiskError> {
    let mut rel = Vec::new();
    let mut abs = Vec::new();
    let mut mac = Vec::new();
    for (i, loc) in header.locators.iter().enumerate() {
        match loc.platform {
            PLAT_W2RU => rel.push(utf16le(&read_locator(storage, file_len, loc, i)?)),
            PLAT_W2KU => abs.push(utf16le(&read_locator(storage, file_len, loc, i)?)),
            PLAT_MACX => mac.extend(file_url(&read_locator(storage, file_len, loc, i)?)),
            _ => {}
        }
    }
    let mut names: Vec<String> = rel
        .into_iter()
        .chain(abs.iter().cloned())
        .chain(mac)
        .collect();
    if !header.parent_name.is_empty() {
        names.push(header.parent_name.clone());
    }
    // Last resort: the file name of an absolute path, next to the child.
    for a in &abs {
        if let Some(base) = a.rsplit(['\\', '/']).next() {
            names.push(base.to_owned());
        }
    }
    let mut out = Vec::new();
    for n in names.into_iter().filter(|n| !n.is_empty()) {
        for variant in [n.clone(), n.replace('\\', "/")] {
            let p = PathBuf::from(&variant);
            let p = if p.is_absolute() { p } else { dir.join(p) };
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The path of `target` relative to `base_dir` (both absolute), Windows style: components
/// joined by `\`, starting with `.\` or `..\`.
pub fn relative_windows_path(base_dir: &Path, target: &Path) -> String {
    let b: Vec<Component<'_>> = base_dir.components().collect();
    let t: Vec<Component<'_>> = target.components().collect();
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    if common == b.len() {
        parts.push(".".into());
    }
    parts.extend((common..b.len()).map(|_| "..".to_string()));
    parts.extend(
        t[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("\\")
}

/// Encode `s` as UTF-16LE (locator payloads of `W2ku` / `W2ru`).
pub fn encode_utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_windows_path(Path::new("/a/b"), Path::new("/a/b/p.vhd")),
            ".\\p.vhd"
        );
        assert_eq!(
            relative_windows_path(Path::new("/a/b"), Path::new("/a/c/p.vhd")),
            "..\\c\\p.vhd"
        );
    }

    #[test]
    fn urls_and_utf16() {
        assert_eq!(
            file_url(b"file://localhost/Users/x/my%20disk.vhd\0").as_deref(),
            Some("/Users/x/my disk.vhd")
        );
        assert_eq!(file_url(b"file:///a%2").as_deref(), Some("/a%2"));
        assert_eq!(file_url(b"http://x"), None);
        assert_eq!(utf16le(&encode_utf16le(".\\p.vhd")), ".\\p.vhd");
    }
}
