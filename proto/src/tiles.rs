//! The tile encodings of `parvis.v1.Tile`, for the agent (encoding) and every client
//! (decoding): one implementation of the wire format.

use thiserror::Error;

use crate::v1::{Tile, TileEncoding};

/// Why a tile's data does not decode.
#[derive(Debug, Error)]
pub enum TileError {
    #[error("unknown tile encoding {0}")]
    UnknownEncoding(i32),
    #[error("an LZ4 tile is too short")]
    Short,
    #[error("an LZ4 tile says {got} bytes, not {want}")]
    WrongLength { got: usize, want: usize },
    #[error("a tile does not decompress: {0}")]
    Decompress(String),
    #[error("a {width}x{height} tile is larger than any screen")]
    TooBig { width: u32, height: u32 },
    #[error(
        "a tile at {x},{y} ({width}x{height}) is outside the {screen_width}x{screen_height} screen"
    )]
    Outside {
        x: u32,
        y: u32,
        width: u32,
        height: u32,
        screen_width: u32,
        screen_height: u32,
    },
    #[error("a {width}x{height} tile has {got} bytes, not {want}")]
    WrongSize {
        width: u32,
        height: u32,
        got: usize,
        want: usize,
    },
}

/// LZ4 as the API defines it: the uncompressed size (4 bytes, little-endian), then one
/// raw LZ4 block.
pub fn encode_lz4(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + lz4_flex::block::get_maximum_output_size(raw.len()));
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend(lz4_flex::block::compress(raw));
    out
}

/// [`encode_lz4`] compressing into a caller's scratch buffer, reused from tile to tile, so
/// only the compressed bytes are allocated.
pub fn encode_lz4_with(raw: &[u8], scratch: &mut Vec<u8>) -> Vec<u8> {
    let max = 4 + lz4_flex::block::get_maximum_output_size(raw.len());
    if scratch.len() < max {
        scratch.resize(max, 0);
    }
    match lz4_flex::block::compress_into(raw, &mut scratch[4..max]) {
        Ok(n) => {
            scratch[..4].copy_from_slice(&(raw.len() as u32).to_le_bytes());
            scratch[..4 + n].to_vec()
        }
        // Cannot happen with room for the maximum size; the allocating path is always right.
        Err(_) => encode_lz4(raw),
    }
}

/// Where `t` goes on a `screen_width`×`screen_height` screen: its x, y, width and height in
/// pixels, or why it does not fit (a client checks this before writing a tile anywhere).
pub fn place(
    t: &Tile,
    screen_width: u32,
    screen_height: u32,
) -> Result<(usize, usize, usize, usize), TileError> {
    let fits = |at: u32, len: u32, end: u32| at.checked_add(len).is_some_and(|e| e <= end);
    if !fits(t.x, t.width, screen_width) || !fits(t.y, t.height, screen_height) {
        return Err(TileError::Outside {
            x: t.x,
            y: t.y,
            width: t.width,
            height: t.height,
            screen_width,
            screen_height,
        });
    }
    Ok((
        t.x as usize,
        t.y as usize,
        t.width as usize,
        t.height as usize,
    ))
}

/// Decode a screen update's tiles one tile row at a time (a run of tiles with the same y
/// and height): each is checked with [`place`] against the `width`×`height` screen and
/// decoded into `band` (buffers reused between calls), then `f` gets the run and its
/// pixels. A client then writes its screen copy a whole pixel row across the run at a time:
/// writing a screen-sized buffer a tile's width at a time, tile after tile, costs about
/// twice as much.
pub fn decode_rows(
    tiles: &[Tile],
    width: u32,
    height: u32,
    band: &mut Vec<Vec<u8>>,
    mut f: impl FnMut(&[Tile], &[Vec<u8>]),
) -> Result<(), TileError> {
    for run in tiles.chunk_by(|a, b| a.y == b.y && a.height == b.height) {
        for t in run {
            place(t, width, height)?;
        }
        if band.len() < run.len() {
            band.resize_with(run.len(), Vec::new);
        }
        for (t, px) in run.iter().zip(band.iter_mut()) {
            decode_into(t, px)?;
        }
        f(run, &band[..run.len()]);
    }
    Ok(())
}

/// The largest tile: a whole 8192×8192 screen.
pub const MAX_TILE_BYTES: usize = 8192 * 8192 * 4;

/// A tile's BGRX pixels (`width * height * 4` bytes), decompressed.
pub fn decode(t: &Tile) -> Result<Vec<u8>, TileError> {
    let mut px = Vec::new();
    decode_into(t, &mut px)?;
    Ok(px)
}

/// Like [`decode`], into `px`, whose allocation is reused: a client decoding every tile
/// of every frame into one buffer does not allocate (and fault in) a screen's worth of
/// fresh memory per frame.
pub fn decode_into(t: &Tile, px: &mut Vec<u8>) -> Result<(), TileError> {
    let want = (t.width as usize)
        .checked_mul(t.height as usize)
        .and_then(|n| n.checked_mul(4))
        .filter(|&n| n <= MAX_TILE_BYTES)
        .ok_or(TileError::TooBig {
            width: t.width,
            height: t.height,
        })?;
    let wrong_size = |got| TileError::WrongSize {
        width: t.width,
        height: t.height,
        got,
        want,
    };
    match TileEncoding::try_from(t.encoding) {
        Ok(TileEncoding::Raw) => {
            if t.data.len() != want {
                return Err(wrong_size(t.data.len()));
            }
            px.clear();
            px.extend_from_slice(&t.data);
        }
        Ok(TileEncoding::Lz4 | TileEncoding::Unspecified) => {
            let (len, body) = t.data.split_first_chunk::<4>().ok_or(TileError::Short)?;
            let got = u32::from_le_bytes(*len) as usize;
            if got != want {
                return Err(TileError::WrongLength { got, want });
            }
            px.resize(want, 0);
            let n = lz4_flex::block::decompress_into(body, px)
                .map_err(|e| TileError::Decompress(e.to_string()))?;
            if n != want {
                return Err(wrong_size(n));
            }
        }
        Ok(TileEncoding::Zstd) => {
            px.resize(want, 0);
            let n = zstd::bulk::decompress_to_buffer(&t.data, px)
                .map_err(|e| TileError::Decompress(e.to_string()))?;
            if n != want {
                return Err(wrong_size(n));
            }
        }
        Err(_) => return Err(TileError::UnknownEncoding(t.encoding)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_placed_only_inside_the_screen() {
        let t = |x, y, width, height| Tile {
            x,
            y,
            width,
            height,
            ..Default::default()
        };
        assert_eq!(place(&t(64, 0, 64, 64), 128, 64).unwrap(), (64, 0, 64, 64));
        for bad in [
            t(65, 0, 64, 64),
            t(0, 1, 64, 64),
            t(u32::MAX, 0, 2, 1),
            t(0, u32::MAX - 1, 1, 4),
        ] {
            assert!(matches!(
                place(&bad, 128, 64),
                Err(TileError::Outside { .. })
            ));
        }
    }

    #[test]
    fn updates_are_decoded_a_tile_row_at_a_time() {
        let tile = |x, y, width, height, v: u8| {
            let raw = vec![v; (width * height * 4) as usize];
            Tile {
                x,
                y,
                width,
                height,
                encoding: TileEncoding::Lz4 as i32,
                data: encode_lz4_with(&raw, &mut Vec::new()).into(),
            }
        };
        let tiles = [
            tile(0, 0, 64, 64, 1),
            tile(64, 0, 36, 64, 2),
            tile(0, 64, 64, 16, 3),
        ];
        let mut band = vec![vec![9u8; 3]; 4];
        let mut runs = Vec::new();
        decode_rows(&tiles, 100, 80, &mut band, |run, px| {
            assert_eq!(run.len(), px.len());
            for (t, p) in run.iter().zip(px) {
                assert_eq!(p.len(), (t.width * t.height * 4) as usize);
                assert!(p.iter().all(|&b| b == p[0]));
            }
            runs.push(px.iter().map(|p| p[0]).collect::<Vec<_>>());
        })
        .unwrap();
        assert_eq!(runs, vec![vec![1, 2], vec![3]]);
        // A tile off the screen stops the update before its row is decoded.
        let mut called = 0;
        let e = decode_rows(&tiles, 100, 70, &mut band, |_, _| called += 1).unwrap_err();
        assert!(matches!(e, TileError::Outside { .. }), "{e}");
        assert_eq!(called, 1);
    }

    /// One buffer decodes tiles of every encoding and size in turn; damaged or oversized
    /// tiles are errors, not panics.
    #[test]
    fn decode_into_reuses_one_buffer() {
        let mut buf = Vec::new();
        for (i, (w, h)) in [(64u32, 64u32), (3, 5), (64, 20), (1, 1)]
            .into_iter()
            .enumerate()
        {
            let raw: Vec<u8> = (0..w * h * 4).map(|b| (b as usize ^ i) as u8).collect();
            for (enc, data) in [
                (TileEncoding::Lz4, encode_lz4_with(&raw, &mut Vec::new())),
                (TileEncoding::Zstd, zstd::bulk::compress(&raw, 1).unwrap()),
                (TileEncoding::Raw, raw.clone()),
            ] {
                let t = Tile {
                    x: 0,
                    y: 0,
                    width: w,
                    height: h,
                    encoding: enc as i32,
                    data: data.into(),
                };
                decode_into(&t, &mut buf).unwrap();
                assert_eq!(buf, raw, "{enc:?} {w}x{h}");
                assert_eq!(decode(&t).unwrap(), raw);
                let mut short = t.clone();
                short.data = short.data.slice(..short.data.len() - 1);
                assert!(decode_into(&short, &mut buf).is_err(), "{enc:?} {w}x{h}");
            }
        }
        let huge = Tile {
            x: 0,
            y: 0,
            width: u32::MAX,
            height: u32::MAX,
            encoding: TileEncoding::Raw as i32,
            data: Vec::new().into(),
        };
        assert!(matches!(
            decode_into(&huge, &mut buf),
            Err(TileError::TooBig { .. })
        ));
    }

    fn tile(encoding: TileEncoding, data: Vec<u8>) -> Tile {
        Tile {
            x: 0,
            y: 0,
            width: 4,
            height: 2,
            encoding: encoding as i32,
            data: data.into(),
        }
    }

    #[test]
    fn every_encoding_round_trips_and_lies_are_errors() {
        let raw: Vec<u8> = (0..32u8).collect();
        assert_eq!(decode(&tile(TileEncoding::Raw, raw.clone())).unwrap(), raw);
        assert_eq!(
            decode(&tile(TileEncoding::Lz4, encode_lz4(&raw))).unwrap(),
            raw
        );
        let z = zstd::bulk::compress(&raw, 1).unwrap();
        assert_eq!(decode(&tile(TileEncoding::Zstd, z)).unwrap(), raw);
        assert!(decode(&tile(TileEncoding::Lz4, vec![1, 2])).is_err());
        assert!(decode(&tile(TileEncoding::Lz4, encode_lz4(&raw[..16]))).is_err());
        assert!(decode(&tile(TileEncoding::Raw, raw[..31].to_vec())).is_err());
        let mut bad = tile(TileEncoding::Raw, raw);
        bad.encoding = 99;
        assert!(matches!(decode(&bad), Err(TileError::UnknownEncoding(99))));
    }
}
