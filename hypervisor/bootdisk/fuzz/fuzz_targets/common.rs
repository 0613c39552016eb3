//! Walk a file system the way the resolver does: list, resolve, read, follow links.

#![allow(dead_code)]

/// The reader catches panics inside `fatfs` (its arithmetic overflows on hostile volumes) and
/// turns them into errors, as it does in the worker. libFuzzer's panic hook aborts before any
/// unwinding, so replace it with a silent one: a panic the reader catches is an error, and
/// one it does not catch still reaches libfuzzer-sys, which aborts on it (a crash).
pub fn catch_panics_in_guards() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

use bootdisk::Limits;
use bootdisk::fs::{FileKind, FileSystem, Namespace};

pub fn walk(fs: &dyn FileSystem) {
    let _ = (fs.uuid(), fs.label(), fs.kind());
    let limits = Limits {
        config: 64 << 10,
        dir_entries: 256,
        ..Limits::default()
    };
    let ns = Namespace::new(fs, 0, limits);
    let mut dirs = vec!["/".to_string()];
    let mut seen = 0;
    while let Some(d) = dirs.pop() {
        let Ok(names) = ns.list(&d) else { continue };
        for n in names {
            seen += 1;
            if seen > 512 {
                return;
            }
            let p = format!("{}/{n}", d.trim_end_matches('/'));
            match fs.kind_of(&p) {
                Ok(FileKind::Dir) if dirs.len() < 64 && p.len() < 256 => dirs.push(p),
                Ok(FileKind::Symlink) => {
                    let _ = fs.read_link(&p);
                    let _ = ns.read(&p, 64 << 10);
                }
                Ok(FileKind::File { .. }) => {
                    let _ = ns.read(&p, 64 << 10);
                }
                _ => {}
            }
        }
    }
}
