//! Worker processes: spawning, recognising them after an agent restart, and reading how
//! they ended.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use proto::v1::VmState;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use super::config::{Bus, DiskRef};
use super::{SERIAL_LOG, SOCKET, STATUS, VmConfig, WORKER_LOG, scrub};
use crate::host::BootFiles;

/// `run.json`: which process is the VM's worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub pid: i32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): tells a worker from
    /// an unrelated process that got the same pid later.
    pub start_time: u64,
}

impl RunRecord {
    pub fn of(pid: i32) -> std::io::Result<Self> {
        Ok(RunRecord {
            pid,
            start_time: start_time(pid)?,
        })
    }
}

/// `status.json`, written by the worker as it exits.
#[derive(Debug, Clone, Deserialize)]
pub struct ExitRecord {
    pub code: i32,
    #[serde(default)]
    pub reason: String,
}

/// From /proc/PID/stat: whether the process is a zombie, and its start time in clock
/// ticks since boot (field 22). The command name may contain spaces and parentheses, so
/// fields are counted after the last ')'.
fn proc_stat(pid: i32) -> std::io::Result<(bool, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let mut fields = rest.split_whitespace();
    let zombie = fields.next() == Some("Z");
    let start = fields
        .nth(18)
        .and_then(|s| s.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    Ok((zombie, start))
}

fn start_time(pid: i32) -> std::io::Result<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// Whether the recorded worker is still the same live process.
pub fn is_same_process(run: &RunRecord) -> bool {
    run.pid > 0
        && proc_stat(run.pid).is_ok_and(|(zombie, start)| !zombie && start == run.start_time)
}

/// Wait until a process that is not our child ends.
pub async fn wait_pid(pid: i32) {
    let Some(p) = rustix::process::Pid::from_raw(pid) else {
        return;
    };
    match rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) {
        // A pidfd becomes readable when the process ends; wait on a blocking thread.
        Ok(fd) => {
            let waited = tokio::task::spawn_blocking(move || {
                use rustix::event::{PollFd, PollFlags, poll};
                let mut fds = [PollFd::new(&fd, PollFlags::IN)];
                loop {
                    match poll(&mut fds, None) {
                        Err(rustix::io::Errno::INTR) => continue,
                        other => return other.is_ok(),
                    }
                }
            })
            .await
            .unwrap_or(false);
            if !waited {
                poll_pid(pid).await;
            }
        }
        Err(_) => poll_pid(pid).await,
    }
}

async fn poll_pid(pid: i32) {
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// The worker's `--disk` options after the path for `d`: SCSI disks carry their place,
/// their library id (the guest-visible serial number and WWN derive from it) and, when
/// writable, discard (the guest's TRIM frees space in the image).
pub fn disk_options(d: &DiskRef) -> String {
    let mut o = String::new();
    if d.read_only {
        o.push_str(",ro");
    }
    if d.bus == Bus::Scsi {
        o.push_str(&format!(
            ",bus=scsi,controller={},lun={},id={}",
            d.controller,
            d.lun.unwrap_or(0),
            d.disk_id
        ));
        if !d.read_only {
            o.push_str(",discard");
        }
    }
    o
}

/// SIGKILL a worker.
pub fn kill(pid: i32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

/// Start the worker for `config` in `dir`. It runs in its own process group, so a Ctrl-C
/// aimed at the agent does not reach it, and it outlives the agent.
pub fn spawn(
    worker_bin: &Path,
    dir: &Path,
    config: &VmConfig,
    boot: Option<&BootFiles>,
    disks: &[(PathBuf, DiskRef)],
    nics: Vec<(std::os::fd::OwnedFd, String)>,
) -> std::io::Result<Child> {
    let _ = std::fs::remove_file(dir.join(STATUS));
    let _ = std::fs::remove_file(dir.join(SOCKET));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(WORKER_LOG))?;
    let mut cmd = Command::new(worker_bin);
    match boot {
        // The first disk's own kernel, read by the worker's confined reader; the VM's
        // command line is added to the entry's.
        None => {
            cmd.arg("--boot-disk");
            if !config.boot_entry.is_empty() {
                cmd.arg("--boot-entry").arg(&config.boot_entry);
            }
            if !config.cmdline.is_empty() {
                cmd.arg("--cmdline").arg(&config.cmdline);
            }
        }
        Some(boot) => {
            cmd.arg("--kernel").arg(&boot.kernel);
            if let Some(i) = &boot.initrd {
                cmd.arg("--initrd").arg(i);
            }
            let cmdline = if config.cmdline.is_empty() {
                &boot.cmdline
            } else {
                &config.cmdline
            };
            cmd.arg("--cmdline").arg(cmdline);
        }
    }
    cmd.arg("--memory")
        .arg(format!("{}M", config.memory_bytes >> 20))
        .arg("--cpus")
        .arg(config.cpus.to_string())
        .arg("--framebuffer")
        .arg(format!(
            "{}x{}",
            config.display_width, config.display_height
        ));
    for (path, d) in disks {
        let mut spec = path.as_os_str().to_owned();
        spec.push(disk_options(d));
        cmd.arg("--disk").arg(spec);
    }
    // Each adapter's TAP becomes descriptor 3, 4, … of the worker (and only of it).
    let mut mappings = Vec::new();
    for (i, (fd, mac)) in nics.into_iter().enumerate() {
        let child_fd = 3 + i as i32;
        cmd.arg("--nic").arg(format!("fd={child_fd},mac={mac}"));
        mappings.push(command_fds::FdMapping {
            parent_fd: fd,
            child_fd,
        });
    }
    if !mappings.is_empty() {
        use command_fds::CommandFdExt;
        cmd.fd_mappings(mappings)
            .map_err(|e| std::io::Error::other(format!("cannot pass the network adapters: {e}")))?;
    }
    cmd.arg("--serial")
        .arg("none")
        .arg("--serial-log")
        .arg(dir.join(SERIAL_LOG))
        .arg("--control")
        .arg(dir.join(SOCKET))
        .arg("--status-file")
        .arg(dir.join(STATUS))
        .arg("--on-reboot")
        .arg("reset")
        // Hyper-V enlightenments and VMBus (synthetic video, keyboard, mouse): KVM's
        // in-kernel emulation where the host has it, else the worker's own.
        .arg("--hyperv")
        .arg("auto")
        .arg("--log")
        .arg("info")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn()
}

/// The VM state and reason for a worker's end.
pub fn outcome(
    record: Option<&ExitRecord>,
    status: Option<ExitStatus>,
    stopping: bool,
    root: &Path,
) -> (VmState, String) {
    if let Some(r) = record {
        let reason = scrub(&r.reason, root);
        return match r.code {
            0 if stopping => (VmState::Off, "stopped by the host".into()),
            0 => (
                VmState::Off,
                if reason.is_empty() {
                    "guest powered off".into()
                } else {
                    reason
                },
            ),
            4 => (VmState::Off, "guest rebooted".into()),
            // The worker's reasons read "guest crashed: …" and "error: …".
            3 if reason.starts_with("guest crashed") => (VmState::Crashed, reason),
            3 => (VmState::Crashed, format!("guest crashed: {reason}")),
            _ => (
                VmState::Crashed,
                format!(
                    "worker failed: {}",
                    reason.strip_prefix("error: ").unwrap_or(&reason)
                ),
            ),
        };
    }
    match status {
        Some(s) if s.signal().is_some() && stopping => {
            (VmState::Off, "stopped by the host (worker killed)".into())
        }
        Some(s) if s.signal().is_some() => (
            VmState::Crashed,
            format!("worker killed by signal {}", s.signal().unwrap_or_default()),
        ),
        Some(s) => (
            VmState::Crashed,
            format!(
                "worker exited with status {} and no exit record",
                s.code().unwrap_or(-1)
            ),
        ),
        None => (
            VmState::Crashed,
            "worker ended while the agent was away, without an exit record".into(),
        ),
    }
}

/// The last `lines` lines of the worker's log, for the crash report.
pub fn log_tail(path: &Path, lines: usize, root: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(16 << 10);
    let text = String::from_utf8_lossy(&text[start..]);
    let v: Vec<&str> = text.lines().collect();
    scrub(&v[v.len().saturating_sub(lines)..].join("\n"), root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_told_apart() {
        let root = Path::new("/state");
        let rec = |code, reason: &str| ExitRecord {
            code,
            reason: reason.into(),
        };
        assert_eq!(
            outcome(Some(&rec(0, "")), None, false, root).0,
            VmState::Off
        );
        assert_eq!(
            outcome(Some(&rec(0, "")), None, true, root).1,
            "stopped by the host"
        );
        let (s, r) = outcome(
            Some(&rec(3, "guest crashed: triple fault on vCPU 0")),
            None,
            false,
            root,
        );
        assert_eq!(s, VmState::Crashed);
        assert_eq!(r, "guest crashed: triple fault on vCPU 0");
        let (_, r) = outcome(
            Some(&rec(1, "error: cannot open disk /state/disks/x/image.vhdx")),
            None,
            false,
            root,
        );
        assert!(!r.contains("/state/"), "{r}");
        assert!(r.starts_with("worker failed: cannot open disk"), "{r}");
        let killed = ExitStatus::from_raw(9);
        let (s, r) = outcome(None, Some(killed), false, root);
        assert_eq!(s, VmState::Crashed);
        assert_eq!(r, "worker killed by signal 9");
        assert_eq!(outcome(None, None, false, root).0, VmState::Crashed);
    }

    #[test]
    fn our_own_process_is_recognised_and_a_dead_pid_is_not() {
        let me = RunRecord::of(std::process::id() as i32).unwrap();
        assert!(is_same_process(&me));
        let wrong_time = RunRecord {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(!is_same_process(&wrong_time));
        assert!(!is_same_process(&RunRecord {
            pid: 0,
            start_time: 0
        }));
    }
}
