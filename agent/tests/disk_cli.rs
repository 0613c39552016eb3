//! `parvis disk …` against the real peer, qemu-img: images made by one are read, checked and
//! compared by the other.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn parvis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parvis"))
        .args(args)
        .output()
        .expect("parvis runs")
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed for these tests (tests/setup-host.sh installs it)")
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A sparse raw file with patterned data in a few places (about half of it allocated).
fn patterned_raw(dir: &Path, name: &str, size: u64) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        if (off >> 20) % 2 == 0 {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let n = chunk.len().min((size - off) as usize);
            f.write_all_at(&chunk[..n], off).unwrap();
        }
        off += 1 << 21;
    }
    p
}

#[test]
fn images_parvis_writes_pass_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let raw = patterned_raw(dir.path(), "src.raw", 24 << 20);
    for (ext, variant, qfmt) in [
        ("vhdx", "dynamic", "vhdx"),
        ("vhdx", "fixed", "vhdx"),
        ("vhd", "dynamic", "vpc"),
        ("vhd", "fixed", "vpc"),
    ] {
        let out = dir.path().join(format!("out-{variant}.{ext}"));
        ok(
            &parvis(&[
                "disk",
                "convert",
                "-q",
                "--variant",
                variant,
                s(&raw),
                s(&out),
            ]),
            "parvis convert",
        );
        if qfmt == "vpc" {
            // qemu-img 7.2 has no check for VHD (exit 63); opening it validates the footer,
            // header and BAT.
            ok(
                &qemu_img(&["info", "-f", qfmt, s(&out)]),
                &format!("qemu-img info {ext} {variant}"),
            );
        } else {
            ok(
                &qemu_img(&["check", "-f", qfmt, s(&out)]),
                &format!("qemu-img check {ext} {variant}"),
            );
        }
        ok(
            &qemu_img(&["compare", "-f", "raw", "-F", qfmt, s(&raw), s(&out)]),
            "qemu-img compare",
        );
        // And parvis's own compare agrees.
        ok(
            &parvis(&["disk", "compare", "-q", s(&raw), s(&out)]),
            "parvis compare",
        );
    }
}

#[test]
fn qemu_img_images_read_back_identical_to_qemu_img_raw() {
    let dir = tempfile::tempdir().unwrap();
    let raw = patterned_raw(dir.path(), "src.raw", 20 << 20);
    for (qfmt, opts, ext) in [
        ("vhdx", "subformat=dynamic,block_size=1M", "vhdx"),
        ("vhdx", "subformat=dynamic,block_size=32M", "vhdx"),
        ("vhdx", "subformat=fixed", "vhdx"),
        ("vpc", "subformat=dynamic", "vhd"),
        ("vpc", "subformat=fixed,force_size=on", "vhd"),
    ] {
        let img = dir.path().join(format!("q.{ext}"));
        let _ = std::fs::remove_file(&img);
        ok(
            &qemu_img(&["convert", "-O", qfmt, "-o", opts, s(&raw), s(&img)]),
            "qemu-img convert",
        );
        let theirs = dir.path().join("theirs.raw");
        let ours = dir.path().join("ours.raw");
        let _ = std::fs::remove_file(&theirs);
        let _ = std::fs::remove_file(&ours);
        ok(
            &qemu_img(&["convert", "-f", qfmt, "-O", "raw", s(&img), s(&theirs)]),
            "qemu-img to raw",
        );
        ok(
            &parvis(&["disk", "convert", "-q", s(&img), s(&ours)]),
            &format!("parvis {qfmt} {opts} to raw"),
        );
        assert!(
            std::fs::read(&theirs).unwrap() == std::fs::read(&ours).unwrap(),
            "{qfmt} {opts}: parvis and qemu-img disagree"
        );
    }
}

#[test]
fn info_json_and_check_json() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(
        &parvis(&[
            "disk",
            "create",
            "--size",
            "1G",
            "--block-size",
            "8M",
            s(&img),
        ]),
        "create",
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&parvis(&["disk", "info", "--json", s(&img)]), "info")).unwrap();
    assert_eq!(v["format"], "vhdx");
    assert_eq!(v["variant"], "dynamic");
    assert_eq!(v["virtual_size"], 1u64 << 30);
    assert_eq!(v["block_size"], 8u64 << 20);
    assert_eq!(v["allocated"], 0);
    let c: serde_json::Value =
        serde_json::from_str(&ok(&parvis(&["disk", "check", "--json", s(&img)]), "check")).unwrap();
    assert_eq!(c["ok"], true);
    // qemu-img agrees on the size.
    let q: serde_json::Value = serde_json::from_str(&ok(
        &qemu_img(&["info", "--output=json", s(&img)]),
        "qemu-img info",
    ))
    .unwrap();
    assert_eq!(q["virtual-size"], 1u64 << 30);

    // A local conversion with --json says what it made and what it did.
    let raw = patterned_raw(dir.path(), "half.raw", 8 << 20);
    let out = dir.path().join("half.vhdx");
    let c: serde_json::Value = serde_json::from_str(&ok(
        &parvis(&["disk", "convert", "--json", s(&raw), s(&out)]),
        "convert --json",
    ))
    .unwrap();
    assert_eq!(c["dst"], s(&out), "{c}");
    assert_eq!(c["format"], "vhdx", "{c}");
    assert_eq!(c["variant"], "dynamic", "{c}");
    assert_eq!(c["virtual_size"], 8u64 << 20, "{c}");
    // Half of the source is data, half is zeros that are not written.
    assert_eq!(c["written"], 4u64 << 20, "{c}");
    assert_eq!(
        c["skipped_zero"].as_u64().unwrap() + c["skipped_unallocated"].as_u64().unwrap(),
        4u64 << 20,
        "{c}"
    );
    ok(
        &parvis(&["disk", "compare", "-q", s(&raw), s(&out)]),
        "compare",
    );
}

#[test]
fn resize_grows_and_qemu_img_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.vhdx");
    ok(
        &parvis(&["disk", "create", "--size", "64M", s(&img)]),
        "create",
    );
    ok(&parvis(&["disk", "resize", s(&img), "128M"]), "grow");
    let q: serde_json::Value = serde_json::from_str(&ok(
        &qemu_img(&["info", "--output=json", s(&img)]),
        "qemu-img info",
    ))
    .unwrap();
    assert_eq!(q["virtual-size"], 128u64 << 20);
    ok(
        &qemu_img(&["check", s(&img)]),
        "qemu-img check after resize",
    );
    ok(
        &parvis(&["disk", "resize", s(&img), "32M"]),
        "shrink (VHDX)",
    );
    let q: serde_json::Value = serde_json::from_str(&ok(
        &qemu_img(&["info", "--output=json", s(&img)]),
        "qemu-img info",
    ))
    .unwrap();
    assert_eq!(q["virtual-size"], 32u64 << 20);
}

#[test]
fn compare_reports_differences_and_bad_input_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = patterned_raw(dir.path(), "a.raw", 4 << 20);
    let b = dir.path().join("b.raw");
    std::fs::copy(&a, &b).unwrap();
    ok(
        &parvis(&["disk", "compare", "-q", s(&a), s(&b)]),
        "identical",
    );
    {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&b)
            .unwrap()
            .write_all_at(&[0xee], 12345)
            .unwrap();
    }
    let o = parvis(&["disk", "compare", "-q", s(&a), s(&b)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("offset 12345"));
    // A larger image equals the smaller one only if its tail is zero.
    let longer = dir.path().join("longer.raw");
    std::fs::copy(&a, &longer).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&longer)
        .unwrap();
    f.set_len(5 << 20).unwrap();
    ok(
        &parvis(&["disk", "compare", "-q", s(&a), s(&longer)]),
        "zero tail",
    );
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0x42], (4 << 20) + 777).unwrap();
    }
    let o = parvis(&["disk", "compare", "-q", s(&a), s(&longer)]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("offset {}", (4 << 20) + 777)),
        "{out}"
    );
    // A truncated VHDX: a clear error, exit 1, nothing written.
    let good = dir.path().join("g.vhdx");
    ok(
        &parvis(&["disk", "create", "--size", "16M", s(&good)]),
        "create",
    );
    let bad = dir.path().join("bad.vhdx");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&bad, &bytes[..300_000]).unwrap();
    let o = parvis(&["disk", "info", s(&bad)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("parvis: error:") && err.contains("bad.vhdx"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&bad).unwrap(),
        &bytes[..300_000],
        "a failed open wrote to the file"
    );
    // Refuses to overwrite.
    let o = parvis(&["disk", "convert", "-q", s(&a), s(&good)]);
    assert_eq!(o.status.code(), Some(1));
}
