//! A running VM's screen as compressed tiles, fanned out to every console watching it.
//!
//! The worker passes the guest memory file; the framebuffer lives at a known offset in it.
//! A capture thread reads the framebuffer periodically, compares it with the previous read
//! tile by tile, and stores each changed tile (raw, and LZ4-compressed at once) with the
//! capture's generation number. Each subscriber sends, when it is ready, every tile newer
//! than what it has sent: a slow client skips intermediate states instead of queueing
//! them, and nothing is sent while nothing changes.

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
    raw: Bytes,
    lz4: Bytes,
    zstd: OnceLock<Bytes>,
}

impl TileData {
    fn new(generation: u64, raw: Vec<u8>) -> Self {
        let lz4 = proto::tiles::encode_lz4(&raw);
        TileData {
            generation,
            raw: raw.into(),
            lz4: lz4.into(),
            zstd: OnceLock::new(),
        }
    }

    fn encoded(&self, enc: TileEncoding) -> Bytes {
        match enc {
            TileEncoding::Raw => self.raw.clone(),
            TileEncoding::Zstd => self
                .zstd
                .get_or_init(|| {
                    zstd::bulk::compress(&self.raw, 1)
                        .map(Bytes::from)
                        .unwrap_or_else(|_| self.raw.clone())
                })
                .clone(),
            TileEncoding::Lz4 | TileEncoding::Unspecified => self.lz4.clone(),
        }
    }
}

#[derive(Debug)]
struct Frame {
    tiles: Vec<Arc<TileData>>,
    generation: u64,
    captured_us: i64,
}

/// A running VM's screen.
#[derive(Debug)]
pub struct Screen {
    geometry: Geometry,
    frame: Mutex<Frame>,
    generation: watch::Sender<u64>,
    subscribers: AtomicUsize,
    wake: (Mutex<()>, Condvar),
    stopped: AtomicBool,
}

impl Screen {
    /// Start capturing from `file` (the guest memory file) at `geometry`.
    pub fn start(file: OwnedFd, geometry: Geometry) -> std::io::Result<Arc<Screen>> {
        let mut first = vec![0u8; geometry.len()];
        read_exact_at(&file, &mut first, geometry.offset)?;
        let tiles = (0..geometry.tile_count())
            .map(|i| Arc::new(TileData::new(1, pack_tile(&geometry, &first, i))))
            .collect();
        let screen = Arc::new(Screen {
            geometry,
            frame: Mutex::new(Frame {
                tiles,
                generation: 1,
                captured_us: now_us(),
            }),
            generation: watch::channel(1).0,
            subscribers: AtomicUsize::new(0),
            wake: (Mutex::new(()), Condvar::new()),
            stopped: AtomicBool::new(false),
        });
        let s = screen.clone();
        std::thread::Builder::new()
            .name("screen-capture".into())
            .spawn(move || s.capture_loop(file, first))?;
        Ok(screen)
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
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

    fn capture_loop(&self, file: OwnedFd, mut prev: Vec<u8>) {
        let g = self.geometry;
        let mut cur = vec![0u8; g.len()];
        let mut last_change = Instant::now();
        let mut next = Instant::now();
        while !self.stopped.load(Ordering::SeqCst) {
            if self.subscribers.load(Ordering::SeqCst) == 0 {
                let guard = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
                let _ = self
                    .wake
                    .1
                    .wait_timeout(guard, Duration::from_millis(500))
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            }
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
            if read_exact_at(&file, &mut cur, g.offset).is_err() {
                tracing::warn!("cannot read the guest framebuffer; screen capture stops");
                break;
            }
            let changed: Vec<usize> = (0..g.tile_count())
                .filter(|&i| tile_differs(&g, &prev, &cur, i))
                .collect();
            if changed.is_empty() {
                continue;
            }
            last_change = Instant::now();
            let generation = self.frame().generation + 1;
            let fresh: Vec<(usize, Arc<TileData>)> = changed
                .iter()
                .map(|&i| {
                    (
                        i,
                        Arc::new(TileData::new(generation, pack_tile(&g, &cur, i))),
                    )
                })
                .collect();
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
            let mut sent = vec![0u64; screen.geometry.tile_count()];
            let mut seq = 0u64;
            loop {
                gen_rx.borrow_and_update();
                let s = screen.clone();
                let full = seq == 0;
                let (update, newest) = match tokio::task::spawn_blocking(move || {
                    let u = s.update_since(&sent, encoding, full);
                    (u, sent)
                })
                .await
                {
                    Ok((u, old)) => {
                        sent = old;
                        u
                    }
                    Err(_) => break,
                };
                if !update.tiles.is_empty() {
                    seq += 1;
                    for (i, g) in newest {
                        sent[i] = g;
                    }
                    let mut update = update;
                    update.seq = seq;
                    if tx.send(Ok(update)).await.is_err() {
                        break;
                    }
                }
                if screen.stopped.load(Ordering::SeqCst) || gen_rx.changed().await.is_err() {
                    break;
                }
                if screen.stopped.load(Ordering::SeqCst) {
                    break;
                }
            }
            if screen.stopped.load(Ordering::SeqCst) {
                let g = screen.geometry;
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

    /// Tiles newer than `sent` (all when `full`), and the generations they carry.
    fn update_since(
        &self,
        sent: &[u64],
        encoding: TileEncoding,
        full: bool,
    ) -> (FrameUpdate, Vec<(usize, u64)>) {
        let g = self.geometry;
        let (tiles, captured_us): (Vec<(usize, Arc<TileData>)>, i64) = {
            let f = self.frame();
            let t = f
                .tiles
                .iter()
                .enumerate()
                .filter(|(i, t)| full || t.generation > sent[*i])
                .map(|(i, t)| (i, t.clone()))
                .collect();
            (t, f.captured_us)
        };
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
                    data: t.encoded(enc),
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
            },
            newest,
        )
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

fn tile_differs(g: &Geometry, a: &[u8], b: &[u8], i: usize) -> bool {
    let (x, y, w, h) = g.tile_rect(i);
    (y..y + h).any(|row| {
        let start = row as usize * g.stride as usize + x as usize * 4;
        let end = start + w as usize * 4;
        a[start..end] != b[start..end]
    })
}

fn pack_tile(g: &Geometry, fb: &[u8], i: usize) -> Vec<u8> {
    let (x, y, w, h) = g.tile_rect(i);
    let mut out = Vec::with_capacity((w * h * 4) as usize);
    for row in y..y + h {
        let start = row as usize * g.stride as usize + x as usize * 4;
        out.extend_from_slice(&fb[start..start + w as usize * 4]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

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
