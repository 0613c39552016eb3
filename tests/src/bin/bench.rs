//! `bench`: boot time and memory overhead of `parvis-worker` against QEMU (`-M microvm` and
//! `-M q35`), same kernel, initramfs, memory and vCPU count, all inside one test-host boot
//! (or directly on this machine when its KVM can run unmodified guests).
//!
//! `cargo run --release -p parvis-tests --bin bench [-- --runs N] [-- --keep DIR]`
//!
//! A benchmark, not a test: it asserts nothing. It exits non-zero only when the scenario
//! could not run or a VMM failed to boot the guest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use parvis_tests::bench_support::{
    BootRun, Memory, SMAPS_AWK, median, min, pack_qemu, parse_stamp,
};
use parvis_tests::{Mode, Outcome, Scenario};

/// The VMM variants, in launch order: (label, description).
const VMMS: &[(&str, &str)] = &[
    ("parvis", "parvis-worker --no-framebuffer"),
    ("parvis-fb", "parvis-worker (framebuffer)"),
    ("microvm", "qemu -M microvm"),
    ("q35", "qemu -M q35"),
];

const CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// The scenario. `RUNS` is set in front of it. Every timestamp is taken inside the machine
/// that runs the VMMs (L1), with busybox ash's `$EPOCHREALTIME` (µs, no fork), and every
/// VMM's serial output goes to a file in L1's /tmp, not to L1's slow console.
const SCRIPT: &str = r#"
B=$(mktemp -d)
Q=$(mktemp -d)
if [ -n "${EPOCHREALTIME:-}" ]; then E=1; echo 'EPOCHREALTIME' >"$B/clock"
else E=; echo 'date +%s.%N' >"$B/clock"; fi
now() { if [ -n "$E" ]; then T=$EPOCHREALTIME; else T=$(date +%s.%N); fi; }

# Copy QEMU and the worker out of the 9p share first so that loading them is not timed
# over 9p (L1 mounts it without a cache).
now; c0=$T
cp -r "$SHARE/q/." "$Q/" && chmod +x "$Q/qemu-system-x86_64" "$Q/ld-linux-x86-64.so.2"
mkdir -p "$Q/bin" && cp "$BIN/parvis-worker" "$Q/bin/" && chmod +x "$Q/bin/parvis-worker"
export PATH="$Q/bin:$PATH"
cp "$SHARE/smaps.awk" "$B/smaps.awk"
now; echo "COPY $c0 $T $(du -sk "$Q" | cut -f1)" >"$B/times"
K=$IMAGES/vmlinux
I=$IMAGES/l2-initramfs.cpio
cat "$K" "$I" >/dev/null
C="console=ttyS0 quiet panic=-1"
PW="--kernel $K --initrd $I --memory 256M --cpus 1"
QEMU="$Q/ld-linux-x86-64.so.2 --library-path $Q $Q/qemu-system-x86_64 -L $Q/share"
QA="-enable-kvm -cpu host -nodefaults -no-user-config -nographic -serial stdio -no-reboot -m 256M -smp 1 -kernel $K -initrd $I"
EXEC=

# start LABEL CMDLINE [WORKER-ARGS...]: one VMM under a 180 s watchdog (SIGKILL: a VMM
# whose vCPU is stuck may not act on SIGTERM). With EXEC=exec the
# calling (sub)shell becomes the VMM: busybox timeout execs the program in its own process.
start() {
    l=$1; c=$2; shift 2
    case $l in
        parvis) $EXEC timeout -s KILL 180 parvis-worker $PW --no-framebuffer --cmdline "$c" "$@" ;;
        parvis-fb) $EXEC timeout -s KILL 180 parvis-worker $PW --cmdline "$c" "$@" ;;
        microvm) $EXEC timeout -s KILL 180 $QEMU -M microvm $QA -append "$c" ;;
        q35) $EXEC timeout -s KILL 180 $QEMU -M q35 $QA -append "$c" ;;
    esac
}

# Prefix every line with the time it was read.
stamp() {
    while IFS= read -r line || [ -n "$line" ]; do
        if [ -n "$E" ]; then s=$EPOCHREALTIME; else s=$(date +%s.%N); fi
        printf '%s %s\n' "$s" "$line"
    done
}

# boot LABEL RUN CMDLINE: a timed launch, to the VMM's exit.
boot() {
    echo "BENCH: $1 run $2: start"
    now; t0=$T
    { start "$1" "$3" </dev/null 2>"$B/$1.$2.err"; echo "BENCH-RC $?"; } | stamp >"$B/$1.$2.out"
    now
    echo "BOOT $1 $2 $t0 $T" >>"$B/times"
    echo "BENCH: $1 run $2: $(grep -c PARVIS-L2-USERSPACE "$B/$1.$2.out") userspace marker(s), $(grep BENCH-RC "$B/$1.$2.out" | cut -d' ' -f2-)"
}

# The VMM process behind PID (GNU timeout, as on a direct run, forks it as a child).
vmm_pid() {
    p=$1
    if [ "$(cat /proc/$p/comm 2>/dev/null)" = timeout ]; then
        p=$(cat /proc/$p/task/$p/children 2>/dev/null | cut -d' ' -f1)
    fi
    echo "$p"
}

# hold LABEL: boot with parvis.test=hold, measure the VMM's memory, stop it.
hold() {
    l=$1
    S=$B/$l.sock
    case $l in parvis*) set -- --control "$S" ;; *) set -- ;; esac
    ( EXEC=exec; start "$l" "$C parvis.test=hold" "$@" </dev/null >"$B/$l.hold.out" 2>"$B/$l.hold.err" ) &
    pid=$!
    if wait_for PARVIS-L2-USERSPACE "$B/$l.hold.out" 170; then
        sleep 2
        p=$(vmm_pid $pid)
        cat /proc/$p/cmdline | tr '\0' ' ' >"$B/$l.cmdline"
        cat /proc/$p/smaps >"$B/$l.smaps"
        grep -E '^(VmRSS|RssAnon|RssFile|RssShmem|VmHWM)' /proc/$p/status >"$B/$l.status"
        case $l in parvis*) g=parvis ;; *) g=anon ;; esac
        echo "MEM $l $(awk -v guest=$g -v ram_kb=262144 -f "$B/smaps.awk" "$B/$l.smaps")" >>"$B/mem"
    else
        echo "MEM $l failed" >>"$B/mem"
        p=$(vmm_pid $pid)
    fi
    case $l in
        parvis*) parvis-worker ctl "$S" stop >"$B/$l.ctl" 2>&1 || kill "$p" ;;
        *) kill "$p" ;;
    esac
    wait $pid
    echo "HOLD $l $?" >>"$B/mem"
    echo "BENCH: $l hold: $(tail -n 2 "$B/mem" | head -n 1)"
}

# A liveness line on the console every 30 s: if these stop, L1 itself is stuck (the
# watchdogs above run in L1 and cannot help then).
( while sleep 30; do echo "BENCH: L1 alive, uptime $(cut -d' ' -f1 /proc/uptime) s"; done ) &
alive=$!

# One verbose boot of each kind (no quiet), for the kernel's complaints; also a warm-up.
for l in parvis microvm q35; do
    { start $l "console=ttyS0 panic=-1 parvis.test=nproc" </dev/null 2>"$B/$l.verbose.err"; echo "BENCH-RC $?"; } >"$B/$l.verbose.out"
    echo "BENCH: $l verbose boot: $(tail -n 1 "$B/$l.verbose.out")"
done

r=1
while [ $r -le "$RUNS" ]; do
    for l in parvis parvis-fb microvm q35; do
        boot $l $r "$C parvis.test=nproc"
    done
    r=$((r + 1))
done

for l in parvis parvis-fb microvm q35; do
    hold $l
done

kill $alive
mkdir -p "$SHARE/results"
cp "$B"/* "$SHARE/results/" 2>/dev/null
echo "BENCH: done"
"#;

struct Args {
    runs: u32,
    keep: Option<PathBuf>,
    /// "boot", "disk" or both (None).
    only: Option<String>,
    disk_gib: u64,
    disk_dir: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        runs: 3,
        keep: None,
        only: None,
        disk_gib: 4,
        disk_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => {
                a.runs = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .context("--runs needs a positive number")?;
            }
            "--keep" => a.keep = Some(it.next().context("--keep needs a folder")?.into()),
            "--only" => {
                let v = it.next().context("--only needs a benchmark's name")?;
                if !BENCHES.contains(&v.as_str()) {
                    bail!("--only takes one of {}, not {v}", BENCHES.join(", "));
                }
                a.only = Some(v);
            }
            "--disk-gib" => {
                a.disk_gib = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .context("--disk-gib needs a positive number")?;
            }
            "--disk-dir" => {
                a.disk_dir = Some(it.next().context("--disk-dir needs a folder")?.into())
            }
            "-h" | "--help" => {
                println!(
                    "bench [--runs N] [--keep DIR] [--only NAME] [--disk-gib G] [--disk-dir DIR]:\n\
                     boot: boot time and memory of parvis-worker versus QEMU microvm and q35 \
                     (N timed boots each, default 3; --keep DIR keeps the raw results)\n\
                     disk: image conversion versus qemu-img convert on a G GiB half-allocated \
                     image (default 4) and an empty 100 GiB VHDX, in --disk-dir (default a \
                     temporary folder), best of N runs\n\
                     upload: N 1 GiB uploads to parvis-agent on loopback, with TLS and in \
                     plaintext (the median counts) versus cp + sync and dd with direct writes\n\
                     console: the desktop console, headless: UI frame time with 50 hosts / \
                     1,000 VMs, and console fps at 1920x1080 with full-screen tile updates\n\
                     fb: the agent's framebuffer stream at 1920x1080 (full-screen changes at \
                     60 Hz, typing, idle): frames/s, bytes per update, latency p50/p99\n\
                     stats: the agent's CPU for sampling 50 running VMs' resource use\n\
                     vmbus: VMBus keystroke and dirty-rectangle latency in the test host"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    Ok(a)
}

/// What `--only` can name.
const BENCHES: &[&str] = &[
    "boot", "disk", "upload", "fb", "console", "vmbus", "stats", "storage", "diskboot", "net",
];

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let args = args()?;
    let mut ok = true;
    let want = |what: &str| args.only.as_deref().is_none_or(|o| o == what);
    if want("boot") {
        ok &= run_boot(&args)?;
    }
    if want("diskboot") {
        let qemu = std::env::var_os("PARVIS_BENCH_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into());
        let r = parvis_tests::diskboot_bench::run(&qemu, args.runs)?;
        parvis_tests::diskboot_bench::print(&r);
    }
    if want("net") {
        let qemu = std::env::var_os("PARVIS_BENCH_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into());
        let r = parvis_tests::net_bench::run(&qemu)?;
        parvis_tests::net_bench::print(&r);
    }
    if want("console") {
        let r = parvis_tests::console_bench::run(300)?;
        parvis_tests::console_bench::print(&r);
    }
    if want("fb") {
        let tmp = tempfile::Builder::new()
            .prefix("parvis-fb-bench-")
            .tempdir()?;
        let r = parvis_tests::fb_bench::run(tmp.path(), 1920, 1080, 5.0)?;
        parvis_tests::fb_bench::print(&r);
    }
    if want("stats") {
        let tmp = tempfile::Builder::new()
            .prefix("parvis-stats-bench-")
            .tempdir()?;
        let r = parvis_tests::stats_bench::run(tmp.path(), 50, 60.0)?;
        parvis_tests::stats_bench::print(&r);
    }
    if want("vmbus") {
        let r = parvis_tests::vmbus_bench::run()?;
        parvis_tests::vmbus_bench::print(&r);
    }
    if want("storage") {
        let r = parvis_tests::storage_bench::run(args.runs as usize)?;
        parvis_tests::storage_bench::print(&r);
    }
    if want("upload") {
        let tmp = tempfile::Builder::new()
            .prefix("parvis-upload-bench-")
            .tempdir_in(args.disk_dir.clone().unwrap_or_else(std::env::temp_dir))?;
        let r = parvis_tests::upload_bench::run(tmp.path(), 1, args.runs as usize)?;
        parvis_tests::upload_bench::print(&r);
    }
    if want("disk") {
        let tmp;
        let dir = match &args.disk_dir {
            Some(d) => d.clone(),
            None => {
                tmp = tempfile::Builder::new()
                    .prefix("parvis-disk-bench-")
                    .tempdir()?;
                tmp.path().to_path_buf()
            }
        };
        let results = parvis_tests::disk_bench::run(&dir, args.disk_gib, args.runs as usize)?;
        parvis_tests::disk_bench::print(&results);
    }
    Ok(ok)
}

/// Returns whether every VMM booted every time.
fn run_boot(args: &Args) -> Result<bool> {
    let qemu = std::env::var_os("PARVIS_BENCH_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into());
    let script = format!("RUNS={}\n{SCRIPT}", args.runs);
    eprintln!(
        "bench: {} timed boots of each of {} VMM variants (the test host takes a few minutes)",
        args.runs,
        VMMS.len()
    );
    let outcome = Scenario::new("bench", &script)
        .timeout(std::time::Duration::from_secs(
            300 + 200 * u64::from(args.runs),
        ))
        .run(|share| {
            pack_qemu(&qemu, &share.join("q"))?;
            std::fs::write(share.join("smaps.awk"), SMAPS_AWK)?;
            Ok(())
        })
        .context("the benchmark scenario could not run")?;
    if let Some(dir) = &args.keep {
        keep(&outcome.path("results"), dir)?;
    }
    if outcome.file("results/times").is_empty() {
        bail!(
            "the scenario left no results (status {}); test host log:\n{}",
            outcome.status,
            parvis_tests::testhost::tail(&outcome.log(), 60)
        );
    }
    report(&outcome, args.runs)
}

fn keep(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        std::fs::copy(e.path(), dst.join(e.file_name()))?;
    }
    eprintln!("bench: raw results kept in {}", dst.display());
    Ok(())
}

struct Figures {
    runs: Vec<BootRun>,
    memory: Option<Memory>,
    hold_rc: Option<i32>,
}

impl Figures {
    fn userspace(&self) -> Vec<f64> {
        self.runs
            .iter()
            .filter(|r| r.ok())
            .filter_map(|r| r.userspace)
            .collect()
    }
    fn exit(&self) -> Vec<f64> {
        self.runs
            .iter()
            .filter(|r| r.ok())
            .filter_map(|r| r.exit)
            .collect()
    }
}

fn report(o: &Outcome, runs: u32) -> Result<bool> {
    let times = o.file("results/times");
    let mem = o.file("results/mem");
    let mut figs: BTreeMap<&str, Figures> = VMMS
        .iter()
        .map(|(l, _)| {
            let f = Figures {
                runs: Vec::new(),
                memory: None,
                hold_rc: None,
            };
            (*l, f)
        })
        .collect();
    let mut copy = None;
    for l in times.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["COPY", a, b, kib] => {
                copy = Some((
                    (parse_stamp(b).unwrap_or(0) - parse_stamp(a).unwrap_or(0)) as f64 / 1e9,
                    kib.parse::<f64>().unwrap_or(0.0) / 1024.0,
                ))
            }
            ["BOOT", label, run, t0, _] => {
                let Some(f) = figs.get_mut(label) else {
                    continue;
                };
                let t0 = parse_stamp(t0).context("bad launch stamp")?;
                let out = o.file(&format!("results/{label}.{run}.out"));
                f.runs.push(BootRun::parse(t0, &out));
            }
            _ => {}
        }
    }
    for l in mem.lines() {
        let w: Vec<&str> = l.splitn(3, ' ').collect();
        match w.as_slice() {
            ["MEM", label, rest] => {
                if let Some(f) = figs.get_mut(label) {
                    f.memory = Memory::parse(rest);
                }
            }
            ["HOLD", label, rc] => {
                if let Some(f) = figs.get_mut(label) {
                    f.hold_rc = rc.trim().parse().ok();
                }
            }
            _ => {}
        }
    }

    let clock = o.file("results/clock");
    let where_ = match o.mode {
        Mode::Emulated => {
            "inside the emulated test host (L1 = QEMU TCG, -cpu EPYC, 1 vCPU, 2 GiB; \
             nested KVM; L2 = the guest)"
        }
        Mode::Direct => "directly on this machine's KVM",
    };
    let release = std::fs::read_to_string(parvis_tests::artifacts()?.images.join("kernel-release"))
        .unwrap_or_default();
    println!();
    println!("Parvis boot and memory benchmark, {where_}");
    println!(
        "guest: vmlinux {} (PVH entry for QEMU) + l2-initramfs.cpio, 256 MiB, 1 vCPU, \
         cmdline \"{CMDLINE} parvis.test=nproc\"",
        release.trim()
    );
    println!(
        "timing: {} runs each, round-robin; clock: {} taken inside {}, from just before the \
         launch to the stamped serial line PARVIS-L2-USERSPACE / to the VMM's exit; the VMMs' \
         serial output goes to a pipe, not to a console",
        runs,
        match clock.trim() {
            "EPOCHREALTIME" => "busybox ash $EPOCHREALTIME (µs)",
            "" => "unknown",
            _ => "date +%s.%N",
        },
        if o.mode == Mode::Emulated {
            "L1"
        } else {
            "the host"
        }
    );
    if let Some((secs, mib)) = copy {
        println!(
            "(QEMU bundle, {mib:.1} MiB, copied from the 9p share to tmpfs in {secs:.1} s, untimed)"
        );
    }
    println!();
    println!(
        "{:<32} {:>10} {:>7} {:>10} {:>7} {:>9} {:>7} {:>9} {:>9} {:>7} {:>7}",
        "VMM",
        "userspace",
        "",
        "exit",
        "",
        "RSS total",
        "guest",
        "overhead",
        "(k+initrd",
        "bins",
        "other)"
    );
    println!(
        "{:<32} {:>10} {:>7} {:>10} {:>7} {:>9} {:>7} {:>9} {:>9} {:>7} {:>7}",
        "", "median s", "min s", "median s", "min s", "MiB", "MiB", "MiB", "MiB", "MiB", "MiB"
    );
    let s = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let mib = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{:.1}", v as f64 / 1024.0));
    for (label, desc) in VMMS {
        let f = &figs[label];
        let (u, e) = (f.userspace(), f.exit());
        let m = f.memory;
        println!(
            "{:<32} {:>10} {:>7} {:>10} {:>7} {:>9} {:>7} {:>9} {:>9} {:>7} {:>7}",
            desc,
            s(median(&u)),
            s(min(&u)),
            s(median(&e)),
            s(min(&e)),
            mib(m.map(|m| m.total)),
            mib(m.map(|m| m.guest)),
            mib(m.map(|m| m.overhead())),
            mib(m.map(|m| m.images)),
            mib(m.map(|m| m.file)),
            mib(m.map(|m| m.other)),
        );
    }
    println!(
        "memory: one more boot each with parvis.test=hold, /proc/<pid>/smaps of the VMM 2 s after \
         the marker; guest = RSS of guest RAM (parvis: the memfd RAM mappings; QEMU: the \
         anonymous RAM block); overhead = total - guest; k+initrd = QEMU's mappings of the \
         -kernel/-initrd files (kept for fw_cfg); bins = binary and libraries; other = heap, \
         stacks, device memory (parvis's VRAM lives in the guest memfd after the RAM)"
    );
    println!();
    println!("per run (s, userspace/exit):");
    for (label, desc) in VMMS {
        let runs: Vec<String> = figs[label]
            .runs
            .iter()
            .map(|r| {
                let rc = match r.rc {
                    Some(0) => String::new(),
                    Some(rc) => format!(" rc={rc}"),
                    None => " rc=?".into(),
                };
                format!("{}/{}{rc}", s(r.userspace), s(r.exit))
            })
            .collect();
        let hold = match figs[label].hold_rc {
            Some(rc) => format!("  (hold run stopped, status {rc})"),
            None => "  (no hold run)".into(),
        };
        println!("  {:<30} {}{hold}", desc, runs.join("  "));
    }

    println!();
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let med = |l: &str, exit: bool| {
        let f = &figs[l];
        median(&if exit { f.exit() } else { f.userspace() })
    };
    let over = |l: &str| figs[l].memory.map(|m| m.overhead() as f64);
    let over_ex = |l: &str| {
        figs[l]
            .memory
            .map(|m| m.overhead().saturating_sub(m.images) as f64)
    };
    for p in ["parvis", "parvis-fb"] {
        for q in ["microvm", "q35"] {
            println!(
                "{p:>9} / {q:<7}: boot to userspace {:>6}, to exit {:>6}, memory overhead {:>6} \
                 ({} without QEMU's kernel/initrd mappings)",
                ratio(med(p, false), med(q, false)),
                ratio(med(p, true), med(q, true)),
                ratio(over(p), over(q)),
                ratio(over_ex(p), over_ex(q)),
            );
        }
    }
    println!();
    let target_boot = match (med("parvis", false), med("microvm", false)) {
        (Some(p), Some(m)) => format!(
            "parvis {p:.3} s vs 0.7 x {m:.3} = {:.3} s -> {}",
            0.7 * m,
            if p <= 0.7 * m { "met" } else { "not met" }
        ),
        _ => "not measured".into(),
    };
    println!(
        "target (issue): boot <= 0.7x QEMU microvm (to userspace, --no-framebuffer): {target_boot}"
    );
    for p in ["parvis", "parvis-fb"] {
        let t = match figs[p].memory {
            Some(m) => {
                let o = m.overhead() as f64 / 1024.0;
                format!("{o:.1} MiB -> {}", if o <= 5.0 { "met" } else { "not met" })
            }
            None => "not measured".into(),
        };
        println!("target (issue): overhead <= 5 MiB ({p}): {t}");
    }

    // The kernel's complaints in one verbose boot of each kind.
    println!();
    println!("verbose boot (no `quiet`), kernel lines mentioning XSAVE:");
    for l in ["parvis", "microvm", "q35"] {
        let log = o.file(&format!("results/{l}.verbose.out"));
        let hits: Vec<&str> = log
            .lines()
            .filter(|x| x.to_ascii_lowercase().contains("xsave"))
            .collect();
        let bad = hits.iter().any(|x| x.contains("consistency problem"));
        println!(
            "  {l:<8} {} lines, {} mention XSAVE{}",
            log.lines().count(),
            hits.len(),
            if bad {
                ", including `XSAVE consistency problem`"
            } else {
                ""
            }
        );
        for h in hits.iter().take(8) {
            println!("      {}", h.trim_end_matches('\r'));
        }
    }

    // Failures.
    let mut failures = Vec::new();
    for (label, _) in VMMS {
        let f = &figs[label];
        if f.runs.len() != runs as usize {
            failures.push(format!(
                "{label}: {} of {runs} timed runs recorded",
                f.runs.len()
            ));
        }
        for (i, r) in f.runs.iter().enumerate() {
            if !r.ok() {
                let err = o.file(&format!("results/{label}.{}.err", i + 1));
                let rc = match r.rc {
                    Some(137) => "137 (killed by the 180 s watchdog)".to_string(),
                    Some(rc) => rc.to_string(),
                    None => "unknown".into(),
                };
                let seen = if r.userspace.is_some() {
                    "seen"
                } else {
                    "missing"
                };
                failures.push(format!(
                    "{label} run {}: userspace marker {seen}, exit status {rc}; stderr: {}",
                    i + 1,
                    parvis_tests::testhost::tail(err.trim(), 5)
                ));
            }
        }
        if f.memory.is_none() {
            let err = o.file(&format!("results/{label}.hold.err"));
            failures.push(format!(
                "{label}: no memory figures (the hold boot did not reach userspace); stderr: {}",
                parvis_tests::testhost::tail(err.trim(), 5)
            ));
        }
    }
    if failures.is_empty() {
        Ok(true)
    } else {
        println!();
        println!("FAILED:");
        for f in &failures {
            println!("  {f}");
        }
        Ok(false)
    }
}
