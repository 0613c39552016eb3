//! Any bytes as an ext2/3/4 file system (ext4-view underneath): mount, walk every
//! directory, read every file and link within caps. Errors are fine; panics are not.

#![no_main]

use std::sync::Arc;

use bootdisk::ReadAt;
use bootdisk::fs::Ext4Fs;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let part: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    if let Ok(fs) = Ext4Fs::open(part, "fuzz") {
        common::walk(&fs);
    }
});
