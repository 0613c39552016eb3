//! Walk a file system the way the resolver does: list, resolve, read, follow links.

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
