//! Talking to an agent: which one, connecting, turning failures into one clear line, and
//! the pieces every remote command shares (Ctrl-C, task progress, names, times, JSON).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use proto::client::{self, Clients, ConnectError, Target};
use proto::hosts::{self, HostsFile};
use proto::v1::{Task, TaskRef, TaskState};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

/// The agent this process talks to, for error hints.
static AGENT: OnceLock<String> = OnceLock::new();
/// Whether that agent is reached in plain HTTP/2.
static PLAIN: OnceLock<bool> = OnceLock::new();

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// Which agent to talk to: `--host NAME`, else `$PARVIS_ADDR` (with `$PARVIS_TOKEN` and
/// optionally `$PARVIS_FINGERPRINT`), else `$PARVIS_HOST`, else the first configured host.
/// Returns a name for messages and the target.
pub fn target(host: Option<&str>) -> Result<(String, Target)> {
    if let Some(h) = host {
        return configured(h);
    }
    if let Some(addr) = env_nonempty("PARVIS_ADDR") {
        let token = env_nonempty("PARVIS_TOKEN")
            .context("PARVIS_ADDR is set but PARVIS_TOKEN is not; set both")?;
        let fingerprint = env_nonempty("PARVIS_FINGERPRINT");
        return Ok((
            addr.clone(),
            Target {
                addr: addr.trim().to_string(),
                fingerprint,
                token: token.trim().to_string(),
            },
        ));
    }
    if let Some(h) = env_nonempty("PARVIS_HOST") {
        return configured(&h);
    }
    let cfg = saved_hosts()?;
    match cfg.hosts.first() {
        Some(h) => Ok((h.name.clone(), h.target())),
        None => bail!(
            "no agent configured: run `parvis host add NAME ADDR --token TOKEN`, or set \
             PARVIS_ADDR and PARVIS_TOKEN"
        ),
    }
}

/// The saved-hosts file (shared with the console).
fn saved_hosts() -> Result<HostsFile> {
    Ok(HostsFile::load(&hosts::default_path()?)?)
}

fn configured(name: &str) -> Result<(String, Target)> {
    let cfg = saved_hosts()?;
    let h = cfg.find(name).with_context(|| {
        let known: Vec<&str> = cfg.hosts.iter().map(|h| h.name.as_str()).collect();
        if known.is_empty() {
            format!("no host named '{name}' (none configured; see `parvis host add`)")
        } else {
            format!("no host named '{name}' (configured: {})", known.join(", "))
        }
    })?;
    Ok((h.name.clone(), h.target()))
}

/// Connect to the agent `--host` (or the environment, or the default) names.
pub async fn connect(host: Option<&str>) -> Result<Clients> {
    let (name, t) = target(host)?;
    connect_to(&name, &t).await
}

/// Connect to `t`; `name` is how messages call it.
pub async fn connect_to(name: &str, t: &Target) -> Result<Clients> {
    let _ = AGENT.set(if name == t.addr {
        t.addr.clone()
    } else {
        format!("'{name}' ({})", t.addr)
    });
    let _ = PLAIN.set(t.fingerprint.is_none());
    client::connect(t).await.map_err(|e| connect_error(t, &e))
}

/// Every message of an error's source chain, without repeats.
pub fn chain(e: &dyn std::error::Error) -> String {
    proto::client::error_chain(e)
}

fn connect_error(t: &Target, e: &ConnectError) -> anyhow::Error {
    let text = chain(e);
    let lower = text.to_ascii_lowercase();
    let hint = if lower.contains("fingerprint") && lower.contains("pinned") {
        "the agent's certificate is not the one trusted for this host; if it was replaced \
         on purpose, run `parvis host add` again"
            .to_string()
    } else if matches!(e, ConnectError::BadAddress(_) | ConnectError::BadToken) {
        String::new()
    } else if t.fingerprint.is_none() && !lower.contains("refused") {
        "this host is set up for plain HTTP/2; if the agent uses TLS, add it again without \
         --plain (or set PARVIS_FINGERPRINT)"
            .to_string()
    } else if t.fingerprint.is_some()
        && (lower.contains("tls") || lower.contains("corrupt") || lower.contains("handshake"))
    {
        "TLS failed; if the agent listens in plain HTTP/2 on loopback, add it with --plain"
            .to_string()
    } else {
        format!(
            "is parvis-agent running at {}? (`parvis host list` shows the addresses)",
            t.addr
        )
    };
    if hint.is_empty() {
        anyhow!("{text}")
    } else {
        anyhow!("{text} ({hint})")
    }
}

/// A failed call as one line: what was being done, the agent's message, and a hint.
pub fn status_error(what: &str, s: &Status) -> anyhow::Error {
    let msg = if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    };
    let agent = AGENT.get().map_or("the agent", String::as_str);
    let line = match s.code() {
        Code::Unauthenticated => format!(
            "{what}: {msg} (token rejected by {agent}; run `parvis host add` again with the \
             agent's current token)"
        ),
        Code::Unavailable if std::error::Error::source(s).is_some() || msg.contains("connect") => {
            let detail = std::error::Error::source(s).map(chain).unwrap_or_default();
            let detail = if detail.is_empty() || msg.contains(&detail) {
                msg
            } else if detail.contains(&msg) {
                detail
            } else {
                format!("{msg}: {detail}")
            };
            format!("{what}: cannot reach {agent}: {detail} (is parvis-agent running?)")
        }
        Code::Unimplemented => format!(
            "{what}: {msg} (the agent does not support this call; are parvis and parvis-agent \
             the same version?)"
        ),
        Code::DeadlineExceeded => format!("{what}: {msg} (the agent did not answer in time)"),
        Code::Cancelled | Code::Unknown | Code::Unavailable if PLAIN.get() == Some(&true) => {
            format!(
                "{what}: {msg} (this agent is reached in plain HTTP/2; if it uses TLS, add it \
                 again without --plain, or set PARVIS_FINGERPRINT)"
            )
        }
        _ => format!("{what}: {msg}"),
    };
    anyhow!(line)
}

/// `.rpc("what")` on a call's result: the message, or [`status_error`].
pub trait Rpc<T> {
    fn rpc(self, what: &str) -> Result<T>;
}

impl<T> Rpc<T> for Result<tonic::Response<T>, Status> {
    fn rpc(self, what: &str) -> Result<T> {
        self.map(tonic::Response::into_inner)
            .map_err(|s| status_error(what, &s))
    }
}

// ---- Ctrl-C -------------------------------------------------------------------------------

static CLAIMS: AtomicUsize = AtomicUsize::new(0);
static PRESSED: OnceLock<tokio::sync::watch::Sender<u64>> = OnceLock::new();

fn pressed_tx() -> &'static tokio::sync::watch::Sender<u64> {
    PRESSED.get_or_init(|| tokio::sync::watch::channel(0).0)
}

/// Route Ctrl-C: to whoever holds a [`CtrlC`] claim, else exit at once (status 130).
/// Call once, inside the runtime.
pub fn install_ctrl_c() {
    let tx = pressed_tx();
    tokio::spawn(async move {
        loop {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            if CLAIMS.load(Ordering::SeqCst) > 0 {
                tx.send_modify(|n| *n += 1);
            } else {
                eprintln!("\nparvis: interrupted");
                std::process::exit(130);
            }
        }
    });
}

/// While alive, Ctrl-C is delivered to [`CtrlC::pressed`] instead of ending the process.
pub struct CtrlC {
    rx: tokio::sync::watch::Receiver<u64>,
}

impl CtrlC {
    pub fn claim() -> Self {
        CLAIMS.fetch_add(1, Ordering::SeqCst);
        let mut rx = pressed_tx().subscribe();
        rx.mark_unchanged();
        CtrlC { rx }
    }

    /// Completes at the next Ctrl-C.
    pub async fn pressed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for CtrlC {
    fn drop(&mut self) {
        CLAIMS.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---- Tasks --------------------------------------------------------------------------------

/// What Ctrl-C does while a task is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCtrlC {
    /// Ask the agent to cancel the task (and wait for it to end).
    Cancel,
    /// Stop watching; the task goes on.
    Detach,
}

/// How a watch ended.
#[derive(Debug)]
pub enum Watched {
    Ended(Task),
    Detached,
}

/// Watch a task to its end with a progress bar.
pub async fn watch_task(
    c: &mut Clients,
    task_id: &str,
    quiet: bool,
    on_ctrl_c: OnCtrlC,
) -> Result<Watched> {
    let mut ctrl = CtrlC::claim();
    let mut stream = c
        .disk
        .watch_task(TaskRef {
            task_id: task_id.to_string(),
        })
        .await
        .rpc("watching the task")?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    let mut styled_for: Option<(bool, u64)> = None;
    let mut last: Option<Task> = None;
    let mut cancelling = false;
    loop {
        let next = tokio::select! {
            n = stream.next() => n,
            () = ctrl.pressed() => {
                if on_ctrl_c == OnCtrlC::Detach || cancelling {
                    bar.abandon();
                    return Ok(Watched::Detached);
                }
                cancelling = true;
                bar.suspend(|| eprintln!("parvis: cancelling the task (Ctrl-C again to stop waiting)"));
                c.disk
                    .cancel_task(TaskRef { task_id: task_id.to_string() })
                    .await
                    .rpc("cancelling the task")?;
                continue;
            }
        };
        match next {
            Some(Ok(t)) => {
                let bytes = t.unit == "bytes";
                if styled_for != Some((bytes, t.total)) {
                    styled_for = Some((bytes, t.total));
                    bar.set_length(t.total);
                    let template = if bytes {
                        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
                    } else {
                        "{msg} [{bar:40}] {pos}/{len}"
                    };
                    bar.set_style(
                        ProgressStyle::with_template(template)
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    bar.set_message(t.description.clone());
                }
                bar.set_position(t.done);
                let ended = t.state != TaskState::Running as i32;
                last = Some(t);
                if ended {
                    break;
                }
            }
            Some(Err(s)) => {
                bar.abandon();
                return Err(status_error("watching the task", &s));
            }
            None => break,
        }
    }
    bar.finish_and_clear();
    let t = match last {
        Some(t) if t.state != TaskState::Running as i32 => t,
        _ => c
            .disk
            .get_task(TaskRef {
                task_id: task_id.to_string(),
            })
            .await
            .rpc("reading the task")?,
    };
    Ok(Watched::Ended(t))
}

/// A task that ended: Ok when it succeeded, else its error.
pub fn task_result(t: &Task) -> Result<()> {
    match TaskState::try_from(t.state) {
        Ok(TaskState::Succeeded) => Ok(()),
        Ok(TaskState::Failed) => bail!("{} failed: {}", t.description, t.error),
        Ok(TaskState::Cancelled) => bail!("{} was cancelled", t.description),
        _ => bail!("{} did not finish", t.description),
    }
}

/// Exponential backoff: 0.5 s, 1 s, 2 s, … up to 10 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((500u64 << attempt.min(5)).min(10_000))
}

// ---- Names, ids and words -----------------------------------------------------------------

/// Find one object by id, name or unique id prefix. `items` are (id, name) pairs.
pub fn resolve<'a>(
    kind: &str,
    items: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    query: &str,
) -> Result<String> {
    if let Some((id, _)) = items.clone().into_iter().find(|(id, _)| *id == query) {
        return Ok(id.to_string());
    }
    let named: Vec<&str> = items
        .clone()
        .into_iter()
        .filter(|(_, n)| *n == query)
        .map(|(id, _)| id)
        .collect();
    match named.len() {
        1 => return Ok(named[0].to_string()),
        0 => {}
        _ => bail!(
            "{} {kind}s are named '{query}' ({}); give the id instead",
            named.len(),
            named.join(", ")
        ),
    }
    if query.len() >= 4 && query.bytes().all(|b| b.is_ascii_hexdigit()) {
        let q = query.to_ascii_lowercase();
        let pre: Vec<&str> = items
            .into_iter()
            .filter(|(id, _)| id.starts_with(&q))
            .map(|(id, _)| id)
            .collect();
        match pre.len() {
            1 => return Ok(pre[0].to_string()),
            0 => {}
            _ => bail!(
                "'{query}' is the start of {} {kind} ids ({}); give more of it",
                pre.len(),
                pre.join(", ")
            ),
        }
    }
    bail!("no {kind} with the id or name '{query}'")
}

/// `VM_STATE_RUNNING` → `running`.
pub fn word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

pub fn vm_state(v: i32) -> String {
    proto::v1::VmState::try_from(v).map_or_else(
        |_| format!("unknown({v})"),
        |s| word(s.as_str_name(), "VM_STATE_"),
    )
}

pub fn disk_format(v: i32) -> String {
    proto::v1::DiskFormat::try_from(v).map_or_else(
        |_| format!("unknown({v})"),
        |s| word(s.as_str_name(), "DISK_FORMAT_"),
    )
}

pub fn disk_variant(v: i32) -> String {
    proto::v1::DiskVariant::try_from(v).map_or_else(
        |_| format!("unknown({v})"),
        |s| word(s.as_str_name(), "DISK_VARIANT_"),
    )
}

pub fn task_state(v: i32) -> String {
    TaskState::try_from(v).map_or_else(
        |_| format!("unknown({v})"),
        |s| word(s.as_str_name(), "TASK_STATE_"),
    )
}

pub fn upload_state(v: i32) -> String {
    proto::v1::UploadState::try_from(v).map_or_else(
        |_| format!("unknown({v})"),
        |s| word(s.as_str_name(), "UPLOAD_STATE_"),
    )
}

/// Unix milliseconds as `2026-01-31 12:34:56 UTC`; 0 as `-`.
pub fn time_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Print a value as pretty JSON.
pub fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Print rows as columns (the first row is the header).
pub fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

pub fn task_json(t: &Task) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "description": t.description,
        "state": task_state(t.state),
        "done": t.done,
        "total": t.total,
        "unit": t.unit,
        "error": t.error,
        "disk_id": t.disk_id,
        "created_ms": t.created_ms,
        "finished_ms": t.finished_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_words() {
        assert_eq!(time_ms(0), "-");
        assert_eq!(time_ms(86_400_000 + 3_661_000), "1970-01-02 01:01:01 UTC");
        assert_eq!(time_ms(1_709_210_096_000), "2024-02-29 12:34:56 UTC");
        assert_eq!(word("VM_STATE_RUNNING", "VM_STATE_"), "running");
        assert_eq!(vm_state(6), "crashed");
        assert_eq!(disk_format(3), "vhdx");
    }

    #[test]
    fn resolving_ids_and_names() {
        let items = [
            ("0123456789ab", "web"),
            ("0123aaaaaaaa", "db"),
            ("ffffffffffff", "db"),
        ];
        let it = || items.iter().map(|(a, b)| (*a, *b));
        assert_eq!(resolve("VM", it(), "web").unwrap(), "0123456789ab");
        assert_eq!(resolve("VM", it(), "ffffffffffff").unwrap(), "ffffffffffff");
        assert_eq!(resolve("VM", it(), "01234").unwrap(), "0123456789ab");
        assert!(
            resolve("VM", it(), "0123")
                .unwrap_err()
                .to_string()
                .contains("start of 2")
        );
        assert!(
            resolve("VM", it(), "db")
                .unwrap_err()
                .to_string()
                .contains("2 VMs")
        );
        assert!(resolve("VM", it(), "nope").is_err());
    }
}
