//! `UploadDecoder` against a plain reference (split the gRPC frames, decode each message
//! whole with prost): any bytes, fed in any pieces, must give the same messages or an
//! error in both, and never a panic.

#![no_main]

use std::collections::VecDeque;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::upload_wire::UploadDecoder;
use proto::v1::UploadChunk;

/// Small, so the fuzzer reaches it.
const LIMIT: usize = 4096;

/// The data of all chunks, and the (id, offset) of the chunks that have either.
type Summary = (Vec<u8>, Vec<(String, u64)>);

fn summary<'a>(chunks: impl IntoIterator<Item = &'a UploadChunk>) -> Summary {
    let mut s = Summary::default();
    for c in chunks {
        s.0.extend_from_slice(&c.data);
        if !c.upload_id.is_empty() || c.offset != 0 {
            s.1.push((c.upload_id.clone(), c.offset));
        }
    }
    s
}

fn reference(mut b: &[u8]) -> Option<Summary> {
    let mut msgs = Vec::new();
    while !b.is_empty() {
        if b.len() < 5 || b[0] != 0 {
            return None;
        }
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if len > LIMIT || b.len() < 5 + len {
            return None;
        }
        msgs.push(UploadChunk::decode(&b[5..5 + len]).ok()?);
        b = &b[5 + len..];
    }
    Some(summary(&msgs))
}

fuzz_target!(|input: &[u8]| {
    let Some((&split, stream)) = input.split_first() else {
        return;
    };
    // Piece sizes cycle through 1..=split+1, so streams are cut everywhere.
    let mut d = UploadDecoder::new(LIMIT);
    let mut out = VecDeque::new();
    let mut rest = stream;
    let mut step = 0usize;
    let mut result = Ok(());
    while !rest.is_empty() && result.is_ok() {
        let n = (step % (usize::from(split) + 1) + 1).min(rest.len());
        step += 1;
        result = d.push(Bytes::copy_from_slice(&rest[..n]), &mut out);
        rest = &rest[n..];
    }
    let got = result.and_then(|()| d.finish()).map(|()| summary(&out));
    match (got, reference(stream)) {
        (Ok(g), Some(r)) => assert_eq!(g, r),
        (Err(_), None) => {}
        (g, r) => panic!("decoder {g:?}, reference {r:?}"),
    }
});
