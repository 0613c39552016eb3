//! End-to-end: the guest runs on VHD and VHDX disks, made by qemu-img (the peer) and by
//! Parvis, including a 4096-byte-sector VHDX and a VHDX root file system.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use parvis_disk::image::{self, CreateOptions, OpenOptions, Variant};
use parvis_tests::markers::has_line;
use parvis_tests::pattern;
use parvis_tests::{Outcome, Scenario, marker};
use sha2::{Digest, Sha256};

const SCRIPT: &str = r#"
K="--kernel $IMAGES/vmlinux --initrd $IMAGES/l2-initramfs.cpio --memory 256M"
C="console=ttyS0 quiet panic=-1"
run vhdxroot $K --disk "$SHARE/root.vhdx" --cmdline "$C parvis.test=rootdisk"
run vhdx4k $K --disk "$SHARE/p4k.vhdx" --cmdline "$C parvis.test=disk,diskwrite"
run vhd $K --disk "$SHARE/q.vhd" --cmdline "$C parvis.test=disk,diskwrite"
"#;

const ROOTFS_ID: &str = "rootfs-from-a-qemu-made-vhdx";

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let o = cmd.output()?;
    anyhow::ensure!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

fn prepare(share: &Path) -> anyhow::Result<()> {
    // A root file system with busybox and an /init, as ext4, in a qemu-img-made VHDX.
    let root = share.join("rootfs");
    std::fs::create_dir_all(root.join("bin"))?;
    for d in ["proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    std::fs::write(root.join("etc/parvis-id"), ROOTFS_ID)?;
    let init = root.join("init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\necho PARVIS-ROOTFS-INIT\n\
         echo PARVIS-ROOTFS-ID=$(/bin/busybox cat /etc/parvis-id)\n/bin/busybox poweroff -f\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let raw = share.join("root.raw");
    sh(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-F", "-d"])
        .arg(&root)
        .arg(&raw)
        .arg("48M"))?;
    sh(Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=8M",
        ])
        .arg(&raw)
        .arg(share.join("root.vhdx")))?;
    std::fs::remove_file(&raw)?;
    std::fs::remove_dir_all(&root)?;

    // A 4096-byte-sector dynamic VHDX made by Parvis (qemu-img cannot make these).
    let p4k = image::create(
        &share.join("p4k.vhdx"),
        &CreateOptions {
            format: parvis_disk::ImageFormat::Vhdx,
            variant: Variant::Dynamic,
            size: 16 << 20,
            block_size: Some(1 << 20),
            logical_sector_size: 4096,
        },
    )?;
    p4k.device().write_at(&pattern(8 << 20, 7), 4 << 20)?;
    p4k.device().flush()?;
    drop(p4k);

    // A dynamic VHD made by qemu-img from a patterned raw file.
    let vraw = share.join("v.raw");
    std::fs::write(&vraw, pattern(12 << 20, 11))?;
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "vpc", "-o", "subformat=dynamic"])
        .arg(&vraw)
        .arg(share.join("q.vhd")))?;
    Ok(())
}

fn outcome() -> &'static Outcome {
    static CELL: OnceLock<Result<Outcome, String>> = OnceLock::new();
    match CELL.get_or_init(|| {
        Scenario::new("disks", SCRIPT)
            .run(prepare)
            .map_err(|e| format!("{e:#}"))
    }) {
        Ok(o) => o,
        Err(e) => panic!("the disk-format scenario could not run: {e}"),
    }
}

fn run(name: &str) -> (String, String, i32) {
    outcome().worker_run(name)
}

fn read_image(path: &Path) -> Vec<u8> {
    let img = image::open(
        path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let d = img.device();
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn guest_boots_userspace_from_a_qemu_made_vhdx_root_disk() {
    let (out, _, rc) = run("vhdxroot");
    assert!(has_line(&out, "PARVIS-ROOTDISK-MOUNTED"), "{out}");
    assert!(
        has_line(&out, "PARVIS-ROOTFS-INIT"),
        "the disk's /init did not run:\n{out}"
    );
    assert_eq!(marker(&out, "PARVIS-ROOTFS-ID"), Some(ROOTFS_ID));
    assert_eq!(rc, 0);
    // The guest mounted it read-write (ext4 journal replay/mount updates): still valid for qemu-img.
    let o = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(outcome().path("root.vhdx"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn guest_sees_4096_byte_sectors_of_a_4k_vhdx_and_its_writes_land() {
    let (out, _, rc) = run("vhdx4k");
    assert_eq!(rc, 0);
    assert_eq!(marker(&out, "PARVIS-DISK-LBS"), Some("4096"), "{out}");
    let mut expected = vec![0u8; 16 << 20];
    expected[4 << 20..12 << 20].copy_from_slice(&pattern(8 << 20, 7));
    assert_eq!(
        marker(&out, "PARVIS-DISK-SHA256"),
        Some(hex::encode(Sha256::digest(&expected)).as_str())
    );
    assert!(has_line(&out, "PARVIS-DISK-WRITTEN"));
    let after = read_image(&outcome().path("p4k.vhdx"));
    assert_eq!(&after[1 << 20..(1 << 20) + 23], b"PARVIS-GUEST-WROTE-THIS");
}

#[test]
fn guest_reads_and_writes_a_qemu_made_vhd() {
    let (out, _, rc) = run("vhd");
    assert_eq!(rc, 0);
    let expected = pattern(12 << 20, 11);
    let sha = hex::encode(Sha256::digest(&expected));
    // qemu-img may round the VHD up to its CHS geometry: the tail reads as zeros.
    let size: usize = marker(&out, "PARVIS-DISK-SIZE").unwrap().parse().unwrap();
    let mut padded = expected.clone();
    padded.resize(size, 0);
    let sha_padded = hex::encode(Sha256::digest(&padded));
    let got = marker(&out, "PARVIS-DISK-SHA256").unwrap();
    assert!(got == sha || got == sha_padded, "{out}");
    let p = outcome().path("q.vhd");
    // qemu-img 7.2 cannot check VHD; opening it (info) validates footer, header and BAT.
    let o = Command::new("qemu-img")
        .args(["info", "-f", "vpc"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let raw = outcome().path("q-after.raw");
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&p)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(o.status.success());
    let after = std::fs::read(raw).unwrap();
    assert_eq!(&after[1 << 20..(1 << 20) + 23], b"PARVIS-GUEST-WROTE-THIS");
}
