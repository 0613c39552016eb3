//! `bench --only diskboot`: from launch to a real Debian 12 disk's systemd marker
//! (`PARVIS-DISK-BOOTED`, written by a unit after multi-user.target), for the same disks
//! (`assets/guest/build-disks.sh`), in one test-host boot:
//!
//! * `parvis-gen2`, `parvis-gen1`: `parvis-worker --boot-disk` on the Generation 2 and
//!   Generation 1 VHDX (the boot-disk reader finds the kernel, no firmware, no GRUB), the disk
//!   on the synthetic SCSI controller, Hyper-V enlightenments on;
//! * `ovmf-q35`: QEMU `-M q35` with OVMF (UEFI) booting the Generation 2 VHDX through its
//!   own shim and GRUB, on virtio-blk;
//! * `seabios-pc`: QEMU `-M pc` with SeaBIOS booting the Generation 1 VHDX through GRUB.
//!
//! Every boot gets its own copy of the disk (the guest writes it), made on this machine and
//! read through the test host's 9p share by both VMMs alike, 512 MiB and one vCPU. The
//! guests keep their own command lines; Parvis is given `console=tty0` (appended) so its
//! kernel writes to the same console as under QEMU, where GRUB passes none: otherwise Parvis
//! would add the serial console and pay for printing the boot there. GRUB's menu waits
//! (Debian's default: 5 s) are part of what QEMU users wait for, and are reported as such.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::bench_support::{median, pack_qemu, parse_stamp};
use crate::{Outcome, Scenario};

/// The variants, in launch order.
pub const VMMS: &[&str] = &["parvis-gen2", "ovmf-q35", "parvis-gen1", "seabios-pc"];

const SCRIPT: &str = r#"
B=$(mktemp -d)
Q=$(mktemp -d)
if [ -n "${EPOCHREALTIME:-}" ]; then E=1; else E=; fi
now() { if [ -n "$E" ]; then T=$EPOCHREALTIME; else T=$(date +%s.%N); fi; }
cp -r "$SHARE/q/." "$Q/" && chmod +x "$Q/qemu-system-x86_64" "$Q/ld-linux-x86-64.so.2"
mkdir -p "$Q/bin" && cp "$BIN/parvis-worker" "$Q/bin/" && chmod +x "$Q/bin/parvis-worker"
export PATH="$Q/bin:$PATH"
QEMU="$Q/ld-linux-x86-64.so.2 --library-path $Q $Q/qemu-system-x86_64 -L $Q/share"
QA="-enable-kvm -cpu host -nodefaults -no-user-config -display none -serial stdio -no-reboot -m 512M -smp 1"

# start LABEL DISK: one VMM on its own copy of DISK, under a watchdog.
start() {
    case $1 in
        parvis-*) timeout -s KILL 900 parvis-worker --boot-disk --disk "$2,bus=scsi" \
            --memory 512M --cpus 1 --hyperv auto --cmdline console=tty0 ;;
        ovmf-q35) cp "$SHARE/fw/OVMF_VARS.fd" "$B/vars.fd"
            timeout -s KILL 900 $QEMU -M q35 $QA \
            -drive if=pflash,format=raw,readonly=on,file=$SHARE/fw/OVMF_CODE.fd \
            -drive if=pflash,format=raw,file=$B/vars.fd \
            -drive file="$2",format=vhdx,if=virtio ;;
        seabios-pc) timeout -s KILL 900 $QEMU -M pc $QA -drive file="$2",format=vhdx,if=virtio ;;
    esac
}

stamp() {
    while IFS= read -r line || [ -n "$line" ]; do
        if [ -n "$E" ]; then s=$EPOCHREALTIME; else s=$(date +%s.%N); fi
        printf '%s %s\n' "$s" "$line"
        case $line in *PARVIS-DISK-BOOTED*) echo "$s" >"$B/booted" ;; esac
    done
}

# boot LABEL RUN: launch on the variant's own copy of its disk (made on the host: a copy
# through 9p takes minutes), wait for the marker, stop the VMM.
boot() {
    rm -f "$B/booted"
    d="$SHARE/disk-$1-$2.vhdx"
    now; t0=$T
    ( start "$1" "$d" </dev/null 2>"$B/$1.$2.err" | stamp >"$B/$1.$2.out" ) &
    pid=$!
    n=0
    while [ ! -e "$B/booted" ] && [ $n -lt 9000 ]; do n=$((n + 1)); sleep 0.1; done
    if [ -e "$B/booted" ]; then echo "BOOT $1 $2 $t0 $(cat "$B/booted")" >>"$B/times"
    else echo "BOOT $1 $2 $t0 failed" >>"$B/times"; fi
    pkill -KILL -f "$d" 2>/dev/null
    wait $pid 2>/dev/null
    echo "BENCH: $1 run $2: $(tail -n 1 "$B/times")"
}

( while sleep 30; do echo "BENCH: L1 alive, uptime $(cut -d' ' -f1 /proc/uptime) s"; done ) &
alive=$!
r=1
while [ $r -le "$RUNS" ]; do
    for l in parvis-gen2 ovmf-q35 parvis-gen1 seabios-pc; do boot $l $r; done
    r=$((r + 1))
done
kill $alive
mkdir -p "$SHARE/results"
cp "$B"/times "$B"/*.out "$B"/*.err "$SHARE/results/" 2>/dev/null
echo "BENCH: done"
"#;

/// Seconds from launch to the marker, per variant, in run order (None: it never came).
#[derive(Debug, Default)]
pub struct Results {
    pub runs: Vec<(String, Option<f64>)>,
    /// How long GRUB's menu waited in the QEMU boots (the disks' GRUB_TIMEOUT).
    pub grub_timeout: Option<u32>,
}

impl Results {
    fn of(&self, label: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter(|(l, _)| l == label)
            .filter_map(|(_, t)| *t)
            .collect()
    }
}

/// Run the scenario: `runs` boots of each variant.
pub fn run(qemu: &Path, runs: u32) -> Result<Results> {
    let disks = crate::build::guest_disks()?;
    let grub_timeout =
        std::fs::read_to_string(disks.join("configs/debian12-gen1.vhdx/etc-default-grub"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.trim().strip_prefix("GRUB_TIMEOUT="))
                    .and_then(|v| v.trim_matches('"').parse().ok())
            });
    let script = format!("RUNS={runs}\n{SCRIPT}");
    let outcome = Scenario::new("diskboot-bench", &script)
        .timeout(std::time::Duration::from_secs(600 + 2400 * u64::from(runs)))
        .l1_memory(3072)
        .run(|share| {
            pack_qemu(qemu, &share.join("q"))?;
            let fw = share.join("fw");
            std::fs::create_dir_all(&fw)?;
            for f in ["OVMF_CODE.fd", "OVMF_VARS.fd"] {
                std::fs::copy(Path::new("/usr/share/OVMF").join(f), fw.join(f))
                    .with_context(|| format!("{f} (install Debian's ovmf)"))?;
            }
            for run in 1..=runs {
                for label in VMMS {
                    let src = if label.ends_with("gen1") || *label == "seabios-pc" {
                        "debian12-gen1.vhdx"
                    } else {
                        "debian12-gen2.vhdx"
                    };
                    std::fs::copy(
                        disks.join(src),
                        share.join(format!("disk-{label}-{run}.vhdx")),
                    )?;
                }
            }
            Ok(())
        })
        .context("the disk-boot benchmark could not run")?;
    parse(&outcome, grub_timeout)
}

fn parse(o: &Outcome, grub_timeout: Option<u32>) -> Result<Results> {
    let times = o.file("results/times");
    if times.is_empty() {
        bail!(
            "the scenario left no results (status {}); test host log:\n{}",
            o.status,
            crate::testhost::tail(&o.log(), 60)
        );
    }
    let mut r = Results {
        grub_timeout,
        ..Default::default()
    };
    for l in times.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let ["BOOT", label, _run, t0, t1] = w.as_slice() {
            let secs = parse_stamp(t0)
                .zip(parse_stamp(t1))
                .map(|(a, b)| (b - a) as f64 / 1e9);
            r.runs.push((label.to_string(), secs));
        }
    }
    Ok(r)
}

/// Print the figures and the ratios against QEMU, per generation.
pub fn print(r: &Results) {
    println!("disk boot: launch to the guest's multi-user marker (s), median of the runs");
    for label in VMMS {
        let v = r.of(label);
        let failed = r
            .runs
            .iter()
            .filter(|(l, t)| l == label && t.is_none())
            .count();
        let shown: Vec<String> = v.iter().map(|t| format!("{t:.1}")).collect();
        println!(
            "  {label:<12} {:>8}  runs [{}]{}",
            median(&v).map_or("-".into(), |m| format!("{m:.1}")),
            shown.join(", "),
            if failed > 0 {
                format!(", {failed} never reached the marker")
            } else {
                String::new()
            }
        );
    }
    for (ours, theirs) in [("parvis-gen2", "ovmf-q35"), ("parvis-gen1", "seabios-pc")] {
        if let (Some(a), Some(b)) = (median(&r.of(ours)), median(&r.of(theirs))) {
            println!("  {ours} / {theirs}: {:.2}x", a / b);
        }
    }
    if let Some(t) = r.grub_timeout {
        println!("  (the QEMU boots include GRUB's menu wait: GRUB_TIMEOUT={t} s on these disks)");
    }
}
