//! `bench --only console`: the desktop console, headless (no GPU, no window):
//!
//! - **UI frame time** with 50 hosts and 1,000 VMs in the inventory (hosts that are shown
//!   but not connected): the real app's frame (`ConsoleApp::show`) plus tessellation,
//!   idle and while scrolling. Target ≤ 8 ms.
//! - **Console fps at 1920x1080**: every frame changes the whole screen; the agent's LZ4
//!   64x64 tiles go through the console's real path: decoding (the network thread's
//!   work), the texture patches and the app frame that applies them (the UI thread's
//!   work). The GPU upload itself is not included (no GPU here). Target ≥ 60 fps.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use console_gui::ConsoleApp;
use console_gui::config::HostConfig;
use console_gui::console::Decoder;
use proto::v1::{FrameUpdate, PixelFormat, Tile, TileEncoding, Vm, VmSpec, VmState};

/// What was measured.
#[derive(Debug)]
pub struct ConsoleBench {
    pub hosts: usize,
    pub vms: usize,
    /// Frame times with the inventory idle.
    pub idle: Vec<Duration>,
    /// Frame times while scrolling through it.
    pub scrolling: Vec<Duration>,
    pub width: u32,
    pub height: u32,
    /// Time per full-screen update through the console (decode + frame).
    pub console: Vec<Duration>,
    /// Of that, decoding tiles into patches (network thread).
    pub decode: Vec<Duration>,
    pub tiles_per_frame: usize,
    pub bytes_per_frame: usize,
}

fn raw_input(events: Vec<egui::Event>) -> egui::RawInput {
    egui::RawInput {
        screen_rect: Some(egui::Rect::from_min_size(
            egui::Pos2::ZERO,
            egui::vec2(1600.0, 1000.0),
        )),
        events,
        ..Default::default()
    }
}

/// One frame of the app: layout, then tessellation (what the renderer is handed).
fn frame(ctx: &egui::Context, app: &mut ConsoleApp, events: Vec<egui::Event>) -> Duration {
    let t = Instant::now();
    let out = ctx.run_ui(raw_input(events), |ui| app.show(ui));
    let prims = ctx.tessellate(out.shapes, out.pixels_per_point);
    std::hint::black_box(prims);
    t.elapsed()
}

fn fake_vms(host: usize, n: usize) -> Vec<Vm> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    (0..n)
        .map(|i| Vm {
            id: format!("{host:04x}{i:08x}"),
            spec: Some(VmSpec {
                name: format!("vm-{host:02}-{i:03}"),
                cpus: 1 + (i % 8) as u32,
                memory_bytes: (512 + 256 * (i % 16) as u64) << 20,
                ..Default::default()
            }),
            state: if i % 3 == 0 {
                VmState::Off as i32
            } else {
                VmState::Running as i32
            },
            state_changed_ms: now - (i as i64) * 60_000,
            ..Default::default()
        })
        .collect()
}

/// A full-screen update: 64x64 LZ4 tiles of a pattern that moves with `k`.
fn full_update(w: u32, h: u32, k: u32) -> FrameUpdate {
    let mut tiles = Vec::new();
    for ty in (0..h).step_by(64) {
        for tx in (0..w).step_by(64) {
            let (tw, th) = (64.min(w - tx), 64.min(h - ty));
            let mut raw = Vec::with_capacity((tw * th * 4) as usize);
            for y in ty..ty + th {
                for x in tx..tx + tw {
                    let v = x.wrapping_add(y).wrapping_add(k * 7);
                    raw.extend_from_slice(&[
                        (v & 0xff) as u8,
                        (y & 0xff) as u8,
                        (k & 0xff) as u8,
                        0,
                    ]);
                }
            }
            tiles.push(Tile {
                x: tx,
                y: ty,
                width: tw,
                height: th,
                encoding: TileEncoding::Lz4 as i32,
                data: proto::tiles::encode_lz4(&raw).into(),
            });
        }
    }
    FrameUpdate {
        seq: u64::from(k),
        width: w,
        height: h,
        format: PixelFormat::Bgrx8888 as i32,
        full: true,
        tiles,
        active: true,
        ..Default::default()
    }
}

fn host(i: usize) -> HostConfig {
    HostConfig {
        name: format!("host-{i:02}"),
        addr: format!("10.0.{}.{}:7443", i / 250, i % 250 + 1),
        token: "pvs_bench".into(),
        fingerprint: None,
    }
}

/// Run both measurements (`frames` frames each).
pub fn run(frames: usize) -> Result<ConsoleBench> {
    let (hosts, per_host) = (50, 20);
    let ctx = egui::Context::default();
    let mut app = ConsoleApp::new(&ctx, None).context("starting the app")?;
    for i in 0..hosts {
        app.add_static_host(host(i), fake_vms(i, per_host));
    }
    // Warm up (fonts, layout caches).
    for _ in 0..5 {
        frame(&ctx, &mut app, Vec::new());
    }
    let idle: Vec<Duration> = (0..frames)
        .map(|_| frame(&ctx, &mut app, Vec::new()))
        .collect();
    let scroll = |down: bool| egui::Event::MouseWheel {
        unit: egui::MouseWheelUnit::Point,
        delta: egui::vec2(0.0, if down { -120.0 } else { 120.0 }),
        phase: egui::TouchPhase::Move,
        modifiers: egui::Modifiers::NONE,
        source: egui::MouseWheelSource::Wheel,
    };
    let mut scrolling = Vec::with_capacity(frames);
    for i in 0..frames {
        let events = vec![
            egui::Event::PointerMoved(egui::pos2(600.0, 400.0)),
            scroll(i % 200 < 100),
        ];
        scrolling.push(frame(&ctx, &mut app, events));
    }

    // The console at 1920x1080, with a dozen distinct full screens in turn.
    let (w, h) = (1920, 1080);
    let screen_host = app.add_static_host(
        host(99),
        vec![Vm {
            id: "console-vm".into(),
            spec: Some(VmSpec {
                name: "screen".into(),
                ..Default::default()
            }),
            state: VmState::Running as i32,
            ..Default::default()
        }],
    );
    app.open_console(screen_host, "console-vm");
    let updates: Vec<FrameUpdate> = (0..12).map(|k| full_update(w, h, k)).collect();
    let tiles_per_frame = updates[0].tiles.len();
    let bytes_per_frame = updates[0].tiles.iter().map(|t| t.data.len()).sum();
    let shared = app.consoles()[0].handle.shared.clone();
    let mut decoder = Decoder::default();
    let mut console = Vec::with_capacity(frames);
    let mut decode = Vec::with_capacity(frames);
    for i in 0..frames + 5 {
        let t = Instant::now();
        decoder
            .apply(&updates[i % updates.len()], &shared)
            .map_err(anyhow::Error::msg)?;
        let d = t.elapsed();
        frame(&ctx, &mut app, Vec::new());
        if i >= 5 {
            decode.push(d);
            console.push(t.elapsed());
        }
    }
    let s = &app.consoles()[0].screen;
    anyhow::ensure!(
        s.size() == [w as usize, h as usize] && s.texture_updates as usize >= frames,
        "the console did not take the frames ({:?}, {} updates)",
        s.size(),
        s.texture_updates
    );
    Ok(ConsoleBench {
        hosts,
        vms: hosts * per_host,
        idle,
        scrolling,
        width: w,
        height: h,
        console,
        decode,
        tiles_per_frame,
        bytes_per_frame,
    })
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Print the figures.
pub fn print(r: &ConsoleBench) {
    println!(
        "console UI, {} hosts / {} VMs listed (headless, layout + tessellation per frame; target <= 8 ms):",
        r.hosts, r.vms
    );
    for (what, v) in [("idle", &r.idle), ("scrolling", &r.scrolling)] {
        println!(
            "  {what:<10} p50 {}  p95 {}  max {}  ({} frames)",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.95)),
            ms(pct(v, 1.0)),
            v.len()
        );
    }
    let mean = r.console.iter().sum::<Duration>() / r.console.len() as u32;
    println!(
        "console view {}x{}, every frame a full-screen change ({} LZ4 tiles, {:.1} MiB per update; \
         decode + patches + app frame, no GPU upload; target >= 60 fps):",
        r.width,
        r.height,
        r.tiles_per_frame,
        r.bytes_per_frame as f64 / (1 << 20) as f64
    );
    println!(
        "  {:.0} fps (mean {}, p95 {}; of which decoding p50 {})",
        1.0 / mean.as_secs_f64(),
        ms(mean),
        ms(pct(&r.console, 0.95)),
        ms(pct(&r.decode, 0.5))
    );
}
