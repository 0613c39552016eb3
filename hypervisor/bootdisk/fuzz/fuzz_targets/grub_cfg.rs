//! Any text as grub.cfg, grubenv, a BLS snippet, /etc/default/grub and fstab: parse,
//! pick the default, list the entries.

#![no_main]

use std::collections::HashMap;

use bootdisk::entry::{bls, debian, grub};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let env = grub::read_grubenv(&text);
    let cfg = grub::read_config(&text, &env);
    if let Some(p) = grub::select(&cfg.items, cfg.default.as_deref()) {
        assert!(grub::at(&cfg.items, &p).is_some());
    }
    let _ = grub::entries(&cfg.items);
    let _ = bls::parse_entry("fuzz", &text, &env);
    let mut vars = HashMap::new();
    debian::assignments(&text, &mut vars);
    let _ = debian::fstab(&text);
    let _ = bls::vercmp(&text, "6.1.0-9-amd64");
});
