//! On-disk state: atomic file writes, ids, the state directory's layout.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Write `bytes` to `path` so that a crash at any moment leaves either the old or the new
/// content: a temporary file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// fsync a directory so that entries created or renamed in it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Serialize `value` as pretty JSON and write it atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Read a JSON file written by [`write_json`].
pub fn read_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<T> {
    let bytes = fs::read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A new random id: 12 lower-case hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("the OS random number generator is available");
    hex::encode(b)
}

/// Whether `s` looks like an id this agent made (so it is safe as a path component).
pub fn is_id(s: &str) -> bool {
    s.len() == 12
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The state directory's layout.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: PathBuf) -> Self {
        Layout { root }
    }
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }
    pub fn vm(&self, id: &str) -> PathBuf {
        self.vms().join(id)
    }
    pub fn disks(&self) -> PathBuf {
        self.root.join("disks")
    }
    pub fn uploads(&self) -> PathBuf {
        self.root.join("uploads")
    }
    pub fn boot(&self) -> PathBuf {
        self.root.join("boot")
    }
    pub fn secrets(&self) -> PathBuf {
        self.root.join("secrets")
    }
    /// Create every directory; secrets only readable by the agent's user.
    pub fn create(&self) -> std::io::Result<()> {
        for d in [
            self.root.clone(),
            self.vms(),
            self.disks(),
            self.uploads(),
            self.boot(),
        ] {
            fs::create_dir_all(&d)?;
        }
        fs::create_dir_all(self.secrets())?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(self.secrets(), fs::Permissions::from_mode(0o700))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vm.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn ids_are_safe_path_components() {
        let id = new_id();
        assert!(is_id(&id), "{id}");
        for bad in ["", "../etc", "ABCDEF012345", "abc", "0123456789ab/"] {
            assert!(!is_id(bad), "{bad}");
        }
    }
}
