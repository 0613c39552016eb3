//! A running VM's screen as compressed tiles, fanned out to every console watching it.
//!
//! The worker passes the guest memory file; the framebuffer lives at a known offset in it.
//! Two ways to learn what changed:
//! - the boot framebuffer (efifb/simpledrm): a capture thread reads the framebuffer
//!   periodically and compares it with the previous read tile by tile;
//! - the synthetic video device (VMBus synthvid), once its guest driver owns the screen: the
//!   worker reports the geometry (resolution changes) and the guest's dirty rectangles, and
//!   only the tiles under those rectangles are read — no full scans.
//!
//! Either way each changed tile is stored LZ4-compressed, with a 128-bit hash of its pixels
//! (what the next capture compares with) and the capture's generation number; raw pixels
//! are decoded from it only for subscribers that ask for raw or zstd tiles. Tiles are
//! packed in a reused buffer, so a capture writes no screen-sized memory of its own. Each
//! subscriber sends, when it is ready, every tile newer than what it has sent: a slow
//! client skips intermediate states instead of queueing them, and nothing is sent while
//! nothing changes.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::v1::{FrameUpdate, PixelFormat, Tile, TileEncoding};
use tokio::sync::{mpsc, watch};

/// Tile edge in pixels.
pub const TILE: u32 = 64;
/// Capture period while the screen is changing, and after a second without change.
const ACTIVE_PERIOD: Duration = Duration::from_millis(5);
const IDLE_PERIOD: Duration = Duration::from_millis(16);

/// Where the framebuffer is in the guest memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub offset: u64,
    pub width: u32,
    pub height: u32,
    pub stride: u32,
}

impl Geometry {
    /// Check the worker's numbers before trusting them with buffer sizes.
    pub fn validate(fb: &proto::worker::Framebuffer, file_len: u64) -> Option<Geometry> {
        let g = Geometry {
            offset: fb.offset,
            width: fb.width,
            height: fb.height,
            stride: fb.stride,
        };
        let ok = fb.bytes_per_pixel == 4
            && (1..=8192).contains(&g.width)
            && (1..=8192).contains(&g.height)
            && u64::from(g.stride) >= u64::from(g.width) * 4
            && g.offset
                .checked_add(u64::from(g.stride) * u64::from(g.height))
                .is_some_and(|end| end <= file_len);
        ok.then_some(g)
    }

    fn len(&self) -> usize {
        self.stride as usize * self.height as usize
    }

    fn tiles_x(&self) -> u32 {
        self.width.div_ceil(TILE)
    }

    fn tile_count(&self) -> usize {
        (self.tiles_x() * self.height.div_ceil(TILE)) as usize
    }

    fn tile_rect(&self, i: usize) -> (u32, u32, u32, u32) {
        let i = i as u32;
        let x = (i % self.tiles_x()) * TILE;
        let y = (i / self.tiles_x()) * TILE;
        (x, y, TILE.min(self.width - x), TILE.min(self.height - y))
    }
}

/// One tile's pixels at one generation.
#[derive(Debug)]
struct TileData {
    generation: u64,
    /// [`tile_hash`] of the pixels.
    hash: u128,
    lz4: Bytes,
    raw: OnceLock<Bytes>,
    zstd: OnceLock<Bytes>,
}

/// What captures compare tiles by: equal pixels have equal hashes, and different pixels
/// (xxh3, 128 bits) practically never do. A guest that made two of its own tiles collide
/// would only keep its own screen from updating.
fn tile_hash(px: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(px)
}

impl TileData {
    /// `scratch` is the compressor's working buffer, reused across tiles.
    fn new(generation: u64, px: &[u8], scratch: &mut Vec<u8>) -> Self {
        Self::with_hash(generation, tile_hash(px), px, scratch)
    }

    fn with_hash(generation: u64, hash: u128, px: &[u8], scratch: &mut Vec<u8>) -> Self {
        TileData {
            generation,
            hash,
            lz4: proto::tiles::encode_lz4_with(px, scratch).into(),
            raw: OnceLock::new(),
            zstd: OnceLock::new(),
        }
    }

    /// The pixels of this `w`×`h` tile, decoded once.
    fn raw(&self, w: u32, h: u32) -> Bytes {
        self.raw
            .get_or_init(|| {
                let t = Tile {
                    width: w,
                    height: h,
                    encoding: TileEncoding::Lz4 as i32,
                    data: self.lz4.clone(),
                    ..Default::default()
                };
                // Our own encoding of a tile of this size: it decodes.
                proto::tiles::decode(&t).map_or_else(|_| Bytes::new(), Bytes::from)
            })
            .clone()
    }

    fn encoded(&self, enc: TileEncoding, w: u32, h: u32) -> Bytes {
        match enc {
            TileEncoding::Raw => self.raw(w, h),
            TileEncoding::Zstd => self
                .zstd
                .get_or_init(|| {
                    let raw = self.raw(w, h);
                    zstd::bulk::compress(&raw, 1)
                        .map(Bytes::from)
                        .unwrap_or(raw)
                })
                .clone(),
            TileEncoding::Lz4 | TileEncoding::Unspecified => self.lz4.clone(),
        }
    }
}

#[derive(Debug)]
struct Frame {
    geometry: Geometry,
    /// Bumped on every geometry change (subscribers then start over with a full frame).
    epoch: u64,
    tiles: Vec<Arc<TileData>>,
    generation: u64,
    captured_us: i64,
    /// A capture of dirty rectangles is publishing its tiles row by row: updates sent now
    /// say `more`.
    capturing: bool,
}

/// A dirty rectangle reported by the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// What the worker's synthetic video device reports (see `WorkerConn::display`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisplayEvent {
    /// The synthetic video driver owns the screen at this geometry (first report, or a
    /// resolution change); not yet validated.
    Mode(proto::worker::Framebuffer),
    /// The guest redrew these rectangles.
    Dirty(Vec<Rect>),
    /// The driver let go: back to the boot framebuffer.
    Inactive,
    /// Rows of the boot framebuffer the guest wrote (KVM's dirty page log), whichever
    /// device owns the screen.
    BootDirty(Vec<Rect>),
}

/// What a worker reports about the screen.
#[derive(Debug)]
pub struct DisplaySource {
    pub events: std::sync::mpsc::Receiver<DisplayEvent>,
    /// Whether [`DisplayEvent::BootDirty`] events come, so that the boot framebuffer is
    /// never searched for changes.
    pub boot_dirty_log: bool,
    /// The display connection's writing side, to say whether the boot framebuffer's rows
    /// are wanted (`watch_boot_framebuffer`).
    pub control: Option<std::os::unix::net::UnixStream>,
}

/// With nobody watching for this long, the worker stops reading the boot framebuffer's
/// dirty page log (a guest drawing unwatched then pays nothing for it).
const UNWATCHED_GRACE: Duration = Duration::from_secs(1);

/// Written boot framebuffer rectangles kept while nobody watches are merged into one
/// beyond this many.
const MAX_PENDING: usize = 256;

/// A running VM's screen.
#[derive(Debug)]
pub struct Screen {
    /// The boot framebuffer's geometry (what polling captures).
    boot: Geometry,
    frame: Mutex<Frame>,
    generation: watch::Sender<u64>,
    subscribers: AtomicUsize,
    wake: (Mutex<()>, Condvar),
    stopped: AtomicBool,
}

impl Screen {
    /// Start capturing from `file` (the guest memory file) at `geometry`, polling.
    pub fn start(file: OwnedFd, geometry: Geometry) -> std::io::Result<Arc<Screen>> {
        Self::start_with_display(file, geometry, None)
    }

    /// Like [`Screen::start`], switching to `display`'s geometry and dirty rectangles
    /// whenever the synthetic video device owns the screen, and reading only the written
    /// rows of the boot framebuffer when the worker reports them.
    pub fn start_with_display(
        file: OwnedFd,
        geometry: Geometry,
        display: Option<DisplaySource>,
    ) -> std::io::Result<Arc<Screen>> {
        let mut first = vec![0u8; geometry.len()];
        read_exact_at(&file, &mut first, geometry.offset)?;
        let tiles = encode_all(&geometry, &first, 1);
        let screen = Arc::new(Screen {
            boot: geometry,
            frame: Mutex::new(Frame {
                geometry,
                epoch: 0,
                tiles,
                generation: 1,
                captured_us: now_us(),
                capturing: false,
            }),
            generation: watch::channel(1).0,
            subscribers: AtomicUsize::new(0),
            wake: (Mutex::new(()), Condvar::new()),
            stopped: AtomicBool::new(false),
        });
        let s = screen.clone();
        std::thread::Builder::new()
            .name("screen-capture".into())
            .spawn(move || s.capture_loop(file, first, display))?;
        Ok(screen)
    }

    /// The current geometry (the synthetic video mode while its driver owns the screen).
    pub fn geometry(&self) -> Geometry {
        self.frame().geometry
    }

    /// Stop capturing (the VM stopped); subscribers' streams end.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake.1.notify_all();
        self.generation.send_modify(|g| *g = u64::MAX);
    }

    fn frame(&self) -> std::sync::MutexGuard<'_, Frame> {
        self.frame.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn capture_loop(&self, file: OwnedFd, mut prev: Vec<u8>, display: Option<DisplaySource>) {
        let file_len = rustix::fs::fstat(&file).map_or(0, |s| s.st_size as u64);
        let (mut display, mut boot_log, mut control) = match display {
            Some(d) => (Some(d.events), d.boot_dirty_log, d.control),
            None => (None, false, None),
        };
        // Whether the worker sends the boot framebuffer's rows (it does from subscribing),
        // and since when they have been of no use.
        let mut rows_wanted = true;
        let mut unwatched_since: Option<Instant> = None;
        if boot_log {
            tracing::debug!("the boot framebuffer's writes are logged: no polling");
        }
        // Some(geometry) while the synthetic video device owns the screen.
        let mut synthetic: Option<Geometry> = None;
        // Written boot framebuffer rectangles not captured yet (nobody watched, or another
        // device owned the screen).
        let mut pending: Vec<Rect> = Vec::new();
        let mut cur = vec![0u8; self.boot.len()];
        let mut last_change = Instant::now();
        let mut next = Instant::now();
        while !self.stopped.load(Ordering::SeqCst) {
            // Display events first: they say which mode we are in.
            let wait = if synthetic.is_none() && boot_log && !pending.is_empty() {
                // Rows wait for a subscriber: look for one soon.
                Duration::from_millis(20)
            } else if boot_log {
                // Also how soon a new subscriber has the rows wanted again.
                Duration::from_millis(50)
            } else if synthetic.is_some() {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            let mut events = Vec::new();
            if let Some(rx) = &display {
                match rx.recv_timeout(wait) {
                    Ok(e) => {
                        events.push(e);
                        events.extend(rx.try_iter());
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        display = None;
                        // Nothing reports writes any more: poll.
                        boot_log = false;
                        pending.clear();
                        if synthetic.take().is_some() {
                            self.switch(&file, self.boot, &mut prev);
                        }
                    }
                }
            }
            let mut dirty = Vec::new();
            for e in events {
                match e {
                    DisplayEvent::Mode(fb) => match Geometry::validate(&fb, file_len) {
                        Some(g) => {
                            synthetic = Some(g);
                            dirty.clear();
                            self.switch(&file, g, &mut prev);
                        }
                        None => tracing::warn!(?fb, "worker reported a bad display geometry"),
                    },
                    DisplayEvent::Inactive => {
                        if synthetic.take().is_some() {
                            dirty.clear();
                            // The switch reads all of it.
                            pending.clear();
                            self.switch(&file, self.boot, &mut prev);
                        }
                    }
                    DisplayEvent::Dirty(r) => dirty.extend(r),
                    DisplayEvent::BootDirty(r) => {
                        pending.extend(r);
                        if pending.len() > MAX_PENDING {
                            pending = vec![bounding(&pending)];
                        }
                    }
                }
            }
            if boot_log {
                let useful = synthetic.is_none() && self.subscribers.load(Ordering::SeqCst) > 0;
                let want = if useful {
                    unwatched_since = None;
                    true
                } else {
                    unwatched_since.get_or_insert_with(Instant::now).elapsed() < UNWATCHED_GRACE
                };
                if want != rows_wanted {
                    rows_wanted = want;
                    // Wanted again, every row comes: rows kept until then are not needed
                    // (nor a loop looking for a subscriber to show them).
                    if watch_boot_framebuffer(&mut control, want) && !want {
                        pending.clear();
                    }
                }
            }
            if let Some(g) = synthetic {
                if !dirty.is_empty() {
                    self.capture_rects(&file, g, &dirty);
                }
                if display.is_some() {
                    continue;
                }
            }
            if boot_log {
                // The boot framebuffer's written rows, once somebody watches.
                if !pending.is_empty() && self.subscribers.load(Ordering::SeqCst) > 0 {
                    let rects = std::mem::take(&mut pending);
                    self.capture_rects(&file, self.boot, &rects);
                }
                continue;
            }
            if self.subscribers.load(Ordering::SeqCst) == 0 {
                let guard = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
                let idle = if display.is_some() {
                    Duration::from_millis(50)
                } else {
                    Duration::from_millis(500)
                };
                let _ = self
                    .wake
                    .1
                    .wait_timeout(guard, idle)
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let g = self.boot;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            let period = if last_change.elapsed() < Duration::from_secs(1) {
                ACTIVE_PERIOD
            } else {
                IDLE_PERIOD
            };
            next = Instant::now() + period;
            cur.resize(g.len(), 0);
            prev.resize(g.len(), 0);
            let generation = self.frame().generation + 1;
            let fresh = match scan(&file, &g, &prev, &mut cur, generation) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("cannot read the guest framebuffer ({e}); screen capture stops");
                    break;
                }
            };
            if fresh.is_empty() {
                continue;
            }
            last_change = Instant::now();
            {
                let mut f = self.frame();
                for (i, t) in fresh {
                    f.tiles[i] = t;
                }
                f.generation = generation;
                f.captured_us = now_us();
            }
            std::mem::swap(&mut prev, &mut cur);
            self.generation.send_replace(generation);
        }
        self.stop();
    }

    /// New geometry: capture the whole frame once and start a new epoch (subscribers send a
    /// full update). `prev` becomes that frame when `g` is the boot framebuffer.
    fn switch(&self, file: &OwnedFd, g: Geometry, prev: &mut Vec<u8>) {
        let mut all = vec![0u8; g.len()];
        if read_exact_at(file, &mut all, g.offset).is_err() {
            tracing::warn!("cannot read the guest framebuffer after a mode change");
        }
        let generation = self.frame().generation + 1;
        let tiles = encode_all(&g, &all, generation);
        {
            let mut f = self.frame();
            f.geometry = g;
            f.epoch += 1;
            f.tiles = tiles;
            f.generation = generation;
            f.captured_us = now_us();
        }
        if g == self.boot {
            *prev = all;
        }
        self.generation.send_replace(generation);
    }

    /// Read only the tiles under `rects` (the guest's dirty rectangles). Tiles whose
    /// pixels turn out unchanged (a rectangle larger than the change) are not sent again.
    ///
    /// Each tile row is published as soon as it is compressed (the rows are shared out
    /// among threads in order), so subscribers send the first rows while the rest are
    /// still being read; the frame says `capturing` until the last row is in.
    fn capture_rects(&self, file: &OwnedFd, g: Geometry, rects: &[Rect]) {
        let rows = tiles_under(&g, rects);
        if rows.is_empty() {
            return;
        }
        let (generation, old) = {
            let mut f = self.frame();
            if f.geometry != g {
                return;
            }
            // Only the tiles under the rectangles, to compare with (a keystroke is one).
            let tx = g.tiles_x();
            let old: std::collections::HashMap<usize, Arc<TileData>> = rows
                .iter()
                .flat_map(|(ty, cols)| cols.iter().map(move |c| (ty * tx + c) as usize))
                .filter_map(|i| f.tiles.get(i).map(|t| (i, t.clone())))
                .collect();
            f.capturing = true;
            (f.generation + 1, old)
        };
        let bytes: usize = rows.iter().map(|(_, t)| t.len()).sum::<usize>() * TILE_BYTES;
        let threads = capture_threads(bytes);
        let done = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        par_for_each(&rows, threads, Scratch::default, |sc, (ty, txs)| {
            let mut fresh = Vec::new();
            if !failed.load(Ordering::Relaxed) {
                let Scratch { read, tile, lz4 } = sc;
                let read = read_tile_row(file, &g, *ty, txs, read, tile, |i, px| {
                    let hash = tile_hash(px);
                    if old.get(&i).is_none_or(|t| t.hash != hash) {
                        let t = TileData::with_hash(generation, hash, px, lz4);
                        fresh.push((i, Arc::new(t)));
                    }
                });
                if let Err(e) = read {
                    fresh.clear();
                    if !failed.swap(true, Ordering::Relaxed) {
                        tracing::warn!("cannot read the guest framebuffer: {e}");
                    }
                }
            }
            let changed = !fresh.is_empty();
            // Counted under the lock, so the row that finds itself last is the last one
            // published and ends the capture.
            let last = {
                let mut f = self.frame();
                if changed && f.geometry == g {
                    for (i, t) in fresh {
                        f.tiles[i] = t;
                    }
                    f.generation = generation;
                    f.captured_us = now_us();
                }
                let last = done.fetch_add(1, Ordering::SeqCst) + 1 == rows.len();
                if last {
                    f.capturing = false;
                }
                last
            };
            if changed || last {
                self.generation.send_replace(generation);
            }
        });
    }

    /// A stream of updates for one console: everything first, then changes.
    pub fn subscribe(
        self: &Arc<Self>,
        encoding: TileEncoding,
    ) -> mpsc::Receiver<Result<FrameUpdate, tonic::Status>> {
        let (tx, rx) = mpsc::channel(1);
        let screen = self.clone();
        let mut gen_rx = self.generation.subscribe();
        screen.subscribers.fetch_add(1, Ordering::SeqCst);
        screen.wake.1.notify_all();
        tokio::spawn(async move {
            let mut sent: Vec<u64> = Vec::new();
            // The geometry epoch `sent` refers to; None before the first update.
            let mut epoch: Option<u64> = None;
            let mut seq = 0u64;
            // The last update sent said `more`: the one that ends the capture must follow,
            // with or without tiles.
            let mut owed_end = false;
            loop {
                gen_rx.borrow_and_update();
                let known = epoch;
                // LZ4 and raw tiles are ready: gathering them is quick, so it happens here
                // rather than on another thread (two thread hops per update). zstd is
                // compressed on first use, on a blocking thread.
                let (update, newest, now_epoch, more) = if encoding == TileEncoding::Zstd {
                    let s = screen.clone();
                    match tokio::task::spawn_blocking(move || {
                        let u = s.update_since(&sent, encoding, known);
                        (u, sent)
                    })
                    .await
                    {
                        Ok(((u, newest, e, more), old)) => {
                            sent = old;
                            (u, newest, e, more)
                        }
                        Err(_) => break,
                    }
                } else {
                    screen.update_since(&sent, encoding, known)
                };
                if epoch != Some(now_epoch) {
                    epoch = Some(now_epoch);
                    sent = vec![
                        0u64;
                        (update.width.div_ceil(TILE) * update.height.div_ceil(TILE))
                            as usize
                    ];
                }
                if !update.tiles.is_empty() || (owed_end && !more) {
                    seq += 1;
                    owed_end = more;
                    for (i, g) in newest {
                        if let Some(s) = sent.get_mut(i) {
                            *s = g;
                        }
                    }
                    let mut update = update;
                    update.seq = seq;
                    update.more = more;
                    if tx.send(Ok(update)).await.is_err() {
                        break;
                    }
                }
                if screen.stopped.load(Ordering::SeqCst) {
                    break;
                }
                // A console that went away stops counting now, not at the next change.
                tokio::select! {
                    r = gen_rx.changed() => if r.is_err() {
                        break;
                    },
                    _ = tx.closed() => break,
                }
                if screen.stopped.load(Ordering::SeqCst) {
                    break;
                }
            }
            if screen.stopped.load(Ordering::SeqCst) {
                let g = screen.geometry();
                let _ = tx
                    .send(Ok(FrameUpdate {
                        seq: seq + 1,
                        width: g.width,
                        height: g.height,
                        format: PixelFormat::Bgrx8888 as i32,
                        active: false,
                        captured_us: now_us(),
                        ..Default::default()
                    }))
                    .await;
            }
            screen.subscribers.fetch_sub(1, Ordering::SeqCst);
        });
        rx
    }

    /// Tiles newer than `sent` (all, a full update, when the geometry epoch is not `epoch`),
    /// the generations they carry, the current epoch, and whether a capture is still
    /// publishing (more tiles follow).
    fn update_since(
        &self,
        sent: &[u64],
        encoding: TileEncoding,
        epoch: Option<u64>,
    ) -> (FrameUpdate, Vec<(usize, u64)>, u64, bool) {
        type Gathered = (Geometry, u64, Vec<(usize, Arc<TileData>)>, i64, bool);
        let (g, now_epoch, tiles, captured_us, more): Gathered = {
            let f = self.frame();
            let full = epoch != Some(f.epoch);
            let t = f
                .tiles
                .iter()
                .enumerate()
                .filter(|(i, t)| full || sent.get(*i).is_none_or(|s| t.generation > *s))
                .map(|(i, t)| (i, t.clone()))
                .collect();
            (f.geometry, f.epoch, t, f.captured_us, f.capturing)
        };
        let full = epoch != Some(now_epoch);
        let enc = match encoding {
            TileEncoding::Unspecified => TileEncoding::Lz4,
            e => e,
        };
        let newest = tiles.iter().map(|(i, t)| (*i, t.generation)).collect();
        let tiles = tiles
            .iter()
            .map(|(i, t)| {
                let (x, y, w, h) = g.tile_rect(*i);
                Tile {
                    x,
                    y,
                    width: w,
                    height: h,
                    encoding: enc as i32,
                    data: t.encoded(enc, w, h),
                }
            })
            .collect();
        (
            FrameUpdate {
                seq: 0,
                width: g.width,
                height: g.height,
                format: PixelFormat::Bgrx8888 as i32,
                full,
                tiles,
                captured_us,
                active: true,
                more: false,
            },
            newest,
            now_epoch,
            more,
        )
    }
}

/// Tell the worker whether the boot framebuffer's rows are wanted; whether it was told. A
/// failed write is the worker going away, which the display events' end reports.
fn watch_boot_framebuffer(
    control: &mut Option<std::os::unix::net::UnixStream>,
    want: bool,
) -> bool {
    use std::io::Write;
    let Some(c) = control else { return false };
    let req = proto::worker::Request {
        id: 0,
        kind: Some(proto::worker::request::Kind::WatchBootFramebuffer(want)),
    };
    if c.write_all(&proto::framing::encode(&req)).is_err() {
        *control = None;
        return false;
    }
    true
}

/// The smallest rectangle holding all of `rects` (not empty).
fn bounding(rects: &[Rect]) -> Rect {
    let x0 = rects.iter().map(|r| r.x).min().unwrap_or(0);
    let y0 = rects.iter().map(|r| r.y).min().unwrap_or(0);
    let x1 = rects
        .iter()
        .map(|r| r.x.saturating_add(r.width))
        .max()
        .unwrap_or(0);
    let y1 = rects
        .iter()
        .map(|r| r.y.saturating_add(r.height))
        .max()
        .unwrap_or(0);
    Rect {
        x: x0,
        y: y0,
        width: x1 - x0,
        height: y1 - y0,
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn read_exact_at(file: &OwnedFd, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = rustix::io::pread(file, &mut buf[done..], offset + done as u64)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        done += n;
    }
    Ok(())
}

/// Bytes of a whole tile's pixels.
const TILE_BYTES: usize = (TILE * TILE * 4) as usize;

/// How many threads capturing `bytes` bytes of pixels may use: one per CPU, at most 4, and
/// just one below 1 MiB, where starting threads costs more than it saves.
fn capture_threads(bytes: usize) -> usize {
    if bytes < 1 << 20 {
        return 1;
    }
    // Asked once: the answer comes from reading cgroup files.
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
}

/// A capture thread's reusable buffers.
#[derive(Default)]
struct Scratch {
    read: Vec<u8>,
    tile: Vec<u8>,
    lz4: Vec<u8>,
}

/// `f` over `items` in order, split into one consecutive run per thread (at most
/// `threads`; the calling thread takes the first run, and any run whose thread cannot be
/// started). Each run has its own state from `init`.
fn par_map<I: Sync, S, T: Send>(
    items: &[I],
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &I) -> T + Sync,
) -> Vec<T> {
    let threads = threads.clamp(1, items.len().max(1));
    let per = items.len().div_ceil(threads).max(1);
    let run = |items: &[I]| {
        let mut state = init();
        items.iter().map(|i| f(&mut state, i)).collect::<Vec<T>>()
    };
    let run = &run;
    std::thread::scope(|s| {
        let mut runs = items.chunks(per);
        let first = runs.next().unwrap_or(&[]);
        let others: Vec<_> = runs
            .map(|r| {
                std::thread::Builder::new()
                    .name("screen-encode".into())
                    .spawn_scoped(s, move || run(r))
                    .map_err(|_| r)
            })
            .collect();
        let mut out = run(first);
        for o in others {
            match o {
                Ok(h) => match h.join() {
                    Ok(v) => out.extend(v),
                    Err(p) => std::panic::resume_unwind(p),
                },
                Err(r) => out.extend(run(r)),
            }
        }
        out
    })
}

/// `f` over every item, shared out among up to `threads` threads (the calling thread is
/// one) in order: each takes the next item not yet taken, so the items are started in
/// order and a thread that is held up does not hold up a whole run of them. Each thread
/// has its own state from `init`.
fn par_for_each<I: Sync, S>(
    items: &[I],
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &I) + Sync,
) {
    let next = AtomicUsize::new(0);
    let work = || {
        let mut state = init();
        while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            f(&mut state, item);
        }
    };
    let work = &work;
    std::thread::scope(|s| {
        for _ in 1..threads.clamp(1, items.len().max(1)) {
            // A thread that cannot be started leaves its share to the others.
            let _ = std::thread::Builder::new()
                .name("screen-encode".into())
                .spawn_scoped(s, work);
        }
        work();
    });
}

/// Every tile of a whole frame (`fb` holds `g.len()` bytes), encoded at `generation`.
fn encode_all(g: &Geometry, fb: &[u8], generation: u64) -> Vec<Arc<TileData>> {
    let all: Vec<usize> = (0..g.tile_count()).collect();
    par_map(
        &all,
        capture_threads(g.len()),
        Scratch::default,
        |sc, &i| {
            let (x, y, w, h) = g.tile_rect(i);
            let start = y as usize * g.stride as usize;
            pack_into(&mut sc.tile, &fb[start..], g.stride, x, w, h);
            Arc::new(TileData::new(generation, &sc.tile, &mut sc.lz4))
        },
    )
}

/// The pixels of a `w`×`h` tile at column `x` of a band of rows starting at `band[0]`,
/// into `out` (whose allocation is reused).
fn pack_into(out: &mut Vec<u8>, band: &[u8], stride: u32, x: u32, w: u32, h: u32) {
    out.clear();
    for row in 0..h as usize {
        let start = row * stride as usize + x as usize * 4;
        out.extend_from_slice(&band[start..start + w as usize * 4]);
    }
}

/// The tiles under `rects`, as (tile row, tile columns) with both in increasing order.
fn tiles_under(g: &Geometry, rects: &[Rect]) -> Vec<(u32, Vec<u32>)> {
    let mut wanted = std::collections::BTreeSet::new();
    let (tx, ty) = (g.tiles_x(), g.height.div_ceil(TILE));
    for r in rects {
        if r.width == 0 || r.height == 0 || r.x >= g.width || r.y >= g.height {
            continue;
        }
        let x2 = r.x.saturating_add(r.width).min(g.width) - 1;
        let y2 = r.y.saturating_add(r.height).min(g.height) - 1;
        for row in r.y / TILE..=(y2 / TILE).min(ty - 1) {
            for col in r.x / TILE..=(x2 / TILE).min(tx - 1) {
                wanted.insert((row, col));
            }
        }
    }
    let mut rows: Vec<(u32, Vec<u32>)> = Vec::new();
    for (row, col) in wanted {
        match rows.last_mut() {
            Some((r, cols)) if *r == row => cols.push(col),
            _ => rows.push((row, vec![col])),
        }
    }
    rows
}

/// Read the tiles at columns `cols` (increasing) of tile row `ty` and call `f` with each
/// tile's index and packed pixels (in `tile`, reused): with one read spanning them all when
/// there are several, else row by row.
fn read_tile_row(
    file: &OwnedFd,
    g: &Geometry,
    ty: u32,
    cols: &[u32],
    buf: &mut Vec<u8>,
    tile: &mut Vec<u8>,
    mut f: impl FnMut(usize, &[u8]),
) -> std::io::Result<()> {
    let y = ty * TILE;
    let h = TILE.min(g.height - y);
    let (Some(&first), Some(&last)) = (cols.first(), cols.last()) else {
        return Ok(());
    };
    let index = |col: u32| (ty * g.tiles_x() + col) as usize;
    let row_start = g.offset + u64::from(y) * u64::from(g.stride);
    if cols.len() >= 4 {
        let x0 = first * TILE;
        let x1 = (last * TILE + TILE).min(g.width);
        let span = (h - 1) as usize * g.stride as usize + (x1 - x0) as usize * 4;
        // Growing zeroes only the new part; the read overwrites all of it.
        buf.resize(span, 0);
        read_exact_at(file, &mut buf[..span], row_start + u64::from(x0) * 4)?;
        for &col in cols {
            let x = col * TILE;
            let w = TILE.min(g.width - x);
            pack_into(tile, buf, g.stride, x - x0, w, h);
            f(index(col), tile);
        }
    } else {
        for &col in cols {
            let x = col * TILE;
            let w = TILE.min(g.width - x);
            tile.clear();
            for row in 0..h {
                let off = row_start + u64::from(row) * u64::from(g.stride) + u64::from(x) * 4;
                read_into(file, tile, (w * 4) as usize, off)?;
            }
            f(index(col), tile);
        }
    }
    Ok(())
}

/// Append `len` bytes read at `offset` to `buf`.
fn read_into(file: &OwnedFd, buf: &mut Vec<u8>, len: usize, offset: u64) -> std::io::Result<()> {
    let start = buf.len();
    buf.resize(start + len, 0);
    read_exact_at(file, &mut buf[start..], offset)
}

/// Re-read the whole framebuffer into `cur` and return the tiles that differ from `prev`
/// (the previous read), encoded at `generation`. Bands of tile rows go to parallel threads,
/// each reading, comparing and compressing its own band.
fn scan(
    file: &OwnedFd,
    g: &Geometry,
    prev: &[u8],
    cur: &mut [u8],
    generation: u64,
) -> std::io::Result<Vec<(usize, Arc<TileData>)>> {
    let band = TILE as usize * g.stride as usize;
    let tile_rows = g.height.div_ceil(TILE) as usize;
    let threads = capture_threads(g.len()).min(tile_rows);
    let per = tile_rows.div_ceil(threads) * band;
    let bands: Vec<(usize, &mut [u8])> = cur[..g.len()]
        .chunks_mut(per)
        .enumerate()
        .map(|(k, c)| (k * per, c))
        .collect();
    let work =
        |(start, chunk): (usize, &mut [u8])| -> std::io::Result<Vec<(usize, Arc<TileData>)>> {
            let mut scratch = Vec::new();
            let mut out = Vec::new();
            // One tile row at a time, so the comparison finds what was just read in cache.
            for (k, rows) in chunk.chunks_mut(band).enumerate() {
                let at = start + k * band;
                read_exact_at(file, rows, g.offset + at as u64)?;
                out.extend(
                    scan_band(g, at / band, &prev[at..at + rows.len()], rows)
                        .into_iter()
                        .map(|(i, px)| (i, Arc::new(TileData::new(generation, &px, &mut scratch)))),
                );
            }
            Ok(out)
        };
    // Each band is taken once, by a started thread or, when it gets there first (or a
    // thread cannot be started), by this one.
    /// A band of `cur` (its byte offset, its bytes), until a thread takes it.
    type Band<'a> = std::sync::Mutex<Option<(usize, &'a mut [u8])>>;
    let bands: Vec<Band<'_>> = bands
        .into_iter()
        .map(|b| std::sync::Mutex::new(Some(b)))
        .collect();
    fn take<T>(b: &std::sync::Mutex<Option<T>>) -> Option<T> {
        b.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = bands[1..]
            .iter()
            .filter_map(|b| {
                std::thread::Builder::new()
                    .name("screen-scan".into())
                    .spawn_scoped(s, || take(b).map(work))
                    .ok()
            })
            .collect();
        let mut out = Vec::new();
        for b in &bands {
            if let Some(b) = take(b) {
                out.extend(work(b)?);
            }
        }
        for h in handles {
            match h.join() {
                Ok(Some(r)) => out.extend(r?),
                Ok(None) => {}
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        Ok(out)
    })
}

/// The tiles of a band of whole tile rows (starting at tile row `row0`) whose pixels in
/// `cur` differ from `prev`, packed. Rows are compared whole first: an unchanged row costs
/// one comparison.
fn scan_band(g: &Geometry, row0: usize, prev: &[u8], cur: &[u8]) -> Vec<(usize, Vec<u8>)> {
    let stride = g.stride as usize;
    let band = TILE as usize * stride;
    let tiles_x = g.tiles_x() as usize;
    let width = g.width as usize * 4;
    let mut out = Vec::new();
    let mut changed = vec![false; tiles_x];
    for (k, (c, p)) in cur.chunks(band).zip(prev.chunks(band)).enumerate() {
        changed.fill(false);
        let h = c.len().div_ceil(stride).min(TILE as usize);
        for row in 0..h {
            let at = row * stride;
            if c[at..at + width] == p[at..at + width] {
                continue;
            }
            for (tx, flag) in changed.iter_mut().enumerate() {
                let a = at + tx * TILE as usize * 4;
                let b = (a + TILE as usize * 4).min(at + width);
                if !*flag && c[a..b] != p[a..b] {
                    *flag = true;
                }
            }
        }
        for (tx, _) in changed.iter().enumerate().filter(|(_, f)| **f) {
            let x = tx as u32 * TILE;
            let w = TILE.min(g.width - x);
            let mut px = Vec::new();
            pack_into(&mut px, c, g.stride, x, w, h as u32);
            out.push(((row0 + k) * tiles_x + tx, px));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::pattern;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;

    fn memfile(g: &Geometry) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(g.offset + g.len() as u64).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    fn paint(f: &mut std::fs::File, g: &Geometry, x: u32, y: u32, w: u32, h: u32, v: u8) {
        for row in y..y + h {
            let off = g.offset + u64::from(row) * u64::from(g.stride) + u64::from(x) * 4;
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&vec![v; (w * 4) as usize]).unwrap();
        }
    }

    fn apply(fb: &mut [u8], g: &Geometry, u: &FrameUpdate) {
        for t in &u.tiles {
            let px = proto::tiles::decode(t).expect("tile decodes");
            for r in 0..t.height {
                let dst = ((t.y + r) * g.width + t.x) as usize * 4;
                let src = (r * t.width) as usize * 4;
                fb[dst..dst + t.width as usize * 4]
                    .copy_from_slice(&px[src..src + t.width as usize * 4]);
            }
        }
    }

    fn geometry() -> Geometry {
        Geometry {
            offset: 4096,
            width: 200,
            height: 100,
            stride: 200 * 4 + 64,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_frame_then_only_changed_tiles_then_nothing() {
        let g = geometry();
        let mut f = memfile(&g);
        paint(&mut f, &g, 0, 0, 200, 100, 0x11);
        let screen = Screen::start(f.try_clone().unwrap().into(), g).unwrap();
        let mut rx = screen.subscribe(TileEncoding::Lz4);
        let first = rx.recv().await.unwrap().unwrap();
        assert!(first.full && first.active);
        assert_eq!(first.tiles.len(), 4 * 2);
        let mut fb = vec![0u8; (g.width * g.height * 4) as usize];
        apply(&mut fb, &g, &first);
        assert!(fb.iter().all(|&b| b == 0x11));

        paint(&mut f, &g, 130, 70, 10, 10, 0x22);
        let u = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!u.full);
        assert_eq!(u.tiles.len(), 1, "only the tile at (128,64) changed");
        assert_eq!(
            (
                u.tiles[0].x,
                u.tiles[0].y,
                u.tiles[0].width,
                u.tiles[0].height
            ),
            (128, 64, 64, 36)
        );
        apply(&mut fb, &g, &u);
        assert_eq!(fb[((75 * 200 + 135) * 4) as usize], 0x22);

        let idle = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(idle.is_err(), "nothing is sent while nothing changes");
        screen.stop();
        let last = rx.recv().await.unwrap().unwrap();
        assert!(!last.active);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_client_skips_states_but_ends_up_exact() {
        let g = geometry();
        let mut f = memfile(&g);
        let screen = Screen::start(f.try_clone().unwrap().into(), g).unwrap();
        let mut rx = screen.subscribe(TileEncoding::Zstd);
        let mut fb = vec![0u8; (g.width * g.height * 4) as usize];
        apply(&mut fb, &g, &rx.recv().await.unwrap().unwrap());
        for v in 1..=40u8 {
            paint(&mut f, &g, u32::from(v) % 190, 0, 10, 100, v);
            std::thread::sleep(Duration::from_millis(2));
        }
        // Don't read for a while: the agent must not queue 40 updates.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut updates = 0;
        while let Ok(Some(Ok(u))) =
            tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
        {
            apply(&mut fb, &g, &u);
            updates += 1;
        }
        assert!(updates <= 3, "{updates} updates queued for a slow client");
        let mut want = vec![0u8; g.len()];
        read_exact_at(&f.try_clone().unwrap().into(), &mut want, g.offset).unwrap();
        for row in 0..g.height as usize {
            let a = &fb[row * 800..row * 800 + 800];
            let b = &want[row * g.stride as usize..row * g.stride as usize + 800];
            assert_eq!(a, b, "row {row}");
        }
        screen.stop();
    }

    /// With a synthetic video device: a mode change gives a full update at the new size,
    /// then only the tiles under reported dirty rectangles are sent — a change the worker
    /// did not report is not found by scanning.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn display_events_drive_geometry_and_dirty_tiles_without_scanning() {
        let boot = geometry();
        let mut f = memfile(&Geometry {
            height: 400,
            ..boot
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let screen =
            Screen::start_with_display(f.try_clone().unwrap().into(), boot, polled(rx)).unwrap();
        let mut sub = screen.subscribe(TileEncoding::Raw);
        let first = sub.recv().await.unwrap().unwrap();
        assert!(first.full && (first.width, first.height) == (200, 100));

        // The driver takes over at 300x150 (stride 1200) at the same place.
        let g2 = Geometry {
            offset: 4096,
            width: 300,
            height: 150,
            stride: 1200,
        };
        paint(&mut f, &g2, 0, 0, 300, 150, 0x33);
        tx.send(DisplayEvent::Mode(proto::worker::Framebuffer {
            offset: 4096,
            width: 300,
            height: 150,
            stride: 1200,
            bytes_per_pixel: 4,
        }))
        .unwrap();
        // The boot framebuffer's poller may report the paint first (same memory).
        let mut u = next(&mut sub).await;
        while !u.full {
            assert_eq!((u.width, u.height), (200, 100));
            u = next(&mut sub).await;
        }
        assert!((u.width, u.height) == (300, 150), "{u:?}");
        assert_eq!(u.tiles.len(), 5 * 3);
        let mut fb = vec![0u8; 300 * 150 * 4];
        apply(&mut fb, &g2, &u);
        assert!(fb.iter().all(|&b| b == 0x33));
        assert_eq!(screen.geometry(), g2);

        // Unreported change: nothing is sent.
        paint(&mut f, &g2, 0, 0, 10, 10, 0x44);
        let idle = tokio::time::timeout(Duration::from_millis(400), sub.recv()).await;
        assert!(
            idle.is_err(),
            "a change without a dirty rectangle was found by scanning"
        );

        // Reported change: exactly the tiles under it.
        paint(&mut f, &g2, 130, 70, 10, 10, 0x55);
        tx.send(DisplayEvent::Dirty(vec![Rect {
            x: 130,
            y: 70,
            width: 10,
            height: 10,
        }]))
        .unwrap();
        let u = next(&mut sub).await;
        assert!(!u.full);
        assert!(!u.more, "one tile row is one update");
        assert_eq!(u.tiles.len(), 1);
        assert_eq!((u.tiles[0].x, u.tiles[0].y), (128, 64));
        apply(&mut fb, &g2, &u);
        assert_eq!(fb[(75 * 300 + 135) * 4], 0x55);

        // The driver goes away: back to the boot framebuffer, full update.
        tx.send(DisplayEvent::Inactive).unwrap();
        let u = next(&mut sub).await;
        assert!(u.full && (u.width, u.height) == (200, 100));
        screen.stop();
    }

    /// Display events from a worker that does not log the boot framebuffer's writes.
    fn polled(events: std::sync::mpsc::Receiver<DisplayEvent>) -> Option<DisplaySource> {
        Some(DisplaySource {
            events,
            boot_dirty_log: false,
            control: None,
        })
    }

    /// With KVM's dirty page log: the boot framebuffer is never searched; exactly the
    /// tiles under the written rows are read, and rows written while nobody watched are
    /// read when somebody does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logged_boot_framebuffer_rows_are_read_and_nothing_else() {
        let g = geometry();
        let mut f = memfile(&g);
        paint(&mut f, &g, 0, 0, 200, 100, 0x11);
        let (tx, events) = std::sync::mpsc::channel();
        let (worker_side, control) = std::os::unix::net::UnixStream::pair().unwrap();
        let screen = Screen::start_with_display(
            f.try_clone().unwrap().into(),
            g,
            Some(DisplaySource {
                events,
                boot_dirty_log: true,
                control: Some(control),
            }),
        )
        .unwrap();
        // Written before anybody watches: kept for later.
        paint(&mut f, &g, 10, 70, 5, 5, 0x22);
        tx.send(DisplayEvent::BootDirty(vec![Rect {
            x: 0,
            y: 70,
            width: 200,
            height: 5,
        }]))
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut sub = screen.subscribe(TileEncoding::Raw);
        let mut fb = vec![0u8; (g.width * g.height * 4) as usize];
        let first = next(&mut sub).await;
        assert!(first.full);
        apply(&mut fb, &g, &first);
        if fb[((72 * 200 + 12) * 4) as usize] != 0x22 {
            let u = next(&mut sub).await;
            assert!(!u.full);
            assert_eq!(u.tiles.len(), 1, "only the tile at (0,64) changed: {u:?}");
            apply(&mut fb, &g, &u);
        }
        assert_eq!(fb[((72 * 200 + 12) * 4) as usize], 0x22);

        // A write the log did not report is not looked for.
        paint(&mut f, &g, 150, 10, 10, 10, 0x33);
        let idle = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await;
        assert!(
            idle.is_err(),
            "the boot framebuffer was searched for changes"
        );

        // Reported rows: the changed tiles under them, and only those.
        tx.send(DisplayEvent::BootDirty(vec![Rect {
            x: 0,
            y: 10,
            width: 200,
            height: 10,
        }]))
        .unwrap();
        let u = next(&mut sub).await;
        assert!(!u.full);
        assert_eq!(u.tiles.len(), 1, "{u:?}");
        assert_eq!((u.tiles[0].x, u.tiles[0].y), (128, 0));
        apply(&mut fb, &g, &u);
        assert_eq!(fb[((15 * 200 + 155) * 4) as usize], 0x33);

        // Nobody watches for a while: the worker is told to stop reading the log, and to
        // start again when somebody watches. (The grace before this test's first
        // subscriber was too short for the first.)
        let mut requests = WatchRequests::new(worker_side);
        drop(sub);
        assert!(!requests.next(), "rows still wanted with nobody watching");
        let mut sub = screen.subscribe(TileEncoding::Raw);
        assert!(
            requests.next(),
            "rows not wanted again for a new subscriber"
        );
        let first = next(&mut sub).await;
        assert!(first.full);

        // The worker goes away: nothing reports writes any more, so the screen is polled.
        drop(tx);
        std::thread::sleep(Duration::from_millis(150));
        paint(&mut f, &g, 20, 20, 4, 4, 0x44);
        // (The first scan may also resend tiles the log already delivered.)
        while fb[((21 * 200 + 21) * 4) as usize] != 0x44 {
            let u = next(&mut sub).await;
            apply(&mut fb, &g, &u);
        }
        screen.stop();
    }

    /// `watch_boot_framebuffer` requests as the worker reads them.
    struct WatchRequests {
        stream: std::os::unix::net::UnixStream,
        decoder: proto::framing::Decoder,
    }

    impl WatchRequests {
        fn new(stream: std::os::unix::net::UnixStream) -> Self {
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            WatchRequests {
                stream,
                decoder: proto::framing::Decoder::default(),
            }
        }

        fn next(&mut self) -> bool {
            use std::io::Read;
            loop {
                if let Some(r) = self
                    .decoder
                    .next_message::<proto::worker::Request>()
                    .unwrap()
                {
                    match r.kind {
                        Some(proto::worker::request::Kind::WatchBootFramebuffer(on)) => return on,
                        other => panic!("{other:?}"),
                    }
                }
                let mut buf = [0u8; 256];
                let n = (&self.stream).read(&mut buf).expect("a request within 5 s");
                assert!(n > 0, "the control connection closed");
                self.decoder.push(&buf[..n]);
            }
        }
    }

    #[test]
    fn bounding_holds_every_rectangle() {
        let r = |x, y, width, height| Rect {
            x,
            y,
            width,
            height,
        };
        assert_eq!(
            bounding(&[r(0, 70, 200, 5), r(10, 3, 4, 4), r(50, 90, 10, 10)]),
            r(0, 3, 200, 97)
        );
    }

    /// Updates until one says the capture is complete (`more` false).
    async fn until_complete(
        sub: &mut mpsc::Receiver<Result<FrameUpdate, tonic::Status>>,
    ) -> Vec<FrameUpdate> {
        let mut parts = Vec::new();
        loop {
            let u = next(sub).await;
            let more = u.more;
            parts.push(u);
            if !more {
                return parts;
            }
        }
    }

    /// A large dirty rectangle is sent in parts as its tile rows are captured: every part
    /// but the last says `more`, no tile comes twice, and together they are exactly the new
    /// frame. A rectangle larger than the change sends only the changed tiles and still
    /// ends with a part that says the capture is complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_dirty_rectangles_arrive_in_parts_that_end_complete() {
        // Big enough for several capture threads (over 1 MiB), with partial edge tiles.
        let g = Geometry {
            offset: 4096,
            width: 1000,
            height: 600,
            stride: 1000 * 4 + 32,
        };
        let f = memfile(&g);
        let (tx, rx) = std::sync::mpsc::channel();
        // Booted at a smaller size, so the mode change's full update is told apart.
        let screen =
            Screen::start_with_display(f.try_clone().unwrap().into(), geometry(), polled(rx))
                .unwrap();
        tx.send(DisplayEvent::Mode(proto::worker::Framebuffer {
            offset: g.offset,
            width: g.width,
            height: g.height,
            stride: g.stride,
            bytes_per_pixel: 4,
        }))
        .unwrap();
        let mut sub = screen.subscribe(TileEncoding::Lz4);
        let mut fb = vec![0u8; g.len()];
        // The mode change's full update (and perhaps the first state before it).
        loop {
            let u = next(&mut sub).await;
            if u.width == g.width {
                assert!(u.full && !u.more);
                apply(&mut fb, &g, &u);
                break;
            }
        }

        // Every pixel row of `rows` different (from `seed` on), into the guest's memory and
        // into `want`, the frame the client should end up with.
        let mut want = vec![0u8; g.len()];
        let draw = |want: &mut [u8], rows: std::ops::Range<u32>, seed: u64| {
            let line = (g.width * 4) as usize;
            for y in rows {
                let row = pattern(line, u64::from(y) + seed);
                f.write_all_at(&row, g.offset + u64::from(y) * u64::from(g.stride))
                    .unwrap();
                want[y as usize * line..(y as usize + 1) * line].copy_from_slice(&row);
            }
        };
        draw(&mut want, 0..g.height, 1);
        let whole = Rect {
            x: 0,
            y: 0,
            width: g.width,
            height: g.height,
        };
        tx.send(DisplayEvent::Dirty(vec![whole])).unwrap();
        let parts = until_complete(&mut sub).await;
        let mut seen = std::collections::HashSet::new();
        for u in &parts {
            for t in &u.tiles {
                assert!(seen.insert((t.x, t.y)), "tile {},{} sent twice", t.x, t.y);
            }
            apply(&mut fb, &g, u);
        }
        assert_eq!(seen.len(), g.tile_count(), "every tile changed");
        assert!(fb == want, "the parts together are the new frame");

        // Only the top 100 rows change, but the whole screen is reported dirty.
        draw(&mut want, 0..100, 1000);
        tx.send(DisplayEvent::Dirty(vec![whole])).unwrap();
        let parts = until_complete(&mut sub).await;
        for u in &parts {
            assert!(
                u.tiles.iter().all(|t| t.y < 128),
                "an unchanged tile was sent: {:?}",
                u.tiles.iter().map(|t| (t.x, t.y)).collect::<Vec<_>>()
            );
            apply(&mut fb, &g, u);
        }
        assert!(fb == want);
        let idle = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await;
        assert!(idle.is_err(), "nothing more after the capture completed");
        screen.stop();
    }

    async fn next(sub: &mut mpsc::Receiver<Result<FrameUpdate, tonic::Status>>) -> FrameUpdate {
        tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("an update")
            .unwrap()
            .unwrap()
    }

    /// A frame big enough to be scanned by several threads, with a padded stride and
    /// partial tiles on the right and bottom edges: exactly the tiles holding a changed
    /// byte come back, with exactly the new pixels.
    #[test]
    fn parallel_scan_finds_exactly_the_changed_tiles() {
        let g = Geometry {
            offset: 8192,
            width: 1000,
            height: 700,
            stride: 1000 * 4 + 96,
        };
        let file = memfile(&g);
        let before = pattern(g.len(), 7);
        file.write_all_at(&before, g.offset).unwrap();
        let fd: OwnedFd = file.try_clone().unwrap().into();
        assert!(capture_threads(g.len()) >= 1);
        let mut cur = vec![0u8; g.len()];
        assert!(scan(&fd, &g, &before, &mut cur, 2).unwrap().is_empty());
        assert_eq!(cur, before);

        // One byte in each of these pixels; the stride padding changes too, and must not count.
        let pixels = [(0, 0), (999, 699), (64, 63), (500, 640), (130, 300)];
        let mut after = before.clone();
        for &(x, y) in &pixels {
            after[y * g.stride as usize + x * 4 + 1] ^= 0x5a;
        }
        for y in 0..g.height as usize {
            after[y * g.stride as usize + 4000] ^= 0xff;
        }
        file.write_all_at(&after, g.offset).unwrap();
        let mut found = scan(&fd, &g, &before, &mut cur, 3).unwrap();
        found.sort_by_key(|(i, _)| *i);
        let mut want: Vec<usize> = pixels
            .iter()
            .map(|&(x, y)| (y / 64) * 16 + x / 64)
            .collect();
        want.sort();
        assert_eq!(found.iter().map(|(i, _)| *i).collect::<Vec<_>>(), want);
        let all = encode_all(&g, &after, 3);
        for (i, t) in &found {
            assert_eq!(t.generation, 3);
            let (_, _, w, h) = g.tile_rect(*i);
            assert_eq!(t.raw(w, h), all[*i].raw(w, h), "tile {i}");
            assert_eq!(t.hash, all[*i].hash, "tile {i}");
            assert_eq!(t.raw(w, h).len(), (w * h * 4) as usize);
        }
    }

    /// Dirty rectangles read as one span per tile row (4 or more tiles) or row by row
    /// give the same pixels as a whole-frame read.
    #[test]
    fn dirty_tiles_read_the_same_pixels_either_way() {
        let g = Geometry {
            offset: 4096,
            width: 700,
            height: 150,
            stride: 700 * 4 + 32,
        };
        let file = memfile(&g);
        let frame = pattern(g.len(), 3);
        file.write_all_at(&frame, g.offset).unwrap();
        let fd: OwnedFd = file.try_clone().unwrap().into();
        let all = encode_all(&g, &frame, 1);
        let rows = tiles_under(
            &g,
            &[
                Rect {
                    x: 10,
                    y: 0,
                    width: 600,
                    height: 1,
                },
                Rect {
                    x: 690,
                    y: 140,
                    width: 100,
                    height: 100,
                },
                Rect {
                    x: 0,
                    y: 70,
                    width: 1,
                    height: 1,
                },
                Rect {
                    x: 800,
                    y: 0,
                    width: 5,
                    height: 5,
                },
                Rect {
                    x: 5,
                    y: 5,
                    width: 0,
                    height: 5,
                },
            ],
        );
        assert_eq!(
            rows,
            vec![(0, (0..10).collect()), (1, vec![0]), (2, vec![10])]
        );
        let mut seen = Vec::new();
        for (ty, cols) in &rows {
            read_tile_row(
                &fd,
                &g,
                *ty,
                cols,
                &mut Vec::new(),
                &mut Vec::new(),
                |i, px| {
                    let (_, _, w, h) = g.tile_rect(i);
                    assert_eq!(px[..], all[i].raw(w, h)[..], "tile {i}");
                    assert_eq!(tile_hash(px), all[i].hash, "tile {i}");
                    seen.push(i);
                },
            )
            .unwrap();
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 32]);
    }

    #[test]
    fn hostile_geometry_is_refused() {
        let fb = |offset, width, height, stride, bpp| proto::worker::Framebuffer {
            offset,
            width,
            height,
            stride,
            bytes_per_pixel: bpp,
        };
        assert!(Geometry::validate(&fb(0, 100, 100, 400, 4), 40_000).is_some());
        assert!(Geometry::validate(&fb(1, 100, 100, 400, 4), 40_000).is_none());
        assert!(Geometry::validate(&fb(0, 100, 100, 399, 4), 1 << 20).is_none());
        assert!(Geometry::validate(&fb(0, 0, 100, 400, 4), 1 << 20).is_none());
        assert!(Geometry::validate(&fb(u64::MAX, 100, 100, 400, 4), u64::MAX).is_none());
        assert!(Geometry::validate(&fb(0, 100, 100, 400, 3), 1 << 20).is_none());
    }
}
