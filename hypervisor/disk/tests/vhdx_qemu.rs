//! VHDX interoperability with the real peer, qemu-img/qemu-io 7.2 (required: these tests
//! fail, never skip, when the tools are missing).

#[path = "vhdx_common.rs"]
mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use parvis_disk::BlockDevice;
use parvis_disk::vhdx::{Variant, Vhdx, VhdxCreateOptions, VhdxKind, VhdxOpenOptions};

const MIB: u64 = 1 << 20;

fn ro() -> VhdxOpenOptions {
    VhdxOpenOptions {
        read_only: true,
        allow_replay: false,
    }
}

fn rw() -> VhdxOpenOptions {
    VhdxOpenOptions {
        read_only: false,
        allow_replay: false,
    }
}

/// Create a qemu image, fill it with qemu-io, and check Parvis reads what qemu converts.
fn qemu_image_reads(subformat: &str, block: &str, size: &str, log: &str, writes: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhdx");
    let raw = dir.path().join("q.raw");
    let opts = format!("subformat={subformat},block_size={block},log_size={log}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        &opts,
        img.to_str().unwrap(),
        size,
    ]);
    qemu_io(&img, writes);
    to_raw(&img, &raw);
    let v = Vhdx::open(&img, &ro()).unwrap();
    let want = if subformat == "fixed" {
        Variant::Fixed
    } else {
        Variant::Dynamic
    };
    assert_eq!(v.variant(), want);
    assert_eq!(v.logical_sector_size(), 512);
    assert_same(&v, &raw);
    let report = v.check().unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    let info = v.info();
    assert!(info.allocated > 0 && info.allocated <= info.virtual_size);
}

#[test]
fn reads_qemu_dynamic_images_of_every_block_size() {
    let writes = [
        "write -P 0x5a 3M 1M",
        "write -P 0x11 1020k 8k", // crosses a 1 MiB boundary
        "write -P 0x22 33M 512",
        "write -P 0x33 63M 1M", // the last MiB
    ];
    for block in ["1M", "8M", "32M"] {
        qemu_image_reads("dynamic", block, "64M", "1M", &writes);
    }
    // 256 MiB blocks, a size that is not a multiple of the block size, a bigger log.
    qemu_image_reads(
        "dynamic",
        "256M",
        "300M",
        "4M",
        &[
            "write -P 0x44 255M 2M",
            "write -P 0x55 299M 1M",
            "write -P 0x66 0 4k",
        ],
    );
}

#[test]
fn reads_qemu_fixed_images() {
    qemu_image_reads(
        "fixed",
        "8M",
        "50M",
        "1M",
        &["write -P 0x77 7M 2M", "write -P 0x78 49M 1M"],
    );
    qemu_image_reads("fixed", "1M", "20M", "1M", &["write -P 0x79 0 20M"]);
    qemu_image_reads("fixed", "32M", "40M", "1M", &["write -P 0x7a 31M 9M"]);
}

#[test]
fn reads_qemu_convert_of_a_patterned_sparse_raw() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let f = File::create(&src).unwrap();
    f.set_len(70 * MIB).unwrap();
    for (i, off) in [0u64, 5 * MIB + 4096, 40 * MIB - 512, 69 * MIB]
        .iter()
        .enumerate()
    {
        f.write_all_at(&pattern(i as u8 + 1, 256 * 1024), *off)
            .unwrap();
    }
    drop(f);
    for block in ["1M", "32M"] {
        let img = dir.path().join(format!("c{block}.vhdx"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            &format!("subformat=dynamic,block_size={block}"),
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let v = Vhdx::open(&img, &ro()).unwrap();
        // qemu rounds the virtual size up to its block of the source.
        assert_same(&v, &src);
    }
}

/// Write the same data to a Parvis image and a raw file; qemu must agree.
fn parvis_writes_pass_qemu(kind: VhdxKind, block_size: u32, logical: u32) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.vhdx");
    let raw = dir.path().join("p.raw");
    let size = 48 * MIB + 64 * 1024;
    let mut opts = VhdxCreateOptions::new(kind.clone(), size);
    opts.block_size = block_size;
    opts.logical_sector_size = logical;
    let v = Vhdx::create(&img, &opts).unwrap();
    let r = File::create(&raw).unwrap();
    r.set_len(size).unwrap();
    let writes: [(u64, usize); 6] = [
        (0, 4096),
        (MIB - 4096, 8192),        // crosses a 1 MiB block boundary
        (5 * MIB + 512 * 3, 4096), // odd sector offset (4K images: merged)
        (32 * MIB - 2048, 4096),   // crosses a 32 MiB boundary
        (size - 4096, 4096),       // the end of the disk
        (17 * MIB, 3 << 20),       // several whole blocks
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let (off, len) = if logical == 4096 {
            (off / 4096 * 4096, len)
        } else {
            (off, len)
        };
        let data = pattern(i as u8 + 7, len);
        v.write_at(&data, off).unwrap();
        r.write_all_at(&data, off).unwrap();
        if i == 2 {
            v.flush().unwrap(); // flushes in the middle too
        }
    }
    assert_same(&v, &raw);
    drop(v);
    if logical == 512 {
        qemu_check(&img);
    }
    let v = Vhdx::open(&img, &ro()).unwrap();
    assert_same(&v, &raw);
    assert!(v.check().unwrap().errors.is_empty());
    drop(v);
    if logical == 512 {
        qemu_img(&[
            "compare",
            "-f",
            "vhdx",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
    } else {
        // qemu 7.2 refuses VHDX with 4 KiB logical sectors ("Operation not supported"). If
        // a newer qemu opens it, it must read the same bytes.
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "vhdx", img.to_str().unwrap()])
            .output()
            .expect("qemu-img is required");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            qemu_img(&[
                "compare",
                "-f",
                "vhdx",
                "-F",
                "raw",
                img.to_str().unwrap(),
                raw.to_str().unwrap(),
            ]);
        } else {
            assert!(
                err.contains("not supported"),
                "unexpected qemu-img failure: {err}"
            );
        }
    }
}

#[test]
fn parvis_dynamic_images_pass_qemu_check_and_compare() {
    parvis_writes_pass_qemu(VhdxKind::Dynamic, 1 << 20, 512);
    parvis_writes_pass_qemu(VhdxKind::Dynamic, 32 << 20, 512);
}

#[test]
fn parvis_fixed_images_pass_qemu_check_and_compare() {
    parvis_writes_pass_qemu(VhdxKind::Fixed, 1 << 20, 512);
    parvis_writes_pass_qemu(VhdxKind::Fixed, 32 << 20, 512);
}

#[test]
fn parvis_4k_sector_images() {
    parvis_writes_pass_qemu(VhdxKind::Dynamic, 1 << 20, 4096);
    parvis_writes_pass_qemu(VhdxKind::Fixed, 8 << 20, 4096);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.vhdx");
    let mut o = VhdxCreateOptions::dynamic(8 * MIB);
    o.logical_sector_size = 4096;
    drop(Vhdx::create(&img, &o).unwrap());
    let v = Vhdx::open(&img, &ro()).unwrap();
    assert_eq!(
        (v.logical_sector_size(), v.physical_sector_size()),
        (4096, 4096)
    );
}

#[test]
fn parvis_writes_to_qemu_images() {
    // Parvis writes into images qemu made (ZERO-state BAT entries, qemu's layout).
    for sub in ["dynamic", "fixed"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("q.vhdx");
        let raw = dir.path().join("q.raw");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            &format!("subformat={sub},block_size=1M"),
            img.to_str().unwrap(),
            "10M",
        ]);
        qemu_io(&img, &["write -P 0x5a 2M 1M"]);
        let v = Vhdx::open(&img, &rw()).unwrap();
        v.write_at(&pattern(3, 8192), 2 * MIB + 4096).unwrap();
        v.write_at(&pattern(4, 4096), 7 * MIB).unwrap();
        drop(v);
        qemu_check(&img);
        to_raw(&img, &raw);
        let v = Vhdx::open(&img, &ro()).unwrap();
        assert_same(&v, &raw);
        let mut b = vec![0u8; 8192];
        v.read_at(&mut b, 2 * MIB + 4096).unwrap();
        assert_eq!(b, pattern(3, 8192));
        v.read_at(&mut b[..4096], 2 * MIB).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0x5a));
    }
}

#[test]
fn resize_grows_and_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [VhdxKind::Dynamic, VhdxKind::Fixed] {
        let img = dir.path().join(format!("r{kind:?}.vhdx"));
        let mut o = VhdxCreateOptions::new(kind.clone(), 20 * MIB);
        o.block_size = 1 << 20;
        let v = Vhdx::create(&img, &o).unwrap();
        v.write_at(&pattern(1, 4096), 19 * MIB).unwrap();
        v.write_at(&pattern(2, 4096), 10 * MIB).unwrap();
        v.resize(40 * MIB).unwrap();
        assert_eq!(v.size(), 40 * MIB);
        v.write_at(&pattern(3, 4096), 39 * MIB).unwrap();
        let mut b = vec![0u8; 4096];
        v.read_at(&mut b, 19 * MIB).unwrap();
        assert_eq!(b, pattern(1, 4096));
        v.read_at(&mut b, 30 * MIB).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        v.resize(15 * MIB).unwrap();
        v.resize(25 * MIB).unwrap(); // the dropped range reads zeros again
        v.read_at(&mut b, 19 * MIB).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        v.read_at(&mut b, 10 * MIB).unwrap();
        assert_eq!(b, pattern(2, 4096));
        drop(v);
        qemu_check(&img);
        let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
        assert!(
            info.contains(&format!("\"virtual-size\": {}", 25 * MIB)),
            "{info}"
        );
        let raw = dir.path().join("r.raw");
        let _ = std::fs::remove_file(&raw);
        to_raw(&img, &raw);
        assert_same(&Vhdx::open(&img, &ro()).unwrap(), &raw);
    }
    // Growing past what the BAT region holds relocates the BAT (1 MiB holds 131072
    // entries: 128 GiB at 1 MiB blocks).
    let img = dir.path().join("big.vhdx");
    let mut o = VhdxCreateOptions::dynamic(MIB * 1024);
    o.block_size = 1 << 20;
    let v = Vhdx::create(&img, &o).unwrap();
    v.write_at(&pattern(5, 4096), 100 * MIB).unwrap();
    v.resize(200 << 30).unwrap();
    v.write_at(&pattern(6, 4096), (200 << 30) - 4096).unwrap();
    drop(v);
    qemu_check(&img);
    let v = Vhdx::open(&img, &ro()).unwrap();
    let mut b = vec![0u8; 4096];
    v.read_at(&mut b, 100 * MIB).unwrap();
    assert_eq!(b, pattern(5, 4096));
    v.read_at(&mut b, (200 << 30) - 4096).unwrap();
    assert_eq!(b, pattern(6, 4096));
    let q = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    assert!(
        q.contains(&format!("\"virtual-size\": {}", 200u64 << 30)),
        "{q}"
    );
}

#[test]
fn detect_and_info() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", img.to_str().unwrap(), "8M"]);
    let s = parvis_disk::storage::FileStorage(File::open(&img).unwrap());
    assert!(Vhdx::detect(&s).unwrap());
    let raw = dir.path().join("x.raw");
    std::fs::write(&raw, b"short").unwrap();
    assert!(
        !Vhdx::detect(&parvis_disk::storage::FileStorage(
            File::open(&raw).unwrap()
        ))
        .unwrap()
    );
    qemu_io(&img, &["write -P 0x5a 1M 4k"]);
    save_seed("qemu-dynamic", &std::fs::read(&img).unwrap());
    let info = Vhdx::open(&img, &ro()).unwrap().info();
    assert_eq!(info.variant, "dynamic");
    assert_eq!(info.virtual_size, 8 * MIB);
    assert!(info.allocated > 0);
    assert!(
        info.details
            .iter()
            .any(|(k, v)| k == "creator" && v.contains("QEMU")),
        "{info:?}"
    );
    let _ = Path::new("");
}

/// Small images with a little data: the fuzz seeds (saved when `VHDX_SEED_DIR` is set).
#[test]
fn small_images_for_fuzz_seeds() {
    let dir = tempfile::tempdir().unwrap();
    for (name, kind, logical) in [
        ("parvis-dynamic", VhdxKind::Dynamic, 512),
        ("parvis-fixed", VhdxKind::Fixed, 512),
        ("parvis-dynamic-4k", VhdxKind::Dynamic, 4096),
    ] {
        let img = dir.path().join(name);
        let mut o = VhdxCreateOptions::new(kind, 3 * MIB);
        o.block_size = 1 << 20;
        o.logical_sector_size = logical;
        let v = Vhdx::create(&img, &o).unwrap();
        v.write_at(&[0x5a; 4096], MIB).unwrap();
        drop(v);
        let bytes = std::fs::read(&img).unwrap();
        let seed = fuzz_seed(&bytes);
        assert!(
            seed.len() < 64 * 1024,
            "{name}: seed of {} bytes",
            seed.len()
        );
        save_seed(name, &bytes);
    }
}

/// (file length, bytes the host file system allocated for it).
fn file_usage(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.len(), m.blocks() * 512)
}

#[test]
fn shrink_gives_back_the_space_of_dropped_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut o = VhdxCreateOptions::dynamic(64 * MIB);
    o.block_size = 1 << 20;
    // Dropped blocks at the end of the file: the file is cut.
    let tail = d.join("tail.vhdx");
    let v = Vhdx::create(&tail, &o).unwrap();
    v.write_at(&pattern(1, 8 << 20), 0).unwrap();
    v.write_at(&pattern(2, 2 << 20), 50 * MIB).unwrap();
    v.write_at(&pattern(3, 4096), 60 * MIB).unwrap();
    v.flush().unwrap();
    let (len0, used0) = file_usage(&tail);
    let alloc0 = v.info().allocated;
    v.resize(32 * MIB).unwrap();
    let (len1, used1) = file_usage(&tail);
    assert_eq!(len1, len0 - 3 * MIB, "three 1 MiB blocks cut off the end");
    // (The last block held 4 KiB of data: blocks are allocated sparse.)
    assert!(used1 + 2 * MIB + 4096 <= used0, "{used0} -> {used1}");
    assert_eq!(v.info().allocated, alloc0 - 3 * MIB);
    assert!(v.check().unwrap().errors.is_empty());
    // New blocks go at the new end of the file.
    v.write_at(&pattern(4, 4096), 20 * MIB).unwrap();
    drop(v);
    assert_eq!(file_usage(&tail).0, len1 + MIB);
    qemu_check(&tail);
    let raw = d.join("tail.raw");
    to_raw(&tail, &raw);
    let v = Vhdx::open(&tail, &ro()).unwrap();
    assert_same(&v, &raw);
    let mut b = vec![0u8; 8 << 20];
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(b, pattern(1, 8 << 20));
    v.read_at(&mut b[..4096], 20 * MIB).unwrap();
    assert_eq!(b[..4096], pattern(4, 4096));
    drop(v);

    // Dropped blocks before blocks that stay: they become holes.
    let mid = d.join("mid.vhdx");
    let v = Vhdx::create(&mid, &o).unwrap();
    v.write_at(&pattern(5, 4 << 20), 40 * MIB).unwrap();
    v.write_at(&pattern(6, 2 << 20), 2 * MIB).unwrap();
    v.flush().unwrap();
    let (len0, used0) = file_usage(&mid);
    v.resize(16 * MIB).unwrap();
    drop(v);
    let (len1, used1) = file_usage(&mid);
    assert_eq!(len1, len0, "the kept blocks lie behind the dropped ones");
    assert!(
        used1 + 4 * MIB <= used0,
        "holes punched: {used0} -> {used1}"
    );
    qemu_check(&mid);
    let raw = d.join("mid.raw");
    to_raw(&mid, &raw);
    let v = Vhdx::open(&mid, &ro()).unwrap();
    assert_same(&v, &raw);
    v.read_at(&mut b[..2 << 20], 2 * MIB).unwrap();
    assert_eq!(b[..2 << 20], pattern(6, 2 << 20));
    assert!(v.check().unwrap().errors.is_empty());
    drop(v);

    // A fixed image loses the tail of its data area.
    let fixed = d.join("fixed.vhdx");
    let mut o = VhdxCreateOptions::fixed(64 * MIB);
    o.block_size = 1 << 20;
    let v = Vhdx::create(&fixed, &o).unwrap();
    v.write_at(&pattern(7, 4096), 10 * MIB).unwrap();
    let (len0, _) = file_usage(&fixed);
    v.resize(16 * MIB + 512).unwrap();
    assert_eq!(v.info().allocated, 16 * MIB + 512);
    drop(v);
    assert_eq!(file_usage(&fixed).0, len0 - 47 * MIB);
    qemu_check(&fixed);
    let raw = d.join("fixed.raw");
    to_raw(&fixed, &raw);
    let v = Vhdx::open(&fixed, &ro()).unwrap();
    assert_same(&v, &raw);
    v.read_at(&mut b[..4096], 10 * MIB).unwrap();
    assert_eq!(b[..4096], pattern(7, 4096));
    let r = v.check().unwrap();
    assert!(r.errors.is_empty() && r.warnings.is_empty(), "{r:?}");
}
