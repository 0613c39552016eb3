//! The confined boot disk reader (`parvis-worker boot-disk-read`) on disks made here with
//! sfdisk and mkfs: it hands back the disk's own kernel, initrd and command line in its
//! framing, says in one sentence why a disk cannot boot, and while it reads it runs without
//! privileges (nobody when started by root, no capabilities, no_new_privs, a seccomp filter).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = "0a0b0c0d-1111-2222-3333-444455556666";

fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A GPT disk: partition 1 empty, partition 2 ext4 with a Debian-style /boot whose grub.cfg
/// defaults (through grubenv) to its second entry.
fn debian_disk(dir: &Path) -> PathBuf {
    let cfg = format!(
        "set default=\"${{saved_entry}}\"\n\
         menuentry 'First' --id first {{\n  search --no-floppy --fs-uuid --set=root {ROOT}\n  linux /boot/vmlinuz-6.1.0-1-amd64 root=UUID={ROOT} ro first\n  initrd /boot/initrd.img-6.1.0-1-amd64\n}}\n\
         menuentry 'Second' --id second {{\n  search --no-floppy --fs-uuid --set=root {ROOT}\n  linux /boot/vmlinuz-6.1.0-2-amd64 root=UUID={ROOT} ro quiet console=ttyS0\n  initrd /boot/initrd.img-6.1.0-2-amd64\n}}\n"
    );
    let r = dir.join("r");
    std::fs::create_dir_all(r.join("boot/grub")).unwrap();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::write(r.join("boot/grub/grub.cfg"), cfg).unwrap();
    std::fs::write(r.join("boot/grub/grubenv"), "saved_entry=second\n").unwrap();
    std::fs::write(
        r.join("etc/fstab"),
        format!("UUID={ROOT} / ext4 defaults 0 1\n"),
    )
    .unwrap();
    for v in ["1", "2"] {
        std::fs::write(
            r.join(format!("boot/vmlinuz-6.1.0-{v}-amd64")),
            format!("KERNEL-{v}").repeat(1000),
        )
        .unwrap();
        std::fs::write(
            r.join(format!("boot/initrd.img-6.1.0-{v}-amd64")),
            format!("INITRD-{v}"),
        )
        .unwrap();
    }
    sh(
        dir,
        &format!(
            "mkfs.ext4 -q -F -U {ROOT} -d r root.img 16M\n\
             truncate -s 24M disk.raw\n\
             printf 'label: gpt\\nsize=4M, type=U\\ntype=L\\n' | sfdisk -q disk.raw\n\
             dd if=root.img of=disk.raw bs=512 seek=10240 conv=notrunc status=none"
        ),
    );
    dir.join("disk.raw")
}

/// Run the reader on `disk`; its exit status, stdout and stderr.
fn read(disk: &Path, args: &[&str]) -> (Option<i32>, Vec<u8>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_parvis-worker"))
        .arg("boot-disk-read")
        .args(args)
        .stdin(std::fs::File::open(disk).unwrap())
        .output()
        .unwrap();
    (
        out.status.code(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The reply's metadata, kernel and initrd.
fn parts(out: &[u8]) -> (serde_json::Value, Vec<u8>, Vec<u8>) {
    let n = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
    let meta: serde_json::Value = serde_json::from_slice(&out[4..4 + n]).unwrap();
    let mut at = 4 + n;
    let mut next = || {
        let len = u64::from_le_bytes(out[at..at + 8].try_into().unwrap()) as usize;
        let part = out[at + 8..at + 8 + len].to_vec();
        at += 8 + len;
        part
    };
    let k = next();
    let i = next();
    (meta, k, i)
}

#[test]
fn the_reader_hands_back_the_disks_default_entry() {
    let dir = tempfile::tempdir().unwrap();
    let disk = debian_disk(dir.path());
    let (code, out, err) = read(&disk, &[]);
    assert_eq!(code, Some(0), "{err}");
    let (meta, kernel, initrd) = parts(&out);
    assert_eq!(meta["title"], "Second");
    assert_eq!(
        meta["cmdline"],
        format!("root=UUID={ROOT} ro quiet console=ttyS0")
    );
    assert_eq!(meta["entries"], serde_json::json!(["First", "Second"]));
    assert_eq!(kernel, "KERNEL-2".repeat(1000).as_bytes());
    assert_eq!(initrd, b"INITRD-2");
    // Another entry on request.
    let (code, out, err) = read(&disk, &["--entry", "0"]);
    assert_eq!(code, Some(0), "{err}");
    let (meta, kernel, _) = parts(&out);
    assert_eq!(meta["title"], "First");
    assert_eq!(kernel, "KERNEL-1".repeat(1000).as_bytes());
    // By kernel version or title, as the agent names them.
    for name in ["6.1.0-1-amd64", "First"] {
        let (code, out, err) = read(&disk, &["--entry", name]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(parts(&out).0["title"], "First");
    }
    let (code, _, err) = read(&disk, &["--entry", "7"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("the disk has no boot entry '7'; its entries: 6.1.0-1-amd64, 6.1.0-2-amd64"),
        "{err}"
    );
}

#[test]
fn the_reader_describes_a_disk_for_the_agent() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let disk = debian_disk(dir.path());
    let describe = |disk: &Path| {
        let (code, out, err) = read(disk, &["--inspect"]);
        assert_eq!(code, Some(0), "{err}");
        let n = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(out.len(), 4 + n, "one length-prefixed message");
        proto::v1::DiskBootInfo::decode(&out[4..]).unwrap()
    };
    let info = describe(&disk);
    assert!(info.inspected && info.bootable, "{info:?}");
    assert_eq!(info.entries.len(), 2);
    assert_eq!(info.default_entry, 1);
    let e = &info.entries[1];
    assert_eq!(
        (e.title.as_str(), e.version.as_str(), e.cmdline.as_str()),
        (
            "Second",
            "6.1.0-2-amd64",
            &*format!("root=UUID={ROOT} ro quiet console=ttyS0")
        )
    );
    assert!(e.kernel.ends_with(": /boot/vmlinuz-6.1.0-2-amd64"), "{e:?}");
    assert!(
        info.volumes
            .iter()
            .any(|v| v.file_system == "ext4" && v.uuid == ROOT)
    );
    // A disk that cannot boot is described too, with the reason.
    sh(dir.path(), "truncate -s 8M empty.raw");
    let info = describe(&dir.path().join("empty.raw"));
    assert!(info.inspected && !info.bootable);
    assert_eq!(info.reason, "the disk holds no file system: it looks empty");
}

#[test]
fn a_disk_that_cannot_boot_says_why() {
    let dir = tempfile::tempdir().unwrap();
    sh(dir.path(), "truncate -s 8M empty.raw");
    let (code, out, err) = read(&dir.path().join("empty.raw"), &[]);
    assert_eq!(code, Some(2));
    assert!(out.is_empty());
    assert_eq!(err.trim(), "the disk holds no file system: it looks empty");
}

/// A line of /proc/PID/status.
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

#[test]
fn the_reader_runs_without_privileges() {
    let dir = tempfile::tempdir().unwrap();
    let disk = debian_disk(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_parvis-worker"))
        .args(["boot-disk-read", "--hold", "3"])
        .stdin(std::fs::File::open(&disk).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says "confined" on stderr once the filter is on.
    let mut err = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut b = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("confined") {
        assert!(
            Instant::now() < deadline,
            "the reader never said it was confined"
        );
        let n = err.read(&mut b).unwrap();
        assert!(
            n > 0,
            "the reader ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&b[..n]);
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let root = rustix_euid_is_root();
    let uid = status_field(&status, "Uid");
    if root {
        assert_eq!(
            uid, "65534\t65534\t65534\t65534",
            "started by root, it becomes nobody"
        );
        assert_eq!(status_field(&status, "Gid"), "65534\t65534\t65534\t65534");
        assert_eq!(status_field(&status, "Groups"), "");
    }
    assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
    assert_eq!(status_field(&status, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(
        status_field(&status, "Seccomp"),
        "2",
        "a seccomp filter is on"
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(parts(&out.stdout).0["title"], "Second");
}

fn rustix_euid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| status_field(&s, "Uid").split('\t').nth(1) == Some("0"))
        .unwrap_or(false)
}
