//! Any bytes as a FAT volume (fatfs underneath, guarded): mount, walk, read. Errors are
//! fine; panics, hangs and unbounded allocation are not.

#![no_main]

use std::sync::Arc;

use bootdisk::ReadAt;
use bootdisk::fs::FatFs;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    common::catch_panics_in_guards();
    let part: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    if let Ok(fs) = FatFs::open(part, "fuzz") {
        common::walk(&fs);
    }
});
