//! Framebuffer streaming: a real `parvis-agent` (TLS on loopback) streams the screen of a VM
//! whose worker is `fake-worker`, which draws on the shared framebuffer like a guest would
//! and stamps every frame with the time it finished drawing (see [`crate::fbstamp`]). The
//! client here decodes every tile, as a console does, and measures:
//! - frames per second actually delivered while the writer changes the full screen 60 times
//!   a second, and how many of the writer's frames reached the client;
//! - bytes per delivered frame on the wire (protobuf encoded size) against the raw frame size
//!   (a large change comes as several updates, the last one completing the capture);
//! - draw-to-client latency (writer's stamp → the update completing its capture decoded on
//!   the client), p50/p99;
//! - bytes per second while the screen is idle.
//!
//! The writer is not a guest, so this measures the agent's pipeline (capture, diff,
//! compress, gRPC over TLS, decode), which is what the guest's writes go through.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use prost::Message;
use proto::client;
use proto::v1::{CreateVmRequest, FramebufferRequest, SerialInput, TileEncoding, VmRef, VmSpec};
use tokio_stream::StreamExt;

use crate::bench_support::ok;
use crate::fbstamp::{self, monotonic_ns};

/// One workload's figures.
#[derive(Debug, Default)]
pub struct Workload {
    pub name: &'static str,
    pub secs: f64,
    /// Updates received.
    pub updates: u64,
    /// Captures completed (updates with `more` false): a large change comes in parts.
    pub captures: u64,
    /// Distinct writer frames seen (stamps).
    pub frames_seen: u64,
    /// Writer frames drawn in the window (by sequence numbers).
    pub frames_drawn: u64,
    pub bytes: u64,
    pub latencies_ms: Vec<f64>,
    /// The same latencies in three parts: drawn → the agent stored the captured tiles
    /// (`captured_us`, wall clock, mapped onto the monotonic clock), → the client received
    /// the update, → decoded.
    pub to_captured_ms: Vec<f64>,
    pub to_received_ms: Vec<f64>,
    pub to_decoded_ms: Vec<f64>,
    /// When the first and the last stamped frame arrived.
    pub first_at: Option<Instant>,
    pub last_at: Option<Instant>,
    /// CPU seconds used in the window by the agent, the writer and this client.
    pub cpu_agent: f64,
    pub cpu_writer: f64,
    pub cpu_client: f64,
}

impl Workload {
    /// Frames delivered per second, from the first stamped frame's arrival to the last's
    /// (the writer starts drawing a moment after the window opens).
    fn fps(&self) -> f64 {
        match (self.first_at, self.last_at) {
            (Some(a), Some(b)) if self.frames_seen > 1 && b > a => {
                (self.frames_seen - 1) as f64 / (b - a).as_secs_f64()
            }
            _ => self.frames_seen as f64 / self.secs,
        }
    }
    fn pct(&self, p: f64) -> f64 {
        pct(&self.latencies_ms, p)
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Wall clock minus monotonic clock, in nanoseconds.
fn wall_minus_monotonic_ns() -> i128 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    wall - i128::from(monotonic_ns())
}

impl Workload {}

/// One way the agent learns what changed, and its figures.
#[derive(Debug)]
pub struct Capture {
    pub name: &'static str,
    pub full: Workload,
    pub typing: Workload,
    pub idle_bytes_per_sec: f64,
    pub idle_secs: f64,
}

/// All figures.
#[derive(Debug)]
pub struct FbResult {
    pub width: u32,
    pub height: u32,
    pub encoding: &'static str,
    /// The synthetic video device's dirty rectangles (a running guest with hyperv_drm), the
    /// boot framebuffer's written rows from KVM's dirty page log (firmware, early boot,
    /// guests without the driver), then polling the boot framebuffer (a worker without the
    /// log).
    pub captures: Vec<Capture>,
}

/// `fake-worker`, built beside this program (same profile and target folder).
pub fn fake_worker() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    let dir = exe.parent().context("this program has no folder")?;
    let target = dir
        .parent()
        .context("this program is not in a cargo target folder")?;
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(crate::build::workspace())
        .args(["build", "-p", "parvis-tests", "--bin", "fake-worker"])
        .env("CARGO_TARGET_DIR", target);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("cannot run cargo to build fake-worker")?;
    if !status.success() {
        bail!("building fake-worker failed ({status})");
    }
    Ok(dir.join("fake-worker"))
}

/// CPU seconds (user + system) a process has used so far; 0 if it is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are 12 and 13 after the state.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}

/// The agent's child running `fake-worker` (a child of whichever agent thread spawned it).
fn writer_pid(agent: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{agent}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let children = std::fs::read_to_string(t.path().join("children")).ok()?;
        children.split_whitespace().find_map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
            (comm.trim() == "fake-worker").then(|| p.parse().ok())?
        })
    })
}

/// Run the three workloads, `secs` seconds each, at `width`×`height`, for each way the
/// agent learns of changes.
pub fn run(dir: &Path, width: u32, height: u32, secs: f64) -> Result<FbResult> {
    let worker = fake_worker()?;
    let mut r = run_agent(
        &dir.join("logged"),
        &worker,
        width,
        height,
        secs,
        &[
            ("synthetic video (dirty rectangles)", "synthvid"),
            ("boot framebuffer (KVM dirty page log)", "bootfb"),
        ],
    )?;
    // A worker without the log, through a wrapper: the agent passes a worker its own
    // arguments only.
    let polled = dir.join("fake-worker-polled");
    std::fs::write(
        &polled,
        format!(
            "#!/bin/sh\nexec '{}' --no-dirty-log \"$@\"\n",
            worker.display()
        ),
    )?;
    std::fs::set_permissions(&polled, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let p = run_agent(
        &dir.join("polled"),
        &polled,
        width,
        height,
        secs,
        &[("boot framebuffer (polled, no log)", "bootfb")],
    )?;
    r.captures.extend(p.captures);
    Ok(r)
}

/// One agent and VM, measuring `captures` (name, the word that selects it).
fn run_agent(
    dir: &Path,
    worker: &Path,
    width: u32,
    height: u32,
    secs: f64,
    which: &[(&'static str, &'static str)],
) -> Result<FbResult> {
    let state = dir.join("agent-state");
    crate::agent_proc::placeholder_boot_image(&state)?;
    let worker_arg = worker.to_string_lossy().into_owned();
    let (mut agent, target) =
        crate::agent_proc::spawn_agent(&state, &["--worker", &worker_arg], None)?;
    let agent_pid = agent.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let mut c = client::connect(&target).await?;
        let vm =
            c.vm.create_vm(CreateVmRequest {
                spec: Some(VmSpec {
                    name: "fb-bench".into(),
                    cpus: 1,
                    memory_bytes: 64 << 20,
                    boot_image: "default".into(),
                    display_width: width,
                    display_height: height,
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        let id = vm.id.clone();
        c.vm.start_vm(VmRef { vm_id: id.clone() }).await?;

        // The workload is chosen through the serial console.
        let (serial_tx, serial_rx) = tokio::sync::mpsc::channel::<SerialInput>(4);
        serial_tx
            .send(SerialInput {
                vm_id: id.clone(),
                data: Vec::new().into(),
            })
            .await?;
        let mut serial_c = c.console.clone();
        let serial = tokio::spawn(async move {
            let s = serial_c
                .serial_console(tokio_stream::wrappers::ReceiverStream::new(serial_rx))
                .await?;
            let mut s = s.into_inner();
            while s.next().await.is_some() {}
            Ok::<_, anyhow::Error>(())
        });
        let say = |word: &str| {
            let tx = serial_tx.clone();
            let msg = SerialInput {
                vm_id: String::new(),
                data: format!("{word}\n").into_bytes().into(),
            };
            async move {
                tx.send(msg)
                    .await
                    .map_err(|_| anyhow::anyhow!("serial closed"))
            }
        };

        let mut stream = c
            .console
            .stream_framebuffer(FramebufferRequest {
                vm_id: id.clone(),
                encoding: TileEncoding::Lz4 as i32,
            })
            .await?
            .into_inner();
        let writer = writer_pid(agent_pid).context("fake-worker is not running")?;
        let pids = Pids {
            agent: agent_pid,
            writer,
            client: std::process::id(),
        };
        let mut screen = Screen::default();
        // The first update is the whole screen.
        let first = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .context("no first frame within 20 s")?
            .context("the stream ended")??;
        screen.apply(&first)?;
        if !first.full {
            bail!("the first update is not a full frame");
        }

        let mut captures = Vec::new();
        for &(name, word) in which {
            // The switch sends a full update at the same geometry.
            say(word).await?;
            let _ = measure(&mut stream, &mut screen, &pids, "settle", 1.0, false).await?;
            say("full").await?;
            let full = measure(&mut stream, &mut screen, &pids, "full-screen", secs, true).await?;
            // Let the full-screen backlog drain before timing keystrokes.
            say("idle").await?;
            let _ = measure(&mut stream, &mut screen, &pids, "settle", 1.0, false).await?;
            say("typing").await?;
            let typing = measure(&mut stream, &mut screen, &pids, "typing", secs, true).await?;
            say("idle").await?;
            // Let the last drawn frames arrive, then count what comes while nothing changes.
            let _ = measure(&mut stream, &mut screen, &pids, "settle", 1.0, false).await?;
            let idle = measure(&mut stream, &mut screen, &pids, "idle", secs, false).await?;
            captures.push(Capture {
                name,
                full,
                typing,
                idle_bytes_per_sec: idle.bytes as f64 / idle.secs,
                idle_secs: idle.secs,
            });
        }

        let _ = c.vm.stop_vm(VmRef { vm_id: id.clone() }).await;
        drop(serial_tx);
        serial.abort();
        Ok::<_, anyhow::Error>(FbResult {
            width,
            height,
            encoding: "lz4",
            captures,
        })
    });
    let _ = agent.kill();
    let _ = agent.wait();
    result
}

/// The client's copy of the screen.
#[derive(Default)]
struct Screen {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
    /// Decoded tiles of one tile row, reused.
    band: Vec<Vec<u8>>,
}

impl Screen {
    /// Apply an update; return the stamps in the tiles it changed.
    fn apply(&mut self, u: &proto::v1::FrameUpdate) -> Result<Vec<fbstamp::Stamp>> {
        if u.width != self.width || u.height != self.height {
            self.width = u.width;
            self.height = u.height;
            self.pixels = vec![0; (u.width * u.height * 4) as usize];
        }
        let mut stamps = Vec::new();
        // As the console decodes: a tile row at a time, copied into the screen a whole
        // pixel row at a time.
        let (width, pixels) = (self.width as usize, &mut self.pixels);
        proto::tiles::decode_rows(
            &u.tiles,
            self.width,
            self.height,
            &mut self.band,
            |run, band| {
                for (t, px) in run.iter().zip(band) {
                    stamps.extend(fbstamp::find(px, t.x, t.y, t.width, t.height));
                }
                for y in 0..run[0].height as usize {
                    let line = (run[0].y as usize + y) * width;
                    for (t, px) in run.iter().zip(band) {
                        let row = (t.width * 4) as usize;
                        let dst = (line + t.x as usize) * 4;
                        pixels[dst..dst + row].copy_from_slice(&px[y * row..(y + 1) * row]);
                    }
                }
            },
        )?;
        Ok(stamps)
    }
}

struct Pids {
    agent: u32,
    writer: u32,
    client: u32,
}

async fn measure<S>(
    stream: &mut S,
    screen: &mut Screen,
    pids: &Pids,
    name: &'static str,
    secs: f64,
    need_frames: bool,
) -> Result<Workload>
where
    S: tokio_stream::Stream<Item = Result<proto::v1::FrameUpdate, tonic::Status>> + Unpin,
{
    let mut w = Workload {
        name,
        ..Default::default()
    };
    let cpu0 = [pids.agent, pids.writer, pids.client].map(cpu_secs);
    let start = Instant::now();
    let start_ns = monotonic_ns();
    let end = start + Duration::from_secs_f64(secs);
    let (mut first_seq, mut last_seq) = (None::<u32>, 0u32);
    // Stamps seen in the parts of a capture that is not complete yet: a frame counts as
    // delivered when the update completing its capture is decoded.
    let mut pending: Vec<fbstamp::Stamp> = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let u = match tokio::time::timeout(left, stream.next()).await {
            Err(_) => break,
            Ok(None) => bail!("the framebuffer stream ended"),
            Ok(Some(u)) => u?,
        };
        let received = monotonic_ns();
        let stamps = screen.apply(&u)?;
        let now = monotonic_ns();
        let captured = (i128::from(u.captured_us) * 1000 - wall_minus_monotonic_ns()) as f64;
        w.updates += 1;
        w.bytes += u.encoded_len() as u64;
        // Frames drawn before this window (a previous workload's) don't count.
        pending.extend(stamps.into_iter().filter(|s| s.drawn_ns >= start_ns));
        if u.more {
            continue;
        }
        w.captures += 1;
        for s in pending.drain(..) {
            if s.seq > last_seq || first_seq.is_none() {
                first_seq.get_or_insert(s.seq);
                last_seq = s.seq;
                w.frames_seen += 1;
                w.first_at.get_or_insert(Instant::now());
                w.last_at = Some(Instant::now());
                w.latencies_ms
                    .push(now.saturating_sub(s.drawn_ns) as f64 / 1e6);
                w.to_captured_ms.push((captured - s.drawn_ns as f64) / 1e6);
                w.to_received_ms.push((received as f64 - captured) / 1e6);
                w.to_decoded_ms
                    .push(now.saturating_sub(received) as f64 / 1e6);
            }
        }
    }
    w.secs = start.elapsed().as_secs_f64();
    let cpu1 = [pids.agent, pids.writer, pids.client].map(cpu_secs);
    w.cpu_agent = cpu1[0] - cpu0[0];
    w.cpu_writer = cpu1[1] - cpu0[1];
    w.cpu_client = cpu1[2] - cpu0[2];
    if let Some(f) = first_seq {
        w.frames_drawn = u64::from(last_seq - f) + 1;
    }
    if need_frames && w.frames_seen == 0 {
        bail!("{name}: no stamped frame reached the client");
    }
    Ok(w)
}

/// Print the figures against the targets.
pub fn print(r: &FbResult) {
    let raw = f64::from(r.width) * f64::from(r.height) * 4.0;
    println!(
        "framebuffer stream ({}x{}, {}, TLS on loopback, fake-worker drawing on the shared framebuffer)",
        r.width, r.height, r.encoding
    );
    for c in &r.captures {
        println!(" {}:", c.name);
        for w in [&c.full, &c.typing] {
            let per = if w.captures > 0 {
                w.bytes as f64 / w.captures as f64
            } else {
                0.0
            };
            println!(
                "  {:<12} {:6.1} frames/s delivered ({} of {} drawn frames seen), {:>9.0} bytes/frame ({:.3} of a raw frame, {:.1} updates/frame), latency p50 {:.1} ms p99 {:.1} ms",
                w.name,
                w.fps(),
                w.frames_seen,
                w.frames_drawn,
                per,
                per / raw,
                w.updates as f64 / w.captures.max(1) as f64,
                w.pct(0.5),
                w.pct(0.99),
            );
        }
        for w in [&c.full, &c.typing] {
            println!(
                "  {:<12} latency parts, p50: drawn -> captured by the agent {:.1} ms, -> received by the client {:.1} ms, -> decoded {:.1} ms",
                w.name,
                pct(&w.to_captured_ms, 0.5),
                pct(&w.to_received_ms, 0.5),
                pct(&w.to_decoded_ms, 0.5),
            );
        }
        for w in [&c.full, &c.typing] {
            let n = w.frames_seen.max(1) as f64;
            println!(
                "  {:<12} CPU per delivered frame: agent {:.2} ms, writer {:.2} ms, client {:.2} ms",
                w.name,
                w.cpu_agent * 1e3 / n,
                w.cpu_writer * 1e3 / n,
                w.cpu_client * 1e3 / n,
            );
        }
        println!(
            "  idle         {:.0} bytes/s over {:.1} s",
            c.idle_bytes_per_sec, c.idle_secs
        );
        println!(
            "  targets: >= 60 frames/s full-screen, p50 <= 10 ms, idle 0 B/s: {} / {} / {}",
            ok(c.full.fps() >= 59.5),
            ok(c.full.pct(0.5) <= 10.0 && c.typing.pct(0.5) <= 10.0),
            ok(c.idle_bytes_per_sec == 0.0)
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "  load average after the run: {} (on {} CPUs)",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
