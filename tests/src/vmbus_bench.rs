//! `bench --only vmbus`: latency of the VMBus input and video paths in the test host.
//!
//! A guest runs `parvis-drm echo` (assets/guest/parvis-drm.c): for every key press on the
//! synthetic keyboard it draws a 32x32 square on the synthetic video device, flushes it with
//! DRM_IOCTL_MODE_DIRTYFB (a synthvid DIRT message), then prints `PARVIS-KEY=30` on COM1.
//! `parvis-worker ctl … bench-echo` sends each key through the worker's input API (the call
//! the agent's console input stream makes) and times, on one clock:
//! - keystroke: input API → guest evdev → the guest's COM1 line reaching the worker's
//!   control socket (an upper bound on input → evdev);
//! - dirty rectangle: input API → guest evdev → guest draw → DIRT → the worker's display
//!   notification (the key's share is the keystroke figure's input part).
//!
//! Figures are from the emulated test host (nested KVM under TCG, ~47 µs per VM exit); they
//! show behaviour and relative cost, not what real hardware does.

use anyhow::{Context, Result, bail};

use crate::Scenario;

/// Key presses per run.
pub const PRESSES: u32 = 200;

const SCRIPT: &str = r#"
K="--kernel $IMAGES/vmlinux --initrd $IMAGES/l2-initramfs.cpio --memory 256M"
D=$(mktemp -d)
for backend in kernel userspace; do
    parvis-worker $K --hyperv $backend --control "$D/$backend.sock" \
        --cmdline "console=ttyS0 quiet panic=-1 parvis.test=echo parvis.echo=$PRESSES" \
        </dev/null >echo-$backend.out 2>echo-$backend.err &
    pid=$!
    ( sleep 400; kill -9 $pid 2>/dev/null ) &
    if wait_for PARVIS-ECHO-READY echo-$backend.out 180; then
        parvis-worker ctl "$D/$backend.sock" "bench-echo $PRESSES $SHARE/echo-$backend.txt" \
            "key 0x01 down" "key 0x01 up" >echo-$backend.replies 2>&1
    fi
    wait $pid
done
"#;

/// Latencies of one backend, microseconds.
#[derive(Debug, Default)]
pub struct Latencies {
    pub key: Vec<u64>,
    pub draw: Vec<u64>,
    pub lost: usize,
}

/// Per backend ("kernel", "userspace").
pub type VmbusResult = Vec<(&'static str, Latencies)>;

/// Run the benchmark scenario.
pub fn run() -> Result<VmbusResult> {
    let script = format!("PRESSES={PRESSES}\n{SCRIPT}");
    let outcome = Scenario::new("vmbus-bench", &script)
        .timeout(std::time::Duration::from_secs(1200))
        .run(|_| Ok(()))
        .context("the vmbus benchmark scenario could not run")?;
    let mut out = Vec::new();
    for backend in ["kernel", "userspace"] {
        let text = outcome.file(&format!("echo-{backend}.txt"));
        if text.trim().is_empty() {
            bail!(
                "no measurements for the {backend} backend; guest:\n{}\nreplies: {}",
                crate::testhost::tail(&outcome.file(&format!("echo-{backend}.out")), 30),
                outcome.file(&format!("echo-{backend}.replies"))
            );
        }
        let mut l = Latencies::default();
        for line in text.lines() {
            let f: Vec<i64> = line
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect();
            match f.as_slice() {
                [_, k, d] if *k >= 0 && *d >= 0 => {
                    l.key.push(*k as u64);
                    l.draw.push(*d as u64);
                }
                _ => l.lost += 1,
            }
        }
        out.push((backend, l));
    }
    Ok(out)
}

fn percentile(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i] as f64 / 1000.0
}

/// Print the table.
pub fn print(r: &VmbusResult) {
    println!("\n== VMBus latency (test host: nested KVM under TCG), {PRESSES} key presses ==");
    println!(
        "{:<10} {:>22} {:>22} {:>6}",
        "backend", "keystroke p50/p99 ms", "dirty rect p50/p99 ms", "lost"
    );
    for (b, l) in r {
        println!(
            "{:<10} {:>10.2} / {:>8.2} {:>10.2} / {:>8.2} {:>6}",
            b,
            percentile(&l.key, 0.5),
            percentile(&l.key, 0.99),
            percentile(&l.draw, 0.5),
            percentile(&l.draw, 0.99),
            l.lost
        );
    }
    println!(
        "keystroke = worker input API -> guest evdev -> guest COM1 line at the worker's socket;\n\
         dirty rect = worker input API -> guest evdev -> draw + DIRTYFB -> synthvid DIRT -> display notification"
    );
}
