//! `parvis-worker ctl SOCK cmd...`: a small client of the control socket for people and
//! scripts. Each command word becomes one `Request`; each reply prints as one line: `ok`,
//! `ok running` / `ok paused` (for `state`), or `error: ...`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use proto::framing::{self, Decoder};
use proto::worker::{
    Empty, Event, Input, Key, Pointer, Reply, Request, display_update, event, input, request,
};

/// The request for one command word, or the line to print if there is none.
pub fn request_for(command: &str) -> Result<request::Kind, String> {
    let line = command.trim();
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    let arg = arg.trim();
    Ok(match cmd {
        "pause" => request::Kind::Pause(Empty {}),
        "resume" => request::Kind::Resume(Empty {}),
        "reset" => request::Kind::Reset(Empty {}),
        "stop" => request::Kind::Stop(Empty {}),
        "power-button" => request::Kind::PowerButton(Empty {}),
        "state" => request::Kind::Query(Empty {}),
        "screenshot" if !arg.is_empty() => request::Kind::ScreenshotPath(arg.to_string()),
        "key" => {
            key(arg).ok_or_else(|| format!("error: usage: key SCANCODE down|up, not '{line}'"))?
        }
        "pointer" => pointer(arg)
            .ok_or_else(|| format!("error: usage: pointer X Y [BUTTONS [WHEEL]], not '{line}'"))?,
        "attach-disk" => attach_disk(arg).ok_or_else(|| {
            format!("error: usage: attach-disk PATH ID [ro] [lun=N] [controller=N] [discard], not '{line}'")
        })?,
        "detach-disk" if !arg.is_empty() => request::Kind::DetachDisk(arg.to_string()),
        _ => return Err(format!("error: unknown command '{line}'")),
    })
}

fn number(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `key 0x1e down`: a set-1 scan code (0xE0xx for extended keys) pressed or released.
fn key(arg: &str) -> Option<request::Kind> {
    let mut w = arg.split_whitespace();
    let scancode = number(w.next()?)?;
    let pressed = match w.next()? {
        "down" => true,
        "up" => false,
        _ => return None,
    };
    w.next().is_none().then_some(request::Kind::Input(Input {
        kind: Some(input::Kind::Key(Key { scancode, pressed })),
    }))
}

/// `pointer X Y [BUTTONS [WHEEL]]`: absolute position 0..=32767.
fn pointer(arg: &str) -> Option<request::Kind> {
    let w: Vec<&str> = arg.split_whitespace().collect();
    if !(2..=4).contains(&w.len()) {
        return None;
    }
    let x = number(w[0])?;
    let y = number(w[1])?;
    let buttons = w.get(2).map_or(Some(0), |b| number(b))?;
    let wheel = w.get(3).map_or(Some(0), |b| b.parse::<i32>().ok())?;
    Some(request::Kind::Input(Input {
        kind: Some(input::Kind::Pointer(Pointer {
            x,
            y,
            buttons,
            wheel,
        })),
    }))
}

/// The line printed for the reply to `kind`.
/// A reply's error words, if it failed.
/// `PATH ID [ro] [lun=N] [controller=N] [discard]`.
fn attach_disk(arg: &str) -> Option<request::Kind> {
    let mut words = arg.split_whitespace();
    let mut a = proto::worker::AttachDisk {
        path: words.next()?.to_string(),
        id: words.next()?.to_string(),
        ..Default::default()
    };
    for w in words {
        match w.split_once('=') {
            None if w == "ro" => a.read_only = true,
            None if w == "discard" => a.discard = true,
            Some(("lun", v)) => a.lun = Some(v.parse().ok()?),
            Some(("controller", v)) => a.controller = v.parse().ok()?,
            _ => return None,
        }
    }
    Some(request::Kind::AttachDisk(a))
}

fn failure(reply: &Reply) -> Option<&str> {
    reply.error.as_ref().map(|e| e.message.as_str())
}

pub fn format_reply(kind: &request::Kind, reply: &Reply) -> String {
    if let Some(e) = failure(reply) {
        return format!("error: {e}");
    }
    match kind {
        request::Kind::Query(_) => match &reply.status {
            Some(s) => {
                let mut out = if s.paused { "ok paused" } else { "ok running" }.to_string();
                if let Some(g) = &s.guest {
                    out.push_str(&format!(
                        " heartbeat={} shutdown-service={}",
                        if g.heartbeat.is_empty() {
                            "none"
                        } else {
                            &g.heartbeat
                        },
                        if g.shutdown_service { "yes" } else { "no" }
                    ));
                    if !g.hostname.is_empty() {
                        out.push_str(&format!(" hostname={}", g.hostname));
                    }
                    if !g.addresses.is_empty() {
                        out.push_str(&format!(" addresses={}", g.addresses.join(",")));
                    }
                }
                out
            }
            None => "error: the worker sent no status".into(),
        },
        request::Kind::AttachDisk(_) => match &reply.disk {
            Some(d) => format!("ok controller={} lun={}", d.controller, d.lun),
            None => "error: the worker did not say where the disk went".into(),
        },
        _ => "ok".into(),
    }
}

/// `watch-display DIR SECONDS`: subscribe to the display updates for SECONDS and record
/// them in DIR: `updates.txt` gets one line per event (`<unix time> mode W H STRIDE` or
/// `<unix time> rect X Y W H`, or `inactive`; and `<unix time> boot-rows Y H` for rows of
/// the boot framebuffer that KVM's dirty page log reported written), and
/// `rects.bin` the pixels of every dirty rectangle as read from the guest memory file right
/// after the notification (rows of W*4 bytes, in the order of the `rect` lines). Ends early,
/// successfully, when the worker exits.
pub fn watch_display(socket: &Path, dir: &Path, seconds: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut lines = std::fs::File::create(dir.join("updates.txt"))?;
    let mut pixels = std::io::BufWriter::new(std::fs::File::create(dir.join("rects.bin"))?);
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut client = Client {
        conn,
        decoder: Decoder::default(),
    };
    let (fb, file) = client.framebuffer_fd(1)?;
    let file = std::fs::File::from(file);
    let reply = client.call(2, request::Kind::SubscribeDisplay(Empty {}))?;
    if let Some(e) = failure(&reply) {
        anyhow::bail!("subscribe_display: {e}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    client
        .conn
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    let mut geometry: Option<proto::worker::Framebuffer> = None;
    let _ = fb;
    let mut closed = false;
    while std::time::Instant::now() < deadline && !closed {
        let Some(ev) = client.next_event(&mut closed)? else {
            continue;
        };
        let Some(event::Kind::Display(update)) = ev.kind else {
            continue;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let u = match update.kind {
            Some(display_update::Kind::BootRows(b)) => {
                // The boot framebuffer's written rows.
                for r in &b.rows {
                    writeln!(lines, "{now:.6} boot-rows {} {}", r.y, r.height)?;
                }
                continue;
            }
            Some(display_update::Kind::SyntheticVideo(u)) => u,
            None => continue,
        };
        if !u.active {
            writeln!(lines, "{now:.6} inactive")?;
        }
        if let Some(g) = u.framebuffer {
            writeln!(lines, "{now:.6} mode {} {} {}", g.width, g.height, g.stride)?;
            geometry = Some(g);
        }
        let Some(g) = &geometry else { continue };
        for r in &u.dirty {
            if r.x.saturating_add(r.width) > g.width || r.y.saturating_add(r.height) > g.height {
                anyhow::bail!("rectangle {r:?} outside {}x{}", g.width, g.height);
            }
            writeln!(
                lines,
                "{now:.6} rect {} {} {} {}",
                r.x, r.y, r.width, r.height
            )?;
            let mut row = vec![0u8; r.width as usize * 4];
            for y in r.y..r.y + r.height {
                let off = g.offset + u64::from(y) * u64::from(g.stride) + u64::from(r.x) * 4;
                file.read_exact_at(&mut row, off)?;
                pixels.write_all(&row)?;
            }
        }
        lines.flush()?;
        pixels.flush()?;
    }
    Ok(())
}

/// `bench-echo COUNT OUT`: latency benchmark against a guest running `parvis-drm echo`. For
/// each of COUNT key presses (A), time from sending it to (1) the guest's `PARVIS-KEY=30`
/// line on the serial console and (2) the display update for the square the guest draws.
/// Writes `<i> <key_us> <draw_us>` lines to OUT.
pub fn bench_echo(socket: &Path, count: u32, out: &Path) -> Result<()> {
    use std::time::{Duration, Instant};
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut client = Client {
        conn,
        decoder: Decoder::default(),
    };
    let r = client.call(1, request::Kind::SubscribeSerial(Empty {}))?;
    if let Some(e) = failure(&r) {
        anyhow::bail!("subscribe_serial: {e}");
    }
    let r = client.call(2, request::Kind::SubscribeDisplay(Empty {}))?;
    if let Some(e) = failure(&r) {
        anyhow::bail!("subscribe_display: {e}");
    }
    client
        .conn
        .set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut lines = std::fs::File::create(out)?;
    let mut serial = String::new();
    let mut seen_keys = 0usize;
    let mut closed = false;
    // Let the initial display updates (mode, full frame) pass.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle && !closed {
        let _ = client.next_event(&mut closed)?;
    }
    for i in 0..count {
        let key = |pressed| {
            request::Kind::Input(Input {
                kind: Some(input::Kind::Key(Key {
                    scancode: 0x1e,
                    pressed,
                })),
            })
        };
        let t0 = Instant::now();
        let req = Request {
            id: 100 + u64::from(i) * 2,
            kind: Some(key(true)),
        };
        (&client.conn).write_all(&framing::encode(&req))?;
        let (mut t_key, mut t_draw) = (None, None);
        let deadline = t0 + Duration::from_secs(10);
        while (t_key.is_none() || t_draw.is_none()) && Instant::now() < deadline && !closed {
            let Some(ev) = client.next_event(&mut closed)? else {
                continue;
            };
            match ev.kind {
                Some(event::Kind::SerialOutput(b)) => {
                    serial.push_str(&String::from_utf8_lossy(&b));
                    let n = serial.matches("PARVIS-KEY=30").count();
                    if n > seen_keys {
                        seen_keys = n;
                        t_key.get_or_insert_with(|| t0.elapsed());
                    }
                }
                Some(event::Kind::Display(proto::worker::DisplayUpdate {
                    kind: Some(display_update::Kind::SyntheticVideo(u)),
                })) if u.dirty.iter().any(|r| r.width == 32 && r.height == 32) => {
                    t_draw.get_or_insert_with(|| t0.elapsed());
                }
                _ => {}
            }
        }
        let us = |d: Option<Duration>| d.map_or(-1, |d| d.as_micros() as i64);
        writeln!(lines, "{i} {} {}", us(t_key), us(t_draw))?;
        let req = Request {
            id: 101 + u64::from(i) * 2,
            kind: Some(key(false)),
        };
        (&client.conn).write_all(&framing::encode(&req))?;
        std::thread::sleep(Duration::from_millis(30));
    }
    Ok(())
}

/// Send `commands` in order and print each reply. Returns whether every command succeeded.
pub fn run(socket: &Path, commands: &[String]) -> Result<bool> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut client = Client {
        conn,
        decoder: Decoder::default(),
    };
    let mut all_ok = true;
    for (id, c) in (1u64..).zip(commands) {
        if let Some(arg) = c.trim().strip_prefix("bench-echo ") {
            let mut w = arg.split_whitespace();
            let line = match (w.next().and_then(|s| s.parse().ok()), w.next()) {
                (Some(n), Some(out)) => match bench_echo(socket, n, Path::new(out)) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("error: {e:#}"),
                },
                _ => "error: usage: bench-echo COUNT OUT".to_string(),
            };
            all_ok &= line.starts_with("ok");
            println!("{line}");
            continue;
        }
        if let Some(arg) = c.trim().strip_prefix("watch-display ") {
            let mut w = arg.split_whitespace();
            let line = match (w.next(), w.next().and_then(|s| s.parse().ok())) {
                (Some(dir), Some(secs)) => match watch_display(socket, Path::new(dir), secs) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("error: {e:#}"),
                },
                _ => "error: usage: watch-display DIR SECONDS".to_string(),
            };
            all_ok &= line.starts_with("ok");
            println!("{line}");
            continue;
        }
        let line = match request_for(c) {
            Ok(kind) => {
                let reply = client.call(id, kind.clone())?;
                format_reply(&kind, &reply)
            }
            Err(line) => line,
        };
        all_ok &= line.starts_with("ok");
        println!("{line}");
    }
    Ok(all_ok)
}

struct Client {
    conn: UnixStream,
    decoder: Decoder,
}

impl Client {
    /// Ask for the guest memory file: the reply's geometry and the passed descriptor.
    fn framebuffer_fd(
        &mut self,
        id: u64,
    ) -> Result<(proto::worker::Framebuffer, std::os::fd::OwnedFd)> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
        let req = Request {
            id,
            kind: Some(request::Kind::Framebuffer(Empty {})),
        };
        (&self.conn).write_all(&framing::encode(&req))?;
        let mut fd = None;
        let mut buf = vec![0u8; 4096];
        loop {
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut anc = RecvAncillaryBuffer::new(&mut space);
            let n = recvmsg(
                &self.conn,
                &mut [std::io::IoSliceMut::new(&mut buf)],
                &mut anc,
                RecvFlags::CMSG_CLOEXEC,
            )?
            .bytes;
            for msg in anc.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = msg {
                    for f in fds {
                        fd.get_or_insert(f);
                    }
                }
            }
            if n == 0 {
                anyhow::bail!("the worker closed the control socket");
            }
            self.decoder.push(&buf[..n]);
            while let Some(ev) = self.decoder.next_message::<Event>()? {
                if let Some(event::Kind::Reply(r)) = ev.kind
                    && r.id == id
                {
                    if let Some(e) = failure(&r) {
                        anyhow::bail!("framebuffer: {e}");
                    }
                    let fb = r
                        .framebuffer
                        .context("framebuffer reply without geometry")?;
                    return Ok((fb, fd.context("framebuffer reply without a file")?));
                }
            }
        }
    }

    /// The next event; None after a read timeout or when the worker went away (`closed`).
    fn next_event(&mut self, closed: &mut bool) -> Result<Option<Event>> {
        if let Some(ev) = self.decoder.next_message::<Event>()? {
            return Ok(Some(ev));
        }
        let mut buf = [0u8; 16384];
        match (&self.conn).read(&mut buf) {
            Ok(0) => {
                *closed = true;
                Ok(None)
            }
            Ok(n) => {
                self.decoder.push(&buf[..n]);
                Ok(self.decoder.next_message::<Event>()?)
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                *closed = true;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Send one request and wait for its reply (skipping serial output).
    fn call(&mut self, id: u64, kind: request::Kind) -> Result<Reply> {
        let req = Request {
            id,
            kind: Some(kind),
        };
        (&self.conn)
            .write_all(&framing::encode(&req))
            .context("cannot send to the worker")?;
        let mut buf = [0u8; 4096];
        loop {
            while let Some(ev) = self
                .decoder
                .next_message::<Event>()
                .context("bad message from the worker")?
            {
                if let Some(event::Kind::Reply(r)) = ev.kind
                    && r.id == id
                {
                    return Ok(r);
                }
            }
            let n = (&self.conn)
                .read(&mut buf)
                .context("cannot read the worker's reply")?;
            if n == 0 {
                anyhow::bail!("the worker closed the control socket");
            }
            self.decoder.push(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::worker::Status;

    #[test]
    fn words_map_to_requests() {
        use request::Kind;
        assert_eq!(request_for("pause"), Ok(Kind::Pause(Empty {})));
        assert_eq!(request_for("resume"), Ok(Kind::Resume(Empty {})));
        assert_eq!(request_for("reset"), Ok(Kind::Reset(Empty {})));
        assert_eq!(request_for(" stop "), Ok(Kind::Stop(Empty {})));
        assert_eq!(request_for("power-button"), Ok(Kind::PowerButton(Empty {})));
        assert_eq!(request_for("state"), Ok(Kind::Query(Empty {})));
        assert_eq!(
            request_for("key 0xe048 up"),
            Ok(Kind::Input(Input {
                kind: Some(input::Kind::Key(Key {
                    scancode: 0xe048,
                    pressed: false
                }))
            }))
        );
        assert_eq!(
            request_for("pointer 100 200 1 -2"),
            Ok(Kind::Input(Input {
                kind: Some(input::Kind::Pointer(Pointer {
                    x: 100,
                    y: 200,
                    buttons: 1,
                    wheel: -2
                }))
            }))
        );
        assert!(request_for("key 30").is_err());
        assert!(request_for("pointer 1").is_err());
        assert_eq!(
            request_for("screenshot /tmp/a b.png"),
            Ok(Kind::ScreenshotPath("/tmp/a b.png".into()))
        );
        assert_eq!(
            request_for("screenshot"),
            Err("error: unknown command 'screenshot'".into())
        );
        assert_eq!(
            request_for("frobnicate now"),
            Err("error: unknown command 'frobnicate now'".into())
        );
        assert_eq!(
            request_for("attach-disk /d/x.vhdx disk-1 ro lun=3 discard"),
            Ok(Kind::AttachDisk(proto::worker::AttachDisk {
                path: "/d/x.vhdx".into(),
                id: "disk-1".into(),
                read_only: true,
                lun: Some(3),
                discard: true,
                controller: 0,
            }))
        );
        assert!(request_for("attach-disk /d/x.vhdx").is_err());
        assert!(request_for("attach-disk /d/x.vhdx a lun=x").is_err());
        assert_eq!(
            request_for("detach-disk disk-1"),
            Ok(Kind::DetachDisk("disk-1".into()))
        );
        let placed = Reply {
            disk: Some(proto::worker::DiskIo {
                controller: 0,
                lun: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            format_reply(&request_for("attach-disk /a b").unwrap(), &placed),
            "ok controller=0 lun=3"
        );
    }

    #[test]
    fn replies_print_like_the_old_protocol() {
        let ok = Reply::default();
        let paused = Reply {
            status: Some(Status {
                paused: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let running = Reply {
            status: Some(Status::default()),
            ..Default::default()
        };
        let failed = Reply {
            error: Some(proto::worker::Error::new(
                proto::worker::ErrorCode::Gone,
                "the partition is no longer running",
            )),
            ..Default::default()
        };
        let query = request::Kind::Query(Empty {});
        let pause = request::Kind::Pause(Empty {});
        assert_eq!(format_reply(&pause, &ok), "ok");
        assert_eq!(format_reply(&query, &paused), "ok paused");
        assert_eq!(format_reply(&query, &running), "ok running");
        assert_eq!(
            format_reply(&query, &ok),
            "error: the worker sent no status"
        );
        assert_eq!(
            format_reply(&pause, &failed),
            "error: the partition is no longer running"
        );
    }

    #[test]
    fn talks_to_a_worker_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut d = Decoder::default();
            let mut buf = [0u8; 256];
            let mut seen = Vec::new();
            loop {
                let n = (&conn).read(&mut buf).unwrap();
                if n == 0 {
                    return seen;
                }
                d.push(&buf[..n]);
                while let Some(req) = d.next_message::<Request>().unwrap() {
                    // Serial output in between must be skipped.
                    let noise = Event {
                        kind: Some(event::Kind::SerialOutput(b"noise".to_vec().into())),
                    };
                    (&conn).write_all(&framing::encode(&noise)).unwrap();
                    let mut reply = Reply {
                        id: req.id,
                        ..Default::default()
                    };
                    match req.kind.as_ref().unwrap() {
                        request::Kind::Query(_) => reply.status = Some(Default::default()),
                        request::Kind::Reset(_) => {
                            reply.error = Some(proto::worker::Error::new(
                                proto::worker::ErrorCode::NotReady,
                                "nope",
                            ))
                        }
                        _ => {}
                    }
                    seen.push(req);
                    let ev = Event {
                        kind: Some(event::Kind::Reply(reply)),
                    };
                    (&conn).write_all(&framing::encode(&ev)).unwrap();
                }
            }
        });
        let cmds = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(run(&path, &cmds(&["pause", "state", "screenshot x.png"])).unwrap());
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2, 3]);

        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("2")).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let n = (&conn).read(&mut buf).unwrap();
            let req = {
                let mut d = Decoder::default();
                d.push(&buf[..n]);
                d.next_message::<Request>().unwrap().unwrap()
            };
            let ev = Event {
                kind: Some(event::Kind::Reply(Reply {
                    id: req.id,
                    error: Some(proto::worker::Error::new(
                        proto::worker::ErrorCode::NotReady,
                        "nope",
                    )),
                    ..Default::default()
                })),
            };
            (&conn).write_all(&framing::encode(&ev)).unwrap();
        });
        // An unknown word fails without being sent; a failed command makes the result false.
        assert!(!run(&dir.path().join("2"), &cmds(&["bogus", "reset"])).unwrap());
        server.join().unwrap();
        assert!(run(&dir.path().join("missing"), &cmds(&["state"])).is_err());
    }
}
