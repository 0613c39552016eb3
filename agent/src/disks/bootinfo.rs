//! What a disk would boot: the agent asks the worker's confined boot-disk reader
//! (`parvis-worker boot-disk-read --inspect`, the disk on its stdin; see the worker's
//! `bootread`) and keeps the answer in `disks/<id>/boot.pb` (a `parvis.v1.DiskBootInfo`).
//!
//! The file is a cache of what the disk says, not a record of anything: a missing or
//! unreadable one is made again by reading the disk. A disk is read when it enters the
//! library (upload, create, convert), when the agent starts and finds it unread, and when a
//! VM that writes it stops (the guest may have installed or removed a kernel).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use proto::v1::DiskBootInfo;

/// The cache file in a disk's directory.
pub const BOOT_PB: &str = "boot.pb";
/// How long the reader may take before it is killed.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The largest answer accepted.
const MAX_ANSWER: u32 = 1 << 20;

/// Read the image at `image` with the reader in `worker_bin`. Err carries one sentence for
/// the log; the disk's description (bootable or not, and why) is the Ok value.
pub fn read(worker_bin: &Path, image: &Path) -> Result<DiskBootInfo, String> {
    let disk = std::fs::File::open(image).map_err(|e| format!("cannot open the image: {e}"))?;
    let mut child = Command::new(worker_bin)
        .args(["boot-disk-read", "--inspect"])
        .stdin(disk)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .spawn()
        .map_err(|e| format!("cannot start the boot disk reader: {e}"))?;
    let mut out = child.stdout.take().ok_or("the reader has no stdout")?;
    let mut err = child.stderr.take().ok_or("the reader has no stderr")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = (&mut err).take(16 << 10).read_to_string(&mut s);
        s
    });
    // The answer is read on its own thread so the deadline holds while the reader is silent.
    let out_thread = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        let mut n4 = [0u8; 4];
        out.read_exact(&mut n4)
            .map_err(|_| "the boot disk reader gave no answer".to_string())?;
        let n = u32::from_le_bytes(n4);
        if n > MAX_ANSWER {
            return Err(format!(
                "the boot disk reader's answer is {n} bytes, too long"
            ));
        }
        let mut m = vec![0u8; n as usize];
        out.read_exact(&mut m)
            .map_err(|_| "the boot disk reader's answer was cut short".to_string())?;
        Ok(m)
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "reading the disk took longer than {} s and was stopped",
                    TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("the boot disk reader vanished: {e}")),
        }
    };
    let said = err_thread.join().unwrap_or_default();
    let said = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        if status.signal() == Some(libc_sigsys()) {
            return Err("the boot disk reader broke its sandbox and was stopped".into());
        }
        return Err(format!("the boot disk reader failed ({status}): {said}"));
    }
    let bytes = out_thread
        .join()
        .map_err(|_| "the boot disk reader's answer could not be read".to_string())??;
    let mut info = DiskBootInfo::decode(bytes.as_slice())
        .map_err(|e| format!("the boot disk reader's answer is malformed: {e}"))?;
    info.inspected = true;
    info.inspected_ms = crate::store::now_ms();
    Ok(info)
}

fn libc_sigsys() -> i32 {
    rustix::process::Signal::SYS.as_raw()
}

/// The description kept for the disk in `dir`, if there is a readable one.
pub fn load(dir: &Path) -> Option<DiskBootInfo> {
    let b = std::fs::read(dir.join(BOOT_PB)).ok()?;
    DiskBootInfo::decode(b.as_slice())
        .ok()
        .filter(|i| i.inspected)
}

/// Keep `info` for the disk in `dir`.
pub fn save(dir: &Path, info: &DiskBootInfo) -> std::io::Result<()> {
    crate::store::write_atomic(&dir.join(BOOT_PB), &info.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A stand-in for the worker's reader: a script that checks its arguments and that the
    /// disk is its stdin, then prints `answer`.
    fn fake_reader(dir: &Path, answer: &[u8], exit: i32) -> std::path::PathBuf {
        std::fs::write(dir.join("answer"), answer).unwrap();
        let script = dir.join("reader");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1 $2\" = \"boot-disk-read --inspect\" ] || exit 9\n\
                 [ \"$(head -c 4)\" = DISK ] || exit 8\ncat '{}'\necho 'said on stderr' >&2\nexit {exit}\n",
                dir.join("answer").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn framed(m: &DiskBootInfo) -> Vec<u8> {
        let b = m.encode_to_vec();
        let mut out = (b.len() as u32).to_le_bytes().to_vec();
        out.extend(b);
        out
    }

    #[test]
    fn the_readers_answer_is_kept_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        std::fs::write(&image, b"DISK and more").unwrap();
        let said = DiskBootInfo {
            bootable: true,
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            entries: vec![proto::v1::BootEntry {
                title: "Debian GNU/Linux".into(),
                version: "6.1.0-57-amd64".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let reader = fake_reader(dir.path(), &framed(&said), 0);
        let got = read(&reader, &image).unwrap();
        assert!(got.inspected && got.inspected_ms > 0);
        assert_eq!((got.os.as_str(), got.entries.len()), (said.os.as_str(), 1));
        save(dir.path(), &got).unwrap();
        assert_eq!(load(dir.path()), Some(got));
        // A file that is not a description, or one never inspected, is no description.
        std::fs::write(dir.path().join(BOOT_PB), b"\xff\xff\xff").unwrap();
        assert_eq!(load(dir.path()), None);
        save(dir.path(), &DiskBootInfo::default()).unwrap();
        assert_eq!(load(dir.path()), None);
    }

    #[test]
    fn a_reader_that_fails_or_lies_is_an_error_not_a_description() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        std::fs::write(&image, b"DISK").unwrap();
        let cases: [(Vec<u8>, i32, &str); 4] = [
            (
                Vec::new(),
                3,
                "the boot disk reader failed (exit status: 3): said on stderr",
            ),
            (Vec::new(), 0, "the boot disk reader gave no answer"),
            (u32::MAX.to_le_bytes().to_vec(), 0, "too long"),
            (
                [5u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff].to_vec(),
                0,
                "the boot disk reader's answer is malformed",
            ),
        ];
        for (answer, exit, want) in cases {
            let reader = fake_reader(dir.path(), &answer, exit);
            let e = read(&reader, &image).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let e = read(Path::new("/nonexistent/reader"), &image).unwrap_err();
        assert!(e.starts_with("cannot start the boot disk reader"), "{e}");
    }
}
