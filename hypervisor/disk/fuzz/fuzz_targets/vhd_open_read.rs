//! Arbitrary bytes as a VHD image held in memory: open read-only, then a few reads and
//! allocation queries derived from the input. Unopenable inputs are rejected (not added to
//! the corpus); nothing may panic, hang or allocate without bound.

#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use parvis_disk::BlockDevice;
use parvis_disk::storage::MemStorage;
use parvis_disk::vhd::Vhd;

/// The in-memory image may not grow past this (it never grows: the open is read-only).
const CAP: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| -> Corpus {
    let Ok(disk) = Vhd::open_storage(Box::new(MemStorage::new(data.to_vec(), CAP)), true, None)
    else {
        return Corpus::Reject;
    };
    let size = disk.size();
    let sectors = size / 512;
    // Read requests come from the first bytes of the input (which is the footer copy of a
    // dynamic image, so they vary with the mutations that matter).
    let mut buf = vec![0u8; 256 * 1024];
    for chunk in data.chunks(6).take(8) {
        if sectors == 0 {
            break;
        }
        let mut w = [0u8; 8];
        w[..chunk.len().min(8)].copy_from_slice(&chunk[..chunk.len().min(8)]);
        let v = u64::from_le_bytes(w);
        let start = v % sectors;
        let count = (1 + (v >> 40) % 512).min(sectors - start);
        let _ = disk.read_at(&mut buf[..(count * 512) as usize], start * 512);
        let _ = disk.allocation(start * 512, size - start * 512);
    }
    // Reads near the end of the disk.
    if sectors > 0 {
        let n = sectors.min(8);
        let _ = disk.read_at(&mut buf[..(n * 512) as usize], size - n * 512);
    }
    let _ = disk.info();
    let _ = disk.check();
    Corpus::Keep
});
