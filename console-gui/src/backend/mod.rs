//! Everything that talks to agents, on a tokio runtime of its own: the UI thread only
//! sends requests (never waits) and drains [`Update`]s, and every update wakes the UI with
//! `request_repaint`. A slow or dead host costs the UI nothing.
//!
//! The host connections live here (this file); the calls the app's jobs make are in
//! `jobs`. A console's streams ([`crate::console`]), resource-use feeds ([`crate::stats`])
//! and uploads ([`crate::upload`]) are spawned from here and share only [`crate::conn`] with
//! it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::client::{self, Clients};
use proto::v1::{Disk, Event, GetHostInfoRequest, HostInfo};
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::config::HostConfig;
use crate::conn::{Plain, Slot, UiWaker, connect_error, plain_status};
use crate::console::{ConsoleHandle, ConsoleShared};
use crate::stats::StatsFeed;
use crate::upload::{Progress, UploadControl, UploadRequest};

mod jobs;

pub use jobs::{DiskAction, JobNames, VmDiskChange};

/// A host, as the console numbers them (stable while the app runs).
pub type HostId = u64;
/// A long job listed in the tasks pane.
pub type JobId = u64;

/// How a host's connection is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostStatus {
    Connecting,
    Online,
    /// Unreachable or refused; the console retries by itself. `error` is one sentence for
    /// people, `details` the technical chain.
    Offline {
        error: String,
        details: String,
        retry_in_s: u64,
    },
}

/// What the backend tells the UI.
#[derive(Debug)]
pub enum Update {
    Status {
        host: HostId,
        status: HostStatus,
    },
    Info {
        host: HostId,
        info: Box<HostInfo>,
    },
    Event {
        host: HostId,
        event: Box<Event>,
    },
    /// The answer to [`Backend::fetch_fingerprint`].
    Fingerprint {
        addr: String,
        result: Result<String, String>,
    },
    /// A job ended: a sentence for people, or the failure in plain words.
    JobDone {
        job: JobId,
        result: Result<String, Plain>,
    },
    /// A job follows the agent's task `task_id` (its progress is the task's).
    JobTask {
        job: JobId,
        task_id: String,
    },
    /// An upload became a disk.
    Uploaded {
        job: JobId,
        host: HostId,
        disk: Box<Disk>,
    },
}

/// Something to do to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    Start,
    Shutdown,
    ForceOff,
    Pause,
    Resume,
    Reset,
    Delete,
}

impl VmAction {
    /// For people: "start", "force off", …
    pub fn verb(self) -> &'static str {
        match self {
            VmAction::Start => "start",
            VmAction::Shutdown => "shut down",
            VmAction::ForceOff => "force off",
            VmAction::Pause => "pause",
            VmAction::Resume => "resume",
            VmAction::Reset => "reset",
            VmAction::Delete => "delete",
        }
    }
}

/// Why the backend could not start.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("cannot start the network runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Sends updates to the UI and wakes it.
#[derive(Clone)]
pub struct Notifier {
    tx: std::sync::mpsc::Sender<Update>,
    waker: UiWaker,
}

impl Notifier {
    pub fn send(&self, u: Update) {
        if self.tx.send(u).is_ok() {
            self.waker.wake();
        }
    }

    /// Wake the UI without a message (e.g. new console tiles in shared state).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Only the wake-up call, for tasks that report through shared state.
    pub fn waker(&self) -> UiWaker {
        self.waker.clone()
    }
}

struct HostEntry {
    slot: Slot,
    task: JoinHandle<()>,
}

/// The network side of the app.
pub struct Backend {
    rt: tokio::runtime::Runtime,
    notify: Notifier,
    hosts: HashMap<HostId, HostEntry>,
}

impl Backend {
    /// Start the runtime; updates arrive on the returned receiver.
    pub fn new(
        ctx: egui::Context,
    ) -> Result<(Backend, std::sync::mpsc::Receiver<Update>), BackendError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("parvis-net")
            .enable_all()
            .build()
            .map_err(BackendError::Runtime)?;
        let (tx, rx) = std::sync::mpsc::channel();
        Ok((
            Backend {
                rt,
                notify: Notifier {
                    tx,
                    waker: UiWaker::new(ctx),
                },
                hosts: HashMap::new(),
            },
            rx,
        ))
    }

    /// The runtime, for work that belongs to the app (tests use it too).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    /// Connect to a host and keep it connected until [`Backend::remove_host`].
    pub fn add_host(&mut self, id: HostId, cfg: HostConfig) {
        self.remove_host(id);
        let slot: Slot = Arc::default();
        let task = self
            .rt
            .spawn(host_loop(id, cfg, slot.clone(), self.notify.clone()));
        self.hosts.insert(id, HostEntry { slot, task });
    }

    /// Disconnect (the host is forgotten or about to be re-added).
    pub fn remove_host(&mut self, id: HostId) {
        if let Some(h) = self.hosts.remove(&id) {
            h.task.abort();
        }
    }

    fn clients(&self, host: HostId) -> Option<Clients> {
        self.hosts
            .get(&host)
            .and_then(|h| h.slot.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The host's connection slot (an empty one for a host that is not connected).
    fn slot(&self, host: HostId) -> Slot {
        self.hosts
            .get(&host)
            .map(|h| h.slot.clone())
            .unwrap_or_default()
    }

    /// Learn an agent's certificate fingerprint (trust on first use).
    pub fn fetch_fingerprint(&self, addr: String) {
        let n = self.notify.clone();
        self.rt.spawn(async move {
            let result = client::fetch_fingerprint(&addr)
                .await
                .map_err(|e| connect_error(&addr, &e).line);
            n.send(Update::Fingerprint { addr, result });
        });
    }

    /// Open a VM's screen, input and serial console. Everything stops when the handle is
    /// dropped.
    pub fn open_console(&self, host: HostId, vm_id: String) -> ConsoleHandle {
        let shared = Arc::new(Mutex::new(ConsoleShared::default()));
        crate::console::spawn(
            &self.rt,
            self.slot(host),
            vm_id,
            shared,
            self.notify.waker(),
        )
    }

    /// Follow the resource use of a VM (`Some(id)`) or of the host itself.
    pub fn watch_stats(&self, host: HostId, vm_id: Option<String>) -> StatsFeed {
        crate::stats::spawn(
            &self.rt,
            self.slot(host),
            vm_id.unwrap_or_default(),
            self.notify.waker(),
        )
    }

    /// Upload a disk image as job `job`.
    pub fn upload(
        &self,
        job: JobId,
        host: HostId,
        req: UploadRequest,
    ) -> (Arc<Progress>, tokio::sync::watch::Sender<UploadControl>) {
        let progress = Arc::new(Progress::default());
        let (ctl_tx, ctl_rx) = tokio::sync::watch::channel(UploadControl::Run);
        let slot = self.slot(host);
        let n = self.notify.clone();
        let p = progress.clone();
        self.rt.spawn(async move {
            let r = crate::upload::run(slot, req, p, ctl_rx, n.waker()).await;
            match r {
                Ok(disk) => {
                    let text = format!("uploaded as disk '{}'", disk.name);
                    n.send(Update::Uploaded {
                        job,
                        host,
                        disk: Box::new(disk),
                    });
                    n.send(Update::JobDone {
                        job,
                        result: Ok(text),
                    });
                }
                Err(e) => n.send(Update::JobDone {
                    job,
                    result: Err(e.plain()),
                }),
            }
        });
        (progress, ctl_tx)
    }

    /// Read the system clipboard off the UI thread and type it into a console.
    pub fn type_clipboard(&self, console: &ConsoleHandle) {
        let input = console.input.clone();
        let shared = console.shared.clone();
        let n = self.notify.clone();
        self.rt.spawn_blocking(move || {
            let text = arboard::Clipboard::new().and_then(|mut c| c.get_text());
            let note = match text {
                Ok(t) => {
                    let (keys, skipped) = crate::keymap::type_text(&t);
                    for (code, pressed) in keys {
                        let _ = input.send(crate::console::key_event(code, pressed));
                    }
                    if skipped > 0 {
                        format!(
                            "typed the clipboard; {skipped} character(s) have no key on a US keyboard and were skipped"
                        )
                    } else {
                        format!("typed {} character(s) from the clipboard", t.chars().count())
                    }
                }
                Err(e) => format!("cannot read the clipboard: {e}"),
            };
            shared.lock().unwrap_or_else(|e| e.into_inner()).note = Some(note);
            n.wake();
        });
    }

    /// Write a PNG off the UI thread; the job reports where.
    pub fn save_png(&self, job: JobId, path: PathBuf, image: egui::ColorImage) {
        let n = self.notify.clone();
        self.rt.spawn_blocking(move || {
            let result = crate::console::save_png(&path, &image)
                .map(|()| format!("saved {}", path.display()))
                .map_err(|e| Plain::new(e, ""));
            n.send(Update::JobDone { job, result });
        });
    }

    /// Ask where to save a screenshot (a native dialog, off the UI thread), then save it.
    pub fn save_png_as(&self, job: JobId, default_name: String, image: egui::ColorImage) {
        let n = self.notify.clone();
        self.rt.spawn_blocking(move || {
            let picked = rfd::FileDialog::new()
                .add_filter("PNG image", &["png"])
                .set_file_name(&default_name)
                .save_file();
            let result = match picked {
                Some(path) => crate::console::save_png(&path, &image)
                    .map(|()| format!("saved {}", path.display()))
                    .map_err(|e| Plain::new(e, "")),
                None => Err(Plain::new(
                    "no file chosen; if no dialog appeared, this desktop has no file dialog \
                     service, so use \"Screenshot\" to save into the Pictures folder",
                    "",
                )),
            };
            n.send(Update::JobDone { job, result });
        });
    }

    /// Ask for an image file to upload (a native dialog, off the UI thread).
    pub fn pick_image(&self, then: impl FnOnce(Option<PathBuf>) + Send + 'static) {
        let n = self.notify.clone();
        self.rt.spawn_blocking(move || {
            let picked = rfd::FileDialog::new()
                .add_filter("Virtual hard disk", &["vhdx", "vhd"])
                .pick_file();
            then(picked);
            n.wake();
        });
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        for (_, h) in self.hosts.drain() {
            h.task.abort();
        }
    }
}

/// Longest wait for a host to answer its first call after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep one host connected: connect, read its info, follow its events; on any failure,
/// show it offline and try again with backoff (1 s … 10 s).
async fn host_loop(id: HostId, cfg: HostConfig, slot: Slot, n: Notifier) {
    let mut failures: u32 = 0;
    loop {
        n.send(Update::Status {
            host: id,
            status: HostStatus::Connecting,
        });
        let err = session(id, &cfg, &slot, &n, &mut failures).await;
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let wait = (1u64 << failures.min(3)).min(10);
        failures = failures.saturating_add(1);
        tracing::info!(host = %cfg.name, error = %err.line, details = %err.details, "host offline");
        n.send(Update::Status {
            host: id,
            status: HostStatus::Offline {
                error: err.line,
                details: err.details,
                retry_in_s: wait,
            },
        });
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

/// The host did not answer its first calls in time.
fn silent(addr: &str) -> Plain {
    Plain::new(
        format!(
            "{addr} accepts connections but does not answer; check that parvis-agent is running there and not stuck"
        ),
        format!("no answer within {} s", HELLO_TIMEOUT.as_secs()),
    )
}

/// One connection's life; returns why it ended.
async fn session(
    id: HostId,
    cfg: &HostConfig,
    slot: &Slot,
    n: &Notifier,
    failures: &mut u32,
) -> Plain {
    let connect = tokio::time::timeout(HELLO_TIMEOUT, client::connect(&cfg.target())).await;
    let mut c = match connect {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return connect_error(&cfg.addr, &e),
        Err(_) => return silent(&cfg.addr),
    };
    let info = match tokio::time::timeout(
        HELLO_TIMEOUT,
        c.host.get_host_info(GetHostInfoRequest {}),
    )
    .await
    {
        Ok(Ok(i)) => i.into_inner(),
        Ok(Err(s)) => return plain_status("", &s),
        Err(_) => return silent(&cfg.addr),
    };
    let mut events = match c.host.watch_events(proto::v1::WatchEventsRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(s) => return plain_status("", &s),
    };
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
    *failures = 0;
    n.send(Update::Info {
        host: id,
        info: Box::new(info),
    });
    n.send(Update::Status {
        host: id,
        status: HostStatus::Online,
    });
    let mut info_tick = tokio::time::interval(Duration::from_secs(15));
    info_tick.tick().await;
    let gone = || {
        Plain::new(
            "the host's agent closed the connection (was it restarted?); the console reconnects by itself",
            "the event stream ended",
        )
    };
    loop {
        tokio::select! {
            m = events.message() => match m {
                Ok(Some(event)) => n.send(Update::Event { host: id, event: Box::new(event) }),
                Ok(None) => return gone(),
                Err(s) => return plain_status("", &s),
            },
            _ = info_tick.tick() => {
                // Also notices a host that stopped answering while the stream stays open.
                match tokio::time::timeout(HELLO_TIMEOUT, c.host.get_host_info(GetHostInfoRequest {})).await {
                    Ok(Ok(i)) => n.send(Update::Info { host: id, info: Box::new(i.into_inner()) }),
                    Ok(Err(s)) => return plain_status("", &s),
                    Err(_) => return silent(&cfg.addr),
                }
            }
        }
    }
}
