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

/// A tile's BGRX pixels (`width * height * 4` bytes), decompressed.
pub fn decode(t: &Tile) -> Result<Vec<u8>, TileError> {
    let want = t.width as usize * t.height as usize * 4;
    let px = match TileEncoding::try_from(t.encoding) {
        Ok(TileEncoding::Raw) => t.data.to_vec(),
        Ok(TileEncoding::Lz4 | TileEncoding::Unspecified) => {
            let (len, body) = t.data.split_first_chunk::<4>().ok_or(TileError::Short)?;
            let got = u32::from_le_bytes(*len) as usize;
            if got != want {
                return Err(TileError::WrongLength { got, want });
            }
            lz4_flex::block::decompress(body, want)
                .map_err(|e| TileError::Decompress(e.to_string()))?
        }
        Ok(TileEncoding::Zstd) => zstd::bulk::decompress(&t.data, want)
            .map_err(|e| TileError::Decompress(e.to_string()))?,
        Err(_) => return Err(TileError::UnknownEncoding(t.encoding)),
    };
    if px.len() != want {
        return Err(TileError::WrongSize {
            width: t.width,
            height: t.height,
            got: px.len(),
            want,
        });
    }
    Ok(px)
}

#[cfg(test)]
mod tests {
    use super::*;

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
