//! A scenario that keeps running while the test talks to it: the test host boots, the
//! script starts services (the agent), and the test connects over a forwarded TCP port,
//! asks the script to run commands inside the test host, and finally lets it finish.
//!
//! The script gets `$AGENT_LISTEN` (the address a server in the test host should listen
//! on) and must end by calling `serve_commands`, which runs each `cmd-N.sh` the test drops
//! into the share until the test creates `done`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::build::artifacts;
use crate::testhost::{HEADER, Mode, Outcome, collect, copy_bins, l1_command, tail};

type Collected = Result<(Vec<(Duration, String)>, Option<i32>)>;

/// Port servers listen on inside the test host.
pub const GUEST_PORT: u16 = 7443;

const SERVE: &str = r#"
# serve_commands: run cmd-N.sh files from the test, in order, until it creates `done`.
serve_commands() {
    n=1
    while [ ! -e done ]; do
        if [ -e "cmd-$n.sh" ]; then
            sh "cmd-$n.sh" >"cmd-$n.out" 2>&1
            echo $? >"cmd-$n.rc.tmp" && mv "cmd-$n.rc.tmp" "cmd-$n.rc"
            n=$((n + 1))
        else
            sleep 0.1
        fi
    done
}
"#;

/// A running scenario.
pub struct Live {
    /// Always Some until `finish`.
    share: Option<tempfile::TempDir>,
    /// Where the test connects: `127.0.0.1:PORT`.
    pub addr: String,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    thread: Option<JoinHandle<Collected>>,
    next_cmd: u32,
    mode: Mode,
    name: String,
    /// QEMU's (or the direct script's) process id, for [`Drop`].
    pid: u32,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("addr", &self.addr).finish()
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Live {
    /// Boot the test host (or use this machine directly) and start `script`.
    pub fn start(name: &str, script: &str, timeout: Duration, memory_mib: u32) -> Result<Live> {
        let art = artifacts()?;
        let mode = Mode::detect();
        let share = crate::testhost::new_share(&std::env::temp_dir(), &format!("parvis-{name}-"))?;
        let port = free_port()?;
        let body = format!("{HEADER}\n{SERVE}\n{script}\n");
        let child = match mode {
            Mode::Emulated => {
                let bin = share.path().join("bin");
                std::fs::create_dir_all(&bin)?;
                copy_bins(art, &bin)?;
                std::fs::write(
                    share.path().join("scenario.sh"),
                    format!(
                        "export BIN=/host/bin IMAGES=/images SHARE=/host \
                         AGENT_LISTEN=0.0.0.0:{GUEST_PORT} AGENT_TLS=\n{body}"
                    ),
                )?;
                let mut cmd = l1_command(
                    art,
                    share.path(),
                    memory_mib,
                    &["-serial", "stdio"],
                    Some((port, GUEST_PORT)),
                );
                cmd.stdin(Stdio::null()).stdout(Stdio::piped());
                cmd.spawn()
                    .context("cannot start qemu-system-x86_64 (run tests/setup-host.sh)")?
            }
            Mode::Direct => {
                std::fs::write(share.path().join("scenario.sh"), &body)?;
                std::process::Command::new("sh")
                    .arg("-c")
                    .arg("exec 2>&1; . ./scenario.sh; echo PARVIS-L1-SCENARIO-EXIT=$?")
                    .current_dir(share.path())
                    .env("BIN", &art.bin)
                    .env("IMAGES", &art.images)
                    .env("SHARE", share.path())
                    .env("AGENT_LISTEN", format!("127.0.0.1:{port}"))
                    .env("AGENT_TLS", "--tls")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("cannot start sh")?
            }
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let n = name.to_string();
        let pid = child.id();
        let thread = std::thread::spawn(move || collect_into(child, timeout, &n, sink));
        Ok(Live {
            share: Some(share),
            addr: format!("127.0.0.1:{port}"),
            lines,
            thread: Some(thread),
            next_cmd: 1,
            mode,
            name: name.into(),
            pid,
        })
    }

    /// The shared folder (the scenario's working directory).
    pub fn share(&self) -> &Path {
        self.share.as_ref().expect("running scenario").path()
    }

    /// A path in the share.
    pub fn path(&self, name: &str) -> PathBuf {
        self.share().join(name)
    }

    /// The console output so far.
    pub fn log(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Wait until a file the scenario writes contains `pattern`.
    pub fn wait_file(&self, name: &str, pattern: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(self.path(name)).unwrap_or_default();
            if text.contains(pattern) {
                return Ok(text);
            }
            if self.ended() {
                bail!(
                    "the scenario ended before {name} contained '{pattern}'; {name}:\n{}\nconsole:\n{}",
                    tail(&text, 30),
                    tail(&self.log(), 40)
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "{name} did not contain '{pattern}' within {} s; {name}:\n{}\nconsole:\n{}",
                    timeout.as_secs(),
                    tail(&text, 30),
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run a shell command inside the test host (from the share) and return its status
    /// and output.
    pub fn exec(&mut self, script: &str, timeout: Duration) -> Result<(i32, String)> {
        let n = self.next_cmd;
        self.next_cmd += 1;
        let tmp = self.path(&format!(".cmd-{n}.sh"));
        std::fs::write(
            &tmp,
            format!("set -u\nexport PATH=\"$BIN:$PATH\"\n{script}\n"),
        )?;
        std::fs::rename(&tmp, self.path(&format!("cmd-{n}.sh")))?;
        let started = Instant::now();
        let rc = loop {
            let t = std::fs::read_to_string(self.path(&format!("cmd-{n}.rc"))).unwrap_or_default();
            if !t.trim().is_empty() {
                break t;
            }
            if self.ended() || started.elapsed() > timeout {
                bail!(
                    "command {n} did not finish: {script}\nconsole:\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let out = std::fs::read_to_string(self.path(&format!("cmd-{n}.out"))).unwrap_or_default();
        Ok((rc.trim().parse().unwrap_or(-1), out))
    }

    /// Let the scenario finish and collect everything.
    pub fn finish(mut self) -> Result<Outcome> {
        std::fs::write(self.path("done"), b"")?;
        let thread = self.thread.take().context("already finished")?;
        let (lines, status) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("the console reader panicked"))??;
        let log = crate::testhost::join(&lines);
        let status = match crate::markers::marker(&log, "PARVIS-L1-SCENARIO-EXIT") {
            Some(s) => s.trim().parse().unwrap_or(-1),
            None if self.mode == Mode::Direct => status.unwrap_or(-1),
            None => bail!(
                "the test host did not finish scenario {}:\n{}",
                self.name,
                tail(&log, 60)
            ),
        };
        Ok(Outcome {
            lines,
            status,
            share: self.share.take().context("already finished")?,
            mode: self.mode,
        })
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // A failing test must not leave the test host running after the test process
        // ends: `done` ends the script (and the test host with it); if it is still running
        // after a grace period, it is killed. The collector has not reaped it until its
        // thread finishes, so the id is still ours.
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Some(s) = &self.share {
            let _ = std::fs::write(s.path().join("done"), b"");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !thread.is_finished()
            && let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let _ = thread.join();
    }
}

fn collect_into(
    child: std::process::Child,
    timeout: Duration,
    name: &str,
    sink: Arc<Mutex<Vec<(Duration, String)>>>,
) -> Collected {
    collect(child, timeout, None, name, Some(sink))
}
