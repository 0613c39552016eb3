//! `--status-file`: how the worker ended, for an agent that did not spawn it (and so cannot
//! wait for its exit status). Written atomically: a temporary file in the same directory,
//! fsync, rename, so a reader sees either no file or a whole one.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Remove a status file left by an earlier run, so it cannot be mistaken for this run's.
pub fn clear(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The file's contents: `{"code": N, "reason": "..."}`, the reason on one line.
pub fn render(code: i32, reason: &str) -> String {
    let reason: String = reason
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let mut s = serde_json::json!({ "code": code, "reason": reason.trim() }).to_string();
    s.push('\n');
    s
}

/// Write the status file atomically.
pub fn write(path: &Path, code: i32, reason: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the status file path has no file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(render(code, reason).as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every file system allows fsync on a directory.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_whole_and_parsable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        write(&path, 3, "guest crashed: triple fault on vCPU 0").unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["code"], 3);
        assert_eq!(v["reason"], "guest crashed: triple fault on vCPU 0");
        // Overwrites, leaves no temporary file, keeps the reason on one line.
        write(&path, 1, "error: \"quoted\"\nsecond line").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["code"], 1);
        assert_eq!(v["reason"], "error: \"quoted\" second line");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["status.json"]);
        clear(&path).unwrap();
        assert!(!path.exists());
        clear(&path).unwrap();
        assert!(write(&dir.path().join("missing/status.json"), 0, "x").is_err());
    }

    #[test]
    fn render_is_compact_json() {
        assert_eq!(
            render(0, "guest powered off"),
            "{\"code\":0,\"reason\":\"guest powered off\"}\n"
        );
    }
}
