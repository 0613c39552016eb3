//! End-to-end VMBus tests: the stock Debian kernel's Hyper-V drivers (hv_vmbus, hyperv_drm,
//! hyperv_keyboard, hid_hyperv) against `parvis-worker --hyperv …` in the test host, with
//! QEMU 7.2's `vmbus-bridge` as the reference peer for detection and version negotiation,
//! and the whole path through `parvis-agent` (input stream in, framebuffer stream out).
//!
//! One test-host boot serves everything: the worker-level runs first (their files stay in
//! the share), then the agent story; each `#[test]` checks one result.
//! Run: `cargo test -p parvis-tests --test vmbus` (one L1 boot, ≈ 6–8 min under TCG).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use parvis_tests::live::Live;
use parvis_tests::marker;
use proto::client::{self, Clients, Target};
use proto::v1::{
    CreateVmRequest, FramebufferRequest, InputEvent, KeyEvent, PointerEvent, SerialInput,
    TileEncoding, VmRef, VmSpec, VmState, input_event,
};

/// Worker-level runs, executed inside the test host from the share.
const WORKERS: &str = r#"
run() {
    name=$1; shift
    echo "SCENARIO: $name starts at $(cut -d' ' -f1 /proc/uptime) s"
    timeout -k 10 "${WORKER_TIMEOUT:-240}" parvis-worker "$@" </dev/null >"$name.out" 2>"$name.err"
    echo $? >"$name.rc"
}
wait_for() {
    n=0
    while ! grep -q "$1" "$2" 2>/dev/null; do
        n=$((n + 1)); [ "$n" -gt $(( ${3:-120} * 5 )) ] && return 1; sleep 0.2
    done
}
K="--kernel $IMAGES/vmlinux --initrd $IMAGES/l2-initramfs.cpio --memory 256M"
C="console=ttyS0 quiet panic=-1"

# In-kernel Hyper-V (KVM's emulation), two vCPUs.
run kernel $K --cpus 2 --hyperv kernel --log info --cmdline "$C parvis.test=hyperv,vmbus"

# The same guest against the userspace emulation.
run user $K --cpus 2 --hyperv userspace --log info --cmdline "$C parvis.test=hyperv,vmbus"

# The guest capped at protocol 4.0 (what QEMU offers): must answer on connection id 1.
run v40 $K --hyperv kernel --cmdline "$C hv_vmbus.max_version=0x40000 parvis.test=vmbus"

# Synthetic keyboard and mouse fed through the control socket. Sockets cannot live on 9p.
D=$(mktemp -d)
parvis-worker $K --hyperv kernel --control "$D/in.sock" --log info \
    --cmdline "$C parvis.test=input" </dev/null >input.out 2>input.err &
pid=$!
( sleep 150; kill -9 $pid 2>/dev/null ) &
if wait_for PARVIS-INPUT-READY input.out 120; then
    parvis-worker ctl "$D/in.sock" "key 0x1e down" "key 0x1e up" "key 0xe048 down" \
        "key 0xe048 up" "pointer 16384 8192" "pointer 16384 8192 1" "pointer 100 32767 0 -1" \
        "key 0x01 down" "key 0x01 up" "pointer 0 0 4" >input.replies 2>&1
fi
wait $pid
echo $? >input.rc

# Synthetic video: hyperv_drm binds; a DRM client switches to 1280x720 and draws
# rectangles; the control socket's display stream reports the mode and each rectangle.
parvis-worker $K --hyperv userspace --control "$D/v.sock" --log info \
    --cmdline "$C parvis.test=drm parvis.drm=1280x720:8:3" </dev/null >drm.out 2>drm.err &
pid=$!
( sleep 150; kill -9 $pid 2>/dev/null ) &
n=0
while [ ! -S "$D/v.sock" ] && [ $n -lt 100 ]; do n=$((n + 1)); sleep 0.1; done
parvis-worker ctl "$D/v.sock" "watch-display $SHARE/display 140" >display.replies 2>&1 &
wpid=$!
wait $pid
echo $? >drm.rc
wait $wpid

# Reference peer: QEMU 7.2 with vmbus-bridge and the same guest.
Q="$SHARE/q/ld-linux-x86-64.so.2 --library-path $SHARE/q $SHARE/q/qemu-system-x86_64 -L $SHARE/q/share"
timeout -k 10 240 $Q -enable-kvm -M q35 -nodefaults -vga none -m 256M -smp 1 \
    -cpu host,kvm=off,hv-relaxed,hv-vpindex,hv-time,hv-synic,hv-vapic,hv-runtime \
    -device vmbus-bridge -display none -monitor none -serial stdio -no-reboot \
    -kernel "$IMAGES/vmlinux" -initrd "$IMAGES/l2-initramfs.cpio" \
    -append "$C parvis.test=hyperv,vmbus" </dev/null >qemu.out 2>qemu.err
echo $? >qemu.rc
"#;

/// The test host's main script: an agent, then commands from the test.
const AGENT: &str = r#"
STATE=$(mktemp -d)/state
mkdir -p "$STATE/boot/default"
ln -s "$IMAGES/vmlinux" "$STATE/boot/default/kernel"
ln -s "$IMAGES/l2-initramfs.cpio" "$STATE/boot/default/initrd"
echo "console=ttyS0 quiet parvis.test=hold" >"$STATE/boot/default/cmdline"
echo "$STATE" >state.path
parvis-agent --state-dir "$STATE" --listen "$AGENT_LISTEN" $AGENT_TLS --worker "$BIN/parvis-worker" >>agent.out 2>>agent.err &
apid=$!
serve_commands
kill $apid 2>/dev/null
for p in $(cat "$STATE"/vms/*/run.json 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p'); do kill -9 "$p" 2>/dev/null; done
true
"#;

type Checks = BTreeMap<&'static str, Result<(), String>>;

struct Results {
    /// The share, with every worker-level run's files.
    share: Option<PathBuf>,
    _keep: Option<tempfile::TempDir>,
    checks: Checks,
    fatal: Option<String>,
}

fn results() -> &'static Results {
    static CELL: OnceLock<Results> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut checks = Checks::new();
        match run_all(&mut checks) {
            Ok(dir) => Results {
                share: Some(dir.path().to_path_buf()),
                _keep: Some(dir),
                checks,
                fatal: None,
            },
            Err(e) => Results {
                share: None,
                _keep: None,
                checks,
                fatal: Some(format!("{e:#}")),
            },
        }
    })
}

fn run_all(checks: &mut Checks) -> Result<tempfile::TempDir> {
    let mut live = Live::start("vmbus", AGENT, Duration::from_secs(1800), 2048)?;
    let qemu = which("qemu-system-x86_64")?;
    parvis_tests::bench_support::pack_qemu(&qemu, &live.path("q"))?;
    let (rc, out) = live.exec(WORKERS, Duration::from_secs(1200))?;
    ensure!(rc == 0, "worker runs failed ({rc}):\n{out}");
    let agent_out = live.wait_file("agent.out", "token: ", Duration::from_secs(120))?;
    let token = value(&agent_out, "token: ").context("no token printed")?;
    let fp = value(&agent_out, "TLS certificate SHA-256 fingerprint: ");
    let target = Target {
        addr: live.addr.clone(),
        fingerprint: fp,
        token,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Err(e) = rt.block_on(agent_story(&target, checks)) {
        checks.insert("agent", Err(format!("{e:#}")));
    }
    // Keep the agent's VM logs for diagnosis (the state directory is inside the test host).
    let _ = live.exec(
        "for f in \"$(cat state.path)\"/vms/*/*.log; do cp \"$f\" \"agent-vm-$(basename \"$f\")\"; done",
        Duration::from_secs(30),
    );
    let outcome = live.finish()?;
    Ok(outcome.share)
}

fn value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

fn which(name: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found (install Debian's qemu-system-x86)"))
}

fn share() -> &'static Path {
    let r = results();
    match &r.share {
        Some(p) => p,
        None => panic!(
            "the vmbus scenario could not run: {}",
            r.fatal.as_deref().unwrap_or("?")
        ),
    }
}

fn file(name: &str) -> String {
    std::fs::read_to_string(share().join(name)).unwrap_or_default()
}

fn assert_check(name: &str) {
    let r = results();
    match r.checks.get(name) {
        Some(Ok(())) => {}
        Some(Err(e)) => panic!(
            "{name} failed: {e}\n--- the VM's worker log (tail):\n{}",
            parvis_tests::testhost::tail(&file("agent-vm-worker.log"), 40)
        ),
        None => panic!(
            "{name} did not run: {}",
            r.checks
                .get("agent")
                .and_then(|a| a.as_ref().err().cloned())
                .or_else(|| r.fatal.clone())
                .unwrap_or_else(|| "an earlier step failed".into())
        ),
    }
}

/// Serial output, stderr and exit status of one VMM run.
struct Run {
    out: String,
    err: String,
    rc: i32,
}

fn run(name: &str) -> Run {
    let rc = file(&format!("{name}.rc"));
    let run = Run {
        out: file(&format!("{name}.out")),
        err: file(&format!("{name}.err")),
        rc: rc
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("run {name} left no exit status")),
    };
    eprintln!(
        "--- {name}: rc={} stderr (tail):\n{}\n--- serial (tail):\n{}",
        run.rc,
        parvis_tests::testhost::tail(&run.err, 40),
        parvis_tests::testhost::tail(&run.out, 40)
    );
    run
}

const KEYBOARD_CLASS: &str = "{f912ad6d-2b17-48ea-bd65-f927a61c7684}";
const MOUSE_CLASS: &str = "{cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a}";
const VIDEO_CLASS: &str = "{da0a7802-e377-4aac-8e77-0558eb1073f8}";

fn check_identity(r: &Run) {
    assert_eq!(marker(&r.out, "PARVIS-HV-DETECTED"), Some("1"), "{}", r.out);
    assert_eq!(
        marker(&r.out, "PARVIS-HV-FLAGS"),
        Some("privilege flags low 0xa76, high 0x30, hints 0x200, misc 0x100"),
        "{}",
        r.out
    );
    let cs = marker(&r.out, "PARVIS-CLOCKSOURCES").unwrap_or_default();
    assert!(cs.contains("hyperv_clocksource_tsc_page"), "{cs}");
}

#[test]
fn kernel_backend_gives_the_hyperv_identity() {
    let r = run("kernel");
    check_identity(&r);
    assert_eq!(r.rc, 0);
}

#[test]
fn userspace_backend_gives_the_hyperv_identity() {
    let r = run("user");
    check_identity(&r);
    assert_eq!(r.rc, 0);
}

#[test]
fn vmbus_negotiates_5_3_with_both_backends() {
    for name in ["kernel", "user"] {
        let r = run(name);
        assert_eq!(
            marker(&r.out, "PARVIS-VMBUS-VERSION"),
            Some("5.3"),
            "{name}"
        );
        assert!(!r.out.contains("PARVIS-VMBUS-ERROR"), "{name}");
    }
}

#[test]
fn vmbus_negotiates_4_0_when_the_guest_is_capped_like_under_qemu() {
    let r = run("v40");
    assert_eq!(marker(&r.out, "PARVIS-VMBUS-VERSION"), Some("4.0"));
}

#[test]
fn vmbus_lists_the_three_devices() {
    for name in ["kernel", "user"] {
        let r = run(name);
        let devs = marker(&r.out, "PARVIS-VMBUS-DEVICES").unwrap_or_default();
        for class in [KEYBOARD_CLASS, MOUSE_CLASS, VIDEO_CLASS] {
            assert!(devs.contains(class), "{name}: {class} missing from {devs}");
        }
    }
}

/// `PARVIS-EV=<tag>,<type>,<code>,<value>` lines of one device.
fn events(out: &str, tag: &str) -> Vec<(u16, u16, i32)> {
    parvis_tests::marker_all(out, "PARVIS-EV")
        .into_iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.len() == 4 && f[0] == tag).then(|| {
                (
                    f[1].parse().unwrap_or(0),
                    f[2].parse().unwrap_or(0),
                    f[3].parse().unwrap_or(0),
                )
            })
        })
        .collect()
}

const EV_KEY: u16 = 1;
const EV_REL: u16 = 2;
const EV_ABS: u16 = 3;

#[test]
fn keys_arrive_in_the_guest_evdev_as_the_right_key_codes() {
    let r = run("input");
    assert!(
        r.out.contains("PARVIS-INPUT-READY"),
        "the guest found no synthetic keyboard/mouse:\n{}",
        r.out
    );
    let replies = file("input.replies");
    assert!(!replies.contains("error"), "{replies}");
    assert_eq!(events(&r.out, "kbd"), expected_keys(), "{}", r.out);
}

#[test]
fn absolute_mouse_moves_buttons_and_wheel_arrive_with_the_right_values() {
    let r = run("input");
    let m = events(&r.out, "mouse");
    if let Err(e) = mouse_ok(&m) {
        panic!("{e}: {m:?}");
    }
    assert!(r.out.contains("PARVIS-INPUT-DONE"));
}

/// The pixel parvis-drm draws at (x, y) in rectangle `i` (assets/guest/parvis-drm.c).
fn drm_pixel(x: u32, y: u32, i: u32) -> u32 {
    let r = (x.wrapping_mul(7).wrapping_add(i.wrapping_mul(13))) & 0xff;
    let g = (y.wrapping_mul(3).wrapping_add(i.wrapping_mul(29))) & 0xff;
    let b = (x ^ y ^ i.wrapping_mul(41)) & 0xff;
    (r << 16) | (g << 8) | b
}

/// x, y, width, height.
type RectXywh = (u32, u32, u32, u32);

/// What `watch-display` recorded: modes and rectangles with their pixels.
#[derive(Debug, Default)]
struct Display {
    modes: Vec<(u32, u32, u32)>,
    rects: Vec<(RectXywh, Vec<u32>)>,
}

fn display() -> Display {
    let lines = file("display/updates.txt");
    let bin = std::fs::read(share().join("display/rects.bin")).unwrap_or_default();
    let mut d = Display::default();
    let mut at = 0usize;
    for l in lines.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let n = |i: usize| w.get(i).and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        match w.get(1) {
            Some(&"mode") => d.modes.push((n(2), n(3), n(4))),
            Some(&"rect") => {
                let (x, y, rw, rh) = (n(2), n(3), n(4), n(5));
                let len = (rw * rh * 4) as usize;
                let px = bin
                    .get(at..at + len)
                    .unwrap_or_else(|| panic!("rects.bin too short for {l}"))
                    .chunks(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0xff_ffff)
                    .collect();
                at += len;
                d.rects.push(((x, y, rw, rh), px));
            }
            _ => {}
        }
    }
    d
}

#[test]
fn hyperv_drm_binds_to_the_synthetic_video_device() {
    let r = run("drm");
    assert_eq!(
        marker(&r.out, "PARVIS-DRM-DRIVER"),
        Some("hyperv_drm"),
        "{}",
        r.out
    );
    let v = marker(&r.out, "PARVIS-SYNTHVID").unwrap_or_default();
    assert!(v.contains("Synthvid Version major 3, minor 5"), "{v}");
}

#[test]
fn a_guest_resolution_change_reaches_the_display_stream() {
    let r = run("drm");
    let mode = marker(&r.out, "PARVIS-DRM-MODE").expect("the guest set no mode");
    assert!(mode.starts_with("1280x720x"), "{mode}");
    let stride: u32 = mode.rsplit('x').next().unwrap().parse().unwrap();
    let d = display();
    // The boot mode, the guest's 1280x720, and the fbdev console's mode again when the DRM
    // client exits.
    assert!(d.modes.contains(&(1280, 720, stride)), "{:?}", d.modes);
    assert_eq!(
        d.modes.first().map(|m| (m.0, m.1)),
        Some((1024, 768)),
        "{:?}",
        d.modes
    );
}

/// Every rectangle the guest drew arrives as a dirty rectangle of exactly that size, and the
/// pixels read from the shared memory file at that moment are exactly the guest's pattern.
/// The stream carries rectangles, not full frames, except right after a mode change.
#[test]
fn drawn_rectangles_arrive_as_dirty_rectangles_with_the_exact_pixels() {
    let r = run("drm");
    let drawn: Vec<(u32, u32, u32, u32, u32)> = parvis_tests::marker_all(&r.out, "PARVIS-DRM-RECT")
        .iter()
        .map(|l| {
            let f: Vec<u32> = l.split(',').take(5).map(|s| s.parse().unwrap()).collect();
            (f[0], f[1], f[2], f[3], f[4])
        })
        .collect();
    assert_eq!(drawn.len(), 8, "{}", r.out);
    let d = display();
    for (i, x, y, w, h) in drawn {
        let (_, px) = d
            .rects
            .iter()
            .find(|(rect, _)| *rect == (x, y, w, h))
            .unwrap_or_else(|| {
                panic!(
                    "rect {i} ({x},{y} {w}x{h}) never reported: {:?}",
                    d.rects.iter().map(|r| r.0).collect::<Vec<_>>()
                )
            });
        for (k, p) in px.iter().enumerate() {
            let (px_x, px_y) = (x + k as u32 % w, y + k as u32 / w);
            assert_eq!(
                *p,
                drm_pixel(px_x, px_y, i),
                "rect {i} pixel ({px_x},{px_y})"
            );
        }
    }
    let full = d
        .rects
        .iter()
        .filter(|(r, _)| r.2 == 1280 && r.3 == 720)
        .count();
    assert!(
        full <= 4,
        "{full} full-frame updates: the stream should be rectangles"
    );
}

/// QEMU 7.2 (the reference peer) and Parvis agree on what the guest detects; QEMU stops at
/// 4.0 and offers no devices.
#[test]
fn qemu_reference_peer_agrees_on_detection() {
    let q = run("qemu");
    assert_eq!(marker(&q.out, "PARVIS-HV-DETECTED"), Some("1"), "{}", q.out);
    assert_eq!(marker(&q.out, "PARVIS-VMBUS-VERSION"), Some("4.0"));
    assert_eq!(marker(&q.out, "PARVIS-VMBUS-DEVICES"), Some(""));
    let p = run("kernel");
    assert_eq!(
        marker(&q.out, "PARVIS-HV-DETECTED"),
        marker(&p.out, "PARVIS-HV-DETECTED")
    );
}

// ------------------------------------------------------------------------------------
// Through the agent: console input stream in, framebuffer stream out.

/// Serial output of a VM, collected in the background.
#[derive(Clone, Default)]
struct Serial(Arc<Mutex<String>>);

impl Serial {
    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn wait(&self, pattern: &str, secs: u64) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.text();
            if t.contains(pattern) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!(
                    "no {pattern} on the serial console in {secs} s:\n{}",
                    tail(&t)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn tail(t: &str) -> String {
    parvis_tests::testhost::tail(t, 40)
}

async fn serial(c: &mut Clients, id: &str) -> Result<Serial> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(SerialInput {
        vm_id: id.into(),
        data: Default::default(),
    })
    .await?;
    let mut stream = c
        .console
        .serial_console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let s = Serial::default();
    let sink = s.0.clone();
    tokio::spawn(async move {
        let _keep = tx;
        while let Ok(Some(m)) = stream.message().await {
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&String::from_utf8_lossy(&m.data));
        }
    });
    Ok(s)
}

fn key(vm: &str, scancode: u32, pressed: bool) -> InputEvent {
    InputEvent {
        vm_id: vm.into(),
        kind: Some(input_event::Kind::Key(KeyEvent { scancode, pressed })),
    }
}

fn pointer(vm: &str, x: u32, y: u32, buttons: u32, wheel: i32) -> InputEvent {
    InputEvent {
        vm_id: vm.into(),
        kind: Some(input_event::Kind::Pointer(PointerEvent {
            x,
            y,
            buttons,
            wheel,
        })),
    }
}

/// The screen as the console sees it, rebuilt from the framebuffer stream.
#[derive(Default)]
struct Screen {
    width: u32,
    height: u32,
    px: Vec<u32>,
    /// (full, tiles) of every capture after the last geometry change: a large one comes
    /// as several updates, the last one without `more`.
    since_mode: Vec<(bool, Vec<RectXywh>)>,
    /// The updates of a capture not complete yet.
    part: Option<(bool, Vec<RectXywh>)>,
    modes: Vec<(u32, u32)>,
}

impl Screen {
    fn apply(&mut self, u: &proto::v1::FrameUpdate) -> Result<()> {
        if u.full && (u.width, u.height) != (self.width, self.height) {
            self.width = u.width;
            self.height = u.height;
            self.px = vec![0; (u.width * u.height) as usize];
            self.modes.push((u.width, u.height));
            self.since_mode.clear();
            self.part = None;
        }
        ensure!(
            (u.width, u.height) == (self.width, self.height),
            "update at another size"
        );
        let (full, mut tiles) = self.part.take().unwrap_or((u.full, Vec::new()));
        for t in &u.tiles {
            let raw = proto::tiles::decode(t)?;
            ensure!(t.x + t.width <= self.width && t.y + t.height <= self.height);
            for r in 0..t.height {
                for c in 0..t.width {
                    let o = ((r * t.width + c) * 4) as usize;
                    let v = u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
                    self.px[((t.y + r) * self.width + t.x + c) as usize] = v & 0xff_ffff;
                }
            }
            tiles.push((t.x, t.y, t.width, t.height));
        }
        if u.more {
            self.part = Some((full, tiles));
        } else {
            self.since_mode.push((full, tiles));
        }
        Ok(())
    }
}

/// Rectangles `parvis-drm` reported, in order: (i, x, y, w, h).
fn drawn_rects(serial: &str) -> Vec<(u32, u32, u32, u32, u32)> {
    parvis_tests::marker_all(serial, "PARVIS-DRM-RECT")
        .iter()
        .filter_map(|l| {
            let f: Vec<u32> = l
                .split(',')
                .take(5)
                .filter_map(|s| s.parse().ok())
                .collect();
            (f.len() == 5).then(|| (f[0], f[1], f[2], f[3], f[4]))
        })
        .collect()
}

/// The final picture the guest drew: its rectangles painted in order on black.
fn expected_picture(w: u32, h: u32, rects: &[(u32, u32, u32, u32, u32)]) -> Vec<u32> {
    let mut px = vec![0u32; (w * h) as usize];
    for &(i, x, y, rw, rh) in rects {
        for yy in y..y + rh {
            for xx in x..x + rw {
                px[(yy * w + xx) as usize] = drm_pixel(xx, yy, i);
            }
        }
    }
    px
}

async fn agent_story(target: &Target, checks: &mut Checks) -> Result<()> {
    let mut c = client::connect(target)
        .await
        .context("connecting to the agent")?;
    let spec = VmSpec {
        name: "vmbus".into(),
        cpus: 1,
        memory_bytes: 256 << 20,
        boot_image: "default".into(),
        cmdline: "console=ttyS0 quiet panic=-1 parvis.test=input,drm parvis.drm=1280x720:8:120"
            .into(),
        display_width: 1024,
        display_height: 768,
        ..Default::default()
    };
    let vm =
        c.vm.create_vm(CreateVmRequest { spec: Some(spec) })
            .await?
            .into_inner();
    let id = vm.id.clone();
    let started =
        c.vm.start_vm(VmRef { vm_id: id.clone() })
            .await?
            .into_inner();
    ensure!(started.state == VmState::Running as i32, "{started:?}");
    let serial = serial(&mut c, &id).await?;

    // Input: the agent's console input stream, the same sequence as the worker-level run.
    let r = async {
        serial.wait("PARVIS-INPUT-READY", 180).await?;
        let events = vec![
            key(&id, 0x1e, true),
            key(&id, 0x1e, false),
            key(&id, 0xe048, true),
            key(&id, 0xe048, false),
            pointer(&id, 16384, 8192, 0, 0),
            pointer(&id, 16384, 8192, 1, 0),
            pointer(&id, 100, 32767, 0, -1),
            key(&id, 0x01, true),
            key(&id, 0x01, false),
            pointer(&id, 0, 0, 4, 0),
        ];
        let n = events.len() as u64;
        let summary = c
            .console
            .send_input(tokio_stream::iter(events))
            .await?
            .into_inner();
        ensure!(summary.events == n, "{summary:?}");
        serial.wait("PARVIS-INPUT-DONE", 60).await
    }
    .await;
    let text = match r {
        Ok(t) => t,
        Err(e) => {
            checks.insert("agent_keys", Err(format!("{e:#}")));
            checks.insert("agent_mouse", Err(format!("{e:#}")));
            serial.text()
        }
    };
    if !checks.contains_key("agent_keys") {
        let kbd = events(&text, "kbd");
        checks.insert(
            "agent_keys",
            (kbd == expected_keys())
                .then_some(())
                .ok_or_else(|| format!("keyboard events {kbd:?}")),
        );
        let m = events(&text, "mouse");
        checks.insert(
            "agent_mouse",
            mouse_ok(&m).map_err(|e| format!("{e}: {m:?}")),
        );
    }

    // Screen: the framebuffer stream follows the guest from the boot framebuffer to
    // hyperv_drm at 1280x720 and shows exactly what it drew.
    let mut stream = c
        .console
        .stream_framebuffer(FramebufferRequest {
            vm_id: id.clone(),
            encoding: TileEncoding::Lz4 as i32,
        })
        .await?
        .into_inner();
    let mut screen = Screen::default();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut last_mismatch: Option<(u32, u32, u32, u32)> = None;
    let result: Result<()> = async {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // The serial console may lag behind the screen: re-check every second even when
            // no update comes (the guest holds its picture still).
            let wait = left.min(Duration::from_secs(1));
            match tokio::time::timeout(wait, stream.message()).await {
                Ok(Ok(Some(u))) => screen.apply(&u)?,
                Err(_) if !left.is_zero() => {}
                other => bail!(
                    "framebuffer stream: {other:?}; modes {:?}; last mismatch {:?}; serial:\n{}",
                    screen.modes,
                    last_mismatch,
                    tail(&serial.text())
                ),
            }
            let text = serial.text();
            if (screen.width, screen.height) != (1280, 720) || !text.contains("PARVIS-DRM-DONE") {
                continue;
            }
            let rects = drawn_rects(&text);
            ensure!(rects.len() == 8, "{}", tail(&text));
            let want = expected_picture(1280, 720, &rects);
            let covered = |x: u32, y: u32| {
                rects
                    .iter()
                    .any(|&(_, rx, ry, rw, rh)| x >= rx && x < rx + rw && y >= ry && y < ry + rh)
            };
            let mismatch = (0..720u32)
                .flat_map(|y| (0..1280u32).map(move |x| (x, y)))
                .filter(|&(x, y)| covered(x, y))
                .find(|&(x, y)| {
                    screen.px[(y * 1280 + x) as usize] != want[(y * 1280 + x) as usize]
                });
            match mismatch {
                None => return Ok(()),
                Some((x, y)) => {
                    last_mismatch = Some((
                        x,
                        y,
                        screen.px[(y * 1280 + x) as usize],
                        want[(y * 1280 + x) as usize],
                    ));
                }
            }
        }
    }
    .await;
    checks.insert(
        "agent_resolution",
        if screen.modes.contains(&(1280, 720)) {
            Ok(())
        } else {
            Err(format!("modes seen: {:?}", screen.modes))
        },
    );
    checks.insert("agent_pattern", result.map_err(|e| format!("{e:#}")));
    // After the mode change: captures are the guest's rectangles, not whole frames. Whole-
    // screen captures are allowed only for the mode change itself, the guest's own
    // full-screen DIRT after its mode set, and the worker's settle refresh; every other
    // capture carries only tiles under rectangles the guest drew (nothing found by scanning).
    let rects = drawn_rects(&serial.text());
    let whole = screen
        .since_mode
        .iter()
        .filter(|(_, t)| {
            t.iter()
                .map(|r| u64::from(r.2) * u64::from(r.3))
                .sum::<u64>()
                >= 1280 * 720
        })
        .count();
    let partial: Vec<&Vec<RectXywh>> = screen
        .since_mode
        .iter()
        .filter(|(_, t)| {
            t.iter()
                .map(|r| u64::from(r.2) * u64::from(r.3))
                .sum::<u64>()
                < 1280 * 720
        })
        .map(|(_, t)| t)
        .collect();
    let hits = |t: &RectXywh| {
        rects
            .iter()
            .any(|&(_, x, y, w, h)| t.0 < x + w && x < t.0 + t.2 && t.1 < y + h && y < t.1 + t.3)
    };
    let stray: Vec<RectXywh> = partial
        .iter()
        .flat_map(|t| t.iter())
        .filter(|t| !hits(t))
        .copied()
        .collect();
    checks.insert(
        "agent_dirty_rects",
        if whole <= 3 && !partial.is_empty() && stray.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{whole} whole-screen and {} partial captures after the mode change; tiles \
                 under no drawn rectangle: {stray:?}",
                partial.len()
            ))
        },
    );
    let _ = c.vm.stop_vm(VmRef { vm_id: id }).await;
    Ok(())
}

fn expected_keys() -> Vec<(u16, u16, i32)> {
    // A (set-1 0x1e) = KEY_A 30; E0 48 (Up) = KEY_UP 103; Escape = KEY_ESC 1.
    vec![
        (EV_KEY, 30, 1),
        (EV_KEY, 30, 0),
        (EV_KEY, 103, 1),
        (EV_KEY, 103, 0),
        (EV_KEY, 1, 1),
        (EV_KEY, 1, 0),
    ]
}

fn mouse_ok(m: &[(u16, u16, i32)]) -> Result<(), &'static str> {
    let has = |e: (u16, u16, i32)| m.contains(&e);
    if !(has((EV_ABS, 0, 16384)) && has((EV_ABS, 1, 8192))) {
        return Err("no ABS_X 16384 / ABS_Y 8192");
    }
    if !(has((EV_KEY, 272, 1)) && has((EV_KEY, 272, 0))) {
        return Err("no BTN_LEFT press and release");
    }
    if !(has((EV_ABS, 0, 100)) && has((EV_ABS, 1, 32767))) {
        return Err("no ABS_X 100 / ABS_Y 32767");
    }
    if !has((EV_REL, 8, -1)) {
        return Err("no REL_WHEEL -1");
    }
    if !has((EV_KEY, 274, 1)) {
        return Err("no BTN_MIDDLE");
    }
    Ok(())
}

#[test]
fn agent_input_stream_keys_arrive_in_the_guest_evdev() {
    assert_check("agent_keys");
}

#[test]
fn agent_input_stream_absolute_mouse_arrives_with_the_right_coordinates() {
    assert_check("agent_mouse");
}

#[test]
fn agent_framebuffer_stream_follows_the_guest_resolution_change() {
    assert_check("agent_resolution");
}

#[test]
fn agent_framebuffer_stream_delivers_exactly_the_drawn_pattern() {
    assert_check("agent_pattern");
}

#[test]
fn agent_framebuffer_stream_sends_dirty_rectangles_not_frames() {
    assert_check("agent_dirty_rects");
}
