//! The screen as tiles: the framebuffer's geometry, tiles kept LZ4-compressed with a hash of
//! their pixels, and the ways a capture finds and encodes changed tiles (a whole frame, the
//! tiles under rectangles, a scan comparing with the previous read). The work of a capture is
//! shared out on the screen thread pool ([`super::pool`]).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use proto::v1::{Tile, TileEncoding};

use super::pool;

/// Tile edge in pixels.
pub const TILE: u32 = 64;

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

    pub(super) fn len(&self) -> usize {
        self.stride as usize * self.height as usize
    }

    pub(super) fn tiles_x(&self) -> u32 {
        self.width.div_ceil(TILE)
    }

    pub(super) fn tile_count(&self) -> usize {
        (self.tiles_x() * self.height.div_ceil(TILE)) as usize
    }

    /// Where tile `i` is on the screen.
    pub(super) fn tile_rect(&self, i: usize) -> Rect {
        let i = i as u32;
        let x = (i % self.tiles_x()) * TILE;
        let y = (i / self.tiles_x()) * TILE;
        Rect {
            x,
            y,
            width: TILE.min(self.width - x),
            height: TILE.min(self.height - y),
        }
    }
}

/// One tile's pixels at one generation.
#[derive(Debug)]
pub(super) struct TileData {
    pub(super) generation: u64,
    /// [`tile_hash`] of the pixels.
    pub(super) hash: u128,
    lz4: Bytes,
    raw: OnceLock<Bytes>,
    zstd: OnceLock<Bytes>,
}

/// What captures compare tiles by: equal pixels have equal hashes, and different pixels
/// (xxh3, 128 bits) practically never do. A guest that made two of its own tiles collide
/// would only keep its own screen from updating.
pub(super) fn tile_hash(px: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(px)
}

impl TileData {
    /// `scratch` is the compressor's working buffer, reused across tiles.
    pub(super) fn new(generation: u64, px: &[u8], scratch: &mut Vec<u8>) -> Self {
        Self::with_hash(generation, tile_hash(px), px, scratch)
    }

    pub(super) fn with_hash(generation: u64, hash: u128, px: &[u8], scratch: &mut Vec<u8>) -> Self {
        TileData {
            generation,
            hash,
            lz4: proto::tiles::encode_lz4_with(px, scratch).into(),
            raw: OnceLock::new(),
            zstd: OnceLock::new(),
        }
    }

    /// The pixels of this `w`×`h` tile, decoded once.
    pub(super) fn raw(&self, w: u32, h: u32) -> Bytes {
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

    pub(super) fn encoded(&self, enc: TileEncoding, w: u32, h: u32) -> Bytes {
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

/// A rectangle of the screen in pixels: a dirty rectangle the worker reports, written rows
/// of the boot framebuffer, a tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The smallest rectangle holding all of `rects` (not empty).
pub(super) fn bounding(rects: &[Rect]) -> Rect {
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

pub(super) fn read_exact_at(file: &OwnedFd, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
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
pub(super) const TILE_BYTES: usize = (TILE * TILE * 4) as usize;

/// A capture thread's reusable buffers.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) read: Vec<u8>,
    pub(super) tile: Vec<u8>,
    pub(super) lz4: Vec<u8>,
}

/// Every tile of a whole frame (`fb` holds `g.len()` bytes), encoded at `generation`.
pub(super) fn encode_all(g: &Geometry, fb: &[u8], generation: u64) -> Vec<Arc<TileData>> {
    let all: Vec<usize> = (0..g.tile_count()).collect();
    pool::map_in_order(
        &all,
        pool::capture_threads(g.len()),
        Scratch::default,
        |sc, &i| {
            let r = g.tile_rect(i);
            let start = r.y as usize * g.stride as usize;
            pack_into(&mut sc.tile, &fb[start..], g.stride, r.x, r.width, r.height);
            Arc::new(TileData::new(generation, &sc.tile, &mut sc.lz4))
        },
    )
}

/// The pixels of a `w`×`h` tile at column `x` of a band of rows starting at `band[0]`,
/// into `out` (whose allocation is reused).
pub(super) fn pack_into(out: &mut Vec<u8>, band: &[u8], stride: u32, x: u32, w: u32, h: u32) {
    out.clear();
    for row in 0..h as usize {
        let start = row * stride as usize + x as usize * 4;
        out.extend_from_slice(&band[start..start + w as usize * 4]);
    }
}

/// The tiles under `rects`, as (tile row, tile columns) with both in increasing order.
pub(super) fn tiles_under(g: &Geometry, rects: &[Rect]) -> Vec<(u32, Vec<u32>)> {
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
pub(super) fn read_tile_row(
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
pub(super) fn read_into(
    file: &OwnedFd,
    buf: &mut Vec<u8>,
    len: usize,
    offset: u64,
) -> std::io::Result<()> {
    let start = buf.len();
    buf.resize(start + len, 0);
    read_exact_at(file, &mut buf[start..], offset)
}

/// Re-read the whole framebuffer into `cur` and return the tiles that differ from `prev`
/// (the previous read), encoded at `generation`. Bands of tile rows go to parallel threads,
/// each reading, comparing and compressing its own band.
pub(super) fn scan(
    file: &OwnedFd,
    g: &Geometry,
    prev: &[u8],
    cur: &mut [u8],
    generation: u64,
) -> std::io::Result<Vec<(usize, Arc<TileData>)>> {
    let band = TILE as usize * g.stride as usize;
    let tile_rows = g.height.div_ceil(TILE) as usize;
    let threads = pool::capture_threads(g.len()).min(tile_rows);
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
    // Each band is taken once, by whichever pool thread gets to it.
    /// A band of `cur` (its byte offset, its bytes), until a thread takes it.
    type Band<'a> = Mutex<Option<(usize, &'a mut [u8])>>;
    let bands: Vec<Band<'_>> = bands.into_iter().map(|b| Mutex::new(Some(b))).collect();
    let results = pool::map_in_order(
        &bands,
        threads,
        || (),
        |_, b| {
            let band = b.lock().unwrap_or_else(|e| e.into_inner()).take();
            band.map(work).unwrap_or_else(|| Ok(Vec::new()))
        },
    );
    let mut out = Vec::new();
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

/// The tiles of a band of whole tile rows (starting at tile row `row0`) whose pixels in
/// `cur` differ from `prev`, packed. Rows are compared whole first: an unchanged row costs
/// one comparison.
pub(super) fn scan_band(
    g: &Geometry,
    row0: usize,
    prev: &[u8],
    cur: &[u8],
) -> Vec<(usize, Vec<u8>)> {
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
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;

    use super::pool::capture_threads;
    use super::*;
    use crate::testutil::pattern;

    fn memfile(g: &Geometry) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(g.offset + g.len() as u64).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
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
            let Rect {
                width: w,
                height: h,
                ..
            } = g.tile_rect(*i);
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
                    let Rect {
                        width: w,
                        height: h,
                        ..
                    } = g.tile_rect(i);
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
