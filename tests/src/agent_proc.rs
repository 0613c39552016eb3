//! A real `parvis-agent` on this machine, for benches and tests that talk to it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::client::Target;

/// Give the agent state in `state` a boot image "default" whose kernel is never booted: for
/// agents whose workers are `fake-worker` (the agent refuses a VM without a boot image).
pub fn placeholder_boot_image(state: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(state.join("boot/default"))?;
    std::fs::write(state.join("boot/default/kernel"), b"not booted")
}

/// Start `parvis-agent` (the test-host build) with TLS on a free loopback port, its state in
/// `state` and `args` added (the worker, …), and read its address, certificate fingerprint
/// and token. Its stderr goes to `log` when given (and is quoted if it fails to start).
pub fn spawn_agent(state: &Path, args: &[&str], log: Option<&Path>) -> Result<(Child, Target)> {
    spawn_agent_on(state, args, log, true)
}

/// [`spawn_agent`], with TLS or as the agent listens on loopback by default (plaintext, for
/// the CLI on the host itself).
pub fn spawn_agent_on(
    state: &Path,
    args: &[&str],
    log: Option<&Path>,
    tls: bool,
) -> Result<(Child, Target)> {
    spawn(state, args, log, tls, &[])
}

/// [`spawn_agent`] with `env` added to the agent's environment (its workers inherit it).
pub fn spawn_agent_env(
    state: &Path,
    args: &[&str],
    log: Option<&Path>,
    env: &[(&str, &str)],
) -> Result<(Child, Target)> {
    spawn(state, args, log, true, env)
}

fn spawn(
    state: &Path,
    args: &[&str],
    log: Option<&Path>,
    tls: bool,
    env: &[(&str, &str)],
) -> Result<(Child, Target)> {
    let art = crate::build::artifacts()?;
    let stderr = match log {
        Some(p) => Stdio::from(std::fs::File::create(p).context("cannot create the agent log")?),
        None => Stdio::null(),
    };
    let mut agent = Command::new(art.bin.join("parvis-agent"))
        .arg("--state-dir")
        .arg(state)
        .args(["--listen", "127.0.0.1:0", "--log", "warn"])
        .args(if tls { &["--tls"][..] } else { &[] })
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("cannot start parvis-agent")?;
    let out = agent.stdout.take().context("no stdout")?;
    // Keep reading to the end: the agent prints more after the token, and a closed pipe
    // would end it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    let (mut addr, mut fp, mut token) = (None, None, None);
    while token.is_none() {
        let Ok(l) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = agent.kill();
            let _ = agent.wait();
            let text = log
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            bail!("the agent printed no token within 30 s; its log:\n{text}");
        };
        if let Some(rest) = l.split(" listening on ").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_string);
        } else if let Some(f) = l.strip_prefix("TLS certificate SHA-256 fingerprint: ") {
            fp = Some(f.trim().to_string());
        } else if let Some(t) = l.strip_prefix("token: ") {
            token = Some(t.trim().to_string());
        }
    }
    let target = Target {
        addr: addr.context("no address printed")?,
        fingerprint: fp,
        token: token.unwrap_or_default(),
    };
    Ok((agent, target))
}
