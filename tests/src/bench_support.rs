//! Helpers for the `bench` binary: packing a host QEMU so it runs inside the test host, and
//! reading the timestamps and memory figures the benchmark scenario leaves in the share.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Firmware and option ROMs QEMU loads for `-M microvm` and `-M q35` with a PVH `-kernel`
/// (seen with strace): the first three are required, the rest are copied when present.
const FIRMWARE: &[(&str, bool)] = &[
    ("bios-256k.bin", true),
    ("bios-microvm.bin", true),
    ("pvh.bin", true),
    ("kvmvapic.bin", false),
    ("linuxboot_dma.bin", false),
    ("linuxboot.bin", false),
    ("multiboot_dma.bin", false),
];

/// Where QEMU looks for firmware on a Debian host.
const FIRMWARE_DIRS: &[&str] = &["/usr/share/qemu", "/usr/share/seabios", "/usr/share/qboot"];

/// Copy `qemu` (a dynamically linked `qemu-system-x86_64`), its `ldd` closure and the
/// firmware it needs into `dst`, laid out as `dst/qemu-system-x86_64`,
/// `dst/ld-linux-x86-64.so.2`, `dst/<soname>…` and `dst/share/<firmware>`. Run it as
/// `dst/ld-linux-x86-64.so.2 --library-path dst dst/qemu-system-x86_64 -L dst/share …`.
pub fn pack_qemu(qemu: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst.join("share"))?;
    copy(qemu, &dst.join("qemu-system-x86_64"))?;
    let out = Command::new("ldd")
        .arg(qemu)
        .output()
        .context("cannot run ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            qemu.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut loader = false;
    for (name, path) in ldd_closure(&String::from_utf8_lossy(&out.stdout)) {
        if name.starts_with("ld-linux") {
            loader = true;
            copy(&path, &dst.join("ld-linux-x86-64.so.2"))?;
        } else {
            copy(&path, &dst.join(&name))?;
        }
    }
    if !loader {
        bail!("ldd {} lists no dynamic loader", qemu.display());
    }
    for (name, required) in FIRMWARE {
        let found = FIRMWARE_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists());
        match found {
            Some(src) => copy(&src, &dst.join("share").join(name))?,
            None if *required => bail!("QEMU firmware {name} not found in {FIRMWARE_DIRS:?}"),
            None => {}
        }
    }
    Ok(())
}

fn copy(src: &Path, dst: &Path) -> Result<()> {
    std::fs::copy(src, dst)
        .map(|_| ())
        .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))
}

/// The (file name, resolved path) pairs of an `ldd` listing, without the vDSO.
fn ldd_closure(ldd: &str) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    for l in ldd.lines() {
        let l = l.trim();
        let (name, path) = match l.split_once(" => ") {
            Some((name, rest)) => (name.trim(), rest.split_whitespace().next().unwrap_or("")),
            None => {
                let p = l.split_whitespace().next().unwrap_or("");
                (p.rsplit('/').next().unwrap_or(p), p)
            }
        };
        if path.starts_with('/') {
            v.push((name.to_string(), PathBuf::from(path)));
        }
    }
    v
}

/// A wall-clock stamp such as `1795538824.568531` (ash `$EPOCHREALTIME`) or
/// `1795538824.568531123` (`date +%s.%N`), in nanoseconds.
pub fn parse_stamp(s: &str) -> Option<i128> {
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i128 = sec.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    Some(sec * 1_000_000_000 + digits.parse::<i128>().ok()?)
}

/// One timed VMM launch, read from its stamped output (`<stamp> <line>` per line, with a
/// final `BENCH-RC <status>` line) and its launch stamp.
#[derive(Debug, Clone, Default)]
pub struct BootRun {
    /// Seconds from launch to the guest's `PARVIS-L2-USERSPACE` (the time its line was read).
    pub userspace: Option<f64>,
    /// Seconds from launch to the VMM's exit.
    pub exit: Option<f64>,
    /// The VMM's exit status (the watchdog's 124/143 when it had to kill it).
    pub rc: Option<i32>,
    /// Whether the guest printed `PARVIS-POWEROFF`.
    pub poweroff: bool,
}

impl BootRun {
    /// Read a run launched at stamp `t0` (nanoseconds) from its stamped output.
    pub fn parse(t0: i128, stamped: &str) -> BootRun {
        let mut run = BootRun::default();
        let secs = |t: i128| (t - t0) as f64 / 1e9;
        for l in stamped.lines() {
            let Some((stamp, text)) = l.split_once(' ') else {
                continue;
            };
            let Some(t) = parse_stamp(stamp) else {
                continue;
            };
            let text = text.trim_matches('\r');
            // SeaBIOS leaves `Booting from ROM..` without a newline in front of the marker.
            if text.ends_with("PARVIS-L2-USERSPACE") && run.userspace.is_none() {
                run.userspace = Some(secs(t));
            } else if text == "PARVIS-POWEROFF" {
                run.poweroff = true;
            } else if let Some(rc) = text.strip_prefix("BENCH-RC ") {
                run.rc = rc.trim().parse().ok();
                run.exit = Some(secs(t));
            }
        }
        run
    }

    /// The guest reached userspace and the VMM exited with status 0.
    pub fn ok(&self) -> bool {
        self.userspace.is_some() && self.rc == Some(0)
    }
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// The minimum of `v`.
pub fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::min)
}

/// busybox awk program summarising `/proc/<pid>/smaps`, run with `-v ram_kb=<guest RAM>`.
/// With `-v guest=parvis` the guest RAM is every mapping of `/memfd:parvis-guest-memory` at a
/// file offset below the RAM size (the same memfd holds the VRAM after the RAM); with
/// `-v guest=anon` it is every anonymous mapping at least as large as the RAM (QEMU's RAM
/// block). Prints `total=<kB> guest=<kB> images=<kB> file=<kB> other=<kB> guest_maps=<n>`:
/// `images` is the resident part of mappings of the kernel and initramfs files (QEMU keeps
/// `-kernel`/`-initrd` mapped for fw_cfg), `file` of other file-backed mappings (the binary
/// and its libraries) and `other` the rest that is not guest RAM (heap, stacks, VRAM).
pub const SMAPS_AWK: &str = r#"
function hex(s,    i, n) {
    n = 0
    s = tolower(s)
    for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
    return n
}
/^[0-9a-f]+-[0-9a-f]+ / {
    name = ""
    for (i = 6; i <= NF; i++) name = name (i > 6 ? " " : "") $i
    g = guest == "parvis" && index(name, "memfd:parvis-guest-memory") > 0 && hex($3) < ram_kb * 1024
    pending = 1
    next
}
$1 == "Size:" {
    if (guest == "anon" && name == "" && $2 >= ram_kb) g = 1
    if (g && pending) maps++
    pending = 0
    next
}
$1 == "Rss:" {
    total += $2
    if (g) gr += $2
    else if (name ~ /(vmlinux|vmlinuz|initramfs|initrd)/) images += $2
    else if (name ~ /^\// && name !~ /^\/(memfd:|dev\/zero|SYSV)/) file += $2
    else other += $2
}
END {
    printf "total=%d guest=%d images=%d file=%d other=%d guest_maps=%d\n", total, gr, images, file, other, maps
}
"#;

/// Memory figures of one VMM process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident set, all mappings.
    pub total: u64,
    /// Resident guest RAM.
    pub guest: u64,
    /// Resident mappings of the kernel and initramfs files.
    pub images: u64,
    /// Resident file-backed mappings (the binary and its libraries).
    pub file: u64,
    /// Resident non-guest memory that is not file-backed (heap, stacks, device memory).
    pub other: u64,
    /// How many mappings were counted as guest RAM.
    pub guest_maps: u64,
}

impl Memory {
    /// Parse the line [`SMAPS_AWK`] prints.
    pub fn parse(line: &str) -> Option<Memory> {
        let mut m = Memory::default();
        let mut seen = 0;
        for kv in line.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            seen += 1;
            match k {
                "total" => m.total = v,
                "guest" => m.guest = v,
                "images" => m.images = v,
                "file" => m.file = v,
                "other" => m.other = v,
                "guest_maps" => m.guest_maps = v,
                _ => seen -= 1,
            }
        }
        (seen == 6).then_some(m)
    }

    /// Total minus guest RAM, in KiB.
    pub fn overhead(&self) -> u64 {
        self.total.saturating_sub(self.guest)
    }
}

/// How a bench reports a target: "met" or "NOT met".
pub fn ok(b: bool) -> &'static str {
    if b { "met" } else { "NOT met" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_runs() {
        assert_eq!(parse_stamp("12.5"), Some(12_500_000_000));
        assert_eq!(parse_stamp("1.000001"), Some(1_000_001_000));
        assert_eq!(parse_stamp("3"), Some(3_000_000_000));
        assert_eq!(parse_stamp("x.1"), None);
        let out = "10.100000 [    0.0] hello\n10.500000 PARVIS-L2-USERSPACE\r\n\
                   10.600000 PARVIS-POWEROFF\n10.750000 BENCH-RC 0\n";
        let r = BootRun::parse(parse_stamp("10.0").unwrap(), out);
        assert!((r.userspace.unwrap() - 0.5).abs() < 1e-9);
        assert!((r.exit.unwrap() - 0.75).abs() < 1e-9);
        assert_eq!(r.rc, Some(0));
        assert!(r.ok() && r.poweroff);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(min(&[3.0, 1.0, 2.0]), Some(1.0));
    }

    #[test]
    fn ldd_listing() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let v = ldd_closure(ldd);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0, "libz.so.1");
        assert_eq!(v[1].0, "ld-linux-x86-64.so.2");
        assert_eq!(v[1].1, PathBuf::from("/lib64/ld-linux-x86-64.so.2"));
    }

    #[test]
    fn memory_line() {
        let m =
            Memory::parse("total=300 guest=200 images=0 file=60 other=40 guest_maps=1").unwrap();
        assert_eq!(m.overhead(), 100);
        assert!(Memory::parse("total=1").is_none());
    }
}
