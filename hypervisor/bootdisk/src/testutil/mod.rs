//! Disk images for the tests, made by the tools distributions make them with (sfdisk,
//! mkfs.ext4 -d, mkfs.vfat + mcopy): the parser is checked against them, not against itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::ReadAt;

/// Run a shell script in `dir`; panics with its output when it fails (the tools are in
/// tests/setup-host.sh).
pub fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{script}\nfailed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The entries of the folder `dir` in mkfs.xfs prototype-file syntax (`name mode uid gid
/// [source or link target]`, a directory's entries closed by `$`), names sorted.
fn proto_dir(dir: &Path, out: &mut String) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            !name.contains(char::is_whitespace),
            "{name}: prototype files split names on spaces"
        );
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&p).unwrap();
            out.push_str(&format!("{name} l--777 0 0 {}\n", target.display()));
        } else if meta.is_dir() {
            out.push_str(&format!("{name} d--755 0 0\n"));
            proto_dir(&p, out);
            out.push_str("$\n");
        } else {
            out.push_str(&format!("{name} ---644 0 0 {}\n", p.display()));
        }
    }
}

/// A file's bytes as a disk.
pub fn disk(path: &Path) -> Arc<dyn ReadAt> {
    Arc::new(std::fs::read(path).expect("image"))
}

/// A scratch folder.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn sh(&self, script: &str) -> String {
        sh(self.dir.path(), script)
    }
    /// Write `files` (path → contents; a contents starting with "->" makes a symlink) under
    /// the folder `root`.
    pub fn tree(&self, root: &str, files: &[(&str, &str)]) {
        for (p, c) in files {
            let p = self.path(root).join(p.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            match c.strip_prefix("->") {
                Some(target) => std::os::unix::fs::symlink(target, &p).unwrap(),
                None => std::fs::write(&p, c).unwrap(),
            }
        }
    }
    /// An ext4 image of `size_mib` MiB holding the folder `root`; returns its path.
    pub fn ext4(&self, name: &str, root: &str, size_mib: u32, uuid: &str) -> PathBuf {
        std::fs::create_dir_all(self.path(root)).unwrap();
        self.sh(&format!(
            "mkfs.ext4 -q -F -U {uuid} -L {name} -d {root} {name}.img {size_mib}M"
        ));
        self.path(&format!("{name}.img"))
    }
    /// An XFS image of `size_mib` MiB holding the folder `root`, made by mkfs.xfs from a
    /// prototype file (no mount needed); `opts` are more mkfs.xfs options ("-m crc=0", "-b
    /// size=1024", ...). Returns its path.
    pub fn xfs(&self, name: &str, root: &str, size_mib: u32, uuid: &str, opts: &str) -> PathBuf {
        std::fs::create_dir_all(self.path(root)).unwrap();
        let mut proto = String::from("boot\n0 0\nd--755 0 0\n");
        proto_dir(&self.path(root), &mut proto);
        proto.push_str("$\n");
        std::fs::write(self.path(&format!("{name}.proto")), proto).unwrap();
        // mkfs.xfs refuses file systems under 300 MB unless it runs under fstests, which
        // these variables tell it; smaller ones are still valid XFS.
        self.sh(&format!(
            "rm -f {name}.img; truncate -s {size_mib}M {name}.img
             TEST_DIR=1 TEST_DEV=1 QA_CHECK_FS=1 mkfs.xfs -q -f -m uuid={uuid} -L {name} \
                 {opts} -p {name}.proto {name}.img"
        ));
        self.path(&format!("{name}.img"))
    }
    /// A btrfs image of `size_mib` MiB holding the folder `root` (mkfs.btrfs --rootdir);
    /// `opts` are more mkfs.btrfs options. Returns its path.
    pub fn btrfs(&self, name: &str, root: &str, size_mib: u32, uuid: &str, opts: &str) -> PathBuf {
        std::fs::create_dir_all(self.path(root)).unwrap();
        self.sh(&format!(
            "rm -f {name}.img; truncate -s {size_mib}M {name}.img
             mkfs.btrfs -q -f -U {uuid} -L {name} {opts} --rootdir {root} {name}.img"
        ));
        self.path(&format!("{name}.img"))
    }
    /// A FAT image of `size_mib` MiB holding the folder `root`; returns its path.
    pub fn vfat(&self, name: &str, root: &str, size_mib: u32, id: &str) -> PathBuf {
        std::fs::create_dir_all(self.path(root)).unwrap();
        self.sh(&format!(
            "rm -f {name}.img; mkfs.vfat -C -i {id} -n {label} {name}.img {kib} >/dev/null
             if [ -n \"$(ls -A {root})\" ]; then mcopy -s -i {name}.img {root}/* ::/; fi",
            label = name.to_uppercase(),
            kib = size_mib * 1024
        ));
        self.path(&format!("{name}.img"))
    }
    /// A disk image `name` of `size_mib` MiB partitioned by the sfdisk `script`, with each of
    /// `fill` (partition number, image) copied into its partition.
    pub fn partitioned(
        &self,
        name: &str,
        size_mib: u32,
        script: &str,
        fill: &[(u32, &Path)],
    ) -> PathBuf {
        self.sh(&format!(
            "rm -f {name}; truncate -s {size_mib}M {name}; sfdisk -q {name} <<'EOF'\n{script}\nEOF"
        ));
        let table = self.table(name);
        for (n, img) in fill {
            let start = table["partitions"]
                .as_array()
                .and_then(|ps| {
                    ps.iter()
                        .find(|p| p["node"] == format!("{name}{n}").as_str())
                })
                .and_then(|p| p["start"].as_u64())
                .unwrap_or_else(|| panic!("partition {n} of {name}"));
            self.sh(&format!(
                "dd if={} of={name} bs=512 seek={start} conv=notrunc status=none",
                img.display()
            ));
        }
        self.path(name)
    }

    /// What sfdisk says of the image's table (its `partitiontable` object).
    pub fn table(&self, name: &str) -> serde_json::Value {
        let j: serde_json::Value =
            serde_json::from_str(&self.sh(&format!("sfdisk -J {name}"))).expect("sfdisk -J");
        j["partitiontable"].clone()
    }
}
