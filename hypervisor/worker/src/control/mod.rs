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
//!
//! Rooms: this file is a session and the requests it answers; [`display`] streams display
//! updates; [`serial`] carries the serial console both ways.

mod display;
mod serial;
#[cfg(test)]
mod tests;

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

use crate::storage::{Storage, StorageError};
use hypervisor::devices::bus::lock;
use hypervisor::devices::serial::SerialDevice;
use hypervisor::dirty::{DirtyReader, DirtyRows};
use hypervisor::framebuffer::FbFormat;
use hypervisor::partition::{Command, Gone, PartitionHandle, PartitionState};
use proto::framing::{self, Decoder};
use proto::worker::{
    Error as WireError, ErrorCode, Event, Framebuffer, Reply, Request, Status, SyntheticVideo,
    display_update, event, request,
};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use vmbus_devices::SynthDevices;
use vmbus_devices::keyboard::KeyEvent;
use vmbus_devices::mouse::PointerEvent;
use vmbus_devices::video::{DisplayCursor, VideoShared};

/// Reply to `input` until the partition has a keyboard and mouse (VMBus).
pub const NO_INPUT_DEVICE: &str = "this VM has no input device yet";

/// Why a request failed, as the client gets it: a code and words for a person. The words
/// never carry a host path or an OS error's text; whoever makes a `Fail` from such an error
/// logs the details (see [`internal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    pub code: ErrorCode,
    pub message: String,
}

impl Fail {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Fail {
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Fail::new(ErrorCode::BadRequest, message)
    }

    fn unsupported(message: impl Into<String>) -> Self {
        Fail::new(ErrorCode::NotSupported, message)
    }

    fn gone() -> Self {
        Fail::new(ErrorCode::Gone, Gone.to_string())
    }
}

/// A host-side failure: its details go to the log, the client gets `what` only.
fn internal(what: &str, e: impl std::fmt::Display) -> Fail {
    tracing::warn!(error = %e, "{what}");
    Fail::new(
        ErrorCode::Internal,
        format!("{what} (the worker's log says why)"),
    )
}

/// The client's words for a disk that cannot be attached or detached.
fn storage_fail(e: StorageError) -> Fail {
    match e {
        StorageError::NoVmbus | StorageError::Virtio => Fail::unsupported(e.to_string()),
        StorageError::Lun(storvsp::LunError::StillBusy(..)) => {
            Fail::new(ErrorCode::NotReady, e.to_string())
        }
        _ => Fail::bad(e.to_string()),
    }
}

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
    /// The disks (None: a VM without any, in tests).
    storage: Option<Arc<Storage>>,
    /// Requests being handled (from decoding to the reply being written).
    busy: AtomicUsize,
    /// The integration services (None without VMBus).
    ics: Option<Arc<crate::ic::IntegrationServices>>,
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
            storage: None,
            busy: AtomicUsize::new(0),
            ics: None,
        }
    }

    /// Shut the guest down through its shutdown service, and report its heartbeat and
    /// what KVP learnt in the status.
    pub fn with_integration_services(mut self, ics: Arc<crate::ic::IntegrationServices>) -> Self {
        self.ics = Some(ics);
        self
    }

    /// Route input to these synthetic devices and serve their display updates.
    pub fn with_synth(mut self, synth: SynthDevices) -> Self {
        self.synth = synth;
        self
    }

    /// Report these disks in the status, and add and remove SCSI disks on them.
    pub fn with_storage(mut self, storage: Arc<Storage>) -> Self {
        self.storage = Some(storage);
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

/// What the integration services know of the guest.
fn guest_report(ics: &crate::ic::IntegrationServices) -> proto::worker::GuestReport {
    let info = ics.kvp.guest_info();
    let os = match (&info.os_name, &info.os_version) {
        (Some(n), Some(v)) if !v.is_empty() => format!("{n} {v}"),
        (Some(n), _) => n.clone(),
        _ => String::new(),
    };
    proto::worker::GuestReport {
        heartbeat: crate::ic::heartbeat_word(&ics.heartbeat).to_string(),
        shutdown_service: ics.shutdown.is_connected(),
        hostname: info.hostname.clone().unwrap_or_default(),
        os,
        addresses: info
            .ipv4
            .iter()
            .map(ToString::to_string)
            .chain(info.ipv6.iter().map(ToString::to_string))
            .collect(),
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

impl Session {
    /// Handle one request and send its reply (none for id 0). Returns false when the
    /// connection is dead.
    fn request(&mut self, req: Request) -> bool {
        self.vm.busy.fetch_add(1, Ordering::SeqCst);
        let (reply, fd) = self.handle(req);
        if reply.id == 0 {
            // Nobody waits for this one (input): a failure is only logged.
            if let Some(e) = &reply.error {
                tracing::debug!(error = %e.message, "a request without reply failed");
            }
            self.vm.busy.fetch_sub(1, Ordering::SeqCst);
            return true;
        }
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
            None => Err(Fail::bad("unknown or empty request")),
            Some(Kind::Pause(_)) => self.command(Command::Pause),
            Some(Kind::Resume(_)) => self.command(Command::Resume),
            Some(Kind::Reset(_)) => self.command(Command::Reset),
            Some(Kind::Stop(_)) => self.command(Command::Stop),
            Some(Kind::PowerButton(_)) => self.shutdown(),
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
            Some(Kind::AttachDisk(a)) => self.attach_disk(a).map(|d| reply.disk = Some(d)),
            Some(Kind::DetachDisk(id)) => self.detach_disk(&id),
        };
        if let Err(e) = result {
            reply.error = Some(WireError::new(e.code, e.message));
            reply.status = None;
            reply.framebuffer = None;
            reply.disk = None;
            fd = None;
        }
        (reply, fd)
    }

    fn command(&self, c: Command) -> Result<(), Fail> {
        self.vm.host.send(c).map_err(|_| Fail::gone())
    }

    /// The guest's shutdown service when it has one (falling back to the ACPI power button
    /// if the guest does not take the request), else the power button.
    fn shutdown(&self) -> Result<(), Fail> {
        match &self.vm.ics {
            Some(ics) => {
                let vm = self.vm.clone();
                let how = crate::ic::request_shutdown(&ics.shutdown, move || {
                    let _ = vm.host.send(Command::PowerButton);
                });
                tracing::info!("shutdown requested through the {how}");
                Ok(())
            }
            None => self.command(Command::PowerButton),
        }
    }

    fn query(&self) -> Result<Status, Fail> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::Query(tx))?;
        let state = rx.recv().map_err(|_| Fail::gone())?;
        Ok(Status {
            paused: state == PartitionState::Paused,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            input_ready: self.vm.synth.keyboard.is_some(),
            synthetic_video: self.vm.synth.video.is_some(),
            boot_dirty_log: self.vm.boot_dirty.is_some(),
            disks: self.vm.storage.as_ref().map(|s| s.io()).unwrap_or_default(),
            guest: self.vm.ics.as_ref().map(|i| guest_report(i)),
        })
    }

    fn storage(&self) -> Result<&Storage, Fail> {
        self.vm
            .storage
            .as_deref()
            .ok_or_else(|| Fail::unsupported("this VM has no disk controllers"))
    }

    fn attach_disk(&self, a: proto::worker::AttachDisk) -> Result<proto::worker::DiskIo, Fail> {
        let storage = self.storage()?;
        if a.path.is_empty() || a.id.is_empty() {
            return Err(Fail::bad("a disk to attach needs a path and an id"));
        }
        let mut spec = hypervisor::config::DiskSpec::new(&a.path);
        spec.read_only = a.read_only;
        spec.bus = hypervisor::config::DiskBus::Scsi;
        spec.controller = u8::try_from(a.controller).unwrap_or(u8::MAX);
        spec.lun = a.lun.map(|l| u8::try_from(l).unwrap_or(u8::MAX));
        spec.id = Some(a.id.clone());
        spec.discard = a.discard;
        spec.check().map_err(Fail::bad)?;
        storage.attach(&spec).map_err(storage_fail)?;
        storage
            .slot(&a.id)
            .ok_or_else(|| internal("the attached disk vanished", &a.id))
    }

    fn detach_disk(&self, id: &str) -> Result<(), Fail> {
        self.storage()?.detach(id).map_err(storage_fail)
    }

    fn input(&self, i: proto::worker::Input) -> Result<(), Fail> {
        use proto::worker::input::Kind;
        let queued = match i.kind {
            Some(Kind::Key(k)) => {
                let Some(q) = &self.vm.synth.keyboard else {
                    return Err(Fail::unsupported(NO_INPUT_DEVICE));
                };
                q.push(KeyEvent {
                    scancode: k.scancode,
                    pressed: k.pressed,
                })
            }
            Some(Kind::Pointer(p)) => {
                let Some(q) = &self.vm.synth.mouse else {
                    return Err(Fail::unsupported(NO_INPUT_DEVICE));
                };
                q.push(PointerEvent {
                    x: p.x,
                    y: p.y,
                    buttons: p.buttons,
                    wheel: p.wheel,
                })
            }
            None => return Err(Fail::bad("empty input")),
        };
        if queued {
            Ok(())
        } else {
            Err(Fail::new(
                ErrorCode::NotReady,
                "input is backed up: the guest is not reading its keyboard or mouse",
            ))
        }
    }

    fn screenshot(&self, path: String) -> Result<(), Fail> {
        if path.is_empty() {
            return Err(Fail::bad("screenshot needs a path"));
        }
        let (tx, rx) = mpsc::channel();
        self.command(Command::Screenshot(PathBuf::from(path), tx))?;
        rx.recv().map_err(|_| Fail::gone())?.map_err(|e| match e {
            hypervisor::framebuffer::FbError::NoFramebuffer => Fail::unsupported(e.to_string()),
            e => internal("cannot write the screenshot", e),
        })
    }

    fn framebuffer(&self) -> Result<(Framebuffer, OwnedFd), Fail> {
        let Some(fb) = &self.vm.framebuffer else {
            return Err(Fail::unsupported(
                hypervisor::framebuffer::FbError::NoFramebuffer.to_string(),
            ));
        };
        // A separate, read-only open of the same memfd: the client can map the VRAM but
        // never write guest memory.
        let file = File::open(format!("/proc/self/fd/{}", fb.file.as_raw_fd()))
            .map_err(|e| internal("cannot share the guest memory file", e))?;
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

use display::Gate;
pub use serial::SerialHub;
use serial::{InputFeeder, Subscriber};
