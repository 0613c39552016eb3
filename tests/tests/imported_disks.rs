//! End to end, in the test host: realistic disks (`assets/guest/build-disks.sh`: Debian 12
//! installed by debootstrap, with GRUB and initramfs-tools, as Hyper-V and Azure make them)
//! are uploaded through the agent from this machine and started with no boot image:
//!
//! * a Generation 2 style dynamic VHDX (GPT, ESP, ext4, grub-efi, initramfs MODULES=most)
//!   and a Generation 1 style dynamic VHDX (MBR, grub-pc) reach systemd's multi-user target
//!   (the disks' own marker unit writes `PARVIS-DISK-BOOTED` to the serial port) with their
//!   root on the synthetic SCSI controller;
//! * an Azure-style fixed VHD whose initramfs holds only the Hyper-V drivers and whose kernel
//!   is Debian's cloud kernel (no DRM) boots its root over storvsc, and its screen comes from
//!   the synthetic video device through `hyperv_fb`;
//! * a disk whose /boot is xfs with a Boot Loader Spec entry and no grub.cfg boots;
//! * a disk with no Linux is refused with the reader's sentence at import and at start.
//!
//! One test-host boot serves every case; each `#[test]` checks one result.
//! Run: `cargo test -p parvis-tests --test imported_disks` (builds the disks first, ~7 min
//! the first time; then ≈ 15 min of test host).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use parvis_tests::checks::{Checks, Run, record};
use parvis_tests::client::Cli;
use parvis_tests::live::Live;
use proto::client::{self, Clients};
use proto::v1::{VmRef, VmState};

/// The agent's state stays in the test host's memory, but its disks and uploads live in the
/// share (this machine's disk): the images are larger than the test host's RAM. Control
/// sockets cannot live on 9p, so only those two folders are links.
const SCRIPT: &str = r#"
STATE=$(mktemp -d)/state
mkdir -p "$STATE" "$SHARE/disks" "$SHARE/uploads"
ln -s "$SHARE/disks" "$STATE/disks"
ln -s "$SHARE/uploads" "$STATE/uploads"
parvis-agent --state-dir "$STATE" --listen "$AGENT_LISTEN" $AGENT_TLS --worker "$BIN/parvis-worker" >>agent.out 2>>agent.err &
echo $! >agent.pid
echo "$STATE" >state.path
serve_commands
kill "$(cat agent.pid)" 2>/dev/null
for p in $(cat "$STATE"/vms/*/run.json 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p'); do kill -9 "$p" 2>/dev/null; done
true
"#;

fn results() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| Run::of(run))
}

fn assert_check(name: &str) {
    results().assert(name);
}

/// `manifest.txt` lines `<disk> <key> <value>`.
struct Manifest(String);

impl Manifest {
    fn get(&self, disk: &str, key: &str) -> Option<String> {
        let prefix = format!("{disk} {key} ");
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().to_string())
    }
}

/// The fields of the disks' `PARVIS-DISK-BOOTED key=value ...` line.
fn booted_fields(serial: &str) -> Option<BTreeMap<String, String>> {
    let line = serial
        .lines()
        .find_map(|l| l.split("PARVIS-DISK-BOOTED ").nth(1))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Upload `file` as `name` and wait for the agent to read what it boots.
fn import(cli: &Cli<'_>, file: &Path, name: &str) -> Result<serde_json::Value> {
    let started = Instant::now();
    cli.ok(&[
        "disk",
        "upload",
        &file.to_string_lossy(),
        "--name",
        name,
        "-q",
    ])?;
    eprintln!(
        "imported {name} ({} MB) in {:.0} s",
        std::fs::metadata(file)?.len() >> 20,
        started.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let d = cli.json(&["disk", "get", name, "--json"])?;
        if d["boot"]["inspected"] == true {
            return Ok(d);
        }
        ensure!(Instant::now() < deadline, "{name} was never read: {d}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn run(checks: &mut Checks) -> Result<()> {
    let disks = parvis_tests::build::guest_disks()?;
    let manifest = Manifest(std::fs::read_to_string(disks.join("manifest.txt"))?);
    let mut live = Live::start("imported_disks", SCRIPT, Duration::from_secs(3600), 3072)?;
    let out = live.wait_file("agent.out", "token: ", Duration::from_secs(300))?;
    let target = parvis_tests::client::agent_target(&live.addr, &out)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cli = Cli { target: &target };
    let result = rt.block_on(async {
        let mut c = client::connect(&target).await?;
        for (name, file, check) in [
            ("gen2", "debian12-gen2.vhdx", "gen2_boots_to_multi_user"),
            ("gen1", "debian12-gen1.vhdx", "gen1_boots_to_multi_user"),
            (
                "azure",
                "azure-fixed.vhd",
                "azure_boots_over_storvsc_with_hyperv_fb",
            ),
            ("xfs", "xfs-bls.vhdx", "xfs_boot_with_bls_boots"),
        ] {
            let r = boots(&cli, &mut c, &mut live, &disks, &manifest, name, file).await;
            record(checks, check, r);
        }
        record(
            checks,
            "no_linux_is_refused_with_the_sentence",
            no_linux(&cli, &disks),
        );
        anyhow::Ok(())
    });
    if result.is_err() || checks.values().any(|r| r.is_err()) {
        eprintln!(
            "agent log:\n{}",
            parvis_tests::testhost::tail(
                &std::fs::read_to_string(live.path("agent.err")).unwrap_or_default(),
                60
            )
        );
    }
    let outcome = live.finish();
    result?;
    let outcome = outcome?;
    ensure!(
        outcome.status == 0,
        "scenario ended with {}:\n{}",
        outcome.status,
        parvis_tests::testhost::tail(&outcome.log(), 30)
    );
    Ok(())
}

/// Import `file`, make a VM of it (nothing said about what it boots), start it and wait for
/// the marker; check what the guest says of itself against the manifest.
async fn boots(
    cli: &Cli<'_>,
    c: &mut Clients,
    live: &mut Live,
    disks: &Path,
    manifest: &Manifest,
    name: &str,
    file: &str,
) -> Result<()> {
    let d = import(cli, &disks.join(file), name)?;
    let b = &d["boot"];
    ensure!(b["bootable"] == true, "{name} is not bootable: {b}");
    ensure!(
        b["os"] == "Debian GNU/Linux 12 (bookworm)",
        "{name}: os {}",
        b["os"]
    );
    let kernel = manifest
        .get(file, "kernel")
        .context("no kernel in the manifest")?;
    let default = &b["entries"][b["default_entry"].as_u64().unwrap_or(0) as usize];
    ensure!(
        default["version"] == kernel.as_str(),
        "{name}: default entry {default}"
    );
    cli.ok(&[
        "vm", "create", "--name", name, "--disk", name, "--memory", "512M",
    ])?;
    let v = cli.json(&["vm", "get", name, "--json"])?;
    ensure!(v["boot_source"] == "disk", "{name}: {v}");
    let id = v["id"].as_str().context("no VM id")?.to_string();
    let started = Instant::now();
    cli.ok(&["vm", "start", name])?;
    let serial = parvis_tests::client::serial_until(c, &id, "PARVIS-DISK-BOOTED", true, 1200).await;
    let took = started.elapsed().as_secs_f64();
    let log = worker_log(live, &id);
    let serial = match serial {
        Ok(s) => s,
        Err(e) => bail!(
            "{e:#}\nworker log:\n{}",
            parvis_tests::testhost::tail(&log, 30)
        ),
    };
    let f = booted_fields(&serial).context("no marker fields")?;
    eprintln!("{name}: marker after {took:.0} s: {f:?}");
    let host = manifest.get(file, "hostname").unwrap_or_default();
    ensure!(f.get("host") == Some(&host), "{name}: {f:?}");
    ensure!(f.get("kernel") == Some(&kernel), "{name}: {f:?}");
    // Every disk of an imported VHD/VHDX sits on the synthetic SCSI controller.
    ensure!(
        f.get("root").is_some_and(|r| r.starts_with("/dev/sda")),
        "{name}: root {f:?}"
    );
    ensure!(f.get("scsi").is_some_and(|s| s != "0"), "{name}: {f:?}");
    match name {
        "xfs" => ensure!(f.get("boot").map(String::as_str) == Some("xfs"), "{f:?}"),
        "azure" => {
            ensure!(
                f.get("fb").map(String::as_str) == Some("0_hyperv_fb"),
                "{name}: the screen is not hyperv_fb's: {f:?}"
            );
            // The host drives the screen from the synthetic video device, not the boot
            // framebuffer.
            let worker = worker_log(live, &id);
            ensure!(
                worker.contains("synthvid VRAM")
                    && worker.contains("synthetic video mode mode=Some"),
                "the synthetic video device never got its VRAM and mode:\n{}",
                parvis_tests::testhost::tail(&worker, 30)
            );
            // The login prompt getty draws on tty1 (a moment after the marker, maybe).
            let png = live.path("azure.png");
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                cli.ok(&["vm", "screenshot", name, &png.to_string_lossy()])?;
                let img = image::open(&png)?.to_rgba8();
                let lit = img
                    .pixels()
                    .filter(|p| p[0] > 64 || p[1] > 64 || p[2] > 64)
                    .count();
                if lit > 100 {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the screen stayed blank ({lit} lit pixels)"
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        _ => {}
    }
    cli.ok(&["vm", "stop", name])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vm = c.vm.get_vm(VmRef { vm_id: id.clone() }).await?.into_inner();
        if vm.state == VmState::Off as i32 {
            break;
        }
        ensure!(Instant::now() < deadline, "{name} did not stop: {vm:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// The VM's worker log, read inside the test host (the agent's state is there).
fn worker_log(live: &mut Live, id: &str) -> String {
    live.exec(
        &format!("cat \"$(cat state.path)/vms/{id}/worker.log\""),
        Duration::from_secs(30),
    )
    .map(|(_, out)| out)
    .unwrap_or_else(|e| format!("(cannot read the worker log: {e:#})"))
}

fn no_linux(cli: &Cli<'_>, disks: &Path) -> Result<()> {
    let d = import(cli, &disks.join("no-linux.vhdx"), "data")?;
    let why = "no Linux kernel found on the disk";
    ensure!(d["boot"]["bootable"] == false, "{d}");
    ensure!(
        d["boot"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(why)),
        "{}",
        d["boot"]
    );
    cli.ok(&["vm", "create", "--name", "data", "--disk", "data"])?;
    let (ok, _, err) = cli.run(&["vm", "start", "data"])?;
    ensure!(!ok, "a VM whose disk has no Linux started");
    ensure!(
        err.contains("disk 'data' cannot be booted: ") && err.contains(why),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_generation_2_vhdx_boots_to_systemds_multi_user_target() {
    assert_check("gen2_boots_to_multi_user");
}

#[test]
fn a_generation_1_vhdx_boots_to_systemds_multi_user_target() {
    assert_check("gen1_boots_to_multi_user");
}

#[test]
fn an_azure_fixed_vhd_boots_over_storvsc_and_shows_its_screen_through_hyperv_fb() {
    assert_check("azure_boots_over_storvsc_with_hyperv_fb");
}

#[test]
fn a_disk_with_xfs_boot_and_a_boot_loader_spec_entry_boots() {
    assert_check("xfs_boot_with_bls_boots");
}

#[test]
fn a_disk_with_no_linux_is_refused_at_import_and_at_start() {
    assert_check("no_linux_is_refused_with_the_sentence");
}
