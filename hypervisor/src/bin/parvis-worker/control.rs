//! The control socket (`--control`): the internal agent↔worker protocol
//! (`parvis.worker.v1`, see `proto/schema/parvis/worker/v1/worker.proto`).
//!
//! Every connection is a session on its own thread: it reads length-delimited `Request`s and
//! answers each with one `Reply` (same id) inside an `Event`. A session that subscribed to
//! the serial console also gets `Event.serial_output` chunks, sent by a per-session sender
//! thread so that a slow client never blocks the vCPU that writes to COM1. The framebuffer
//! reply carries a read-only descriptor of the guest memory file (SCM_RIGHTS) on the same
//! `sendmsg` as the reply frame.
//!
//! Whatever a client sends is untrusted: a frame that does not decode ends that connection,
//! and nothing a client does can panic the worker or reach the VM except through the
//! partition's command channel.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hypervisor::devices::bus::lock;
use hypervisor::devices::serial::SerialDevice;
use hypervisor::devices::synth::SynthDevices;
use hypervisor::devices::synth::keyboard::KeyEvent;
use hypervisor::devices::synth::mouse::PointerEvent;
use hypervisor::devices::synth::video::{DisplayCursor, VideoShared};
use hypervisor::dirty::{DirtyReader, DirtyRows};
use hypervisor::framebuffer::FbFormat;
use hypervisor::partition::{Command, Gone, PartitionHandle, PartitionState};
use proto::framing::{self, Decoder};
use proto::worker::{Event, Framebuffer, Reply, Request, Status, event, request};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// Largest serial-output chunk in one event.
pub const SERIAL_CHUNK: usize = 64 << 10;
/// A subscriber whose unsent serial output grows past this is disconnected.
pub const SERIAL_BACKLOG: usize = 1 << 20;
/// How long the sender waits after the first byte so that the UART's byte-at-a-time output
/// goes out in batches.
const SERIAL_BATCH_DELAY: Duration = Duration::from_millis(2);
/// Serial-input requests a session may have queued for a guest that is not reading.
const SERIAL_INPUT_QUEUE: usize = 16;
/// Reply to `input` until the partition has a keyboard and mouse (VMBus).
pub const NO_INPUT_DEVICE: &str = "this VM has no input device yet";

/// Where host commands go: the partition's handle, or a fake in tests.
pub trait Host: Send + Sync {
    /// Queue a command for the partition's event loop.
    fn send(&self, c: Command) -> Result<(), Gone>;
}

impl Host for PartitionHandle {
    fn send(&self, c: Command) -> Result<(), Gone> {
        PartitionHandle::send(self, c)
    }
}

/// The boot framebuffer as the agent maps it: inside the guest memory file.
#[derive(Debug, Clone)]
pub struct SharedFramebuffer {
    /// The guest memory file (RAM, then VRAM).
    pub file: Arc<File>,
    /// Where the VRAM starts in the file.
    pub offset: u64,
    /// The surface's geometry.
    pub format: FbFormat,
}

/// Everything a control session acts on.
pub struct Vm {
    host: Box<dyn Host>,
    serial: Arc<Mutex<SerialDevice>>,
    hub: SerialHub,
    framebuffer: Option<SharedFramebuffer>,
    synth: SynthDevices,
    /// The boot framebuffer's written rows, when KVM logs them.
    boot_dirty: Option<DirtyRows>,
    /// Requests being handled (from decoding to the reply being written).
    busy: AtomicUsize,
}

impl Vm {
    /// A VM controlled through `host`, with its COM1 device, the serial fan-out that the
    /// device writes to, and the framebuffer if it has one.
    pub fn new(
        host: Box<dyn Host>,
        serial: Arc<Mutex<SerialDevice>>,
        hub: SerialHub,
        framebuffer: Option<SharedFramebuffer>,
    ) -> Self {
        Self {
            host,
            serial,
            hub,
            framebuffer,
            synth: SynthDevices::default(),
            boot_dirty: None,
            busy: AtomicUsize::new(0),
        }
    }

    /// Route input to these synthetic devices and serve their display updates.
    pub fn with_synth(mut self, synth: SynthDevices) -> Self {
        self.synth = synth;
        self
    }

    /// Tell display subscribers which rows of the boot framebuffer the guest wrote.
    pub fn with_boot_dirty(mut self, rows: DirtyRows) -> Self {
        self.boot_dirty = Some(rows);
        self
    }

    /// Wait up to `limit` for requests in progress to be answered, so the reply to `stop`
    /// reaches its client before the worker exits.
    pub fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Accept connections forever, one session thread each.
pub fn serve(listener: UnixListener, vm: Arc<Vm>) {
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                let vm = vm.clone();
                if let Err(e) = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || session(conn, vm))
                {
                    tracing::warn!(error = %e, "cannot start a control session");
                }
            }
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The writing side of a connection: whole frames, one writer at a time.
struct Conn {
    stream: UnixStream,
    write: Mutex<()>,
}

impl Conn {
    /// Send one event; `fd` rides along as SCM_RIGHTS with its first bytes.
    fn send(&self, ev: &Event, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        let bytes = framing::encode(ev);
        let _guard = lock(&self.write);
        let mut sent = 0;
        if let Some(fd) = fd {
            let fds = [fd];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(std::io::Error::other("no room for SCM_RIGHTS"));
            }
            sent = loop {
                match rustix::net::sendmsg(
                    &self.stream,
                    &[IoSlice::new(&bytes)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                ) {
                    Ok(n) => break n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
        }
        (&self.stream).write_all(&bytes[sent..])
    }

    /// End the connection both ways (wakes a blocked reader and writer).
    fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// One control connection.
pub fn session(conn: UnixStream, vm: Arc<Vm>) {
    let Ok(writer) = conn.try_clone() else {
        return;
    };
    let mut s = Session {
        vm,
        conn: Arc::new(Conn {
            stream: writer,
            write: Mutex::new(()),
        }),
        subscriber: None,
        input: None,
        display: None,
        display_gate: None,
        boot_rows: None,
    };
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 16 << 10];
    'conn: loop {
        let n = match (&conn).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_message::<Request>() {
                Ok(Some(req)) => {
                    if !s.request(req) {
                        break 'conn;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "closing a control connection that sent a bad frame");
                    s.conn.shutdown();
                    break 'conn;
                }
            }
        }
    }
    s.close();
}

struct Session {
    vm: Arc<Vm>,
    conn: Arc<Conn>,
    subscriber: Option<Arc<Subscriber>>,
    input: Option<InputFeeder>,
    /// Stop flag of this session's display sender.
    display: Option<Arc<AtomicBool>>,
    /// Opened once the reply to `subscribe_display` is out: display updates follow it.
    display_gate: Option<Arc<Gate>>,
    /// Stop flag of this session's boot framebuffer row sender, while it runs.
    boot_rows: Option<Arc<AtomicBool>>,
}

/// Holds threads back until opened.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn open(&self) {
        *lock(&self.open) = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = lock(&self.open);
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Session {
    /// Handle one request and send its reply. Returns false when the connection is dead.
    fn request(&mut self, req: Request) -> bool {
        self.vm.busy.fetch_add(1, Ordering::SeqCst);
        let (reply, fd) = self.handle(req);
        let ev = Event {
            kind: Some(event::Kind::Reply(reply)),
        };
        let ok = self.conn.send(&ev, fd.as_ref().map(|f| f.as_fd())).is_ok();
        if let Some(gate) = self.display_gate.take() {
            gate.open();
        }
        self.vm.busy.fetch_sub(1, Ordering::SeqCst);
        ok
    }

    fn handle(&mut self, req: Request) -> (Reply, Option<OwnedFd>) {
        use request::Kind;
        let mut reply = Reply {
            id: req.id,
            ..Default::default()
        };
        let mut fd = None;
        let result = match req.kind {
            None => Err("unknown or empty request".to_string()),
            Some(Kind::Pause(_)) => self.command(Command::Pause),
            Some(Kind::Resume(_)) => self.command(Command::Resume),
            Some(Kind::Reset(_)) => self.command(Command::Reset),
            Some(Kind::Stop(_)) => self.command(Command::Stop),
            Some(Kind::PowerButton(_)) => self.command(Command::PowerButton),
            Some(Kind::Query(_)) => self.query().map(|s| reply.status = Some(s)),
            Some(Kind::ScreenshotPath(path)) => self.screenshot(path),
            Some(Kind::SerialInput(bytes)) => self.serial_input(Vec::from(bytes)),
            Some(Kind::SubscribeSerial(_)) => {
                self.subscribe();
                Ok(())
            }
            Some(Kind::Framebuffer(_)) => self.framebuffer().map(|(f, file)| {
                reply.framebuffer = Some(f);
                fd = Some(file);
            }),
            Some(Kind::Input(i)) => self.input(i),
            Some(Kind::SubscribeDisplay(_)) => {
                self.subscribe_display().map(|s| reply.status = Some(s))
            }
            Some(Kind::WatchBootFramebuffer(on)) => self.watch_boot_framebuffer(on),
        };
        if let Err(e) = result {
            reply.error = e;
            reply.status = None;
            reply.framebuffer = None;
            fd = None;
        }
        (reply, fd)
    }

    fn command(&self, c: Command) -> Result<(), String> {
        self.vm.host.send(c).map_err(|e| e.to_string())
    }

    fn query(&self) -> Result<Status, String> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::Query(tx))?;
        let state = rx.recv().map_err(|_| Gone.to_string())?;
        Ok(Status {
            paused: state == PartitionState::Paused,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            input_ready: self.vm.synth.keyboard.is_some(),
            synthetic_video: self.vm.synth.video.is_some(),
            boot_dirty_log: self.vm.boot_dirty.is_some(),
        })
    }

    fn input(&self, i: proto::worker::Input) -> Result<(), String> {
        use proto::worker::input::Kind;
        let queued = match i.kind {
            Some(Kind::Key(k)) => {
                let Some(q) = &self.vm.synth.keyboard else {
                    return Err(NO_INPUT_DEVICE.to_string());
                };
                q.push(KeyEvent {
                    scancode: k.scancode,
                    pressed: k.pressed,
                })
            }
            Some(Kind::Pointer(p)) => {
                let Some(q) = &self.vm.synth.mouse else {
                    return Err(NO_INPUT_DEVICE.to_string());
                };
                q.push(PointerEvent {
                    x: p.x,
                    y: p.y,
                    buttons: p.buttons,
                    wheel: p.wheel,
                })
            }
            None => return Err("empty input".into()),
        };
        if queued {
            Ok(())
        } else {
            Err("input is backed up: the guest is not reading its keyboard or mouse".into())
        }
    }

    /// Start sending this session display updates; the status says which kinds.
    fn subscribe_display(&mut self) -> Result<Status, String> {
        let video = self.vm.synth.video.clone();
        if video.is_none() && self.vm.boot_dirty.is_none() {
            return Err(
                "this VM has no synthetic video device and no logged boot framebuffer".into(),
            );
        }
        if self.display.is_none() {
            let stop = Arc::new(AtomicBool::new(false));
            // Set first: a thread that fails to start below must not leave the other one
            // running unstoppably (the gate opens after any reply).
            self.display = Some(stop.clone());
            let gate = self.display_gate.get_or_insert_with(Arc::default).clone();
            if let Some(video) = video {
                let (conn, flag, gate) = (self.conn.clone(), stop.clone(), gate.clone());
                let offset = self.vm.framebuffer.as_ref().map_or(0, |f| f.offset);
                std::thread::Builder::new()
                    .name("display-out".into())
                    .spawn(move || {
                        gate.wait();
                        display_sender(&video, &conn, &flag, offset)
                    })
                    .map_err(|e| format!("cannot start the display sender: {e}"))?;
            }
            self.watch_boot_framebuffer(true)?;
        }
        self.query()
    }

    /// Start or stop sending this (display) session the boot framebuffer's written rows.
    /// The first update follows the reply.
    fn watch_boot_framebuffer(&mut self, on: bool) -> Result<(), String> {
        if self.display.is_none() {
            return Err("watch_boot_framebuffer needs subscribe_display first".into());
        }
        if !on {
            if let Some(stop) = self.boot_rows.take() {
                stop.store(true, Ordering::SeqCst);
            }
            return Ok(());
        }
        let Some(rows) = &self.vm.boot_dirty else {
            return Ok(());
        };
        if self.boot_rows.is_some() {
            return Ok(());
        }
        let reader = rows
            .subscribe()
            .map_err(|e| format!("cannot start the dirty page log reader: {e}"))?;
        let width = rows.format().width;
        let conn = self.conn.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let gate = self.display_gate.get_or_insert_with(Arc::default).clone();
        std::thread::Builder::new()
            .name("boot-dirty-out".into())
            .spawn(move || {
                gate.wait();
                boot_dirty_sender(&reader, width, &conn, &flag)
            })
            .map_err(|e| format!("cannot start the boot framebuffer sender: {e}"))?;
        self.boot_rows = Some(stop);
        Ok(())
    }

    fn screenshot(&self, path: String) -> Result<(), String> {
        if path.is_empty() {
            return Err("screenshot needs a path".into());
        }
        let (tx, rx) = mpsc::channel();
        self.command(Command::Screenshot(PathBuf::from(path), tx))?;
        rx.recv()
            .map_err(|_| Gone.to_string())?
            .map_err(|e| e.to_string())
    }

    fn serial_input(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.input.is_none() {
            self.input = Some(InputFeeder::start(self.vm.serial.clone())?);
        }
        let Some(feeder) = &self.input else {
            return Err("no serial input".into());
        };
        match feeder.tx.try_send(bytes) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                Err("serial input is backed up: the guest is not reading COM1".into())
            }
            Err(TrySendError::Disconnected(_)) => Err("serial input has stopped".into()),
        }
    }

    fn subscribe(&mut self) {
        if self.subscriber.is_some() {
            return;
        }
        let sub = Arc::new(Subscriber {
            backlog: Mutex::new(Backlog::default()),
            ready: Condvar::new(),
            conn: self.conn.clone(),
        });
        let sender = sub.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("serial-out".into())
            .spawn(move || sender.run())
        {
            tracing::warn!(error = %e, "cannot start a serial sender");
            return;
        }
        lock(&self.vm.hub.0.subscribers).push(sub.clone());
        self.subscriber = Some(sub);
    }

    fn framebuffer(&self) -> Result<(Framebuffer, OwnedFd), String> {
        let Some(fb) = &self.vm.framebuffer else {
            return Err(hypervisor::framebuffer::FbError::NoFramebuffer.to_string());
        };
        // A separate, read-only open of the same memfd: the client can map the VRAM but
        // never write guest memory.
        let file = File::open(format!("/proc/self/fd/{}", fb.file.as_raw_fd()))
            .map_err(|e| format!("cannot share the guest memory file: {e}"))?;
        Ok((
            Framebuffer {
                offset: fb.offset,
                width: fb.format.width,
                height: fb.format.height,
                stride: fb.format.stride,
                bytes_per_pixel: 4,
            },
            OwnedFd::from(file),
        ))
    }

    fn close(self) {
        if let Some(sub) = &self.subscriber {
            sub.close();
            lock(&self.vm.hub.0.subscribers).retain(|s| !Arc::ptr_eq(s, sub));
        }
        if let Some(input) = &self.input {
            input.stop.store(true, Ordering::SeqCst);
        }
        if let Some(d) = &self.display {
            d.store(true, Ordering::SeqCst);
        }
        if let Some(b) = &self.boot_rows {
            b.store(true, Ordering::SeqCst);
        }
    }
}

/// Send display updates to one session until it closes. The first update always carries
/// the current state (geometry, or inactive).
fn display_sender(video: &VideoShared, conn: &Conn, stop: &AtomicBool, vram_offset: u64) {
    let mut cursor = DisplayCursor::default();
    let mut first = true;
    while !stop.load(Ordering::SeqCst) {
        let update = match video.wait(cursor, Duration::from_millis(500)) {
            Some(u) => u,
            None if first => hypervisor::devices::synth::video::DisplayUpdate {
                mode: None,
                dirty: Vec::new(),
                cursor,
            },
            None => continue,
        };
        first = false;
        cursor = update.cursor;
        let active = video.mode().is_some();
        let ev = Event {
            kind: Some(event::Kind::Display(proto::worker::DisplayUpdate {
                active,
                framebuffer: update.mode.map(|m| Framebuffer {
                    offset: vram_offset,
                    width: m.width,
                    height: m.height,
                    stride: m.stride,
                    bytes_per_pixel: 4,
                }),
                dirty: update
                    .dirty
                    .iter()
                    .map(|r| proto::worker::Rect {
                        x: r.x,
                        y: r.y,
                        width: r.width,
                        height: r.height,
                    })
                    .collect(),
                boot_dirty: Vec::new(),
            })),
        };
        if conn.send(&ev, None).is_err() {
            return;
        }
    }
}

/// Send one session the boot framebuffer's written rows until stopped (the reader, and
/// with the last one the log's polling, ends with it). Rows written while a send is
/// blocked are merged into the next update.
fn boot_dirty_sender(reader: &DirtyReader, width: u32, conn: &Conn, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let rows = reader.wait(Duration::from_millis(50));
        if rows.is_empty() || stop.load(Ordering::SeqCst) {
            continue;
        }
        let ev = Event {
            kind: Some(event::Kind::Display(hypervisor::dirty::rows_update(
                &rows, width,
            ))),
        };
        if conn.send(&ev, None).is_err() {
            return;
        }
    }
}

/// Feeds one session's serial input into COM1 on its own thread, so a guest that is not
/// reading never blocks the session.
struct InputFeeder {
    tx: SyncSender<Vec<u8>>,
    stop: Arc<AtomicBool>,
}

impl InputFeeder {
    fn start(serial: Arc<Mutex<SerialDevice>>) -> Result<Self, String> {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(SERIAL_INPUT_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("serial-in".into())
            .spawn(move || {
                for bytes in rx {
                    let mut pending = &bytes[..];
                    while !pending.is_empty() {
                        if stopped.load(Ordering::SeqCst) {
                            return;
                        }
                        let taken = lock(&serial).enqueue_input(pending);
                        pending = &pending[taken..];
                        if !pending.is_empty() {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start serial input: {e}"))?;
        Ok(Self { tx, stop })
    }
}

/// Serial output fan-out to the sessions that subscribed; added to the COM1 output sinks.
/// Writing never blocks on a client: bytes go into each subscriber's backlog and its sender
/// thread ships them.
#[derive(Clone, Default)]
pub struct SerialHub(Arc<HubInner>);

#[derive(Default)]
struct HubInner {
    subscribers: Mutex<Vec<Arc<Subscriber>>>,
}

impl Write for SerialHub {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0.subscribers).retain(|s| s.push(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Backlog {
    bytes: Vec<u8>,
    closed: bool,
}

struct Subscriber {
    backlog: Mutex<Backlog>,
    ready: Condvar,
    conn: Arc<Conn>,
}

impl Subscriber {
    /// Queue output (on the vCPU thread). Returns false if the subscriber is gone.
    fn push(&self, buf: &[u8]) -> bool {
        let mut b = lock(&self.backlog);
        if b.closed {
            return false;
        }
        if b.bytes.len() + buf.len() > SERIAL_BACKLOG {
            b.closed = true;
            drop(b);
            tracing::warn!("a serial subscriber fell more than 1 MiB behind; disconnecting it");
            self.ready.notify_all();
            // Unblocks the sender if it is stuck writing, and ends the session.
            self.conn.shutdown();
            return false;
        }
        let wake = b.bytes.is_empty();
        b.bytes.extend_from_slice(buf);
        drop(b);
        if wake {
            self.ready.notify_one();
        }
        true
    }

    fn close(&self) {
        lock(&self.backlog).closed = true;
        self.ready.notify_all();
    }

    /// The sender thread: ship the backlog in chunks until closed.
    fn run(&self) {
        loop {
            let waiting = {
                let mut b = lock(&self.backlog);
                while b.bytes.is_empty() && !b.closed {
                    b = self.ready.wait(b).unwrap_or_else(|e| e.into_inner());
                }
                if b.closed {
                    return;
                }
                b.bytes.len()
            };
            if waiting < SERIAL_CHUNK {
                std::thread::sleep(SERIAL_BATCH_DELAY);
            }
            let chunk = {
                let mut b = lock(&self.backlog);
                if b.closed {
                    return;
                }
                if b.bytes.len() <= SERIAL_CHUNK {
                    std::mem::take(&mut b.bytes)
                } else {
                    b.bytes.drain(..SERIAL_CHUNK).collect()
                }
            };
            let ev = Event {
                kind: Some(event::Kind::SerialOutput(chunk.into())),
            };
            if self.conn.send(&ev, None).is_err() {
                self.close();
                self.conn.shutdown();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::devices::serial::SerialOutput;
    use hypervisor::devices::{BusDevice, IrqLine};
    use proto::worker::{Empty, Input, Key, input};
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::os::unix::fs::FileExt;

    struct NoIrq;
    impl IrqLine for NoIrq {
        fn trigger(&self) {}
    }

    /// Records commands and answers queries and screenshots like the partition would.
    #[derive(Default)]
    struct FakeHost {
        log: Mutex<Vec<String>>,
        paused: AtomicBool,
        gone: AtomicBool,
        /// Answer queries slowly, as a busy partition thread would.
        slow_query: AtomicBool,
    }

    impl Host for Arc<FakeHost> {
        fn send(&self, c: Command) -> Result<(), Gone> {
            if self.gone.load(Ordering::SeqCst) {
                return Err(Gone);
            }
            let name = format!("{c:?}");
            let name = name.split('(').next().unwrap_or_default().to_string();
            match c {
                Command::Query(tx) => {
                    if self.slow_query.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let _ = tx.send(if self.paused.load(Ordering::SeqCst) {
                        PartitionState::Paused
                    } else {
                        PartitionState::Running
                    });
                }
                Command::Screenshot(path, tx) => {
                    let r = std::fs::write(&path, b"png")
                        .map_err(|_| hypervisor::framebuffer::FbError::NoFramebuffer);
                    let _ = tx.send(r);
                }
                Command::Pause => self.paused.store(true, Ordering::SeqCst),
                Command::Resume => self.paused.store(false, Ordering::SeqCst),
                _ => {}
            }
            lock(&self.log).push(name);
            Ok(())
        }
    }

    /// A VM with a fake partition behind it.
    struct Rig {
        host: Arc<FakeHost>,
        serial: Arc<Mutex<SerialDevice>>,
        hub: SerialHub,
        vm: Arc<Vm>,
        memory: Option<Arc<File>>,
        dir: tempfile::TempDir,
    }

    fn rig(with_fb: bool) -> Rig {
        let host = Arc::new(FakeHost::default());
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            Arc::new(NoIrq),
            SerialOutput::default(),
        )));
        let hub = SerialHub::default();
        let dir = tempfile::tempdir().unwrap();
        let memory = with_fb.then(|| {
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("mem"))
                .unwrap();
            f.set_len(3 << 20).unwrap();
            f.write_all_at(b"VRAM", 2 << 20).unwrap();
            Arc::new(f)
        });
        let fb = memory.clone().map(|file| SharedFramebuffer {
            file,
            offset: 2 << 20,
            format: FbFormat::xrgb(640, 480),
        });
        let vm = Arc::new(Vm::new(
            Box::new(host.clone()),
            serial.clone(),
            hub.clone(),
            fb,
        ));
        Rig {
            host,
            serial,
            hub,
            vm,
            memory,
            dir,
        }
    }

    impl Rig {
        /// A new control connection.
        fn connect(&self) -> Client {
            connect(self.vm.clone())
        }

        fn log(&self) -> Vec<String> {
            lock(&self.host.log).clone()
        }
    }

    /// A new control connection to `vm`.
    fn connect(vm: Arc<Vm>) -> Client {
        let (client, server) = UnixStream::pair().unwrap();
        std::thread::spawn(move || session(server, vm));
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream: client,
            decoder: Decoder::default(),
            next_id: 1,
        }
    }

    struct Client {
        stream: UnixStream,
        decoder: Decoder,
        next_id: u64,
    }

    impl Client {
        fn send(&mut self, kind: request::Kind) -> u64 {
            let id = self.next_id;
            self.next_id += 1;
            let req = Request {
                id,
                kind: Some(kind),
            };
            (&self.stream).write_all(&framing::encode(&req)).unwrap();
            id
        }

        /// The next event and any descriptor that came with it; None at end of stream.
        fn event(&mut self) -> Option<(Event, Option<OwnedFd>)> {
            let mut fd = None;
            loop {
                if let Some(ev) = self.decoder.next_message::<Event>().unwrap() {
                    return Some((ev, fd));
                }
                let mut buf = [0u8; 4096];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let r = rustix::net::recvmsg(
                    &self.stream,
                    &mut [std::io::IoSliceMut::new(&mut buf)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .unwrap();
                for msg in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
                        fd = fds.next();
                    }
                }
                if r.bytes == 0 {
                    return None;
                }
                self.decoder.push(&buf[..r.bytes]);
            }
        }

        fn call(&mut self, kind: request::Kind) -> (Reply, Option<OwnedFd>) {
            let id = self.send(kind);
            loop {
                let (ev, fd) = self.event().expect("connection closed");
                if let Some(event::Kind::Reply(r)) = ev.kind {
                    assert_eq!(r.id, id);
                    return (r, fd);
                }
            }
        }
    }

    #[test]
    fn commands_reach_the_partition_and_are_answered() {
        let r = rig(false);
        let mut c = r.connect();
        for k in [
            request::Kind::Pause(Empty {}),
            request::Kind::Resume(Empty {}),
            request::Kind::Reset(Empty {}),
            request::Kind::PowerButton(Empty {}),
            request::Kind::Stop(Empty {}),
        ] {
            let (reply, fd) = c.call(k);
            assert_eq!(reply.error, "");
            assert!(fd.is_none());
        }
        assert_eq!(r.log(), ["Pause", "Resume", "Reset", "PowerButton", "Stop"]);

        c.call(request::Kind::Pause(Empty {}));
        let (reply, _) = c.call(request::Kind::Query(Empty {}));
        let status = reply.status.unwrap();
        assert!(status.paused);
        assert_eq!(status.pid, std::process::id());
        assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
        assert!(!status.input_ready);

        let shot = r.dir.path().join("shot.png");
        let (reply, _) = c.call(request::Kind::ScreenshotPath(shot.display().to_string()));
        assert_eq!(reply.error, "");
        assert!(shot.exists());
        let (reply, _) = c.call(request::Kind::ScreenshotPath(String::new()));
        assert_eq!(reply.error, "screenshot needs a path");

        let (reply, _) = c.call(request::Kind::Input(Input {
            kind: Some(input::Kind::Key(Key {
                scancode: 0x1c,
                pressed: true,
            })),
        }));
        assert_eq!(reply.error, NO_INPUT_DEVICE);

        // An empty request (or one from a newer client) is answered, not fatal.
        (&c.stream)
            .write_all(&framing::encode(&Request { id: 99, kind: None }))
            .unwrap();
        let (ev, _) = c.event().unwrap();
        match ev.kind {
            Some(event::Kind::Reply(reply)) => {
                assert_eq!(reply.id, 99);
                assert!(!reply.error.is_empty());
            }
            other => panic!("{other:?}"),
        }

        // Several connections at once.
        let mut c2 = r.connect();
        let (reply, _) = c2.call(request::Kind::Resume(Empty {}));
        assert_eq!(reply.error, "");
        let (reply, _) = c.call(request::Kind::Query(Empty {}));
        assert!(!reply.status.unwrap().paused);

        r.host.gone.store(true, Ordering::SeqCst);
        let (reply, _) = c.call(request::Kind::Pause(Empty {}));
        assert_eq!(reply.error, Gone.to_string());
        let (reply, _) = c.call(request::Kind::Query(Empty {}));
        assert!(reply.status.is_none() && !reply.error.is_empty());
        r.vm.drain(Duration::from_secs(1));
        assert_eq!(r.vm.busy.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn framebuffer_reply_carries_a_read_only_memory_fd() {
        let r = rig(true);
        let mut c = r.connect();
        let (reply, fd) = c.call(request::Kind::Framebuffer(Empty {}));
        assert_eq!(reply.error, "");
        let fb = reply.framebuffer.unwrap();
        assert_eq!(
            (
                fb.offset,
                fb.width,
                fb.height,
                fb.stride,
                fb.bytes_per_pixel
            ),
            (2 << 20, 640, 480, 640 * 4, 4)
        );
        let file = File::from(fd.expect("no descriptor with the framebuffer reply"));
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, fb.offset).unwrap();
        assert_eq!(&buf, b"VRAM");
        assert!(
            file.write_all_at(b"x", 0).is_err(),
            "the fd must be read-only"
        );
        // The same file as the worker's, not a copy.
        r.memory
            .as_ref()
            .unwrap()
            .write_all_at(b"NEW!", 2 << 20)
            .unwrap();
        file.read_exact_at(&mut buf, fb.offset).unwrap();
        assert_eq!(&buf, b"NEW!");

        let r = rig(false);
        let mut c = r.connect();
        let (reply, fd) = c.call(request::Kind::Framebuffer(Empty {}));
        assert_eq!(reply.error, "the partition has no framebuffer");
        assert!(reply.framebuffer.is_none() && fd.is_none());
    }

    #[test]
    fn serial_input_reaches_com1() {
        let r = rig(false);
        let mut c = r.connect();
        let data: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        // More than the UART's FIFO holds: the rest is fed as the guest reads.
        let (reply, _) = c.call(request::Kind::SerialInput(data.clone().into()));
        assert_eq!(reply.error, "");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < data.len() && Instant::now() < deadline {
            let mut lsr = [0u8];
            lock(&r.serial).read(5, &mut lsr);
            if lsr[0] & 1 == 1 {
                let mut b = [0u8];
                lock(&r.serial).read(0, &mut b);
                got.push(b[0]);
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(got, data);
    }

    #[test]
    fn serial_input_to_a_guest_that_does_not_read_is_refused_not_blocking() {
        let r = rig(false);
        let mut c = r.connect();
        let mut refused = false;
        for _ in 0..(SERIAL_INPUT_QUEUE + 20) {
            let (reply, _) = c.call(request::Kind::SerialInput(vec![b'x'; 1000].into()));
            if !reply.error.is_empty() {
                assert!(reply.error.contains("backed up"), "{}", reply.error);
                refused = true;
                break;
            }
        }
        assert!(refused);
        // The session still answers.
        let (reply, _) = c.call(request::Kind::Query(Empty {}));
        assert_eq!(reply.error, "");
    }

    #[test]
    fn subscribers_get_serial_output_in_batches() {
        let r = rig(false);
        let mut c = r.connect();
        let mut other = r.connect();
        // Output before subscribing is not sent.
        r.hub.clone().write_all(b"early").unwrap();
        c.call(request::Kind::SubscribeSerial(Empty {}));
        c.call(request::Kind::SubscribeSerial(Empty {}));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        // The UART writes one byte at a time.
        let mut hub = r.hub.clone();
        for b in &data {
            hub.write_all(std::slice::from_ref(b)).unwrap();
        }
        let mut got = Vec::new();
        let mut events = 0;
        while got.len() < data.len() {
            let (ev, _) = c.event().unwrap();
            match ev.kind {
                Some(event::Kind::SerialOutput(b)) => {
                    assert!(b.len() <= SERIAL_CHUNK);
                    got.extend_from_slice(&b);
                    events += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, data);
        assert!(events < 1000, "{events} events for {} bytes", data.len());
        // A connection that did not subscribe gets only its replies.
        let (reply, _) = other.call(request::Kind::Query(Empty {}));
        assert_eq!(reply.error, "");
        // A subscriber that hangs up is removed.
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock(&r.hub.0.subscribers).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(lock(&r.hub.0.subscribers).is_empty());
    }

    #[test]
    fn a_subscriber_that_stops_reading_is_dropped_without_blocking_the_writer() {
        let r = rig(false);
        let mut c = r.connect();
        c.call(request::Kind::SubscribeSerial(Empty {}));
        let mut hub = r.hub.clone();
        let start = Instant::now();
        // Far more than the socket buffer plus the backlog limit.
        for _ in 0..(8 * SERIAL_BACKLOG / 4096) {
            hub.write_all(&[b'x'; 4096]).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(lock(&r.hub.0.subscribers).is_empty());
        // The client sees its connection end after what was already sent.
        while c.event().is_some() {}
        assert!(r.log().is_empty());
    }

    #[test]
    fn garbage_closes_the_connection_and_nothing_else() {
        let r = rig(false);
        for garbage in [
            &[0xff, 0xff, 0xff, 0xff, 0x0f][..],
            &[0xff; 11][..],
            &[3, 0xff, 0xff, 0xff][..],
        ] {
            let mut c = r.connect();
            (&c.stream).write_all(garbage).unwrap();
            assert!(c.event().is_none());
        }
        // A half frame followed by a hang-up is just a closed connection.
        let c = r.connect();
        (&c.stream).write_all(&[5, 1]).unwrap();
        c.stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        (&c.stream).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(r.log().is_empty());
        // Other connections are unaffected.
        let mut c = r.connect();
        let (reply, _) = c.call(request::Kind::Query(Empty {}));
        assert_eq!(reply.error, "");
    }

    /// A dirty page log that reports the pages a test marks, and counts its readings.
    #[derive(Default)]
    struct MarkedPages(Mutex<Vec<u64>>, AtomicUsize);

    impl hypervisor::dirty::PageLog for MarkedPages {
        fn take(&self) -> hypervisor::dirty::PageDirt {
            self.1.fetch_add(1, Ordering::SeqCst);
            let mut bits = vec![0u64; 64];
            for p in std::mem::take(&mut *lock(&self.0)) {
                bits[(p / 64) as usize] |= 1 << (p % 64);
            }
            hypervisor::dirty::PageDirt::Pages(bits)
        }
    }

    #[test]
    fn display_subscribers_get_the_boot_framebuffer_rows_the_log_reports() {
        // Neither synthetic video nor a logged framebuffer: nothing to subscribe to.
        let r = rig(true);
        let (reply, _) = r.connect().call(request::Kind::SubscribeDisplay(Empty {}));
        assert!(
            reply.error.contains("no synthetic video device"),
            "{reply:?}"
        );

        let log = Arc::new(MarkedPages::default());
        let fb = r.memory.clone().map(|file| SharedFramebuffer {
            file,
            offset: 2 << 20,
            format: FbFormat::xrgb(640, 480),
        });
        let vm = Arc::new(
            Vm::new(
                Box::new(r.host.clone()),
                r.serial.clone(),
                r.hub.clone(),
                fb,
            )
            .with_boot_dirty(DirtyRows::new(log.clone(), FbFormat::xrgb(640, 480))),
        );
        let mut c = connect(vm);
        let (reply, _) = c.call(request::Kind::Query(Empty {}));
        let status = reply.status.unwrap();
        assert!(status.boot_dirty_log && !status.synthetic_video);
        // The reply comes first and says what follows, however long it takes.
        r.host.slow_query.store(true, Ordering::SeqCst);
        let id = c.send(request::Kind::SubscribeDisplay(Empty {}));
        match c.event().expect("connection closed").0.kind {
            Some(event::Kind::Reply(reply)) => {
                assert_eq!((reply.id, reply.error.as_str()), (id, ""));
                let status = reply.status.unwrap();
                assert!(status.boot_dirty_log && !status.synthetic_video);
            }
            other => panic!("display updates came before the reply: {other:?}"),
        }
        let mut updates = Vec::new();
        while updates.is_empty() {
            match c.event().expect("connection closed").0.kind {
                Some(event::Kind::Display(u)) => updates.push(u),
                other => panic!("{other:?}"),
            }
        }
        let rect = |y, height| proto::worker::Rect {
            x: 0,
            y,
            width: 640,
            height,
        };
        // First everything, then exactly the rows under the written pages. A row is 2560
        // bytes: page 3 (12288..16384) is rows 4, 5 and 6.
        assert_eq!(updates[0].boot_dirty, vec![rect(0, 480)]);
        assert!(!updates[0].active && updates[0].framebuffer.is_none());
        assert!(updates[0].dirty.is_empty());
        lock(&log.0).extend([3, 100]);
        let next = loop {
            if let Some(event::Kind::Display(u)) = c.event().expect("connection closed").0.kind {
                break u;
            }
        };
        assert_eq!(next.boot_dirty, vec![rect(4, 3), rect(160, 2)]);

        // Nobody wants the rows: the log is no longer read, and nothing is sent.
        let (reply, _) = c.call(request::Kind::WatchBootFramebuffer(false));
        assert_eq!(reply.error, "");
        std::thread::sleep(Duration::from_millis(300));
        let reads = log.1.load(Ordering::SeqCst);
        lock(&log.0).push(7);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(log.1.load(Ordering::SeqCst), reads, "the log is still read");
        c.stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert!(
            (&c.stream).read(&mut byte).is_err(),
            "an update came while nobody wanted one"
        );
        c.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Wanted again: every row first, then the log as before.
        let (reply, _) = c.call(request::Kind::WatchBootFramebuffer(true));
        assert_eq!(reply.error, "");
        let again = loop {
            if let Some(event::Kind::Display(u)) = c.event().expect("connection closed").0.kind {
                break u;
            }
        };
        assert_eq!(again.boot_dirty, vec![rect(0, 480)]);
        lock(&log.0).push(100);
        // Page 7, written while nobody read the log, is still in it (as in KVM's): it comes
        // with page 100 or before it.
        let mut got = Vec::new();
        while !got.contains(&rect(160, 2)) {
            if let Some(event::Kind::Display(u)) = c.event().expect("connection closed").0.kind {
                got.extend(u.boot_dirty);
            }
        }
        assert_eq!(got, vec![rect(11, 2), rect(160, 2)]);
    }
}
