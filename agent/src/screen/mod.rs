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
//! Rooms: this file holds the screen and its fan-out to subscribers; [`capture`] decides what
//! the capture thread does next (no threads or clocks of its own: unit tests drive it);
//! [`tiles`] finds, reads and encodes tiles; [`pool`] is the one thread pool captures share.
//!
//! Either way each changed tile is stored LZ4-compressed, with a 128-bit hash of its pixels
//! (what the next capture compares with) and the capture's generation number; raw pixels
//! are decoded from it only for subscribers that ask for raw or zstd tiles. Tiles are
//! packed in a reused buffer, so a capture writes no screen-sized memory of its own. Each
//! subscriber sends, when it is ready, every tile newer than what it has sent: a slow
//! client skips intermediate states instead of queueing them, and nothing is sent while
//! nothing changes.

mod capture;
mod pool;
mod tiles;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use proto::v1::{FrameUpdate, PixelFormat, Tile, TileEncoding};
use tokio::sync::{mpsc, watch};

use self::capture::{Action, CaptureState, Input};
pub use self::tiles::{Geometry, Rect, TILE};
use self::tiles::{
    Scratch, TILE_BYTES, TileData, encode_all, read_exact_at, read_tile_row, scan, tile_hash,
    tiles_under,
};

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
    /// are wanted.
    pub control: Option<crate::worker::DisplayControl>,
}

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

    /// The capture thread: carries out what [`CaptureState`] decides.
    fn capture_loop(&self, file: OwnedFd, mut prev: Vec<u8>, display: Option<DisplaySource>) {
        let file_len = rustix::fs::fstat(&file).map_or(0, |s| s.st_size as u64);
        let (mut events, boot_log, mut control) = match display {
            Some(d) => (Some(d.events), d.boot_dirty_log, d.control),
            None => (None, false, None),
        };
        let mut state = CaptureState::new(self.boot, events.is_some(), boot_log, Instant::now());
        if state.boot_logged() {
            tracing::debug!("the boot framebuffer's writes are logged: no polling");
        }
        let mut cur = vec![0u8; self.boot.len()];
        while !self.stopped.load(Ordering::SeqCst) {
            // Display events first: they say which mode we are in.
            let input = match &events {
                None => Input::Events(Vec::new()),
                Some(rx) => match rx.recv_timeout(state.event_wait()) {
                    Ok(e) => {
                        let mut v = vec![e];
                        v.extend(rx.try_iter());
                        Input::Events(v)
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Input::Events(Vec::new()),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        events = None;
                        Input::Disconnected
                    }
                },
            };
            let subscribers = self.subscribers.load(Ordering::SeqCst);
            for action in state.step(input, subscribers, Instant::now(), file_len) {
                match action {
                    Action::Switch(g) => self.switch(&file, g, &mut prev),
                    Action::Capture(g, rects) => self.capture_rects(&file, g, &rects),
                    Action::WatchRows(want) => {
                        let told = control
                            .as_mut()
                            .is_some_and(|c| c.watch_boot_framebuffer(want));
                        state.told(want, told);
                    }
                    Action::Idle(d) => {
                        let guard = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = self
                            .wake
                            .1
                            .wait_timeout(guard, d)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                    Action::Poll(at) => {
                        let now = Instant::now();
                        if at > now {
                            std::thread::sleep(at - now);
                        }
                        let started = Instant::now();
                        let g = self.boot;
                        cur.resize(g.len(), 0);
                        prev.resize(g.len(), 0);
                        let generation = self.frame().generation + 1;
                        let fresh = match scan(&file, &g, &prev, &mut cur, generation) {
                            Ok(f) => f,
                            Err(e) => {
                                tracing::warn!(
                                    "cannot read the guest framebuffer ({e}); screen capture stops"
                                );
                                self.stop();
                                return;
                            }
                        };
                        state.polled(started, !fresh.is_empty());
                        if fresh.is_empty() {
                            continue;
                        }
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
                }
            }
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
        let threads = pool::capture_threads(bytes);
        let done = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        pool::for_each_in_order(&rows, threads, Scratch::default, |sc, (ty, txs)| {
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
                let r = g.tile_rect(*i);
                Tile {
                    x: r.x,
                    y: r.y,
                    width: r.width,
                    height: r.height,
                    encoding: enc as i32,
                    data: t.encoded(enc, r.width, r.height),
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

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::pattern;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

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
                control: Some(crate::worker::DisplayControl::new(control)),
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
}
