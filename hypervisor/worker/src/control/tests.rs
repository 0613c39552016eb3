use super::serial::{SERIAL_BACKLOG, SERIAL_CHUNK, SERIAL_INPUT_QUEUE};
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
                // As the partition reports it: the path and the OS error inside.
                let r = std::fs::write(&path, b"png").map_err(|e| {
                    hypervisor::framebuffer::FbError::Png {
                        path: path.display().to_string(),
                        source: image::ImageError::IoError(e),
                    }
                });
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
        self.send_id(id, kind);
        id
    }

    fn send_id(&mut self, id: u64, kind: request::Kind) {
        let req = Request {
            id,
            kind: Some(kind),
        };
        (&self.stream).write_all(&framing::encode(&req)).unwrap();
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

/// A reply's error words ("" for success).
fn err(reply: &Reply) -> &str {
    reply.error.as_ref().map_or("", |e| e.message.as_str())
}

fn code(reply: &Reply) -> ErrorCode {
    reply
        .error
        .as_ref()
        .map_or(ErrorCode::Unspecified, |e| e.code())
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
        assert_eq!(err(&reply), "");
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
    assert_eq!(err(&reply), "");
    assert!(shot.exists());
    let (reply, _) = c.call(request::Kind::ScreenshotPath(String::new()));
    assert_eq!(err(&reply), "screenshot needs a path");
    assert_eq!(code(&reply), ErrorCode::BadRequest);
    // A host-side failure reaches the client as a code and plain words: no path, no OS
    // error text.
    let missing = r.dir.path().join("no/such/dir/shot.png");
    let (reply, _) = c.call(request::Kind::ScreenshotPath(missing.display().to_string()));
    assert_eq!(code(&reply), ErrorCode::Internal);
    assert!(!err(&reply).contains("no/such"), "{}", err(&reply));
    assert!(!err(&reply).contains("os error"), "{}", err(&reply));
    assert!(err(&reply).contains("worker's log"), "{}", err(&reply));

    let (reply, _) = c.call(request::Kind::Input(Input {
        kind: Some(input::Kind::Key(Key {
            scancode: 0x1c,
            pressed: true,
        })),
    }));
    assert_eq!(err(&reply), NO_INPUT_DEVICE);
    assert_eq!(code(&reply), ErrorCode::NotSupported);
    // Input with id 0 gets no reply: the next event answers the next request.
    c.send_id(
        0,
        request::Kind::Input(Input {
            kind: Some(input::Kind::Key(Key {
                scancode: 0x1c,
                pressed: false,
            })),
        }),
    );

    // An empty request (or one from a newer client) is answered, not fatal.
    (&c.stream)
        .write_all(&framing::encode(&Request { id: 99, kind: None }))
        .unwrap();
    let (ev, _) = c.event().unwrap();
    match ev.kind {
        Some(event::Kind::Reply(reply)) => {
            assert_eq!(reply.id, 99);
            assert!(!err(&reply).is_empty());
        }
        other => panic!("{other:?}"),
    }

    // Several connections at once.
    let mut c2 = r.connect();
    let (reply, _) = c2.call(request::Kind::Resume(Empty {}));
    assert_eq!(err(&reply), "");
    let (reply, _) = c.call(request::Kind::Query(Empty {}));
    assert!(!reply.status.unwrap().paused);

    r.host.gone.store(true, Ordering::SeqCst);
    let (reply, _) = c.call(request::Kind::Pause(Empty {}));
    assert_eq!(err(&reply), Gone.to_string());
    assert_eq!(code(&reply), ErrorCode::Gone);
    let (reply, _) = c.call(request::Kind::Query(Empty {}));
    assert!(reply.status.is_none() && !err(&reply).is_empty());
    r.vm.drain(Duration::from_secs(1));
    assert_eq!(r.vm.busy.load(Ordering::SeqCst), 0);
}

#[test]
fn framebuffer_reply_carries_a_read_only_memory_fd() {
    let r = rig(true);
    let mut c = r.connect();
    let (reply, fd) = c.call(request::Kind::Framebuffer(Empty {}));
    assert_eq!(err(&reply), "");
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
    assert_eq!(err(&reply), "the partition has no framebuffer");
    assert!(reply.framebuffer.is_none() && fd.is_none());
}

#[test]
fn serial_input_reaches_com1() {
    let r = rig(false);
    let mut c = r.connect();
    let data: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
    // More than the UART's FIFO holds: the rest is fed as the guest reads.
    let (reply, _) = c.call(request::Kind::SerialInput(data.clone().into()));
    assert_eq!(err(&reply), "");
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
        if !err(&reply).is_empty() {
            assert!(err(&reply).contains("backed up"), "{}", err(&reply));
            refused = true;
            break;
        }
    }
    assert!(refused);
    // The session still answers.
    let (reply, _) = c.call(request::Kind::Query(Empty {}));
    assert_eq!(err(&reply), "");
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
    assert_eq!(err(&reply), "");
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
    assert_eq!(err(&reply), "");
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
        err(&reply).contains("no synthetic video device"),
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
            assert_eq!((reply.id, err(&reply)), (id, ""));
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
    // A rows update carries nothing else: it is the other kind of the oneof.
    let rows = |u: &proto::worker::DisplayUpdate| match &u.kind {
        Some(display_update::Kind::BootRows(b)) => b.rows.clone(),
        other => panic!("not a rows update: {other:?}"),
    };
    assert_eq!(rows(&updates[0]), vec![rect(0, 480)]);
    lock(&log.0).extend([3, 100]);
    let next = loop {
        if let Some(event::Kind::Display(u)) = c.event().expect("connection closed").0.kind {
            break u;
        }
    };
    assert_eq!(rows(&next), vec![rect(4, 3), rect(160, 2)]);

    // Nobody wants the rows: the log is no longer read, and nothing is sent.
    let (reply, _) = c.call(request::Kind::WatchBootFramebuffer(false));
    assert_eq!(err(&reply), "");
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
    assert_eq!(err(&reply), "");
    let again = loop {
        if let Some(event::Kind::Display(u)) = c.event().expect("connection closed").0.kind {
            break u;
        }
    };
    assert_eq!(rows(&again), vec![rect(0, 480)]);
    lock(&log.0).push(100);
    // Page 7, written while nobody read the log, is still in it (as in KVM's): it comes
    // with page 100 or before it.
    let mut got = Vec::new();
    while !got.contains(&rect(160, 2)) {
        if let Some(event::Kind::Display(u)) = c.event().expect("connection closed").0.kind {
            got.extend(rows(&u));
        }
    }
    assert_eq!(got, vec![rect(11, 2), rect(160, 2)]);
}
