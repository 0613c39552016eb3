//! What end-to-end tests do as a client of a real agent: the `parvis` CLI with a target in
//! its environment, and the serial console over the API.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proto::client::{Clients, Target};
use proto::v1::SerialInput;

/// The text after the first `key` in `text`, to the end of its line, trimmed.
pub fn value_after(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split(key).nth(1))
        .map(|v| v.trim().to_string())
}

/// The agent at `addr` as a client reaches it: its token and pinned TLS certificate, read
/// from what a first start printed (`agent_out`).
pub fn agent_target(addr: &str, agent_out: &str) -> Result<Target> {
    Ok(Target {
        addr: addr.to_string(),
        fingerprint: Some(
            value_after(agent_out, "TLS certificate SHA-256 fingerprint: ")
                .context("no fingerprint printed")?,
        ),
        token: value_after(agent_out, "token: ").context("no token printed")?,
    })
}

/// The `parvis` CLI pointed at one agent.
pub struct Cli<'a> {
    pub target: &'a Target,
}

impl Cli<'_> {
    /// (success, stdout, stderr) of `parvis ARGS`.
    pub fn run(&self, args: &[&str]) -> Result<(bool, String, String)> {
        parvis(self.target, args)
    }

    /// Stdout of `parvis ARGS`, which must succeed.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let (ok, out, err) = self.run(args)?;
        ensure!(ok, "parvis {args:?} failed: {err}{out}");
        Ok(out)
    }

    /// The JSON `parvis ARGS` prints.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.ok(args)?)?)
    }
}

/// Run the `parvis` CLI (the test build) against `target`: (success, stdout, stderr).
pub fn parvis(target: &Target, args: &[&str]) -> Result<(bool, String, String)> {
    let art = crate::build::artifacts()?;
    let out = Command::new(art.bin.join("parvis"))
        .args(args)
        .env("PARVIS_ADDR", &target.addr)
        .env("PARVIS_TOKEN", &target.token)
        .env(
            "PARVIS_FINGERPRINT",
            target.fingerprint.as_deref().unwrap_or(""),
        )
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Collect VM `id`'s serial output until `pattern` has appeared and, with `whole_line`, the
/// rest of its line too; fails after `secs` with the output's tail.
pub async fn serial_until(
    c: &mut Clients,
    id: &str,
    pattern: &str,
    whole_line: bool,
    secs: u64,
) -> Result<String> {
    serial_until_nth(c, id, pattern, 1, whole_line, secs).await
}

/// As [`serial_until`], until `pattern` has appeared `n` times (the serial history a
/// restarted VM replays holds its earlier boots too).
pub async fn serial_until_nth(
    c: &mut Clients,
    id: &str,
    pattern: &str,
    n: usize,
    whole_line: bool,
    secs: u64,
) -> Result<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(SerialInput {
        vm_id: id.into(),
        data: Default::default(),
    })
    .await?;
    let mut stream = c
        .console
        .serial_console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let done = |t: &str| {
        let mut parts = t.splitn(n + 1, pattern);
        match parts.nth(n) {
            Some(rest) => !whole_line || rest.contains('\n'),
            None => false,
        }
    };
    let tail = |t: &str| crate::testhost::tail(t, 40);
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done(&text) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(m))) => text.push_str(&String::from_utf8_lossy(&m.data)),
            Ok(Ok(None)) => bail!("serial stream ended before {pattern}:\n{}", tail(&text)),
            Ok(Err(e)) => bail!("serial stream failed: {e}\n{}", tail(&text)),
            Err(_) => bail!(
                "no {pattern} on the serial console in {secs} s:\n{}",
                tail(&text)
            ),
        }
    }
    drop(tx);
    Ok(text)
}
