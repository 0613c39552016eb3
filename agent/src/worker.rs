//! The agent's side of the internal worker protocol (`parvis.worker.v1`) over the Unix
//! socket in the VM's directory.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::framing::{Decoder, encode};
use proto::worker::{Event, Reply, Request, display_update, event, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex as AsyncMutex, oneshot};

use crate::error::{AgentError, AgentResult};

/// How long a request may take before the worker is considered hung.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// One connection to a worker.
#[derive(Debug)]
pub struct WorkerConn {
    socket: PathBuf,
    writer: AsyncMutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
}

impl WorkerConn {
    /// Connect; `on_serial` gets every chunk of serial output once subscribed. When the
    /// worker closes the connection, `on_close` runs and pending requests fail.
    pub async fn connect(
        socket: &Path,
        on_serial: impl Fn(bytes::Bytes) + Send + 'static,
        on_close: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let stream = UnixStream::connect(socket).await?;
        let (mut rd, wr) = stream.into_split();
        let pending: Pending = Arc::default();
        let conn = Arc::new(WorkerConn {
            socket: socket.to_owned(),
            writer: AsyncMutex::new(wr),
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(async move {
            let mut dec = Decoder::default();
            let mut buf = vec![0u8; 64 << 10];
            'outer: loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                dec.push(&buf[..n]);
                loop {
                    match dec.next_message::<Event>() {
                        Ok(Some(Event {
                            kind: Some(event::Kind::Reply(r)),
                        })) => {
                            let tx = pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&r.id);
                            if let Some(tx) = tx {
                                let _ = tx.send(r);
                            }
                        }
                        Ok(Some(Event {
                            kind: Some(event::Kind::SerialOutput(b)),
                        })) => on_serial(b),
                        // Display updates go to their own connection (see screen.rs).
                        Ok(Some(Event {
                            kind: Some(event::Kind::Display(_)),
                        })) => {}
                        Ok(Some(Event { kind: None })) => {}
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("bad message from a worker: {e}");
                            break 'outer;
                        }
                    }
                }
            }
            pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
            on_close();
        });
        Ok(conn)
    }

    /// Send a request and wait for its reply; a reply with an error becomes the status its
    /// code maps to (see `error.rs`).
    pub async fn call(&self, kind: request::Kind) -> AgentResult<Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let bytes = encode(&Request {
            id,
            kind: Some(kind),
        });
        {
            let mut w = self.writer.lock().await;
            if w.write_all(&bytes).await.is_err() {
                return Err(gone());
            }
        }
        let reply = match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(gone()),
            Err(_) => {
                return Err(AgentError::Unavailable(
                    "the VM's worker did not answer in time".into(),
                ));
            }
        };
        match reply.error {
            None => Ok(reply),
            Some(e) => Err(e.into()),
        }
    }

    /// The worker's control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Ask for the guest memory file and the framebuffer's place in it. Done on its own
    /// blocking connection, since the file descriptor arrives as ancillary data.
    pub async fn framebuffer(&self) -> AgentResult<(proto::worker::Framebuffer, OwnedFd)> {
        let socket = self.socket.clone();
        tokio::task::spawn_blocking(move || framebuffer_blocking(&socket))
            .await
            .map_err(|e| AgentError::internal("framebuffer request", e))?
    }
}

/// Events queued for a worker's input connection before senders wait.
const INPUT_QUEUE: usize = 64;

/// Keyboard and mouse input for one worker, on a connection of its own: events go out in
/// order as requests without a reply (id 0), so a keystroke never waits for an answer or
/// behind a control request on the main connection. The queue is short and a full one makes
/// [`InputSender::send`] wait: the console's stream slows down instead of piling up input.
#[derive(Debug)]
pub struct InputSender {
    tx: tokio::sync::mpsc::Sender<proto::worker::Input>,
    /// Whether the VM has devices that take input (the worker's `input_ready`).
    ready: bool,
}

impl InputSender {
    /// Start the sender for the worker at `socket`; it connects at once. `ready` is the
    /// worker's `Status.input_ready`.
    pub fn start(socket: &Path, ready: bool) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<proto::worker::Input>(INPUT_QUEUE);
        let socket = socket.to_owned();
        tokio::spawn(async move {
            let mut stream = match UnixStream::connect(&socket).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot open an input connection to a worker: {e}");
                    return;
                }
            };
            let mut bytes = Vec::new();
            while let Some(first) = rx.recv().await {
                // Whatever else is queued goes out in the same write.
                bytes.clear();
                let mut next = Some(first);
                while let Some(input) = next {
                    bytes.extend_from_slice(&encode(&Request {
                        id: 0,
                        kind: Some(request::Kind::Input(input)),
                    }));
                    next = rx.try_recv().ok();
                }
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        InputSender { tx, ready }
    }

    /// Queue one event for the guest; waits while the queue is full.
    pub async fn send(&self, input: proto::worker::Input) -> AgentResult<()> {
        if !self.ready {
            return Err(AgentError::precondition("this VM has no input device yet"));
        }
        self.tx.send(input).await.map_err(|_| gone())
    }
}

/// Subscribe to the worker's display updates (the synthetic video device's, and the boot
/// framebuffer's written rows) on a connection of its own. Events arrive on the returned
/// channel until the worker goes away (the channel then closes). Errors when the VM has
/// neither kind.
pub fn display_blocking(socket: &Path) -> AgentResult<crate::screen::DisplaySource> {
    use crate::screen::{DisplayEvent, Rect};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdUnix;

    let mut s = StdUnix::connect(socket).map_err(|_| gone())?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).ok();
    s.write_all(&encode(&Request {
        id: 1,
        kind: Some(request::Kind::SubscribeDisplay(proto::worker::Empty {})),
    }))
    .map_err(|_| gone())?;
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 64 << 10];
    // The reply first; display updates that come before it are kept.
    let mut early = Vec::new();
    let boot_dirty_log = loop {
        match dec.next_message::<Event>() {
            Ok(Some(Event {
                kind: Some(event::Kind::Reply(r)),
            })) => {
                if let Some(e) = r.error {
                    return Err(e.into());
                }
                break r.status.is_some_and(|s| s.boot_dirty_log);
            }
            Ok(Some(Event {
                kind: Some(event::Kind::Display(u)),
            })) => early.push(u),
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) => return Err(AgentError::internal("display reply", e)),
        }
        let n = s.read(&mut buf).map_err(|_| gone())?;
        if n == 0 {
            return Err(gone());
        }
        dec.push(&buf[..n]);
    };
    s.set_read_timeout(None).ok();
    let control = s.try_clone().ok().map(|c| {
        c.set_write_timeout(Some(REQUEST_TIMEOUT)).ok();
        DisplayControl::new(c)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let rects = |rs: &[proto::worker::Rect]| -> Vec<Rect> {
        rs.iter()
            .map(|r| Rect {
                x: r.x,
                y: r.y,
                width: r.width,
                height: r.height,
            })
            .collect()
    };
    let forward = move |u: proto::worker::DisplayUpdate,
                        tx: &std::sync::mpsc::Sender<DisplayEvent>|
          -> bool {
        let mut out = Vec::new();
        match u.kind {
            Some(display_update::Kind::BootRows(b)) if !b.rows.is_empty() => {
                out.push(DisplayEvent::BootDirty(rects(&b.rows)));
            }
            Some(display_update::Kind::SyntheticVideo(u)) => {
                if !u.active {
                    out.push(DisplayEvent::Inactive);
                }
                if let Some(fb) = u.framebuffer {
                    out.push(DisplayEvent::Mode(fb));
                }
                if !u.dirty.is_empty() {
                    out.push(DisplayEvent::Dirty(rects(&u.dirty)));
                }
            }
            _ => {}
        }
        out.into_iter().all(|e| tx.send(e).is_ok())
    };
    for u in early {
        forward(u, &tx);
    }
    std::thread::Builder::new()
        .name("worker-display".into())
        .spawn(move || {
            loop {
                loop {
                    match dec.next_message::<Event>() {
                        Ok(Some(Event {
                            kind: Some(event::Kind::Display(u)),
                        })) => {
                            if !forward(u, &tx) {
                                return;
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("bad display message from a worker: {e}");
                            return;
                        }
                    }
                }
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => dec.push(&buf[..n]),
                }
            }
        })
        .map_err(|e| AgentError::internal("display thread", e))?;
    Ok(crate::screen::DisplaySource {
        events: rx,
        boot_dirty_log,
        control,
    })
}

/// The writing side of a display connection: what the screen tells the worker.
#[derive(Debug)]
pub struct DisplayControl(Option<std::os::unix::net::UnixStream>);

impl DisplayControl {
    pub fn new(stream: std::os::unix::net::UnixStream) -> Self {
        DisplayControl(Some(stream))
    }

    /// Tell the worker whether the boot framebuffer's rows are wanted; whether it was told.
    /// A failed write is the worker going away, which the display events' end reports.
    pub fn watch_boot_framebuffer(&mut self, want: bool) -> bool {
        use std::io::Write;
        let Some(c) = &mut self.0 else { return false };
        let req = Request {
            id: 0,
            kind: Some(request::Kind::WatchBootFramebuffer(want)),
        };
        if c.write_all(&encode(&req)).is_err() {
            self.0 = None;
            return false;
        }
        true
    }
}

fn gone() -> AgentError {
    AgentError::Unavailable("the VM's worker is gone".into())
}

fn framebuffer_blocking(socket: &Path) -> AgentResult<(proto::worker::Framebuffer, OwnedFd)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    use std::io::{IoSliceMut, Write};
    use std::os::unix::net::UnixStream as StdUnix;

    let mut s = StdUnix::connect(socket).map_err(|_| gone())?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).ok();
    s.write_all(&encode(&Request {
        id: 1,
        kind: Some(request::Kind::Framebuffer(proto::worker::Empty {})),
    }))
    .map_err(|_| gone())?;
    let mut dec = Decoder::default();
    let mut fd: Option<OwnedFd> = None;
    let mut buf = vec![0u8; 4096];
    loop {
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let n = recvmsg(
            &s,
            &mut [IoSliceMut::new(&mut buf)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|_| gone())?
        .bytes;
        for msg in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                for f in fds {
                    fd.get_or_insert(f);
                }
            }
        }
        if n == 0 {
            return Err(gone());
        }
        dec.push(&buf[..n]);
        match dec.next_message::<Event>() {
            Ok(Some(Event {
                kind: Some(event::Kind::Reply(r)),
            })) => {
                if let Some(e) = r.error {
                    return Err(e.into());
                }
                let fb = r.framebuffer.ok_or_else(|| {
                    AgentError::internal("framebuffer", anyhow::anyhow!("reply without geometry"))
                })?;
                let fd = fd.ok_or_else(|| {
                    AgentError::internal("framebuffer", anyhow::anyhow!("reply without a file"))
                })?;
                return Ok((fb, fd));
            }
            Ok(_) => continue,
            Err(e) => return Err(AgentError::internal("framebuffer reply", e)),
        }
    }
}
