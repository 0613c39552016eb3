//! Any bytes as a btrfs file system (the reader's own, fs/btrfs.rs): mount, walk every
//! directory, read every file and link within caps. Errors are fine; panics are not.

#![no_main]

use std::sync::Arc;

use bootdisk::ReadAt;
use bootdisk::fs::BtrfsFs;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let part: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    if let Ok(fs) = BtrfsFs::open(part, "fuzz") {
        common::walk(&fs);
    }
});
