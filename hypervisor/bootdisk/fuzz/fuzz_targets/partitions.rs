//! Any bytes as a disk: the partition table reader must answer a layout whose partitions
//! all lie inside the disk, or an error; never panic or loop.

#![no_main]

use bootdisk::part::read_layout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(l) = read_layout(&data) {
        for p in &l.partitions {
            assert!(p.len > 0 && p.start + p.len <= data.len() as u64, "{p:?}");
        }
    }
});
