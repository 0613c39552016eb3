//! A stand-in for `parvis-worker` that runs no guest: it speaks the worker control protocol
//! on `--control`, shares a framebuffer memfd like the real worker, and draws on it at the
//! rate a guest would. It lets the framebuffer benchmark measure the agent's screen pipeline
//! (capture, diff, compress, gRPC, client decode) on a machine whose `/dev/kvm` cannot run a
//! guest, with writer and reader on one clock.
//!
//! The workload is chosen through the VM's serial console, one word per line:
//! `full` (a full-screen change every 1/60 s), `typing` (one 8×16 glyph every 100 ms) and
//! `idle` (nothing). `synthvid` makes it behave like a guest whose synthetic video driver
//! (hyperv_drm) owns the screen: the scanout is announced on `subscribe_display` connections
//! and every drawn frame is followed by a dirty rectangle, as the real worker reports the
//! guest's DIRT messages; `bootfb` goes back to the boot framebuffer, whose written pages
//! are reported as KVM's dirty page log would report them (the real worker's
//! `hypervisor::dirty` fed with the pages this program writes), unless `--no-dirty-log`
//! makes it a worker without the log, whose boot framebuffer the agent polls.
//! Every drawn frame carries a stamp at an 8×16 cell origin: four pixels
//! `[MAGIC, seq, t_lo, t_hi]`, where `t` is CLOCK_MONOTONIC in nanoseconds taken after the
//! rest of the frame was written. Drawn pixels always have 0xFF in their top byte, so they
//! can never be read as the magic.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hypervisor::dirty::{DirtyReader, DirtyRows, PAGE, PageDirt, PageLog};
use hypervisor::framebuffer::FbFormat;
use parvis_tests::fbstamp::{MAGIC, monotonic_ns};
use proto::framing::{self, Decoder};
use proto::worker::{
    DisplayUpdate, Error as WireError, ErrorCode, Event, Framebuffer, Rect, Reply, Request, Status,
    SyntheticVideo, display_update, event, request,
};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// `PARVIS_FAKE_WORKER_FAIL=framebuffer`: answer the framebuffer request with an internal
/// error whose words carry a host path and an OS error (tests that the agent hides them).
fn fail_framebuffer() -> bool {
    std::env::var("PARVIS_FAKE_WORKER_FAIL").is_ok_and(|v| v.split(',').any(|w| w == "framebuffer"))
}

/// When this worker started.
fn started() -> &'static std::time::Instant {
    static T: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T.get_or_init(std::time::Instant::now)
}

const IDLE: u8 = 0;
const FULL: u8 = 1;
const TYPING: u8 = 2;

struct Args {
    control: PathBuf,
    status: Option<PathBuf>,
    width: u32,
    height: u32,
    dirty_log: bool,
    /// SCSI disks given at start: (id, LUN).
    scsi: Vec<(String, u32)>,
}

fn parse_args() -> Result<Args> {
    let mut control = None;
    let mut status = None;
    let (mut width, mut height) = (1024, 768);
    let mut dirty_log = true;
    let mut scsi = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--control" => control = it.next().map(PathBuf::from),
            "--status-file" => status = it.next().map(PathBuf::from),
            "--no-dirty-log" => dirty_log = false,
            // SCSI disks at boot: PATH,…,bus=scsi,…,lun=N,id=ID.
            "--disk" => {
                let spec = it.next().context("--disk needs a value")?;
                let opt = |k: &str| {
                    spec.split(',')
                        .find_map(|o| o.strip_prefix(k).map(str::to_string))
                };
                if spec.contains(",bus=scsi") {
                    let lun = opt("lun=").and_then(|l| l.parse().ok()).unwrap_or(0);
                    scsi.push((opt("id=").unwrap_or_default(), lun));
                }
            }
            "--framebuffer" => {
                let v = it.next().context("--framebuffer needs WxH")?;
                let (w, h) = v.split_once('x').context("--framebuffer needs WxH")?;
                width = w.parse()?;
                height = h.parse()?;
            }
            _ => {}
        }
    }
    Ok(Args {
        control: control.context("--control is required")?,
        status,
        width,
        height,
        dirty_log,
        scsi,
    })
}

struct Shared {
    fb: File,
    width: u32,
    height: u32,
    mode: AtomicU8,
    status: Option<PathBuf>,
    /// Whether the "synthetic video driver" owns the screen.
    synthvid: AtomicBool,
    /// Connections that asked for display updates.
    display: Mutex<Vec<UnixStream>>,
    /// The boot framebuffer's written pages, as KVM would log them (not while the
    /// "synthetic video driver" draws: its mapping of the VRAM is not logged).
    written: Arc<WrittenPages>,
    boot_rows: Option<DirtyRows>,
    /// SCSI disks attached while running: (id, LUN).
    hot_disks: Mutex<Vec<(String, u32)>>,
}

/// Pages written since the last look, one bit each.
struct WrittenPages(Mutex<Vec<u64>>);

impl PageLog for WrittenPages {
    fn take(&self) -> PageDirt {
        let mut bits = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let out = bits.clone();
        bits.iter_mut().for_each(|w| *w = 0);
        PageDirt::Pages(out)
    }
}

impl Shared {
    /// Write guest pixels at `offset`, logging the pages like KVM.
    fn write(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.fb.write_all_at(data, offset)?;
        if !data.is_empty() && !self.synthvid.load(Ordering::Relaxed) {
            let mut bits = self.written.0.lock().unwrap_or_else(|e| e.into_inner());
            let (first, last) = (offset / PAGE, (offset + data.len() as u64 - 1) / PAGE);
            for p in first..=last {
                if let Some(w) = bits.get_mut((p / 64) as usize) {
                    *w |= 1 << (p % 64);
                }
            }
        }
        Ok(())
    }

    fn status(&self) -> Status {
        Status {
            paused: false,
            pid: std::process::id(),
            version: "fake-worker".into(),
            synthetic_video: true,
            boot_dirty_log: self.boot_rows.is_some(),
            // A disk the guest reads at a steady 1 MiB/s in 100 requests per second.
            disks: vec![proto::worker::DiskIo {
                read_bytes: started().elapsed().as_millis() as u64 * 1024,
                read_ops: started().elapsed().as_millis() as u64 / 10,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn geometry(&self) -> Framebuffer {
        Framebuffer {
            offset: 0,
            width: self.width,
            height: self.height,
            stride: self.width * 4,
            bytes_per_pixel: 4,
        }
    }

    /// Send a synthetic video update to every subscriber (dropping those that went away).
    fn display(&self, u: SyntheticVideo) {
        let bytes = framing::encode(&Event {
            kind: Some(event::Kind::Display(DisplayUpdate {
                kind: Some(display_update::Kind::SyntheticVideo(u)),
            })),
        });
        let mut subs = self.display.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|mut c| c.write_all(&bytes).is_ok());
    }

    /// After drawing: the guest driver's dirty rectangle, when it owns the screen.
    fn dirty(&self, x: u32, y: u32, width: u32, height: u32) {
        if self.synthvid.load(Ordering::Relaxed) {
            self.display(SyntheticVideo {
                active: true,
                framebuffer: None,
                dirty: vec![Rect {
                    x,
                    y,
                    width,
                    height,
                }],
            });
        }
    }
}

fn main() -> Result<()> {
    started();
    let args = parse_args()?;
    if args.width == 0 || args.height == 0 || args.width > 8192 || args.height > 8192 {
        bail!("bad framebuffer size");
    }
    let len = u64::from(args.width) * u64::from(args.height) * 4;
    let fd = rustix::fs::memfd_create("fake-vram", rustix::fs::MemfdFlags::CLOEXEC)?;
    let fb = File::from(fd);
    fb.set_len(len)?;
    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control).context("binding the control socket")?;
    let written = Arc::new(WrittenPages(Mutex::new(vec![
        0;
        len.div_ceil(PAGE * 64)
            as usize
    ])));
    let shared = Arc::new(Shared {
        fb,
        width: args.width,
        height: args.height,
        mode: AtomicU8::new(IDLE),
        status: args.status,
        synthvid: AtomicBool::new(false),
        display: Mutex::new(Vec::new()),
        written: written.clone(),
        boot_rows: args
            .dirty_log
            .then(|| DirtyRows::new(written, FbFormat::xrgb(args.width, args.height))),
        hot_disks: Mutex::new(args.scsi.clone()),
    });
    {
        let s = shared.clone();
        std::thread::spawn(move || draw_loop(&s));
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let s = shared.clone();
        std::thread::spawn(move || session(conn, &s));
    }
    Ok(())
}

fn draw_loop(s: &Shared) {
    let w = s.width as usize;
    let h = s.height as usize;
    // A row pattern that shifts every frame: a full-screen change that still compresses a
    // little, like a scrolling page.
    let base: Vec<u32> = (0..w * 2)
        .map(|i| {
            let v = (i as u32).wrapping_mul(2_654_435_761) >> 8;
            0xFF00_0000 | (v & 0x00FF_FFFF)
        })
        .collect();
    let mut frame = vec![0u8; w * h * 4];
    let mut seq: u32 = 0;
    let mut next = Instant::now();
    loop {
        let mode = s.mode.load(Ordering::Relaxed);
        let period = match mode {
            FULL => Duration::from_micros(16_667),
            TYPING => Duration::from_millis(100),
            _ => Duration::from_millis(50),
        };
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
        if mode == IDLE {
            continue;
        }
        seq = seq.wrapping_add(1);
        if mode == FULL {
            let shift = (seq as usize * 7) % w;
            for (y, row) in frame.chunks_exact_mut(w * 4).enumerate() {
                let start = (shift + y) % w;
                for (px, v) in row.chunks_exact_mut(4).zip(&base[start..start + w]) {
                    px.copy_from_slice(&v.to_le_bytes());
                }
            }
            if s.write(&frame[16..], 16).is_err() {
                return;
            }
            let stamp = stamp(seq);
            if s.write(&stamp, 0).is_err() {
                return;
            }
            s.dirty(0, 0, s.width, s.height);
        } else {
            // One glyph per keystroke, in reading order over 8×16 cells.
            let cols = w / 8;
            let rows = h / 16;
            let cell = (seq as usize) % (cols * rows);
            let (cx, cy) = ((cell % cols) * 8, (cell / cols) * 16);
            for gy in 0..16 {
                let mut line = [0u8; 32];
                for gx in 0..8 {
                    let on = (seq as usize)
                        .wrapping_mul(31)
                        .wrapping_add(gx * 7 + gy * 13)
                        % 3;
                    let v: u32 = if on == 0 { 0xFFFF_FFFF } else { 0xFF10_1010 };
                    line[gx * 4..gx * 4 + 4].copy_from_slice(&v.to_le_bytes());
                }
                let off = ((cy + gy) * w + cx) * 4;
                let from = if gy == 0 { 16 } else { 0 };
                if s.write(&line[from..], (off + from) as u64).is_err() {
                    return;
                }
            }
            let off = (cy * w + cx) * 4;
            if s.write(&stamp(seq), off as u64).is_err() {
                return;
            }
            s.dirty(cx as u32, cy as u32, 8, 16);
        }
    }
}

/// Send one display subscriber the boot framebuffer's written rows, like the real worker.
fn boot_dirty_sender(s: &Shared, reader: &DirtyReader, mut conn: UnixStream, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let rows = reader.wait(Duration::from_millis(50));
        if rows.is_empty() || stop.load(Ordering::SeqCst) {
            continue;
        }
        let bytes = framing::encode(&Event {
            kind: Some(event::Kind::Display(proto::worker_msg::boot_rows(
                rows.iter().map(|r| (r.y, r.height)),
                s.width,
            ))),
        });
        // Under the subscribers' lock: one writer per connection at a time.
        let _subs = s.display.lock().unwrap_or_else(|e| e.into_inner());
        if conn.write_all(&bytes).is_err() {
            return;
        }
    }
}

fn stamp(seq: u32) -> [u8; 16] {
    let t = monotonic_ns();
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&t.to_le_bytes());
    b
}

fn send(conn: &UnixStream, ev: &Event, fd: Option<&OwnedFd>) -> std::io::Result<()> {
    let bytes = framing::encode(ev);
    let mut sent = 0;
    if let Some(fd) = fd {
        let fds = [fd.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(std::io::Error::other("no room for SCM_RIGHTS"));
        }
        sent = rustix::net::sendmsg(
            conn,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
    }
    let mut w = conn;
    w.write_all(&bytes[sent..])
}

fn session(conn: UnixStream, s: &Arc<Shared>) {
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 16 << 10];
    // Stop flag of this connection's boot framebuffer row sender, while it runs.
    let mut boot_rows: Option<Arc<AtomicBool>> = None;
    let mut line = Vec::new();
    loop {
        let n = match (&conn).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        while let Ok(Some(req)) = decoder.next_message::<Request>() {
            let mut reply = Reply {
                id: req.id,
                ..Default::default()
            };
            let mut fd = None;
            let mut exit = false;
            let mut subscribe = false;
            let mut watch = None;
            match req.kind {
                Some(request::Kind::Query(_)) => reply.status = Some(s.status()),
                Some(request::Kind::Framebuffer(_)) if fail_framebuffer() => {
                    // A worker failing on purpose, with words a real worker never sends: the
                    // agent must not pass them on.
                    reply.error = Some(WireError::new(
                        ErrorCode::Internal,
                        "cannot share /var/lib/parvis/vms/x/guest-memory: Permission denied \
                         (os error 13)",
                    ));
                }
                Some(request::Kind::Framebuffer(_)) => {
                    // The agent gets a read-only file, like from the real worker.
                    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&s.fb));
                    match std::fs::File::open(path) {
                        Ok(f) => {
                            fd = Some(OwnedFd::from(f));
                            reply.framebuffer = Some(s.geometry());
                        }
                        Err(e) => {
                            reply.error = Some(WireError::new(ErrorCode::Internal, e.to_string()))
                        }
                    }
                }
                Some(request::Kind::SerialInput(bytes)) => {
                    for b in bytes {
                        if b == b'\n' || b == b'\r' {
                            let word = String::from_utf8_lossy(&line).trim().to_string();
                            line.clear();
                            let m = match word.as_str() {
                                "full" => FULL,
                                "typing" => TYPING,
                                "idle" => IDLE,
                                "synthvid" => {
                                    s.synthvid.store(true, Ordering::Relaxed);
                                    s.display(SyntheticVideo {
                                        active: true,
                                        framebuffer: Some(s.geometry()),
                                        ..Default::default()
                                    });
                                    continue;
                                }
                                "bootfb" => {
                                    s.synthvid.store(false, Ordering::Relaxed);
                                    s.display(SyntheticVideo {
                                        active: false,
                                        ..Default::default()
                                    });
                                    continue;
                                }
                                _ => continue,
                            };
                            s.mode.store(m, Ordering::Relaxed);
                        } else if line.len() < 64 {
                            line.push(b);
                        }
                    }
                }
                Some(request::Kind::SubscribeDisplay(_)) => {
                    subscribe = true;
                    reply.status = Some(s.status());
                }
                Some(request::Kind::Stop(_)) | Some(request::Kind::PowerButton(_)) => exit = true,
                Some(request::Kind::Input(_)) => {
                    reply.error = Some(WireError::new(
                        ErrorCode::NotSupported,
                        "this VM has no input device yet",
                    ));
                }
                Some(request::Kind::WatchBootFramebuffer(on)) => watch = Some(on),
                // Like the real worker: the image must open, ids and LUNs are unique, the
                // lowest free LUN is taken when none is given.
                Some(request::Kind::AttachDisk(a)) => {
                    let mut disks = s.hot_disks.lock().unwrap_or_else(|e| e.into_inner());
                    let lun = a.lun.unwrap_or_else(|| {
                        (0..64)
                            .find(|l| disks.iter().all(|d| d.1 != *l))
                            .unwrap_or(64)
                    });
                    if !std::path::Path::new(&a.path).is_file() {
                        reply.error = Some(WireError::new(
                            ErrorCode::BadRequest,
                            "the disk image cannot be opened (the worker's log says why)",
                        ));
                    } else if disks.iter().any(|d| d.0 == a.id || d.1 == lun) || lun > 63 {
                        reply.error = Some(WireError::new(ErrorCode::BadRequest, "LUN taken"));
                    } else {
                        disks.push((a.id.clone(), lun));
                        reply.disk = Some(proto::worker::DiskIo {
                            id: a.id,
                            bus: proto::worker::DiskBus::Scsi as i32,
                            controller: a.controller,
                            lun,
                            ..Default::default()
                        });
                    }
                }
                Some(request::Kind::DetachDisk(id)) => {
                    let mut disks = s.hot_disks.lock().unwrap_or_else(|e| e.into_inner());
                    match disks.iter().position(|d| d.0 == id) {
                        Some(i) => {
                            disks.remove(i);
                        }
                        None => {
                            reply.error = Some(WireError::new(
                                ErrorCode::BadRequest,
                                format!("no SCSI disk with id '{id}' is attached"),
                            ))
                        }
                    }
                }
                Some(_) => {}
                None => reply.error = Some(WireError::new(ErrorCode::BadRequest, "empty request")),
            }
            let ev = Event {
                kind: Some(event::Kind::Reply(reply)),
            };
            if send(&conn, &ev, fd.as_ref()).is_err() {
                return;
            }
            if subscribe {
                // This connection now carries display updates only.
                if let Ok(c) = conn.try_clone() {
                    s.display.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                }
                watch = Some(true);
            }
            match watch {
                Some(false) => {
                    if let Some(stop) = boot_rows.take() {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                Some(true) if boot_rows.is_none() => {
                    if let (Some(rows), Ok(c)) = (&s.boot_rows, conn.try_clone()) {
                        match rows.subscribe() {
                            Ok(reader) => {
                                let s = s.clone();
                                let stop = Arc::new(AtomicBool::new(false));
                                let flag = stop.clone();
                                std::thread::spawn(move || {
                                    boot_dirty_sender(&s, &reader, c, &flag)
                                });
                                boot_rows = Some(stop);
                            }
                            Err(e) => eprintln!("fake-worker: no dirty log reader: {e}"),
                        }
                    }
                }
                _ => {}
            }
            if exit {
                if let Some(p) = &s.status {
                    let _ = std::fs::write(p, "{\"code\":0,\"reason\":\"\"}\n");
                }
                std::process::exit(0);
            }
        }
    }
}
