//! A VHDX image built from the input, held in memory (capped at 64 MiB): opened writable
//! with log replay allowed, then a sequence of reads, writes, flushes, allocation queries
//! and resizes derived from the input. Unopenable inputs are rejected; nothing may panic,
//! hang or allocate without bound.
//!
//! A valid VHDX is at least 3 MiB, nearly all zeros, so the input describes the image
//! sparsely (which keeps seeds small and mutations on the bytes that matter):
//!
//! ```text
//! u32 image length (capped at 16 MiB) | u8 segment count |
//!   segments: u32 offset, u16 length, bytes |
//! ops, 8 bytes each (at most 64): u8 kind, u32 sector, u16 count, u8 fill
//! ```

#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use parvis_disk::BlockDevice;
use parvis_disk::storage::MemStorage;
use parvis_disk::vhdx::{Vhdx, VhdxOpenOptions};

const CAP: u64 = 64 << 20;
const MAX_IMAGE: usize = 16 << 20;
/// Operations per input (each may scan up to 65536 BAT entries).
const MAX_OPS: usize = 64;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap()))
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
}

fuzz_target!(|data: &[u8]| -> Corpus {
    let mut input = Input(data);
    let Some(len) = input.u32() else {
        return Corpus::Reject;
    };
    let mut image = vec![0u8; (len as usize).min(MAX_IMAGE)];
    let segments = input.u8().unwrap_or(0);
    for _ in 0..segments {
        let (Some(off), Some(n)) = (input.u32(), input.u16()) else {
            break;
        };
        let bytes = input.take(n as usize).unwrap_or_default();
        let off = off as usize;
        if off < image.len() {
            let k = bytes.len().min(image.len() - off);
            image[off..off + k].copy_from_slice(&bytes[..k]);
        }
    }
    let opts = VhdxOpenOptions {
        read_only: false,
        allow_replay: true,
    };
    let Ok(disk) = Vhdx::open_storage(Box::new(MemStorage::new(image, CAP)), &opts, None) else {
        return Corpus::Reject;
    };
    let mut buf = vec![0u8; 256 * 1024];
    for _ in 0..MAX_OPS {
        let Some(op) = input.take(8) else { break };
        let size = disk.size();
        let sectors = size / 512;
        if sectors == 0 {
            break;
        }
        let start = u64::from(u32::from_le_bytes(op[1..5].try_into().unwrap())) % sectors;
        let count = (1 + u64::from(u16::from_le_bytes([op[5], op[6]])) % 512).min(sectors - start);
        let (at, n) = (start * 512, (count * 512) as usize);
        match op[0] % 6 {
            0 => {
                let _ = disk.read_at(&mut buf[..n], at);
            }
            1 => {
                buf[..n].fill(op[7]);
                let _ = disk.write_at(&buf[..n], at);
            }
            2 => {
                let _ = disk.flush();
            }
            3 => {
                let _ = disk.allocation(at, size - at);
            }
            4 => {
                let _ = disk.resize((start + 1) * 4096);
            }
            _ => {
                let _ = disk.check();
                let _ = disk.info();
            }
        }
    }
    let _ = disk.flush();
    Corpus::Keep
});
