//! `bench --only storage`: the guest's disk throughput over Parvis's synthetic SCSI
//! controller (storvsc), over Parvis's virtio-blk and over QEMU's virtio-blk (q35,
//! virtio-blk-pci, default cache and AIO), in one test host, on one raw image in L1's
//! tmpfs, with the same Debian kernel and the same tool: `parvis-io`
//! (assets/guest/parvis-io.c: O_DIRECT, Linux AIO) runs sequential 1 MiB writes and reads
//! at queue depth 8 and 4 KiB random reads at queue depth 1 and 32.
//!
//! Nested KVM under TCG makes every exit slow (~50 µs), so the absolute figures say little;
//! the ratios to QEMU in the same run are the result.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::Scenario;
use crate::bench_support::pack_qemu;

/// Seconds per measurement inside the guest.
pub const SECONDS: u32 = 5;

const SCRIPT: &str = r#"
Q=$(mktemp -d)
cp -r "$SHARE/q/." "$Q/" && chmod +x "$Q/qemu-system-x86_64" "$Q/ld-linux-x86-64.so.2"
QEMU="$Q/ld-linux-x86-64.so.2 --library-path $Q $Q/qemu-system-x86_64 -L $Q/share"
K=$IMAGES/vmlinux
I=$IMAGES/l2-initramfs.cpio
C="console=ttyS0 quiet panic=-1 parvis.test=iobench"
T=$(mktemp -d)
head -c 100663296 /dev/zero | tr '\0' '\132' >"$T/disk.raw"
PW="--kernel $K --initrd $I --memory 256M --cpus 2 --no-framebuffer"
r=1
while [ $r -le "$RUNS" ]; do
    echo "BENCH: run $r: storvsc"
    timeout -s KILL 400 parvis-worker $PW --hyperv kernel --log info --disk "$T/disk.raw,bus=scsi" \
        --cmdline "$C parvis.io=/dev/sda parvis.iotime=$SECS" </dev/null >storvsc.$r.out 2>storvsc.$r.err
    echo "BENCH: run $r: parvis virtio-blk"
    timeout -s KILL 400 parvis-worker $PW --disk "$T/disk.raw" \
        --cmdline "$C parvis.io=/dev/vda parvis.iotime=$SECS" </dev/null >virtio.$r.out 2>virtio.$r.err
    echo "BENCH: run $r: qemu virtio-blk"
    timeout -s KILL 400 $QEMU -M q35 -enable-kvm -cpu host -nodefaults -no-user-config \
        -nographic -serial stdio -no-reboot -m 256M -smp 2 -kernel $K -initrd $I \
        -append "$C parvis.io=/dev/vda parvis.iotime=$SECS" \
        -drive file="$T/disk.raw",format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0 \
        </dev/null >qemu.$r.out 2>qemu.$r.err
    r=$((r + 1))
done
"#;

/// The storvsc runs' channel counters (the worker's "VMBus channel closed" line for the
/// busiest channel): packets, wakeups of the channel thread (the guest's signals that
/// mattered), interrupts raised.
fn channel_counters(err: &str) -> Option<(u64, u64, u64)> {
    err.lines()
        .filter(|l| l.contains("VMBus channel closed"))
        .filter_map(|l| {
            let field = |k: &str| -> Option<u64> {
                let at = l.find(&format!("{k}="))? + k.len() + 1;
                l[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            Some((field("packets")?, field("wakeups")?, field("interrupts")?))
        })
        .max_by_key(|c| c.0)
}

/// One configuration's figures (best of the runs).
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub seq_write_mbps: f64,
    pub seq_read_mbps: f64,
    pub rand_read_qd1_iops: f64,
    pub rand_read_qd32_iops: f64,
}

/// (label, figures) for storvsc, Parvis virtio-blk and QEMU virtio-blk.
pub type StorageResult = (Vec<(&'static str, Figures)>, Vec<(u64, u64, u64)>);

const CONFIGS: [(&str, &str); 3] = [
    ("storvsc", "Parvis SCSI (storvsc)"),
    ("virtio", "Parvis virtio-blk"),
    ("qemu", "QEMU virtio-blk"),
];

fn parse(out: &str) -> Option<Figures> {
    let m = |k: &str| crate::marker(out, k).and_then(|v| v.trim().parse::<f64>().ok());
    Some(Figures {
        seq_write_mbps: m("PARVIS-IO-SEQ-WRITE-MBPS")?,
        seq_read_mbps: m("PARVIS-IO-SEQ-READ-MBPS")?,
        rand_read_qd1_iops: m("PARVIS-IO-RAND-READ-QD1-IOPS")?,
        rand_read_qd32_iops: m("PARVIS-IO-RAND-READ-QD32-IOPS")?,
    })
}

/// Run the scenario `runs` times per configuration.
pub fn run(runs: usize) -> Result<StorageResult> {
    let qemu = std::env::var_os("PARVIS_BENCH_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into());
    let script = format!("RUNS={runs}\nSECS={SECONDS}\n{SCRIPT}");
    let outcome = Scenario::new("storage-bench", &script)
        .timeout(std::time::Duration::from_secs(600 + 900 * runs as u64))
        .run(|share| pack_qemu(&qemu, &share.join("q")))
        .context("the storage benchmark scenario could not run")?;
    let mut result = Vec::new();
    let counters = (1..=runs)
        .filter_map(|r| channel_counters(&outcome.file(&format!("storvsc.{r}.err"))))
        .collect();
    for (label, _) in CONFIGS {
        let mut best: Option<Figures> = None;
        for r in 1..=runs {
            let out = outcome.file(&format!("{label}.{r}.out"));
            let Some(f) = parse(&out) else {
                bail!(
                    "{label} run {r} measured nothing; guest:\n{}\nstderr:\n{}",
                    crate::testhost::tail(&out, 30),
                    crate::testhost::tail(&outcome.file(&format!("{label}.{r}.err")), 20)
                );
            };
            let b = best.get_or_insert_with(Figures::default);
            b.seq_write_mbps = b.seq_write_mbps.max(f.seq_write_mbps);
            b.seq_read_mbps = b.seq_read_mbps.max(f.seq_read_mbps);
            b.rand_read_qd1_iops = b.rand_read_qd1_iops.max(f.rand_read_qd1_iops);
            b.rand_read_qd32_iops = b.rand_read_qd32_iops.max(f.rand_read_qd32_iops);
        }
        result.push((label, best.unwrap_or_default()));
    }
    Ok((result, counters))
}

/// Print the table and the ratios to QEMU.
pub fn print((r, counters): &StorageResult) {
    println!(
        "\n== Guest disk I/O (test host: nested KVM under TCG; parvis-io, {SECONDS} s each, best of runs) =="
    );
    println!(
        "{:<24} {:>14} {:>14} {:>16} {:>17}",
        "", "seq write MB/s", "seq read MB/s", "4K rand QD1 IOPS", "4K rand QD32 IOPS"
    );
    for (label, f) in r {
        let name = CONFIGS
            .iter()
            .find(|c| c.0 == *label)
            .map_or(*label, |c| c.1);
        println!(
            "{:<24} {:>14.1} {:>14.1} {:>16.0} {:>17.0}",
            name, f.seq_write_mbps, f.seq_read_mbps, f.rand_read_qd1_iops, f.rand_read_qd32_iops
        );
    }
    let Some(q) = r.iter().find(|x| x.0 == "qemu").map(|x| &x.1) else {
        return;
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    for (label, f) in r.iter().filter(|x| x.0 != "qemu") {
        let name = CONFIGS
            .iter()
            .find(|c| c.0 == *label)
            .map_or(*label, |c| c.1);
        println!(
            "{:<24} {:>13.2}x {:>13.2}x {:>15.2}x {:>16.2}x   (vs QEMU virtio-blk)",
            name,
            ratio(f.seq_write_mbps, q.seq_write_mbps),
            ratio(f.seq_read_mbps, q.seq_read_mbps),
            ratio(f.rand_read_qd1_iops, q.rand_read_qd1_iops),
            ratio(f.rand_read_qd32_iops, q.rand_read_qd32_iops)
        );
    }
    println!("targets: storvsc >= 1.0x QEMU on sequential, >= 0.8x on 4 KiB random");
    for (i, (p, w, irq)) in counters.iter().enumerate() {
        println!(
            "storvsc run {}: {p} packets, {w} channel wakeups ({:.1} packets each), {irq} interrupts ({:.1} packets each)",
            i + 1,
            *p as f64 / (*w).max(1) as f64,
            *p as f64 / (*irq).max(1) as f64
        );
    }
}
