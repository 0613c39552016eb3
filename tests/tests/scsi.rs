//! End-to-end: the stock Debian kernel's `hv_storvsc` against Parvis's synthetic SCSI
//! controller in the test host: the controller probes, disks show their identity (Msft /
//! Virtual Disk / their WWN) and size, reads equal the host's data, writes land in a VHDX
//! that `qemu-img check` still passes, discard punches holes in a raw backing file, a disk
//! added to the running guest appears and a removed one goes away without errors, and a
//! guest whose initramfs holds `hv_storvsc` and no virtio driver boots its root from it.
//!
//! One test-host boot serves every case; each `#[test]` checks one result.
//! Run: `cargo test -p parvis-tests --test scsi`.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use parvis_disk::image::{self, OpenOptions};
use parvis_tests::markers::{has_line, marker_all};
use parvis_tests::{Outcome, Scenario, marker, pattern};
use scsi_disk::DiskIdentity;
use sha2::{Digest, Sha256};

const SCRIPT: &str = r#"
K="--kernel $IMAGES/vmlinux --initrd $IMAGES/l2-initramfs.cpio --memory 256M --hyperv kernel"
C="console=ttyS0 quiet panic=-1"

# Two disks on the first controller: a qemu-img-made VHDX at LUN 0 and, at LUN 5 with
# discard, a fully written raw file on L1's tmpfs (the 9p share cannot punch holes); a third
# on a second controller.
T=$(mktemp -d)
head -c 33554432 /dev/zero | tr '\0' '\132' >"$T/trim.raw"
stat -c %b "$T/trim.raw" >trim.before
run scsi $K --cpus 2 --disk "$SHARE/scsi0.vhdx,bus=scsi,id=scsi-zero" \
    --disk "$T/trim.raw,bus=scsi,lun=5,id=trim,discard" \
    --disk "$SHARE/c1.vhdx,bus=scsi,controller=1,id=second-controller" \
    --cmdline "$C parvis.test=scsi"
stat -c %b "$T/trim.raw" >trim.after
rm -rf "$T"

# Hot plug on the running guest through the worker's control socket (sockets cannot live
# on 9p).
D=$(mktemp -d)
parvis-worker $K --control "$D/h.sock" --log info --disk "$SHARE/hot0.vhdx,bus=scsi,id=hot0" \
    --cmdline "$C parvis.test=scsihot" </dev/null >hot.out 2>hot.err &
pid=$!
( sleep 400; kill -9 $pid 2>/dev/null ) &
if wait_for PARVIS-SCSI-HOT-READY hot.out 240; then
    parvis-worker ctl "$D/h.sock" "attach-disk $SHARE/hot1.vhdx hot1 discard" >hot.replies 2>&1
    if wait_for PARVIS-SCSI-HOT-ADDED hot.out 120; then
        parvis-worker ctl "$D/h.sock" "detach-disk hot1" "state" >>hot.replies 2>&1
        wait_for PARVIS-SCSI-HOT-REMOVED hot.out 120
    fi
fi
wait $pid
echo $? >hot.rc

# A Hyper-V-style initramfs (hv_storvsc, no virtio) finds its root on /dev/sda.
run sroot --kernel $IMAGES/vmlinux --initrd $IMAGES/l2-storvsc.cpio --memory 256M \
    --hyperv kernel --disk "$SHARE/sroot.vhdx,bus=scsi,id=sroot" --cmdline "$C root=/dev/sda"
"#;

const ROOTFS_ID: &str = "a-root-file-system-reached-over-storvsc";
const SCSI0_SEED: u64 = 23;
const SCSI0_SIZE: usize = 32 << 20;

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let o = cmd.output()?;
    anyhow::ensure!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// A qemu-img-made dynamic VHDX holding `data`.
fn vhdx(share: &Path, name: &str, data: &[u8]) -> anyhow::Result<()> {
    let raw = share.join(format!("{name}.raw"));
    std::fs::write(&raw, data)?;
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "vhdx", "-o", "subformat=dynamic"])
        .arg(&raw)
        .arg(share.join(format!("{name}.vhdx"))))?;
    std::fs::remove_file(raw)?;
    Ok(())
}

fn prepare(share: &Path) -> anyhow::Result<()> {
    vhdx(share, "scsi0", &pattern(SCSI0_SIZE, SCSI0_SEED))?;
    vhdx(share, "hot0", &pattern(8 << 20, 3))?;
    vhdx(share, "hot1", &vec![0u8; 16 << 20])?;
    vhdx(share, "c1", &pattern(8 << 20, 5))?;

    // A root file system whose /init reports where it runs from and what drivers it got.
    let root = share.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    std::fs::write(root.join("etc/parvis-id"), ROOTFS_ID)?;
    let init = root.join("init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\nB=/bin/busybox\n$B mount -t proc proc /proc\necho PARVIS-ROOTFS-INIT\n\
         echo PARVIS-ROOTFS-ID=$($B cat /etc/parvis-id)\n\
         echo PARVIS-ROOTFS-ROOT=$($B awk '$2 == \"/\" {print $1}' /proc/mounts | $B tail -n 1)\n\
         echo PARVIS-ROOTFS-MODULES=$($B cut -d' ' -f1 /proc/modules | $B sort | $B tr '\\n' ',')\n\
         $B poweroff -f\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let raw = share.join("sroot.raw");
    sh(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-F", "-d"])
        .arg(&root)
        .arg(&raw)
        .arg("48M"))?;
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "vhdx", "-o", "subformat=dynamic"])
        .arg(&raw)
        .arg(share.join("sroot.vhdx")))?;
    std::fs::remove_file(&raw)?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

fn outcome() -> &'static Outcome {
    static CELL: OnceLock<Result<Outcome, String>> = OnceLock::new();
    match CELL.get_or_init(|| {
        Scenario::new("scsi", SCRIPT)
            .timeout(std::time::Duration::from_secs(1500))
            .run(prepare)
            .map_err(|e| format!("{e:#}"))
    }) {
        Ok(o) => o,
        Err(e) => panic!("the SCSI scenario could not run: {e}"),
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

/// The guest's PARVIS-SCSI-DISK lines: (name, H:C:T:L, size, vendor, model, wwid, discard max).
fn disks(out: &str) -> Vec<Vec<String>> {
    marker_all(out, "PARVIS-SCSI-DISK")
        .into_iter()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn wwid(id: &str) -> String {
    format!("naa.{:016x}", DiskIdentity::derive(id).wwn())
}

/// Kernel lines about storage problems the guest printed (between its markers).
fn storage_complaints(out: &str) -> Vec<&str> {
    assert!(
        has_line(out, "PARVIS-SCSI-DMESG-END"),
        "no dmesg report:\n{out}"
    );
    marker_all(out, "PARVIS-SCSI-DMESG")
}

fn qemu_img_check(path: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn storvsc_probes_and_each_disk_shows_its_identity_and_size() {
    let (out, _, rc) = run("scsi");
    assert_eq!(rc, 0, "{out}");
    let host = marker(&out, "PARVIS-SCSI-HOST").unwrap_or_default();
    assert!(host.contains("storvsc_host_t"), "{out}");
    let d = disks(&out);
    assert_eq!(d.len(), 3, "{out}");
    let by_id = |id: &str| {
        d.iter()
            .find(|x| x[5] == wwid(id))
            .unwrap_or_else(|| panic!("no disk with the WWN of {id}: {d:?}"))
    };
    let (zero, trim, second) = (
        by_id("scsi-zero"),
        by_id("trim"),
        by_id("second-controller"),
    );
    for disk in [zero, trim, second] {
        assert_eq!(
            (disk[3].as_str(), disk[4].as_str()),
            ("Msft", "Virtual Disk")
        );
    }
    // LUN 0 and LUN 5 of target 0 on one host adapter, LUN 0 on another.
    let host = |x: &[String]| x[1].split(':').next().unwrap().to_string();
    assert!(
        zero[1].ends_with(":0:0:0") && trim[1].ends_with(":0:0:5"),
        "{d:?}"
    );
    assert!(second[1].ends_with(":0:0:0"), "{d:?}");
    assert_eq!(host(zero), host(trim));
    assert_ne!(host(zero), host(second));
    assert_eq!(zero[2], SCSI0_SIZE.to_string());
    assert_eq!(trim[2], (32 << 20).to_string());
    assert_eq!(second[2], (8 << 20).to_string());
    // Discard is offered where it was asked for only.
    assert_eq!(zero[6], "0");
    assert_ne!(trim[6], "0");
}

#[test]
fn the_guest_reads_what_the_host_wrote_and_its_writes_land() {
    let (out, _, rc) = run("scsi");
    assert_eq!(rc, 0);
    let d = disks(&out);
    for (id, file, size, seed) in [
        ("scsi-zero", "scsi0.vhdx", SCSI0_SIZE, SCSI0_SEED),
        ("second-controller", "c1.vhdx", 8 << 20, 5),
    ] {
        let name = &d.iter().find(|x| x[5] == wwid(id)).expect(id)[0];
        let before = pattern(size, seed);
        let want = format!("{name},{}", hex::encode(Sha256::digest(&before)));
        assert!(
            marker_all(&out, "PARVIS-SCSI-SHA256").contains(&want.as_str()),
            "{id}: {out}"
        );
        assert!(marker_all(&out, "PARVIS-SCSI-WRITTEN").contains(&name.as_str()));
        let path = outcome().path(file);
        let after = read_image(&path);
        assert_eq!(&after[1 << 20..(1 << 20) + 23], b"PARVIS-GUEST-WROTE-THIS");
        // The rest is untouched.
        assert_eq!(after[..1 << 20], before[..1 << 20]);
        assert_eq!(after[(1 << 20) + 23..], before[(1 << 20) + 23..]);
        qemu_img_check(&path);
    }
}

#[test]
fn discard_punches_holes_in_the_backing_file() {
    let (out, _, rc) = run("scsi");
    assert_eq!(rc, 0);
    assert!(marker(&out, "PARVIS-SCSI-DISCARDED").is_some(), "{out}");
    let blocks = |f: &str| -> u64 {
        outcome()
            .file(f)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no {f}"))
    };
    let (before, after) = (blocks("trim.before"), blocks("trim.after"));
    // 16 MiB discarded of 32 MiB written: at least 15 MiB of 512-byte blocks freed.
    assert!(
        before >= 64 * 1024 && before - after >= 30 * 1024,
        "blocks before {before}, after {after}"
    );
}

#[test]
fn no_storage_errors_in_the_guest_kernel_log() {
    let (out, _, _) = run("scsi");
    assert_eq!(storage_complaints(&out), Vec::<&str>::new());
}

#[test]
fn a_disk_added_to_the_running_guest_appears_and_a_removed_one_goes_away() {
    let o = outcome();
    let out = o.file("hot.out");
    let replies = o.file("hot.replies");
    eprintln!(
        "--- hot: replies:\n{replies}\n{}\n{}",
        parvis_tests::testhost::tail(&o.file("hot.err"), 20),
        parvis_tests::testhost::tail(&out, 40)
    );
    let ready = marker(&out, "PARVIS-SCSI-HOT-READY").expect("the guest never got ready");
    assert_eq!(ready.split_whitespace().count(), 1, "{ready}");
    assert!(
        replies
            .lines()
            .next()
            .unwrap_or_default()
            .starts_with("ok controller=0 lun=1"),
        "{replies}"
    );
    let d = disks(&out);
    assert_eq!(d.len(), 1, "{out}");
    assert!(d[0][1].ends_with(":0:0:1"), "{:?}", d[0]);
    assert_eq!(d[0][2], (16 << 20).to_string());
    assert_eq!(d[0][5], wwid("hot1"));
    let name = marker(&out, "PARVIS-SCSI-HOT-ADDED").expect("no disk appeared");
    assert_eq!(marker(&out, "PARVIS-SCSI-HOT-REMOVED"), Some(name), "{out}");
    let left = marker(&out, "PARVIS-SCSI-HOT-LEFT").unwrap_or_default();
    assert_eq!(left.trim(), ready.trim(), "the first disk stays");
    assert_eq!(storage_complaints(&out), Vec::<&str>::new());
    assert_eq!(o.file("hot.rc").trim(), "0");
    // The write made before the removal reached the image, which stays valid.
    let path = o.path("hot1.vhdx");
    let after = read_image(&path);
    assert_eq!(&after[4096..4096 + 32], b"PARVIS-HOT-ADDED-DISK-WROTE-THIS");
    qemu_img_check(&path);
}

#[test]
fn an_initramfs_with_hv_storvsc_and_no_virtio_boots_its_root_from_scsi() {
    let (out, _, rc) = run("sroot");
    assert_eq!(rc, 0, "{out}");
    let modules = marker(&out, "PARVIS-STORVSC-INITRD-MODULES").expect("the initramfs did not run");
    assert!(modules.split(',').any(|m| m == "hv_storvsc"), "{modules}");
    assert!(!modules.contains("virtio"), "{modules}");
    assert_eq!(marker(&out, "PARVIS-STORVSC-INITRD-ROOT"), Some("/dev/sda"));
    assert!(has_line(&out, "PARVIS-ROOTFS-INIT"), "{out}");
    assert_eq!(marker(&out, "PARVIS-ROOTFS-ID"), Some(ROOTFS_ID));
    assert_eq!(marker(&out, "PARVIS-ROOTFS-ROOT"), Some("/dev/sda"));
    // The initramfs image itself holds no virtio module at all.
    let cpio = parvis_tests::build::artifacts()
        .unwrap()
        .images
        .join("l2-storvsc.cpio");
    let list = Command::new("cpio")
        .arg("-it")
        .stdin(std::fs::File::open(&cpio).unwrap())
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&list.stdout);
    assert!(names.contains("hv_storvsc.ko"), "{names}");
    assert!(!names.contains("virtio"), "{names}");
    qemu_img_check(&outcome().path("sroot.vhdx"));
}
