//! Any bytes as a whole imported disk: open every volume, inspect, and read the default
//! entry's files within caps, as the worker's reader process does.

#![no_main]

use std::sync::Arc;

use bootdisk::entry::Disk;
use bootdisk::{Limits, ReadAt};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    common::catch_panics_in_guards();
    let disk: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    let limits = Limits {
        kernel: 1 << 20,
        initrd: 1 << 20,
        config: 64 << 10,
        ..Limits::default()
    };
    let Ok(d) = Disk::open(disk, limits) else { return };
    if let Ok(i) = d.inspect() {
        assert!(i.default < i.entries.len());
        let e = &i.entries[i.default];
        let _ = d.read_file(&e.kernel, 1 << 20);
        for f in &e.initrds {
            let _ = d.read_file(f, 1 << 20);
        }
    }
});
