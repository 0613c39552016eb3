//! VHD interoperability with the real peer, qemu-img / qemu-io (qemu 7.2, Debian
//! `qemu-utils`). These tests FAIL (never skip) when the tools are missing.
//!
//! Facts about the peer that shape the tests:
//! - `qemu-img check` does not support the vpc format (it exits 63, "This image format does
//!   not support checks"); opening the image (`qemu-img info`, `compare`, `convert`) runs
//!   qemu's own validation (footer checksum, truncated-image detection) instead.
//! - qemu cannot create differencing VHDs ("Backing file not supported for file format
//!   'vpc'"), and opens them as plain dynamic images (ignoring parent and bitmaps).
//! - qemu sizes images of unknown creators (such as Parvis' `pvis`) by CHS geometry, so
//!   images whose size CHS cannot express are compared with `force_size_calc=current_size`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use parvis_disk::vhd::footer::Geometry;
use parvis_disk::vhd::{Vhd, VhdCreateOptions};
use parvis_disk::{BlockDevice, DiskError};

const MIB: u64 = 1 << 20;

fn run(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("`{tool}` is required for the VHD interoperability tests (apt-get install qemu-utils): {e}")
    })
}

fn ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu's idea of the virtual size (`qemu-img info --output=json`).
fn qemu_size(args: &[&str]) -> u64 {
    let mut a = vec!["info", "--output=json"];
    a.extend_from_slice(args);
    let json = ok("qemu-img", &a);
    let at = json
        .find("\"virtual-size\":")
        .expect("virtual-size in qemu-img info")
        + 15;
    json[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Write a qemu-io pattern (`write -P pat off len`) into a vpc image.
fn qemu_write(img: &Path, writes: &[(u8, u64, u64)]) {
    let mut args = vec!["-f".to_string(), "vpc".to_string()];
    for (p, off, len) in writes {
        args.push("-c".into());
        args.push(format!("write -P {p:#x} {off} {len}"));
    }
    args.push(s(img).to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    ok("qemu-io", &a);
}

/// Assert that `disk` reads exactly the bytes of `raw`, in 16 MiB chunks.
fn assert_same(disk: &dyn BlockDevice, raw: &Path) {
    let len = std::fs::metadata(raw).unwrap().len();
    assert_eq!(disk.size(), len, "virtual size vs {}", raw.display());
    let mut f = File::open(raw).unwrap();
    let chunk = 16 * MIB as usize;
    let (mut a, mut b) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut off = 0u64;
    while off < len {
        let n = chunk.min((len - off) as usize);
        disk.read_at(&mut a[..n], off).unwrap();
        f.read_exact(&mut b[..n]).unwrap();
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!("content differs at {:#x}", off + i as u64);
        }
        off += n as u64;
    }
}

fn to_raw(img: &Path, raw: &Path) {
    ok(
        "qemu-img",
        &["convert", "-f", "vpc", "-O", "raw", s(img), s(raw)],
    );
}

/// Writes that hit the first block, cross a 2 MiB block boundary, and end the disk.
fn writes_for(size: u64) -> Vec<(u8, u64, u64)> {
    let mut w = vec![(0xab, 0, 64 * 1024)];
    if size >= 4 * MIB {
        w.push((0xcd, 2 * MIB - 4096, 8192));
    }
    w.push((0x5a, size - 4096, 4096));
    w
}

fn check_qemu_image(dir: &Path, name: &str, create_opts: &str, size: &str) {
    let img = dir.join(format!("{name}.vhd"));
    let raw = dir.join(format!("{name}.raw"));
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            create_opts,
            s(&img),
            size,
        ],
    );
    let qsize = qemu_size(&["-f", "vpc", s(&img)]);
    qemu_write(&img, &writes_for(qsize));
    to_raw(&img, &raw);
    let v = Vhd::open(&img, true).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(v.size(), qsize, "{name}: size differs from qemu's");
    assert_same(&v, &raw);
    let r = v.check().unwrap();
    assert!(r.errors.is_empty(), "{name}: {r:?}");
    std::fs::remove_file(&raw).unwrap();
}

#[test]
fn reads_qemu_dynamic_images() {
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in ["1M", "65M", "1073742336"].iter().enumerate() {
        check_qemu_image(dir.path(), &format!("dyn{i}"), "subformat=dynamic", size);
    }
    check_qemu_image(
        dir.path(),
        "dynfs",
        "subformat=dynamic,force_size=on",
        "1073742336",
    );
}

#[test]
fn reads_qemu_fixed_images() {
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in ["1M", "65M"].iter().enumerate() {
        check_qemu_image(dir.path(), &format!("fix{i}"), "subformat=fixed", size);
    }
    check_qemu_image(
        dir.path(),
        "fixfs",
        "subformat=fixed,force_size=on",
        "1025K",
    );
    let v = Vhd::open(&dir.path().join("fixfs.vhd"), true).unwrap();
    assert_eq!(v.size(), 1025 * 1024);
    assert_eq!(v.info().variant, "fixed");
}

#[test]
fn chs_rounding_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let chs = dir.path().join("chs.vhd");
    let cur = dir.path().join("cur.vhd");
    ok("qemu-img", &["create", "-q", "-f", "vpc", s(&chs), "3G"]);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            s(&cur),
            "3G",
        ],
    );
    let v = Vhd::open(&chs, true).unwrap();
    let q = qemu_size(&["-f", "vpc", s(&chs)]);
    assert_eq!(v.size(), q);
    assert!(q > 3 << 30, "qemu rounds 3 GiB up to a CHS size");
    assert!(
        v.info()
            .details
            .contains(&("size from".into(), "chs".into()))
    );
    let v = Vhd::open(&cur, true).unwrap();
    assert_eq!(v.size(), 3 << 30);
    assert_eq!(qemu_size(&["-f", "vpc", s(&cur)]), 3 << 30);
}

/// Fill `disk` and a raw twin with the same writes.
fn write_both(disk: &dyn BlockDevice, raw: &Path, writes: &[(u8, u64, u64)]) {
    let f = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(raw)
        .unwrap();
    f.set_len(disk.size()).unwrap();
    use std::os::unix::fs::FileExt;
    for &(p, off, len) in writes {
        let data: Vec<u8> = (0..len).map(|i| p ^ (i / 512) as u8).collect();
        disk.write_at(&data, off).unwrap();
        f.write_all_at(&data, off).unwrap();
    }
}

fn qemu_accepts(img: &Path, raw: &Path, current_size: bool) {
    let out = run("qemu-img", &["check", "-f", "vpc", s(img)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("does not support checks"),
        "qemu-img check: {err}"
    );
    if current_size {
        let a = format!(
            "driver=vpc,force_size_calc=current_size,file.filename={}",
            s(img)
        );
        let b = format!("driver=raw,file.filename={}", s(raw));
        ok("qemu-img", &["compare", "-q", "--image-opts", &a, &b]);
    } else {
        ok(
            "qemu-img",
            &["compare", "-q", "-f", "vpc", "-F", "raw", s(img), s(raw)],
        );
    }
}

#[test]
fn parvis_images_open_and_compare_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A CHS-exact size (qemu reads it without options) and an odd one.
    let exact = Geometry::for_sectors(130_000).total_sectors() * 512;
    for (i, size) in [exact, 65 * MIB + 512].into_iter().enumerate() {
        for fixed in [false, true] {
            let img = d.join(format!("p{i}{fixed}.vhd"));
            let raw = d.join(format!("p{i}{fixed}.raw"));
            let opts = if fixed {
                VhdCreateOptions::fixed(size)
            } else {
                VhdCreateOptions::dynamic(size)
            };
            let v = Vhd::create(&img, &opts).unwrap();
            write_both(&v, &raw, &writes_for(size));
            v.flush().unwrap();
            assert!(v.check().unwrap().errors.is_empty());
            drop(v);
            qemu_accepts(&img, &raw, i == 1);
            // qemu's own raw conversion agrees with Parvis.
            let v = Vhd::open(&img, true).unwrap();
            assert_same(&v, &raw);
        }
    }
    // qemu writes into a Parvis-created dynamic image; Parvis reads qemu's blocks.
    let img = d.join("p0false.vhd");
    qemu_write(&img, &[(0x77, 6 * MIB, 3 * MIB)]);
    let raw = d.join("qemu-wrote.raw");
    to_raw(&img, &raw);
    let v = Vhd::open(&img, false).unwrap();
    assert_same(&v, &raw);
    // Parvis writes into a qemu-created dynamic image; qemu reads Parvis' blocks.
    let q = d.join("q.vhd");
    let qraw = d.join("q.raw");
    ok("qemu-img", &["create", "-q", "-f", "vpc", s(&q), "40M"]);
    qemu_write(&q, &[(0x11, 0, MIB)]);
    to_raw(&q, &qraw);
    let v = Vhd::open(&q, false).unwrap();
    write_both(
        &v,
        &qraw,
        &[(0x22, 512 * 1024, 4 * MIB), (0x33, 20 * MIB, 512)],
    );
    v.flush().unwrap();
    drop(v);
    qemu_accepts(&q, &qraw, false);
}

#[test]
fn differencing_chain_over_qemu_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.vhd");
    let raw = d.join("expect.raw");
    ok("qemu-img", &["create", "-q", "-f", "vpc", s(&base), "32M"]);
    let size = qemu_size(&["-f", "vpc", s(&base)]);
    qemu_write(&base, &[(0xb0, 0, 8 * MIB), (0xb1, size - MIB, MIB)]);
    to_raw(&base, &raw);
    let child = d.join("child.vhd");
    let c = Vhd::create(&child, &VhdCreateOptions::differencing(&base)).unwrap();
    assert_eq!(c.size(), size);
    write_both(
        &c,
        &raw,
        &[
            (0xc0, 4096, 4096),
            (0xc1, 2 * MIB - 512, 1024),
            (0xc2, 16 * MIB, 512),
        ],
    );
    c.flush().unwrap();
    assert_same(&c, &raw);
    drop(c);
    // Reopened from disk, and a grandchild over it.
    let c = Vhd::open(&child, true).unwrap();
    assert_same(&c, &raw);
    assert_eq!(c.info().parent, Some(base.canonicalize().unwrap()));
    drop(c);
    let gc = d.join("grandchild.vhd");
    let g = Vhd::create(&gc, &VhdCreateOptions::differencing(&child)).unwrap();
    write_both(&g, &raw, &[(0xd0, 4096 + 512, 512), (0xd1, 30 * MIB, 4096)]);
    g.flush().unwrap();
    assert_same(&g, &raw);
    assert_eq!(g.chain_depth(), 3);
    drop(g);
    // qemu opens Parvis' differencing images (as dynamic ones, without the parent).
    qemu_size(&["-f", "vpc", s(&gc)]);
    // The peer cannot create the reverse chain.
    let out = run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-b",
            s(&base),
            "-F",
            "vpc",
            s(&d.join("q.vhd")),
        ],
    );
    assert!(
        !out.status.success(),
        "qemu-img learnt to create differencing VHDs: extend this test"
    );
}

#[test]
fn hostile_qemu_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("h.vhd");
    ok("qemu-img", &["create", "-q", "-f", "vpc", s(&img), "16M"]);
    qemu_write(&img, &[(0x42, 0, 8 * MIB)]);
    let good = std::fs::read(&img).unwrap();
    let write = |name: &str, b: &[u8]| -> PathBuf {
        let p = d.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    // Truncated: the last blocks and the footer are gone (copy at 0 is used, BAT overruns).
    let p = write("trunc.vhd", &good[..good.len() - 3 * MIB as usize]);
    let e = Vhd::open(&p, true).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { ref structure, .. } if structure.starts_with("VHD BAT entry")),
        "{e}"
    );
    // Bad checksum in both footers.
    let mut b = good.clone();
    let n = b.len();
    b[n - 512 + 100] ^= 0x10;
    b[100] ^= 0x10;
    let p = write("sum.vhd", &b);
    let e = Vhd::open(&p, true).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { ref structure, ref reason, .. } if structure == "VHD footer" && reason.contains("checksum")),
        "{e}"
    );
    // BAT entry past EOF.
    let mut b = good.clone();
    b[1536 + 8..1536 + 12].copy_from_slice(&0x00ff_0000u32.to_be_bytes());
    let p = write("bat.vhd", &b);
    let e = Vhd::open(&p, true).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { ref structure, offset: 1544, .. } if structure == "VHD BAT entry 2"),
        "{e}"
    );
    // Absurd size (current size 2^62, saturated geometry) in a fixed image.
    let fixed = d.join("f.vhd");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            s(&fixed),
            "1M",
        ],
    );
    let mut b = std::fs::read(&fixed).unwrap();
    let n = b.len();
    let f = &mut b[n - 512..];
    f[48..56].copy_from_slice(&(1u64 << 62).to_be_bytes());
    f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
    f[64..68].fill(0);
    let sum = !f.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    let p = write("huge.vhd", &b);
    let e = Vhd::open(&p, true).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { ref reason, .. } if reason.contains("2040 GiB")),
        "{e}"
    );
    // Parent loop A -> B -> A.
    let a = d.join("a.vhd");
    let bb = d.join("b.vhd");
    let c = d.join("c.vhd");
    drop(Vhd::create(&a, &VhdCreateOptions::dynamic(4 * MIB)).unwrap());
    drop(Vhd::create(&bb, &VhdCreateOptions::differencing(&a)).unwrap());
    drop(Vhd::create(&c, &VhdCreateOptions::differencing(&bb)).unwrap());
    std::fs::rename(&c, &a).unwrap();
    assert!(matches!(
        Vhd::open(&a, true),
        Err(DiskError::ParentChain { .. })
    ));
    // None of this modified the source image.
    assert_eq!(std::fs::read(&img).unwrap(), good);
}

/// Whether `a` and `b` hold the same bytes over `0..len` (sparse-aware: ranges both report
/// unallocated are not read). Returns the first differing offset.
fn first_diff(a: &dyn BlockDevice, b: &dyn BlockDevice, len: u64) -> Option<u64> {
    parvis_disk::convert::first_difference(
        a,
        b,
        0..len,
        &std::sync::atomic::AtomicBool::new(false),
        &|_, _| {},
    )
    .unwrap()
}

/// qemu's raw conversion of `img` compared (sparse-aware) with the raw file `want`.
fn qemu_raw_matches(img: &Path, want: &Path, len: u64) {
    let out = img.with_extension("qemu.raw");
    to_raw(img, &out);
    let q = parvis_disk::RawFile::open(&out, true).unwrap();
    let w = parvis_disk::RawFile::open(want, true).unwrap();
    assert_eq!(q.size(), len, "qemu's raw size of {}", img.display());
    assert_eq!(first_diff(&q, &w, len), None, "{}", img.display());
    drop(q);
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn grow_beyond_the_bat_padding_relocates_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 64 GiB rounded to a CHS size, so that qemu (which sizes `pvis` and `qemu` images by
    // geometry) sees exactly the size Parvis does.
    let big = Geometry::for_sectors((64u64 << 30) / 512).total_sectors() * 512;
    let small = 16 * MIB;
    // A Parvis-made and a qemu-made dynamic image of 16 MiB with data in most blocks: one
    // BAT sector (128 entries, 256 MiB) directly followed by the first data block.
    let pv = d.join("pv.vhd");
    let qv = d.join("qv.vhd");
    drop(Vhd::create(&pv, &VhdCreateOptions::dynamic(small)).unwrap());
    ok("qemu-img", &["create", "-q", "-f", "vpc", s(&qv), "16M"]);
    let qsmall = qemu_size(&["-f", "vpc", s(&qv)]);
    for (img, size) in [(&pv, small), (&qv, qsmall)] {
        let raw = img.with_extension("want.raw");
        let v = Vhd::open(img, false).unwrap();
        assert_eq!(v.size(), size);
        let mut w = writes_for(size);
        w.push((0x3c, 5 * MIB + 512, 3 * MIB));
        write_both(&v, &raw, &w);
        v.flush().unwrap();
        v.resize(big).unwrap();
        // A block allocated after the move goes behind the relocated table.
        write_both(&v, &raw, &[(0x6e, 40 << 30, 8192)]);
        v.flush().unwrap();
        let r = v.check().unwrap();
        assert!(r.errors.is_empty(), "{r:?}");
        drop(v);
        assert_eq!(qemu_size(&["-f", "vpc", s(img)]), big);
        // Parvis reads the old data, zeros in the new area and the new block.
        let v = Vhd::open(img, true).unwrap();
        assert_eq!(v.size(), big);
        let mut b = vec![0xffu8; 4096];
        for at in [size, 1 << 30, big - 4096] {
            v.read_at(&mut b, at).unwrap();
            assert!(b.iter().all(|&x| x == 0), "{at:#x}");
        }
        let want = parvis_disk::RawFile::open(&raw, true).unwrap();
        assert_eq!(first_diff(&v, &want, big), None, "{}", img.display());
        drop(v);
        // qemu reads the same.
        qemu_raw_matches(img, &raw, big);
        // qemu allocates a block in the grown image without hitting the moved table.
        qemu_write(img, &[(0x71, 50 << 30, MIB)]);
        let v = Vhd::open(img, false).unwrap();
        let r = v.check().unwrap();
        assert!(r.errors.is_empty(), "after qemu's write: {r:?}");
        v.read_at(&mut b, 50 << 30).unwrap();
        assert!(b.iter().all(|&x| x == 0x71));
        v.read_at(&mut b, 40 << 30).unwrap();
        assert!(
            b.iter()
                .enumerate()
                .all(|(i, &x)| x == 0x6e ^ (i / 512) as u8)
        );
        drop(v);
        std::fs::remove_file(&raw).unwrap();
    }
}

#[test]
fn grow_differencing_child_beyond_the_bat_padding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let big = Geometry::for_sectors((64u64 << 30) / 512).total_sectors() * 512;
    let base = d.join("base.vhd");
    let full = d.join("full.raw"); // what the child reads: the parent's data under its own
    let own = d.join("own.raw"); // the child's own blocks (all qemu sees: it ignores parents)
    let b = Vhd::create(&base, &VhdCreateOptions::dynamic(big)).unwrap();
    write_both(&b, &full, &[(0xb0, 0, 4 * MIB), (0xb1, 30 << 30, MIB)]);
    drop(b);
    // A 16 MiB child: BAT, then the two parent locators, then blocks.
    let child = d.join("child.vhd");
    let c = Vhd::create(
        &child,
        &VhdCreateOptions {
            size: 16 * MIB,
            ..VhdCreateOptions::differencing(&base)
        },
    )
    .unwrap();
    let w = [(0xc0, 4096, 4096), (0xc1, 16 * MIB - 512, 512)];
    write_both(&c, &full, &w);
    write_both(&c, &own, &w);
    c.flush().unwrap();
    c.resize(big).unwrap();
    let w = [(0xc2, 30 << 30, 4096)];
    write_both(&c, &full, &w);
    write_both(&c, &own, &w);
    c.flush().unwrap();
    assert!(c.check().unwrap().errors.is_empty());
    drop(c);
    let c = Vhd::open(&child, true).unwrap();
    assert_eq!(c.size(), big);
    let f = parvis_disk::RawFile::open(&full, true).unwrap();
    assert_eq!(first_diff(&c, &f, big), None);
    drop(c);
    assert_eq!(qemu_size(&["-f", "vpc", s(&child)]), big);
    let o = File::options().write(true).open(&own).unwrap();
    o.set_len(big).unwrap();
    qemu_raw_matches(&child, &own, big);
}
