//! End-to-end boot tests: the stock Debian kernel under `parvis-worker`, in the test host.
//!
//! One test-host boot runs every scenario below in sequence (each worker run has its own
//! watchdog); the individual tests then check what each run left in the share.

use std::path::Path;
use std::sync::OnceLock;

use parvis_tests::markers::has_line;
use parvis_tests::pattern as disk_bytes;
use parvis_tests::{Outcome, Scenario, marker, marker_all};
use sha2::{Digest, Sha256};

const DISK_SIZE: usize = 8 << 20;
const DISK4K_SIZE: usize = 4 << 20;
const WROTE: &[u8] = b"PARVIS-GUEST-WROTE-THIS";

const SCRIPT: &str = r#"
K="--kernel $IMAGES/vmlinux --initrd $IMAGES/l2-initramfs.cpio --memory 256M"
C="console=ttyS0 quiet panic=-1"

# Main run: two vCPUs, a virtio disk, the framebuffer, clean power-off.
run main $K --cpus 2 --disk "$SHARE/disk.img" \
    --cmdline "$C parvis.test=nproc,disk,diskwrite,fb" --screenshot-on-exit "$SHARE/main.png"

# The same kernel as a bzImage, one vCPU.
run bzimage --kernel "$IMAGES/vmlinuz" --initrd "$IMAGES/l2-initramfs.cpio" --memory 256M \
    --cpus 1 --cmdline "$C parvis.test=nproc"

# A disk with 4096-byte logical sectors, read only.
run sector4k $K --disk "$SHARE/disk4k.img,ro,sector-size=4096" --cmdline "$C parvis.test=disk"

# A kernel panic reported through pvpanic.
run panic $K --cmdline "$C parvis.test=panic"

# A "kernel" that faults with no IDT: a triple fault.
run triplefault --kernel "$SHARE/ud2.elf" --memory 64M --no-framebuffer

# Bad configuration: one clear line, status 1.
run nokernel --kernel "$SHARE/does-not-exist"
run badcpus $K --cpus 0

# Control socket: pause, resume, reset, stop. Sockets cannot live on the 9p share.
# The guest first draws its pattern on the boot framebuffer, watched from before it boots:
# the written rows can only come from KVM's dirty page log.
CTL=$(mktemp -d)/ctl.sock
parvis-worker $K --cpus 1 --cmdline "$C parvis.test=fb,ticks" --control "$CTL" \
    </dev/null >ctl.out 2>ctl.err &
pid=$!
n=0
while [ ! -S "$CTL" ] && [ $n -lt 300 ]; do n=$((n + 1)); sleep 0.1; done
parvis-worker ctl "$CTL" "watch-display $SHARE/bootfb 900" >bootfb.replies 2>&1 &
if wait_for PARVIS-TICK=3 ctl.out 180; then
    parvis-worker ctl "$CTL" pause >ctl.replies
    sleep 1
    a=$(grep -c PARVIS-TICK ctl.out)
    parvis-worker ctl "$CTL" state >>ctl.replies
    sleep 3
    b=$(grep -c PARVIS-TICK ctl.out)
    echo "$a $b" >ctl.paused
    parvis-worker ctl "$CTL" resume >>ctl.replies
    wait_for "PARVIS-TICK=$((b + 2))" ctl.out 60 && echo resumed >ctl.resumed
    date +%s >ctl.reset-at
    parvis-worker ctl "$CTL" reset >>ctl.replies
    n=0
    # Until the second boot has drawn and ticks again.
    while [ "$(grep -cE 'PARVIS-TICK=1[[:space:]]*$' ctl.out)" -lt 2 ] && [ $n -lt 600 ]; do
        n=$((n + 1)); sleep 0.2
    done
    parvis-worker ctl "$CTL" "screenshot $SHARE/ctl.png" stop >>ctl.replies
fi
( sleep 60; kill -9 $pid 2>/dev/null ) &
wait $pid
echo $? >ctl.rc
echo "SCENARIO: ctl exited $(cat ctl.rc)"
"#;

/// A minimal x86-64 ELF whose entry executes `ud2`: with the empty boot IDT the #UD cannot
/// be delivered, which escalates to a triple fault.
fn ud2_elf() -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[8..16].copy_from_slice(&0x800u64.to_le_bytes());
    ph[16..24].copy_from_slice(&0x100_0000u64.to_le_bytes());
    ph[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    ph[32..40].copy_from_slice(&2u64.to_le_bytes());
    ph[40..48].copy_from_slice(&2u64.to_le_bytes());
    f[0x800..0x802].copy_from_slice(&[0x0f, 0x0b]);
    f
}

fn prepare(share: &Path) -> anyhow::Result<()> {
    std::fs::write(share.join("disk.img"), disk_bytes(DISK_SIZE, 0x1234_5678))?;
    std::fs::write(
        share.join("disk4k.img"),
        disk_bytes(DISK4K_SIZE, 0x9abc_def0),
    )?;
    std::fs::write(share.join("ud2.elf"), ud2_elf())?;
    Ok(())
}

fn outcome() -> &'static Outcome {
    static CELL: OnceLock<Result<Outcome, String>> = OnceLock::new();
    let r = CELL.get_or_init(|| {
        Scenario::new("boot", SCRIPT)
            .run(prepare)
            .map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(o) => o,
        Err(e) => panic!("the boot scenario could not run: {e}"),
    }
}

/// Serial output, stderr and exit status of one worker run.
struct Run {
    out: String,
    err: String,
    rc: i32,
}

fn run(name: &str) -> Run {
    let o = outcome();
    let rc = o.file(&format!("{name}.rc"));
    let run = Run {
        out: o.file(&format!("{name}.out")),
        err: o.file(&format!("{name}.err")),
        rc: rc.trim().parse().unwrap_or_else(|_| {
            panic!(
                "worker run {name} left no exit status; test host log:\n{}",
                parvis_tests::testhost::tail(&o.log(), 80)
            )
        }),
    };
    eprintln!(
        "--- {name}: rc={} stderr:\n{}\n--- serial (tail):\n{}",
        run.rc,
        run.err,
        parvis_tests::testhost::tail(&run.out, 30)
    );
    run
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[test]
fn debian_guest_reaches_userspace_and_powers_off_cleanly() {
    let r = run("main");
    assert!(
        has_line(&r.out, "PARVIS-L2-USERSPACE"),
        "no userspace marker"
    );
    assert!(has_line(&r.out, "PARVIS-POWEROFF"));
    assert_eq!(r.rc, 0, "power-off must exit 0");
}

#[test]
fn guest_sees_every_vcpu() {
    assert_eq!(marker(&run("main").out, "PARVIS-NPROC"), Some("2"));
    assert_eq!(marker(&run("bzimage").out, "PARVIS-NPROC"), Some("1"));
}

#[test]
fn bzimage_boots_too() {
    let r = run("bzimage");
    assert!(has_line(&r.out, "PARVIS-L2-USERSPACE"));
    assert_eq!(r.rc, 0);
}

#[test]
fn guest_reads_the_virtio_disk_byte_for_byte() {
    let r = run("main");
    let expected = sha256_hex(&disk_bytes(DISK_SIZE, 0x1234_5678));
    assert_eq!(
        marker(&r.out, "PARVIS-DISK-SIZE"),
        Some(DISK_SIZE.to_string().as_str())
    );
    assert_eq!(marker(&r.out, "PARVIS-DISK-LBS"), Some("512"));
    assert_eq!(
        marker(&r.out, "PARVIS-DISK-SHA256"),
        Some(expected.as_str())
    );
}

#[test]
fn guest_write_reaches_the_host_file() {
    let r = run("main");
    assert!(
        has_line(&r.out, "PARVIS-DISK-WRITTEN"),
        "guest did not report the write"
    );
    let disk = std::fs::read(outcome().path("disk.img")).unwrap();
    assert_eq!(&disk[1 << 20..(1 << 20) + WROTE.len()], WROTE);
    // Nothing else changed.
    let mut original = disk_bytes(DISK_SIZE, 0x1234_5678);
    original[1 << 20..(1 << 20) + WROTE.len()].copy_from_slice(WROTE);
    assert!(disk == original, "bytes outside the written range changed");
}

#[test]
fn guest_sees_4096_byte_sectors() {
    let r = run("sector4k");
    assert_eq!(marker(&r.out, "PARVIS-DISK-LBS"), Some("4096"), "{}", r.out);
    let expected = sha256_hex(&disk_bytes(DISK4K_SIZE, 0x9abc_def0));
    assert_eq!(
        marker(&r.out, "PARVIS-DISK-SHA256"),
        Some(expected.as_str())
    );
    assert_eq!(r.rc, 0);
}

#[test]
fn framebuffer_pattern_appears_in_the_png_dump() {
    let r = run("main");
    assert_eq!(
        marker(&r.out, "PARVIS-FB-DRAWN"),
        Some("1024x768x32"),
        "{}",
        r.out
    );
    let img = image::open(outcome().path("main.png"))
        .expect("the worker wrote main.png")
        .to_rgb8();
    assert_eq!(img.dimensions(), (1024, 768));
    let bands = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]];
    for (i, colour) in bands.iter().enumerate() {
        let (y0, y1) = (i as u32 * 192, i as u32 * 192 + 191);
        for y in [y0, (y0 + y1) / 2, y1] {
            for x in [0, 511, 1023] {
                assert_eq!(
                    img.get_pixel(x, y).0,
                    *colour,
                    "pixel ({x},{y}) of band {i}"
                );
            }
        }
    }
}

#[test]
fn guest_panic_is_a_crash_with_a_clear_message() {
    let r = run("panic");
    assert_eq!(r.rc, 3, "a guest panic must exit 3");
    assert!(
        r.err
            .contains("guest crashed: the guest kernel panicked (pvpanic)"),
        "{}",
        r.err
    );
    assert!(
        r.out.contains("Kernel panic"),
        "the guest's panic message is on the console"
    );
}

#[test]
fn triple_fault_is_a_crash_with_a_clear_message() {
    let r = run("triplefault");
    assert_eq!(r.rc, 3);
    assert!(
        r.err.contains("guest crashed: triple fault on vCPU 0"),
        "{}",
        r.err
    );
}

#[test]
fn bad_configuration_is_one_clear_line() {
    let r = run("nokernel");
    assert_eq!(r.rc, 1);
    assert_eq!(r.err.trim().lines().count(), 1, "{}", r.err);
    assert!(
        r.err.contains("kernel:") && r.err.contains("does-not-exist"),
        "{}",
        r.err
    );
    let r = run("badcpus");
    assert_eq!(r.rc, 1);
    assert!(
        r.err.contains("cpus: must be between 1 and 254"),
        "{}",
        r.err
    );
}

#[test]
fn boot_framebuffer_writes_are_reported_from_kvms_dirty_page_log() {
    let o = outcome();
    let out = o.file("ctl.out");
    assert!(
        out.contains("PARVIS-FB-DRAWN=1024x768x32"),
        "the guest did not draw:\n{out}"
    );
    let reset_at: f64 = o
        .file("ctl.reset-at")
        .trim()
        .parse()
        .expect("the scenario recorded when it reset the guest");
    // `<unix time> boot-rows Y H` lines, before the reset (which makes every row new).
    let updates = o.file("bootfb/updates.txt");
    let rows: Vec<(u32, u32)> = updates
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let t: f64 = w.first()?.parse().ok()?;
            (w.get(1) == Some(&"boot-rows") && t < reset_at)
                .then(|| Some((w.get(2)?.parse().ok()?, w.get(3)?.parse().ok()?)))?
        })
        .collect();
    assert!(
        !rows.is_empty(),
        "no boot framebuffer rows were reported; watch-display said: {}\n{updates}",
        o.file("bootfb.replies")
    );
    assert_eq!(rows[0], (0, 768), "a new subscriber first gets every row");
    // Then the guest's writes: its pattern covers every row.
    let mut seen = vec![false; 768];
    for &(y, h) in &rows[1..] {
        for r in y..(y + h).min(768) {
            seen[r as usize] = true;
        }
    }
    let missing = seen.iter().filter(|s| !**s).count();
    assert_eq!(
        missing, 0,
        "{missing} rows the guest drew were never reported: {rows:?}"
    );
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let o = outcome();
    let paused = o.file("ctl.paused");
    let counts: Vec<u32> = paused
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(
        counts.len(),
        2,
        "no pause measurement; ctl.out:\n{}",
        o.file("ctl.out")
    );
    assert!(counts[0] >= 3);
    assert_eq!(counts[0], counts[1], "ticks advanced while paused");
    assert_eq!(
        o.file("ctl.resumed").trim(),
        "resumed",
        "ticks did not resume"
    );
    let replies = o.file("ctl.replies");
    assert!(replies.lines().any(|l| l == "ok paused"), "{replies}");
}

#[test]
fn reset_boots_again_and_stop_exits_zero() {
    let o = outcome();
    let out = o.file("ctl.out");
    assert_eq!(
        out.lines()
            .filter(|l| l.trim_end() == "PARVIS-L2-USERSPACE")
            .count(),
        2,
        "the guest did not boot a second time after reset:\n{out}"
    );
    // After the reset the ticks start again from 1.
    let ticks = marker_all(&out, "PARVIS-TICK");
    assert!(
        ticks.iter().filter(|t| **t == "1").count() >= 2,
        "{ticks:?}"
    );
    assert_eq!(
        o.file("ctl.rc").trim(),
        "0",
        "stop must exit 0: {}",
        o.file("ctl.err")
    );
    assert!(
        image::open(o.path("ctl.png")).is_ok(),
        "screenshot over the control socket"
    );
}
