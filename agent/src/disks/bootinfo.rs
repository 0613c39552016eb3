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
