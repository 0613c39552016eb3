//! `demo`: the desktop console on a live VM.
//!
//! It starts `parvis-agent` with a demo VM ("demo": Debian's kernel and a busybox userland,
//! a shell on its screen and one on its serial console) and opens `parvis-console`
//! connected to it, the host already added and trusted (its token and certificate
//! fingerprint handed over in a hosts file of the demo's own), the VM's console open. Where
//! this machine's KVM cannot run the guest, the agent and the VM run in the test host and
//! the agent's port is forwarded to this machine's loopback. Closing the window ends the
//! demo: the VM, the agent and the test host all stop.
//!
//! `demo --serial` (or no display to open a window on) attaches this terminal to the VM's
//! serial console instead (`poweroff -f` in the guest ends it, Ctrl-] detaches and stops it).
//! `demo --window-screenshot FILE` waits for the guest's shell, saves the window as a PNG
//! (and what it shows as FILE with a `.json` extension) and closes it: the demo's test.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use parvis_tests::live::Live;
use proto::hosts::{HostsFile, SavedHost};

const SERIAL_SCRIPT: &str = r#"
# The state folder holds Unix sockets, which the test host's 9p share cannot.
state="$(mktemp -d)"
echo "parvis demo: starting parvis-agent; on first start it creates the VM 'demo' (1 vCPU, 256 MiB) from the guest images and starts it"
parvis-agent --state-dir "$state" --listen 127.0.0.1:0 --demo "$IMAGES" --log warn \
    >"$SHARE/agent.out" 2>"$SHARE/agent.log" &
agent=$!
i=0
while ! grep -q '^token: ' "$SHARE/agent.out" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 300 ] || ! kill -0 "$agent" 2>/dev/null; then
        echo "parvis demo: parvis-agent did not start:"
        cat "$SHARE/agent.out" "$SHARE/agent.log"
        exit 1
    fi
    sleep 0.1
done
export PARVIS_ADDR="$(sed -n 's/.* listening on \([^ ]*\).*/\1/p' "$SHARE/agent.out")"
export PARVIS_TOKEN="$(sed -n 's/^token: //p' "$SHARE/agent.out")"
echo "parvis demo: the agent listens on $PARVIS_ADDR"
i=0
until parvis vm list | grep -q running; do
    i=$((i + 1))
    if [ "$i" -gt 50 ]; then parvis vm list; echo "parvis demo: the demo VM did not start"; exit 1; fi
    sleep 0.2
done
parvis vm list
parvis vm console demo
parvis vm stop demo >/dev/null 2>&1
parvis vm list
kill "$agent"
wait "$agent"
echo "parvis demo: done"
"#;

/// The agent with the demo VM, serving the forwarded port until the demo ends; then every
/// worker and the agent stop.
const WINDOW_SCRIPT: &str = r#"
state="$(mktemp -d)"
parvis-agent --state-dir "$state" --listen "$AGENT_LISTEN" $AGENT_TLS --demo "$IMAGES" \
    --worker "$BIN/parvis-worker" --log warn >>agent.out 2>>agent.err &
agent=$!
# The guest's shell is up once its serial console says so.
( until grep -qs PARVIS-DEMO-READY "$state"/vms/*/serial.log; do sleep 0.5; done
  echo ready >demo-ready ) &
serve_commands
kill "$agent" 2>/dev/null
for p in $(cat "$state"/vms/*/run.json 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p'); do kill -9 "$p" 2>/dev/null; done
true
"#;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut serial = false;
    let mut shot: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--serial" => serial = true,
            "--window-screenshot" => match it.next() {
                Some(p) => shot = Some(PathBuf::from(p)),
                None => return usage("--window-screenshot needs a file"),
            },
            "-h" | "--help" => {
                println!(
                    "demo [--serial] [--window-screenshot FILE.png]: the desktop console on a \
                     live demo VM (--serial: the VM's serial console in this terminal)"
                );
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other}")),
        }
    }
    let has_display = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|d| !d.is_empty()));
    if !serial && !has_display {
        eprintln!(
            "parvis demo: there is no display to open the console's window on (DISPLAY and \
             WAYLAND_DISPLAY are unset), so this terminal shows the demo VM's serial console \
             instead."
        );
        serial = true;
    }
    let result = if serial {
        parvis_tests::testhost::run_interactive(SERIAL_SCRIPT)
    } else {
        window_demo(shot.as_deref()).map(|()| 0)
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn usage(why: &str) -> ExitCode {
    eprintln!("demo: {why} (try --help)");
    ExitCode::from(2)
}

/// `parvis-console`, built beside this program (same profile and target folder): the demo
/// builds only what it needs.
fn console_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    let dir = exe.parent().context("this program has no folder")?;
    let target = dir
        .parent()
        .context("this program is not in a cargo target folder")?;
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(parvis_tests::build::workspace())
        .args([
            "build",
            "-q",
            "-p",
            "console_gui",
            "--bin",
            "parvis-console",
        ])
        .env("CARGO_TARGET_DIR", target);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("cannot run cargo to build parvis-console")?;
    if !status.success() {
        bail!("building parvis-console failed ({status})");
    }
    Ok(dir.join("parvis-console"))
}

fn window_demo(shot: Option<&Path>) -> Result<()> {
    let t0 = Instant::now();
    eprintln!("parvis demo: building what the demo needs (the first time takes a while)");
    // The console builds while the guest images and the host's programs are made.
    let console = std::thread::spawn(console_binary);
    parvis_tests::build::artifacts()?;
    let console = console
        .join()
        .map_err(|_| anyhow::anyhow!("the console build panicked"))??;
    eprintln!(
        "parvis demo: starting the host ({}) with its agent and the demo VM",
        match parvis_tests::testhost::Mode::detect() {
            parvis_tests::testhost::Mode::Emulated =>
                "the emulated test host: this machine's KVM cannot run the guest",
            parvis_tests::testhost::Mode::Direct => "this machine",
        }
    );
    let live = Live::start("demo", WINDOW_SCRIPT, Duration::from_secs(12 * 3600), 2048)?;
    let out = live.wait_file("agent.out", "token: ", Duration::from_secs(300))?;
    let value = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .with_context(|| format!("the agent printed no {key}"))
    };
    let host = SavedHost {
        name: "demo-host".into(),
        addr: live.addr.clone(),
        token: value("token: ")?,
        fingerprint: Some(value("TLS certificate SHA-256 fingerprint: ")?),
    };
    let dir = tempfile::Builder::new().prefix("parvis-demo-").tempdir()?;
    let hosts = dir.path().join("hosts.json");
    HostsFile { hosts: vec![host] }.save(&hosts)?;

    let mut cmd = Command::new(&console);
    cmd.arg("--config").arg(&hosts).args(["--open", "demo"]);
    if let Some(p) = shot {
        // The picture is of the guest's shell: wait for it.
        live.wait_file("demo-ready", "ready", Duration::from_secs(600))?;
        cmd.arg("--window-screenshot").arg(p);
    }
    eprintln!(
        "parvis demo: opening the console ({:.0} s since the demo started); close its window \
         to end the demo",
        t0.elapsed().as_secs_f64()
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", console.display()))?;
    // Ctrl-C here ends the console, and so the demo, the same way closing it does.
    let pid = child.id();
    let _ = ctrlc::set_handler(move || {
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        }
    });
    let status = child.wait()?;
    eprintln!("parvis demo: the console closed; stopping the demo VM, the agent and the host");
    let outcome = live.finish()?;
    if !status.success() {
        bail!("the console ended with {status}");
    }
    if outcome.status != 0 {
        bail!(
            "the host's scenario ended with {}:\n{}",
            outcome.status,
            parvis_tests::testhost::tail(&outcome.log(), 30)
        );
    }
    eprintln!("parvis demo: done");
    Ok(())
}
