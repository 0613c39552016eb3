//! The saved hosts, one file shared by the `parvis` CLI and the desktop console: a host added
//! with `parvis host add` appears in the console and the other way round.
//!
//! Where it lives: `$PARVIS_CONFIG` if set; else `hosts.json` in a `parvis` folder of the
//! user's config directory: `$XDG_CONFIG_HOME` or `~/.config` on Linux, `%APPDATA%` on
//! Windows, `~/Library/Application Support` on macOS. It holds tokens, so it is written
//! atomically and readable by its owner only (where the system has such permissions).
//!
//! The console used to keep its hosts in `console.json` beside it (and
//! `$PARVIS_CONSOLE_CONFIG`); that file is read while `hosts.json` does not exist yet.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::client::Target;

/// File name in the config folder.
pub const FILE_NAME: &str = "hosts.json";
/// The console's file before the two were one.
const OLD_CONSOLE_FILE: &str = "console.json";

/// Why the file could not be read or written.
#[derive(Debug, Error)]
pub enum HostsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid hosts file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this system has no user config folder; set PARVIS_CONFIG to the hosts file's path")]
    NoConfigDir,
}

/// One saved agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHost {
    /// What the user calls it (`--host NAME`).
    pub name: String,
    /// `HOST:PORT`.
    pub addr: String,
    /// The bearer token the agent printed.
    pub token: String,
    /// The pinned TLS certificate fingerprint; `None` = plain HTTP/2 (loopback only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl SavedHost {
    /// How `client::connect` reaches it.
    pub fn target(&self) -> Target {
        Target {
            addr: self.addr.clone(),
            fingerprint: self.fingerprint.clone(),
            token: self.token.clone(),
        }
    }
}

/// The whole file. The first host is the CLI's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsFile {
    #[serde(default)]
    pub hosts: Vec<SavedHost>,
}

/// Where the file is (see the module doc).
pub fn default_path() -> Result<PathBuf, HostsError> {
    for var in ["PARVIS_CONFIG", "PARVIS_CONSOLE_CONFIG"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
    }
    dirs::config_dir()
        .map(|d| d.join("parvis").join(FILE_NAME))
        .ok_or(HostsError::NoConfigDir)
}

impl HostsFile {
    /// Read `path`; a missing file is an empty list (or, beside a default-named file, the
    /// console's old `console.json`).
    pub fn load(path: &Path) -> Result<HostsFile, HostsError> {
        let read = |p: &Path| match std::fs::read(p) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| HostsError::Parse {
                        path: p.to_path_buf(),
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HostsError::Read {
                path: p.to_path_buf(),
                source,
            }),
        };
        if let Some(f) = read(path)? {
            return Ok(f);
        }
        if path.file_name().is_some_and(|n| n == FILE_NAME)
            && let Some(old) = path.parent().map(|d| d.join(OLD_CONSOLE_FILE))
            && let Some(f) = read(&old)?
        {
            return Ok(f);
        }
        Ok(HostsFile::default())
    }

    /// Write `path` atomically (temporary file, sync, rename), readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), HostsError> {
        let err = |source| HostsError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        create_private_dir(dir).map_err(err)?;
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        text.push(b'\n');
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let written = (|| {
            let mut f = open_private(&tmp)?;
            std::io::Write::write_all(&mut f, &text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        Ok(())
    }

    /// The host called `name`.
    pub fn find(&self, name: &str) -> Option<&SavedHost> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> SavedHost {
        SavedHost {
            name: "lab".into(),
            addr: "10.0.0.2:7443".into(),
            token: "pvs_x".into(),
            fingerprint: Some("AA:BB".into()),
        }
    }

    #[test]
    fn round_trips_privately_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/hosts.json");
        assert_eq!(HostsFile::load(&p).unwrap(), HostsFile::default());
        let f = HostsFile { hosts: vec![lab()] };
        f.save(&p).unwrap();
        assert_eq!(HostsFile::load(&p).unwrap(), f);
        assert_eq!(f.find("lab"), Some(&lab()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&p, b"{nope").unwrap();
        assert!(matches!(HostsFile::load(&p), Err(HostsError::Parse { .. })));
    }

    #[test]
    fn the_consoles_old_file_is_read_until_the_shared_one_exists() {
        let dir = tempfile::tempdir().unwrap();
        let old = HostsFile { hosts: vec![lab()] };
        std::fs::write(
            dir.path().join(OLD_CONSOLE_FILE),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        let p = dir.path().join(FILE_NAME);
        assert_eq!(HostsFile::load(&p).unwrap(), old);
        HostsFile::default().save(&p).unwrap();
        assert_eq!(HostsFile::load(&p).unwrap(), HostsFile::default());
    }
}
