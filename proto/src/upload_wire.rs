//! `DiskService.UploadDisk` on the wire, without copying the data.
//!
//! An upload moves gigabytes of `UploadChunk.data`. Through tonic's generic codec every byte
//! would be copied once more on each side (into a contiguous message buffer, freshly
//! allocated per message), which costs a fifth of the agent's CPU per uploaded byte. This
//! module speaks the same gRPC framing (a 1-byte compression flag, a 4-byte big-endian
//! length, the protobuf message) while passing the data through as slices of the buffers it
//! arrived in:
//!
//! - [`UploadDecoder`] (the agent) turns the request body's frames into [`UploadChunk`]s:
//!   for each message first one with its `upload_id` and `offset` and no data, then its
//!   data as one chunk per received piece (`upload_id` empty, `offset` 0, which
//!   `UploadChunk` defines as "contiguous with the previous"). A message whose `data` is not
//!   its last field (no encoder we know of writes one; protobuf allows it) is gathered whole
//!   and decoded by prost, as tonic would.
//! - [`encode_chunk`] (clients) frames a chunk as a small header and the data itself.
//!
//! Any other gRPC client (grpcio, tonic) talks to the agent unchanged: both ends stay plain
//! gRPC.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use thiserror::Error;

use crate::v1::UploadChunk;

/// The method's path.
pub const UPLOAD_DISK_PATH: &str = "/parvis.v1.DiskService/UploadDisk";

/// `UploadChunk`'s fields.
const FIELD_DATA: u32 = 3;
/// A message's fields before `data` are gathered up to this size; a message with more (a
/// huge `upload_id`, unknown fields) is decoded whole.
const MAX_PREFIX: usize = 64 << 10;

/// Why a request stream cannot be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("compressed messages are not supported (compression flag {0})")]
    Compressed(u8),
    #[error("a message of {len} bytes is larger than the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed UploadChunk message: {0}")]
    Malformed(String),
    #[error("the stream ended inside a message")]
    Truncated,
}

/// Where the decoder is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a message's 5-byte header (gathered in `buf`).
    Header,
    /// Reading the fields before `data` (gathered in `buf`) of a `len`-byte message.
    Prefix { len: usize },
    /// Passing on `remaining` bytes of the `data` field, which ends the message.
    Data { remaining: usize },
    /// Gathering a whole `len`-byte message in `buf`.
    Whole { len: usize },
}

/// What [`scan_prefix`] found in a message's first bytes.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// `n` more bytes are needed to get on.
    NeedMore(usize),
    /// The `data` field's tag starts at `fields_end`, its `data_len` bytes start at
    /// `data_start` and end the message.
    Data {
        fields_end: usize,
        data_start: usize,
        data_len: usize,
    },
    /// All of the message is in the buffer and none of it is a last `data` field.
    Complete,
    /// Not in the usual field order: decode the message whole.
    Whole,
}

/// Decodes a stream of gRPC-framed `UploadChunk` messages (see the module doc).
#[derive(Debug)]
pub struct UploadDecoder {
    state: State,
    buf: BytesMut,
    limit: usize,
}

impl UploadDecoder {
    /// A decoder refusing messages over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        UploadDecoder {
            state: State::Header,
            buf: BytesMut::new(),
            limit,
        }
    }

    /// Decode `frame`, the next piece of the request body, into `out`.
    pub fn push(
        &mut self,
        mut frame: Bytes,
        out: &mut VecDeque<UploadChunk>,
    ) -> Result<(), WireError> {
        while !frame.is_empty() {
            match self.state {
                State::Header => {
                    let n = (5 - self.buf.len()).min(frame.len());
                    self.buf.put(frame.split_to(n));
                    if self.buf.len() < 5 {
                        continue;
                    }
                    let flag = self.buf.get_u8();
                    if flag != 0 {
                        return Err(WireError::Compressed(flag));
                    }
                    let len = self.buf.get_u32() as usize;
                    if len > self.limit {
                        return Err(WireError::TooLarge {
                            len,
                            limit: self.limit,
                        });
                    }
                    self.buf.clear();
                    if len == 0 {
                        out.push_back(UploadChunk::default());
                    } else {
                        self.state = State::Prefix { len };
                    }
                }
                State::Prefix { len } => match scan_prefix(&self.buf, len)? {
                    Scan::NeedMore(n) => {
                        if self.buf.len() + n > MAX_PREFIX {
                            self.state = State::Whole { len };
                            continue;
                        }
                        let n = n.min(frame.len());
                        self.buf.put(frame.split_to(n));
                    }
                    Scan::Data {
                        fields_end,
                        data_start,
                        data_len,
                    } => {
                        debug_assert_eq!(data_start, self.buf.len());
                        let head = decode(&self.buf[..fields_end])?;
                        self.buf.clear();
                        out.push_back(head);
                        self.state = if data_len == 0 {
                            State::Header
                        } else {
                            State::Data {
                                remaining: data_len,
                            }
                        };
                    }
                    Scan::Complete => {
                        out.push_back(decode(&self.buf)?);
                        self.buf.clear();
                        self.state = State::Header;
                    }
                    Scan::Whole => self.state = State::Whole { len },
                },
                State::Data { remaining } => {
                    let n = remaining.min(frame.len());
                    out.push_back(UploadChunk {
                        upload_id: String::new(),
                        offset: 0,
                        data: frame.split_to(n),
                    });
                    self.state = if n == remaining {
                        State::Header
                    } else {
                        State::Data {
                            remaining: remaining - n,
                        }
                    };
                }
                State::Whole { len } => {
                    let n = (len - self.buf.len()).min(frame.len());
                    self.buf.put(frame.split_to(n));
                    if self.buf.len() == len {
                        out.push_back(decode(&self.buf)?);
                        self.buf.clear();
                        self.state = State::Header;
                    }
                }
            }
        }
        // A message whose data field is empty and last, or that is complete, ends here even
        // if no more bytes come.
        if let State::Prefix { len } = self.state {
            match scan_prefix(&self.buf, len)? {
                Scan::Complete => {
                    out.push_back(decode(&self.buf)?);
                    self.buf.clear();
                    self.state = State::Header;
                }
                Scan::Data {
                    fields_end,
                    data_len: 0,
                    ..
                } => {
                    out.push_back(decode(&self.buf[..fields_end])?);
                    self.buf.clear();
                    self.state = State::Header;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The body ended: fine between messages only.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.state == State::Header && self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Truncated)
        }
    }
}

fn decode(b: &[u8]) -> Result<UploadChunk, WireError> {
    UploadChunk::decode(b).map_err(|e| WireError::Malformed(e.to_string()))
}

/// A varint at the start of `b`: `Ok(None)` if `b` ends inside it.
fn varint(b: &[u8]) -> Result<Option<(u64, usize)>, WireError> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i == 9 && byte > 1 {
                return Err(WireError::Malformed("varint overflows 64 bits".into()));
            }
            return Ok(Some((v, i + 1)));
        }
    }
    if b.len() >= 10 {
        return Err(WireError::Malformed("varint longer than 10 bytes".into()));
    }
    Ok(None)
}

/// Walk the fields at the start of a `len`-byte message, of which `b` holds the first
/// bytes (never more than `len`), up to the `data` field.
fn scan_prefix(b: &[u8], len: usize) -> Result<Scan, WireError> {
    debug_assert!(b.len() <= len);
    let past = || WireError::Malformed("a field runs past the end of the message".into());
    // A varint that the buffer ends inside of: one more byte, if the message has one.
    let one_more = || {
        if b.len() < len {
            Ok(Scan::NeedMore(1))
        } else {
            Err(past())
        }
    };
    let mut pos = 0;
    while pos < len {
        let Some((tag, n)) = varint(&b[pos..])? else {
            return one_more();
        };
        let field = tag >> 3;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(WireError::Malformed(format!("field number {field}")));
        }
        let at = pos + n;
        let end = match tag & 7 {
            // varint
            0 => match varint(&b[at..])? {
                Some((_, m)) => at + m,
                None => return one_more(),
            },
            // fixed64, fixed32
            1 => at + 8,
            5 => at + 4,
            // length-delimited
            2 => {
                let Some((l, m)) = varint(&b[at..])? else {
                    return one_more();
                };
                let start = at + m;
                let l = usize::try_from(l).map_err(|_| past())?;
                let end = start.checked_add(l).ok_or_else(past)?;
                if end > len {
                    return Err(past());
                }
                if field == u64::from(FIELD_DATA) {
                    return Ok(if end == len {
                        Scan::Data {
                            fields_end: pos,
                            data_start: start,
                            data_len: l,
                        }
                    } else {
                        Scan::Whole
                    });
                }
                end
            }
            // groups and invalid wire types: prost says what is wrong
            _ => return Ok(Scan::Whole),
        };
        if end > len {
            return Err(past());
        }
        if end > b.len() {
            return Ok(Scan::NeedMore(end - b.len()));
        }
        pos = end;
    }
    Ok(Scan::Complete)
}

/// Frame `UploadChunk { upload_id, offset, data }` for the request body: a small header (the
/// gRPC message header and the fields up to the data's length) and the data itself, which
/// is not copied.
pub fn encode_chunk(upload_id: &str, offset: u64, data: Bytes) -> [Bytes; 2] {
    let head = UploadChunk {
        upload_id: upload_id.to_string(),
        offset,
        data: Bytes::new(),
    };
    let mut fields = BytesMut::with_capacity(head.encoded_len() + 16);
    head.encode(&mut fields)
        .expect("a BytesMut grows as needed");
    if !data.is_empty() {
        prost::encoding::encode_key(
            FIELD_DATA,
            prost::encoding::WireType::LengthDelimited,
            &mut fields,
        );
        prost::encoding::encode_varint(data.len() as u64, &mut fields);
    }
    let mut out = BytesMut::with_capacity(5 + fields.len());
    put_header(&mut out, fields.len() + data.len());
    out.put(fields);
    [out.freeze(), data]
}

/// A gRPC message header: not compressed, then the message's length (big-endian).
fn put_header(out: &mut BytesMut, len: usize) {
    out.put_u8(0);
    out.put_u32(u32::try_from(len).expect("a gRPC message is smaller than 4 GiB"));
}

/// `msg` framed as one gRPC message (the body of a unary response).
pub fn encode_message(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    put_header(&mut out, len);
    msg.encode(&mut out).expect("the buffer has room");
    out.freeze()
}

/// The protobuf bytes of `body` if it is exactly one uncompressed gRPC message.
pub fn one_message(body: &[u8]) -> Option<&[u8]> {
    let (head, msg) = body.split_first_chunk::<5>()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    (head[0] == 0 && msg.len() == len).then_some(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc_frame(msg: &UploadChunk) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decode `wire` fed in pieces of `piece` bytes, and merge the chunks back into whole
    /// messages (a chunk with an id or an offset, or the first, starts one).
    fn decode_all(wire: &[u8], piece: usize) -> Result<Vec<UploadChunk>, WireError> {
        let mut d = UploadDecoder::new(1 << 20);
        let mut out = VecDeque::new();
        for p in wire.chunks(piece.max(1)) {
            d.push(Bytes::copy_from_slice(p), &mut out)?;
        }
        d.finish()?;
        Ok(out.into_iter().collect())
    }

    fn messages() -> Vec<UploadChunk> {
        vec![
            UploadChunk {
                upload_id: "0123456789abcdef".into(),
                offset: 4096,
                data: Bytes::from((0..70_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
            },
            UploadChunk {
                upload_id: String::new(),
                offset: 0,
                data: Bytes::from_static(b"x"),
            },
            UploadChunk::default(),
            UploadChunk {
                upload_id: "id".into(),
                offset: 300,
                data: Bytes::new(),
            },
            UploadChunk {
                upload_id: String::new(),
                offset: u64::MAX,
                data: Bytes::from(vec![7u8; 1000]),
            },
        ]
    }

    /// The bytes of every data chunk, and the (id, offset) of every chunk that has either.
    fn summary(chunks: &[UploadChunk]) -> (Vec<u8>, Vec<(String, u64)>) {
        let mut data = Vec::new();
        let mut heads = Vec::new();
        for c in chunks {
            data.extend_from_slice(&c.data);
            if !c.upload_id.is_empty() || c.offset != 0 {
                heads.push((c.upload_id.clone(), c.offset));
            }
        }
        (data, heads)
    }

    #[test]
    fn any_split_of_the_stream_decodes_to_the_same_messages() {
        let msgs = messages();
        let wire: Vec<u8> = msgs.iter().flat_map(grpc_frame).collect();
        let want = summary(&msgs);
        for piece in [1, 2, 3, 5, 6, 7, 13, 100, 4096, 65_536, wire.len()] {
            let got = decode_all(&wire, piece).unwrap();
            assert_eq!(summary(&got), want, "piece {piece}");
            // No chunk carries both a head and data, so data passes through as slices.
            assert!(
                got.iter()
                    .all(|c| c.data.is_empty() || (c.upload_id.is_empty() && c.offset == 0))
            );
        }
    }

    #[test]
    fn unary_messages_frame_and_unframe() {
        let msg = UploadChunk {
            upload_id: "u".into(),
            offset: 7,
            data: Bytes::from_static(b"xyz"),
        };
        let wire = encode_message(&msg);
        assert_eq!(wire[..], grpc_frame(&msg)[..]);
        let body = one_message(&wire).unwrap();
        assert_eq!(UploadChunk::decode(body).unwrap(), msg);
        // Short, long, compressed or headerless bodies are not one message.
        assert_eq!(one_message(&wire[..wire.len() - 1]), None);
        assert_eq!(one_message(&[&wire[..], b"!"].concat()), None);
        let mut compressed = wire.to_vec();
        compressed[0] = 1;
        assert_eq!(one_message(&compressed), None);
        assert_eq!(one_message(&wire[..4]), None);
        assert_eq!(one_message(&[0, 0, 0, 0, 0]), Some(&[][..]));
    }

    #[test]
    fn the_encoder_matches_prost_byte_for_byte() {
        for m in messages() {
            let [head, data] = encode_chunk(&m.upload_id, m.offset, m.data.clone());
            let mut wire = head.to_vec();
            wire.extend_from_slice(&data);
            assert_eq!(wire, grpc_frame(&m));
        }
    }

    #[test]
    fn fields_in_another_order_are_decoded_whole() {
        // data first, then offset and id; then data twice (the last wins).
        let mut body = Vec::new();
        prost::encoding::bytes::encode(3, &Bytes::from_static(b"abc"), &mut body);
        prost::encoding::uint64::encode(2, &9, &mut body);
        prost::encoding::string::encode(1, &"u".to_string(), &mut body);
        prost::encoding::bytes::encode(3, &Bytes::from_static(b"def"), &mut body);
        // An unknown field before the data: skipped, the fast path still applies.
        let mut body2 = Vec::new();
        prost::encoding::string::encode(1, &"v".to_string(), &mut body2);
        prost::encoding::fixed64::encode(9, &1, &mut body2);
        prost::encoding::bytes::encode(3, &Bytes::from_static(b"ghi"), &mut body2);
        let mut wire = Vec::new();
        for b in [&body, &body2] {
            wire.push(0);
            wire.extend_from_slice(&(b.len() as u32).to_be_bytes());
            wire.extend_from_slice(b);
        }
        for piece in [1, 4, 1000] {
            let got = decode_all(&wire, piece).unwrap();
            let (data, heads) = summary(&got);
            assert_eq!(data, b"defghi");
            assert_eq!(heads, vec![("u".to_string(), 9), ("v".to_string(), 0)]);
        }
    }

    #[test]
    fn hostile_streams_are_errors() {
        let one = grpc_frame(&messages()[0]);
        // Cut anywhere inside the message.
        for cut in [1, 4, 5, 6, 30, one.len() - 1] {
            assert_eq!(
                decode_all(&one[..cut], 7),
                Err(WireError::Truncated),
                "cut {cut}"
            );
        }
        // Compressed.
        let mut c = one.clone();
        c[0] = 1;
        assert_eq!(decode_all(&c, 100), Err(WireError::Compressed(1)));
        // Over the limit.
        let mut big = vec![0u8];
        big.extend_from_slice(&(2u32 << 20).to_be_bytes());
        assert!(matches!(
            decode_all(&big, 100),
            Err(WireError::TooLarge { .. })
        ));
        // A length that runs past the message.
        let mut body = Vec::new();
        prost::encoding::encode_key(3, prost::encoding::WireType::LengthDelimited, &mut body);
        prost::encoding::encode_varint(1000, &mut body);
        body.extend_from_slice(b"short");
        let mut w = vec![0u8];
        w.extend_from_slice(&(body.len() as u32).to_be_bytes());
        w.extend_from_slice(&body);
        assert!(matches!(decode_all(&w, 3), Err(WireError::Malformed(_))));
        // Field number 0, a bad varint, invalid UTF-8 in the id.
        for body in [
            vec![0x00u8, 0x01],
            vec![
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            vec![0x0a, 0x02, 0xff, 0xfe],
        ] {
            let mut w = vec![0u8];
            w.extend_from_slice(&(body.len() as u32).to_be_bytes());
            w.extend_from_slice(&body);
            assert!(
                matches!(decode_all(&w, 1), Err(WireError::Malformed(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn a_large_prefix_is_decoded_whole() {
        let m = UploadChunk {
            upload_id: "i".repeat(MAX_PREFIX + 10),
            offset: 5,
            data: Bytes::from_static(b"tail"),
        };
        let got = decode_all(&grpc_frame(&m), 4096).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0], m);
    }
}
