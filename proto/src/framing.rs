//! Framing of the internal worker protocol: length-delimited protobuf messages on a stream
//! socket (the varint length prost writes, then the message).

use prost::Message;
use thiserror::Error;

/// Largest message either side accepts. Real messages are small (serial output is sent in
/// chunks of at most 64 KiB); anything larger is a broken or hostile peer.
pub const MAX_FRAME: usize = 1 << 20;

/// Why a frame could not be decoded.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("bad frame length")]
    BadLength,
    #[error("bad message: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// One message as bytes on the wire.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    msg.encode_length_delimited_to_vec()
}

/// Accumulates bytes from a stream and yields whole messages.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Append bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one has arrived.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        let (len, header) = match varint(&self.buf)? {
            Some(v) => v,
            None => return Ok(None),
        };
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < header + len {
            return Ok(None);
        }
        let msg = M::decode(&self.buf[header..header + len])?;
        self.buf.drain(..header + len);
        Ok(Some(msg))
    }
}

/// Decode a varint length prefix: Some((value, bytes used)), or None if incomplete.
fn varint(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return usize::try_from(value)
                .map(|v| Some((v, i + 1)))
                .map_err(|_| FrameError::BadLength);
        }
    }
    if buf.len() >= 10 {
        Err(FrameError::BadLength)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{Event, Request, event, request};

    #[test]
    fn messages_split_anywhere_come_out_whole() {
        let mut wire = Vec::new();
        for i in 0..50u64 {
            wire.extend(encode(&Request {
                id: i,
                kind: Some(request::Kind::SerialInput(
                    vec![i as u8; i as usize * 7].into(),
                )),
            }));
        }
        for step in [1usize, 2, 3, 7, 64, 1000] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                d.push(chunk);
                while let Some(m) = d.next_message::<Request>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 50, "step {step}");
            for (i, m) in got.iter().enumerate() {
                assert_eq!(m.id, i as u64);
                match &m.kind {
                    Some(request::Kind::SerialInput(b)) => assert_eq!(b.len(), i * 7),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    #[test]
    fn hostile_lengths_are_errors_not_allocations() {
        let mut d = Decoder::default();
        d.push(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            d.next_message::<Event>(),
            Err(FrameError::TooLarge(_))
        ));
        let mut d = Decoder::default();
        d.push(&[0xff; 11]);
        assert!(matches!(
            d.next_message::<Event>(),
            Err(FrameError::BadLength)
        ));
        let mut d = Decoder::default();
        d.push(&[3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_message::<Event>(),
            Err(FrameError::Decode(_))
        ));
        let mut d = Decoder::default();
        d.push(&encode(&Event {
            kind: Some(event::Kind::SerialOutput(b"x".to_vec().into())),
        }));
        assert!(d.next_message::<Event>().unwrap().is_some());
    }
}
