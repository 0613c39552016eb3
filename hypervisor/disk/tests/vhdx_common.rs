//! Helpers shared by the VHDX integration tests (included with `#[path]`; as its own test
//! crate it has no tests).

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use parvis_disk::BlockDevice;

/// Run a qemu tool and return its stdout; a missing tool or a failure fails the test.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} is required for these tests (apt-get install qemu-utils): {e}")
    });
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS`.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Run qemu-io commands (`write -P 0x5a 3M 1M`, ...) on a VHDX image.
pub fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "vhdx"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = image.to_str().unwrap();
    args.push(p);
    run("qemu-io", &args);
}

/// `qemu-img check -f vhdx` must pass.
pub fn qemu_check(image: &Path) {
    qemu_img(&["check", "-f", "vhdx", image.to_str().unwrap()]);
}

/// Convert a VHDX image to raw with qemu-img.
pub fn to_raw(image: &Path, raw: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        "vhdx",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

/// Assert that `dev` reads exactly the bytes of the raw file `raw`, in 4 MiB chunks.
pub fn assert_same(dev: &dyn BlockDevice, raw: &Path) {
    let f = File::open(raw).unwrap();
    let len = f.metadata().unwrap().len();
    assert_eq!(dev.size(), len, "virtual size differs from {raw:?}");
    let chunk = 4 << 20;
    let mut a = vec![0u8; chunk];
    let mut b = vec![0u8; chunk];
    let mut off = 0u64;
    while off < len {
        let n = chunk.min((len - off) as usize);
        dev.read_at(&mut a[..n], off).unwrap();
        f.read_exact_at(&mut b[..n], off).unwrap();
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "contents differ at {:#x}: parvis {:#x}, qemu {:#x}",
                off + i as u64,
                a[i],
                b[i]
            );
        }
        off += n as u64;
    }
}

/// A deterministic pattern byte for (`seed`, position).
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_mul(31)
                .wrapping_add((i / 512) as u8)
                .wrapping_add(i as u8)
        })
        .collect()
}

/// A bitwise CRC-32C, independent of the library's table-driven one.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Store the CRC-32C of `buf` (checksum field at 4 taken as zero) at offset 4.
pub fn seal(buf: &mut [u8]) {
    buf[4..8].fill(0);
    let c = crc32c(buf);
    buf[4..8].copy_from_slice(&c.to_le_bytes());
}

/// Little-endian u32/u64 readers.
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

/// See [`le32`].
pub fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Read `len` bytes at `off` of a file.
pub fn read_file_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

/// Write bytes at `off` of a file.
pub fn write_file_at(path: &Path, off: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

/// (current header slot, header bytes) of a VHDX file: the valid one with the higher
/// sequence number.
pub fn current_header(path: &Path) -> (usize, Vec<u8>) {
    let mut best: Option<(usize, Vec<u8>)> = None;
    for (slot, off) in [(0usize, 64u64 << 10), (1, 128 << 10)] {
        let h = read_file_at(path, off, 4096);
        let mut z = h.clone();
        z[4..8].fill(0);
        if &h[0..4] != b"head" || crc32c(&z) != le32(&h, 4) {
            continue;
        }
        if best.as_ref().is_none_or(|(_, b)| le64(&h, 8) > le64(b, 8)) {
            best = Some((slot, h));
        }
    }
    best.expect("a valid header")
}

/// (offset, length) of the region with the given on-disk GUID bytes in the region table.
pub fn region(path: &Path, guid: [u8; 16]) -> (u64, u32) {
    let t = read_file_at(path, 192 << 10, 64 << 10);
    let n = le32(&t, 8) as usize;
    (0..n)
        .map(|i| 16 + i * 32)
        .find(|&e| t[e..e + 16] == guid)
        .map(|e| (le64(&t, e + 16), le32(&t, e + 24)))
        .expect("region present")
}

/// The BAT region GUID 2DC27766-F623-4200-9D64-115E9BFD4A08 in on-disk byte order.
pub const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08,
];

/// Encode an image for the `vhdx_open_rw` fuzz target: length, non-zero segments, then a
/// few operations (read, write, flush, allocation, check).
pub fn fuzz_seed(image: &[u8]) -> Vec<u8> {
    let mut segs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < image.len() {
        if image[i] == 0 {
            i += 1;
            continue;
        }
        let start = i;
        let mut zeros = 0;
        while i < image.len() && zeros < 64 && i - start < 65535 {
            zeros = if image[i] == 0 { zeros + 1 } else { 0 };
            i += 1;
        }
        segs.push((start, i - zeros - start));
    }
    assert!(segs.len() < 256, "{} segments", segs.len());
    let mut out = (image.len() as u32).to_le_bytes().to_vec();
    out.push(segs.len() as u8);
    for (off, len) in segs {
        out.extend_from_slice(&(off as u32).to_le_bytes());
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&image[off..off + len]);
    }
    for op in [
        [0u8, 0, 0, 0, 0, 7, 0, 0],
        [1, 9, 8, 0, 0, 3, 0, 0xab],
        [2; 8],
        [3, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0x20, 0, 0, 0, 1, 0x11],
        [5; 8],
    ] {
        out.extend_from_slice(&op);
    }
    out
}

/// Write `seed` as `name` into `$VHDX_SEED_DIR` (when set).
pub fn save_seed(name: &str, image: &[u8]) {
    if let Some(dir) = std::env::var_os("VHDX_SEED_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(name), fuzz_seed(image)).unwrap();
    }
}
