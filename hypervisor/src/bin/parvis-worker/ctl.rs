//! `parvis-worker ctl SOCK cmd...`: a small client of the control socket for people and
//! scripts. Each command word becomes one `Request`; each reply prints as one line: `ok`,
//! `ok running` / `ok paused` (for `state`), or `error: ...`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use proto::framing::{self, Decoder};
use proto::worker::{Empty, Event, Reply, Request, event, request};

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
        _ => return Err(format!("error: unknown command '{line}'")),
    })
}

/// The line printed for the reply to `kind`.
pub fn format_reply(kind: &request::Kind, reply: &Reply) -> String {
    if !reply.error.is_empty() {
        return format!("error: {}", reply.error);
    }
    match kind {
        request::Kind::Query(_) => match &reply.status {
            Some(s) if s.paused => "ok paused".into(),
            Some(_) => "ok running".into(),
            None => "error: the worker sent no status".into(),
        },
        _ => "ok".into(),
    }
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
            error: "the partition is no longer running".into(),
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
                        request::Kind::Reset(_) => reply.error = "nope".into(),
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
                    error: "nope".into(),
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
