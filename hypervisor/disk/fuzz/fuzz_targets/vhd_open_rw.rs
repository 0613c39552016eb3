//! A VHD image held in memory (growing to at most 64 MiB), opened writable, then a sequence
//! of writes, reads, flushes, allocation queries, checks and resizes (grows that extend or
//! relocate the BAT) derived from the input; every change must leave an image that opens
//! again. Unopenable inputs are rejected; nothing may panic, hang or allocate without bound.
//!
//! ```text
//! u8 op count (at most 32) | ops, 8 bytes each: u8 kind, u32 sector, u16 count, u8 fill |
//!   the image
//! ```

#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use parvis_disk::BlockDevice;
use parvis_disk::storage::{MemStorage, Storage};
use parvis_disk::vhd::Vhd;
use std::sync::Arc;

const CAP: u64 = 64 << 20;
const MAX_OPS: usize = 32;

/// Shares the in-memory image with the harness, so it can be reopened afterwards.
#[derive(Debug)]
struct Shared(Arc<MemStorage>);

impl Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some((&n, rest)) = data.split_first() else {
        return Corpus::Reject;
    };
    let n = (n as usize).min(MAX_OPS);
    if rest.len() < n * 8 {
        return Corpus::Reject;
    }
    let (ops, image) = rest.split_at(n * 8);
    let mem = Arc::new(MemStorage::new(image.to_vec(), CAP));
    let Ok(disk) = Vhd::open_storage(Box::new(Shared(mem.clone())), false, None) else {
        return Corpus::Reject;
    };
    // Damage found at open (a missing trailing footer, say) may outlive the session.
    let clean = disk.check().is_ok_and(|r| r.errors.is_empty());
    let mut buf = vec![0u8; 256 * 1024];
    let mut failed = false;
    for op in ops.chunks_exact(8) {
        let size = disk.size();
        let sectors = size / 512;
        let arg = u32::from_le_bytes(op[1..5].try_into().unwrap());
        let count = 1 + u64::from(u16::from_le_bytes([op[5], op[6]])) % 512;
        if op[0] % 6 == 4 {
            // Grow by up to ~2 TiB (in 1 MiB steps), or try an odd or smaller size.
            let new = match op[7] % 4 {
                0 => size.saturating_add(u64::from(arg % (2 << 20)) << 20),
                1 => size.saturating_add(u64::from(arg) * 512),
                2 => u64::from(arg) * 512,
                _ => size.saturating_add(u64::from(arg)),
            };
            failed |= disk.resize(new).is_err();
            continue;
        }
        if sectors == 0 {
            break;
        }
        let start = u64::from(arg) % sectors;
        let count = count.min(sectors - start);
        let (at, len) = (start * 512, (count * 512) as usize);
        match op[0] % 6 {
            0 => {
                let _ = disk.read_at(&mut buf[..len], at);
            }
            1 => {
                buf[..len].fill(op[7]);
                failed |= disk.write_at(&buf[..len], at).is_err();
            }
            2 => failed |= disk.flush().is_err(),
            3 => {
                let _ = disk.allocation(at, size - at);
            }
            _ => {
                let _ = disk.check();
                let _ = disk.info();
            }
        }
    }
    let size = disk.size();
    failed |= disk.flush().is_err();
    drop(disk);
    // Unless an operation failed (the in-memory cap) or the image was damaged to begin
    // with, what Parvis wrote must open again, with the size it had, and check clean.
    if clean && !failed {
        let again = Vhd::open_storage(Box::new(MemStorage::new(mem.contents(), CAP)), true, None)
            .unwrap_or_else(|e| panic!("the image no longer opens: {e}"));
        assert_eq!(again.size(), size);
        let r = again.check().unwrap();
        assert!(r.errors.is_empty(), "{r:?}");
    }
    Corpus::Keep
});
