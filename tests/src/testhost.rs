//! Running a scenario in the emulated test host (L1) or directly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::build::artifacts;
use crate::markers::marker;

/// Where guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inside the emulated L1 test host (QEMU TCG with SVM, KVM inside).
    Emulated,
    /// On this machine's KVM (hardware virtualisation, not a paravirtual KVM).
    Direct,
}

impl Mode {
    /// `PARVIS_TEST_HOST=emulated|direct` forces a mode; otherwise guests run directly only
    /// when the CPU has VMX/SVM and `/dev/kvm` is a hardware KVM (not kvm_pvm, which cannot
    /// run an unmodified guest).
    pub fn detect() -> Mode {
        match std::env::var("PARVIS_TEST_HOST").as_deref() {
            Ok("emulated") => return Mode::Emulated,
            Ok("direct") => return Mode::Direct,
            _ => {}
        }
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpu
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        if hw && !pvm && Path::new("/dev/kvm").exists() {
            Mode::Direct
        } else {
            Mode::Emulated
        }
    }
}

/// A scenario to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    name: String,
    script: String,
    timeout: Duration,
    l1_memory_mib: u32,
    extra_share: Vec<(PathBuf, String)>,
}

/// What a scenario left behind.
#[derive(Debug)]
pub struct Outcome {
    /// Every console line (L1's serial console, or the script's output when direct), with the
    /// time it arrived relative to the launch.
    pub lines: Vec<(Duration, String)>,
    /// The scenario script's exit status.
    pub status: i32,
    /// The shared folder, with whatever the scenario wrote.
    pub share: tempfile::TempDir,
    /// How the scenario ran.
    pub mode: Mode,
}

impl Outcome {
    /// The console output as one string.
    pub fn log(&self) -> String {
        let mut s = String::new();
        for (_, l) in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// Read a file the scenario wrote into the share.
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.share.path().join(name)).unwrap_or_default()
    }

    /// A path in the share.
    pub fn path(&self, name: &str) -> PathBuf {
        self.share.path().join(name)
    }

    /// What the script's `run NAME ...` left: the worker's stdout, its stderr and its exit
    /// status (their tails are printed for the test log). Panics with the console's tail when
    /// the run left no status (it never ran or the test host died).
    pub fn worker_run(&self, name: &str) -> (String, String, i32) {
        let out = self.file(&format!("{name}.out"));
        let err = self.file(&format!("{name}.err"));
        let rc = self
            .file(&format!("{name}.rc"))
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("run {name} left no status:\n{}", tail(&self.log(), 60)));
        eprintln!(
            "--- {name}: rc={rc}\n{}\n{}",
            tail(&err, 20),
            tail(&out, 40)
        );
        (out, err, rc)
    }
}

pub(crate) const HEADER: &str = r#"set -u
export PATH="$BIN:$PATH"
cd "$SHARE"
# run NAME ARGS...: run a worker with a watchdog; serial output to NAME.out, stderr to
# NAME.err, exit status to NAME.rc.
run() {
    name=$1; shift
    echo "SCENARIO: $name starts at $(cut -d' ' -f1 /proc/uptime) s"
    timeout -k 10 "${WORKER_TIMEOUT:-240}" parvis-worker "$@" </dev/null >"$name.out" 2>"$name.err"
    echo $? >"$name.rc"
    echo "SCENARIO: $name exited $(cat "$name.rc")"
}
# wait_for PATTERN FILE [SECONDS]
wait_for() {
    n=0
    limit=$(( ${3:-120} * 5 ))
    while ! grep -q "$1" "$2" 2>/dev/null; do
        n=$((n + 1))
        [ "$n" -gt "$limit" ] && { echo "SCENARIO: timed out waiting for $1 in $2"; return 1; }
        sleep 0.2
    done
}
"#;

impl Scenario {
    /// A scenario named `name` running `script` (see the module docs for the environment).
    pub fn new(name: &str, script: &str) -> Self {
        Self {
            name: name.into(),
            script: script.into(),
            timeout: Duration::from_secs(900),
            l1_memory_mib: 2048,
            extra_share: Vec::new(),
        }
    }

    /// The test host's memory (default 2 GiB).
    pub fn l1_memory(mut self, mib: u32) -> Self {
        self.l1_memory_mib = mib;
        self
    }

    /// Hard limit for the whole scenario (the test host is killed after it).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Copy a host file into the share under `name` before the run.
    pub fn share_file(mut self, src: PathBuf, name: &str) -> Self {
        self.extra_share.push((src, name.into()));
        self
    }

    /// Run the scenario. `prepare` may write input files into the share first.
    ///
    /// In the test host, a run whose console falls silent for [`STALL`] (the host prints
    /// a line every two minutes while it runs) is an emulator stall, not a test result: it
    /// is reported on stderr and the scenario runs once more from a fresh share.
    pub fn run(self, prepare: impl Fn(&Path) -> Result<()>) -> Result<Outcome> {
        let art = artifacts()?;
        let mode = Mode::detect();
        let mut attempt = 1;
        loop {
            let share = new_share(&std::env::temp_dir(), &format!("parvis-{}-", self.name))?;
            prepare(share.path())?;
            for (src, name) in &self.extra_share {
                std::fs::copy(src, share.path().join(name))
                    .with_context(|| format!("cannot copy {} into the share", src.display()))?;
            }
            let script = format!("{HEADER}\n{}\n", self.script);
            std::fs::write(share.path().join("scenario.sh"), script)?;
            let r = match mode {
                Mode::Emulated => self.clone().run_emulated(art, share),
                Mode::Direct => self.clone().run_direct(art, share),
            };
            match r {
                Err(e) if attempt == 1 && e.downcast_ref::<Stalled>().is_some() => {
                    eprintln!(
                        "PARVIS TEST HOST STALLED in scenario {} (attempt {attempt}); running it \
                         once more:\n{e:#}",
                        self.name
                    );
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn run_emulated(self, art: &crate::Artifacts, share: tempfile::TempDir) -> Result<Outcome> {
        let bin = share.path().join("bin");
        std::fs::create_dir_all(&bin)?;
        copy_bins(art, &bin)?;
        // A line every two minutes shows, in a stalled run's log, whether the test host
        // itself still runs.
        let header = "export BIN=/host/bin IMAGES=/images SHARE=/host\n\
                      ( while sleep 120; do echo \"PARVIS-L1-ALIVE $(cut -d' ' -f1 /proc/uptime)\"; done ) &\n";
        let path = share.path().join("scenario.sh");
        let body = std::fs::read_to_string(&path)?;
        std::fs::write(&path, format!("{header}{body}"))?;
        let mut cmd = l1_command(
            art,
            share.path(),
            self.l1_memory_mib,
            &["-serial", "stdio"],
            None,
        );
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let child = cmd
            .spawn()
            .context("cannot start qemu-system-x86_64 (install Debian's qemu-system-x86)")?;
        let (lines, _) = collect(child, self.timeout, Some(STALL), &self.name, None)
            .map_err(|e| e.context(qemu_stderr(share.path())))?;
        let log = join(&lines);
        if marker(&log, "PARVIS-L1-KVM") != Some("ok") {
            bail!("the test host has no usable /dev/kvm:\n{}", tail(&log, 40));
        }
        let Some(status) = marker(&log, "PARVIS-L1-SCENARIO-EXIT") else {
            bail!(
                "the test host did not finish scenario {}:\n{}\n{}",
                self.name,
                tail(&log, 60),
                qemu_stderr(share.path())
            );
        };
        Ok(Outcome {
            status: status.trim().parse().unwrap_or(-1),
            lines,
            share,
            mode: Mode::Emulated,
        })
    }

    fn run_direct(self, art: &crate::Artifacts, share: tempfile::TempDir) -> Result<Outcome> {
        let child = Command::new("sh")
            .arg("-c")
            .arg("exec 2>&1; . ./scenario.sh")
            .current_dir(share.path())
            .env("BIN", &art.bin)
            .env("IMAGES", &art.images)
            .env("SHARE", share.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start sh")?;
        let (lines, status) = collect(child, self.timeout, None, &self.name, None)?;
        Ok(Outcome {
            status: status.unwrap_or(-1),
            lines,
            share,
            mode: Mode::Direct,
        })
    }
}

/// The QEMU command line of the test host (L1): TCG with an SVM-capable EPYC, the L1 kernel
/// and initramfs, `share` as 9p tag `host0`, and the scenario at `/host/scenario.sh`.
/// `serial` chooses how L1's console is connected.
pub(crate) fn l1_command(
    art: &crate::Artifacts,
    share: &Path,
    memory_mib: u32,
    serial: &[&str],
    forward: Option<(u16, u16)>,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // QEMU's own messages go to a file in the share: a pipe nobody reads would stall the
    // whole test host once it filled.
    match std::fs::File::create(share.join(QEMU_STDERR)) {
        Ok(f) => cmd.stderr(f),
        Err(_) => cmd.stderr(Stdio::null()),
    };
    if let Some((host, guest)) = forward {
        // User-mode networking: L1 is 10.0.2.15; only the forwarded port is reachable,
        // from this machine's loopback.
        cmd.args([
            "-netdev",
            &format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{host}-10.0.2.15:{guest}"),
            "-device",
            "virtio-net-pci,netdev=n0",
        ]);
    }
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "EPYC", "-smp", "1"])
        .args(["-m", &format!("{memory_mib}M")])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(serial)
        .arg("-kernel")
        .arg(art.images.join("vmlinux"))
        .arg("-initrd")
        .arg(art.images.join("l1-initramfs.cpio"))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=host0,security_model=none",
            share.display()
        ))
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 quiet parvis.scenario=/host/scenario.sh",
        ]);
    cmd
}

type Lines = Vec<(Duration, String)>;

/// The file in the share that receives the test host's QEMU stderr.
const QEMU_STDERR: &str = "qemu.stderr";

/// The tail of what the test host's QEMU printed on stderr, for an error message.
pub(crate) fn qemu_stderr(share: &Path) -> String {
    let text = std::fs::read_to_string(share.join(QEMU_STDERR)).unwrap_or_default();
    if text.trim().is_empty() {
        "the test host's QEMU printed nothing on stderr".into()
    } else {
        format!(
            "the test host's QEMU printed on stderr:\n{}",
            tail(&text, 20)
        )
    }
}

/// Copy the static programs the test host runs into `dir` (the share's `bin`).
pub(crate) fn copy_bins(art: &crate::Artifacts, dir: &Path) -> Result<()> {
    for name in crate::build::L1_PROGRAMS {
        std::fs::copy(art.bin.join(name), dir.join(name))
            .with_context(|| format!("cannot copy {name} into the share"))?;
    }
    Ok(())
}

/// How long the test host's console may stay silent before the run counts as stalled.
pub(crate) const STALL: Duration = Duration::from_secs(330);

/// The test host printed nothing, not even its two-minute heartbeat, for [`STALL`].
#[derive(Debug)]
pub struct Stalled(Duration, String);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the test host printed nothing for {} s (not even its heartbeat); last output:\n{}",
            self.0.as_secs(),
            self.1
        )
    }
}

impl std::error::Error for Stalled {}

/// Read the child's stdout line by line with arrival times until it exits or `timeout`
/// passes (then it is killed and the run is an error). With `stall`, a console silent for
/// that long also ends the run, as [`Stalled`].
/// `sink`, when given, receives the lines as they arrive (for a scenario still running).
pub(crate) fn collect(
    mut child: Child,
    timeout: Duration,
    stall: Option<Duration>,
    name: &str,
    sink: Option<Arc<Mutex<Lines>>>,
) -> Result<(Lines, Option<i32>)> {
    let start = Instant::now();
    let lines = sink.unwrap_or_default();
    let stdout = child.stdout.take().context("no stdout")?;
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let l = String::from_utf8_lossy(&l)
                    .trim_end_matches('\r')
                    .to_string();
                if std::env::var_os("PARVIS_TEST_ECHO").is_some() {
                    eprintln!("{l}");
                }
                lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((start.elapsed(), l));
            }
        })
    };
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if let Some(stall) = stall {
            let last = {
                let l = lines.lock().unwrap_or_else(|e| e.into_inner());
                l.last().map(|(t, _)| *t).unwrap_or_default()
            };
            if start.elapsed().saturating_sub(last) > stall {
                // The reader is left to finish on its own: a grandchild may still hold
                // the pipe open.
                let _ = child.kill();
                let _ = child.wait();
                let log = join(&lines.lock().unwrap_or_else(|e| e.into_inner()));
                return Err(Stalled(stall, tail(&log, 30)).into());
            }
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            let log = join(&lines.lock().unwrap_or_else(|e| e.into_inner()));
            bail!(
                "scenario {name} did not finish within {} s; last output:\n{}",
                timeout.as_secs(),
                tail(&log, 60)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = reader.join();
    let lines = lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((lines, status.code()))
}

pub(crate) fn join(lines: &[(Duration, String)]) -> String {
    lines
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The last `n` lines of `log`.
pub fn tail(log: &str, n: usize) -> String {
    let v: Vec<&str> = log.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// The file in a shared folder naming the test process that owns it.
const OWNER: &str = ".parvis-owner";

/// A fresh shared folder in `dir`. Suites keep their outcome, and so this folder, in a
/// `static`, which is never dropped: the folder outlives the test process (about 250 MB per
/// suite and run). So each folder records its owner's PID, and folders with this `prefix`
/// whose owner has exited are removed first (unmarked ones, from older runs, once they are
/// ten minutes old).
pub(crate) fn new_share(dir: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    sweep_stale_shares(dir, prefix);
    let share = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(dir)
        .context("cannot create the shared folder")?;
    std::fs::write(share.path().join(OWNER), std::process::id().to_string())
        .context("cannot write the shared folder's owner")?;
    Ok(share)
}

fn sweep_stale_shares(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = e.path();
        let stale = match std::fs::read_to_string(path.join(OWNER)) {
            Ok(pid) => !Path::new("/proc").join(pid.trim()).exists(),
            Err(_) => e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(600)),
        };
        if stale {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Run `script` with the terminal attached (the README demo): in the test host, L1's serial
/// console is this terminal, and the script's stdin is that console. Returns the exit status
/// of QEMU (emulated) or of the script (direct).
pub fn run_interactive(script: &str) -> Result<i32> {
    let art = artifacts()?;
    let share = tempfile::Builder::new()
        .prefix("parvis-demo-")
        .tempdir()
        .context("cannot create the shared folder")?;
    let body = format!("{HEADER}\n{script}\n");
    let status = match Mode::detect() {
        Mode::Emulated => {
            let bin = share.path().join("bin");
            std::fs::create_dir_all(&bin)?;
            copy_bins(art, &bin)?;
            std::fs::write(
                share.path().join("scenario.sh"),
                format!("export BIN=/host/bin IMAGES=/images SHARE=/host\n{body}"),
            )?;
            eprintln!(
                "parvis demo: this machine's KVM cannot run an unmodified guest, so the demo \
                 runs inside the emulated test host (QEMU TCG with nested KVM); it takes a few \
                 seconds to start."
            );
            l1_command(
                art,
                share.path(),
                2048,
                &[
                    "-chardev",
                    "stdio,id=con,signal=off",
                    "-serial",
                    "chardev:con",
                ],
                None,
            )
            .status()
            .context("cannot start qemu-system-x86_64 (run tests/setup-host.sh)")?
        }
        Mode::Direct => {
            std::fs::write(share.path().join("scenario.sh"), body)?;
            Command::new("sh")
                .arg("./scenario.sh")
                .current_dir(share.path())
                .env("BIN", &art.bin)
                .env("IMAGES", &art.images)
                .env("SHARE", share.path())
                .status()
                .context("cannot start sh")?
        }
    };
    Ok(status.code().unwrap_or(-1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console that falls silent is a stall (and the process is killed); one that keeps
    /// talking is not, even when it runs longer than the stall limit.
    #[test]
    fn a_silent_console_is_a_stall() {
        let spawn = |script: &str| {
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let t0 = Instant::now();
        let e = collect(
            spawn("echo first; sleep 30"),
            Duration::from_secs(60),
            Some(Duration::from_millis(800)),
            "silent",
            None,
        )
        .unwrap_err();
        let stalled = e.downcast_ref::<Stalled>().expect("a stall");
        assert!(stalled.1.contains("first"), "{stalled}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        let (lines, status) = collect(
            spawn("for i in 1 2 3 4 5 6; do echo $i; sleep 0.3; done"),
            Duration::from_secs(60),
            Some(Duration::from_millis(800)),
            "talking",
            None,
        )
        .unwrap();
        assert_eq!(status, Some(0));
        assert_eq!(lines.len(), 6);
    }

    /// Shares left by exited processes (and old unmarked ones) go; a live owner's stays.
    #[test]
    fn stale_shares_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let live = new_share(dir.path(), "parvis-t-").unwrap();
        let gone = dir.path().join("parvis-t-gone");
        std::fs::create_dir(&gone).unwrap();
        // PIDs stay below 2^22 on Linux.
        std::fs::write(gone.join(OWNER), "99999999").unwrap();
        let fresh_unmarked = dir.path().join("parvis-t-new");
        std::fs::create_dir(&fresh_unmarked).unwrap();
        let other = dir.path().join("parvis-u-gone");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join(OWNER), "99999999").unwrap();
        let second = new_share(dir.path(), "parvis-t-").unwrap();
        assert!(live.path().exists() && second.path().exists());
        assert!(!gone.exists(), "a dead owner's share stays");
        assert!(
            fresh_unmarked.exists(),
            "an unmarked share may be in the making"
        );
        assert!(other.exists(), "another suite's share was touched");
    }
}
