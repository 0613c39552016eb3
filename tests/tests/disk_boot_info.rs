//! What a disk boots, end to end on this machine (no test host: nothing is booted): a real
//! `parvis-agent` whose worker program is the real `parvis-worker`, so each imported disk is
//! read by the worker's confined reader. Through the `parvis` CLI: the disk's partitions,
//! distribution and boot entries (or the sentence saying why it cannot boot) after an
//! upload; a VM made from an imported disk boots that disk by default, one made from a disk
//! created empty boots the boot image; a start of a VM whose disk cannot boot, or that asks
//! for a boot entry the disk does not have, is refused with that sentence; `vm boot` picks
//! the entry or the boot image.
//! Run: `cargo test -p parvis-tests --test disk_boot_info`.

use std::path::Path;
use std::time::{Duration, Instant};

use proto::client::Target;
use serde_json::Value;

fn cli(target: &Target, args: &[&str]) -> (bool, String, String) {
    parvis_tests::client::parvis(target, args).unwrap_or_else(|e| panic!("{e:#}"))
}

fn ok(target: &Target, args: &[&str]) -> String {
    let (ok, out, err) = cli(target, args);
    assert!(ok, "parvis {args:?} failed: {err}{out}");
    out
}

fn json(target: &Target, args: &[&str]) -> Value {
    serde_json::from_str(&ok(target, args)).unwrap()
}

/// Upload `file` as `name` and wait until the agent has read its boot entries.
fn import(target: &Target, file: &Path, name: &str) -> Value {
    ok(
        target,
        &[
            "disk",
            "upload",
            file.to_str().unwrap(),
            "--name",
            name,
            "-q",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = json(target, &["disk", "get", name, "--json"]);
        if d["boot"]["inspected"] == true {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never read the boot entries of {name}: {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn imported_disks_show_what_they_boot_and_vms_made_from_them_boot_it() {
    let dir = tempfile::tempdir().unwrap();
    parvis_tests::boot_disks::make(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let art = parvis_tests::build::artifacts().unwrap_or_else(|e| panic!("{e:#}"));
    let release = std::fs::read_to_string(art.images.join("kernel-release"))
        .unwrap()
        .trim()
        .to_string();
    let state = dir.path().join("state");
    parvis_tests::agent_proc::placeholder_boot_image(&state).unwrap();
    let worker = art.bin.join("parvis-worker");
    let log = dir.path().join("agent.log");
    let (mut agent, target) = parvis_tests::agent_proc::spawn_agent(
        &state,
        &["--worker", worker.to_str().unwrap()],
        Some(&log),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let result = std::panic::catch_unwind(|| {
        let t = &target;
        // Generation 2: GPT, ESP + ext4, grubenv saves the second entry.
        let g2 = import(t, &dir.path().join("gen2.vhdx"), "gen2");
        let b = &g2["boot"];
        assert_eq!(b["bootable"], true, "{b}");
        assert_eq!(b["partition_table"], "GPT");
        assert_eq!(b["os"], "Debian GNU/Linux 12 (bookworm)");
        let vols: Vec<(String, String)> = b["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["kind"].as_str().unwrap().to_string(),
                    v["file_system"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            vols,
            [
                ("EFI system".to_string(), "vfat".to_string()),
                ("Linux".to_string(), "ext4".to_string())
            ]
        );
        assert_eq!(b["volumes"][1]["uuid"], parvis_tests::boot_disks::ROOT);
        assert_eq!(b["entries"].as_array().unwrap().len(), 2, "{b}");
        assert_eq!(b["default_entry"], 1, "{b}");
        let e = &b["entries"][1];
        assert_eq!(e["version"], release.as_str());
        assert_eq!(e["kernel"], format!("partition 2: /boot/vmlinuz-{release}"));
        assert!(
            e["cmdline"]
                .as_str()
                .unwrap()
                .ends_with("parvis.test=nproc"),
            "{e}"
        );
        // The human form says the same.
        let text = ok(t, &["disk", "get", "gen2"]);
        assert!(
            text.contains("boots:            Debian GNU/Linux 12 (bookworm)")
                && text.contains(&format!("Debian GNU/Linux, with Linux {release} (default)")),
            "{text}"
        );

        // Generation 1: MBR, Debian's links.
        let g1 = import(t, &dir.path().join("gen1.vhd"), "gen1");
        assert_eq!(g1["boot"]["bootable"], true, "{g1}");
        assert_eq!(g1["boot"]["partition_table"], "MBR");
        assert!(
            g1["boot"]["entries"][0]["cmdline"]
                .as_str()
                .unwrap()
                .contains("parvis.test=nproc"),
            "{g1}"
        );

        // Nothing to boot: the sentence, at import …
        let empty = import(t, &dir.path().join("empty.raw"), "empty");
        assert_eq!(empty["boot"]["bootable"], false);
        let why = "the disk holds no file system: it looks empty";
        assert_eq!(empty["boot"]["reason"], why);

        // A VM made from an imported disk boots it; from a disk made empty here, the image.
        ok(t, &["vm", "create", "--name", "g2", "--disk", "gen2"]);
        let v = json(t, &["vm", "get", "g2", "--json"]);
        assert_eq!(
            (&v["boot_source"], &v["boot_entry"]),
            (&"disk".into(), &"".into())
        );
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async {
                let mut c = proto::client::connect(t).await?;
                c.disk
                    .create_disk(proto::v1::CreateDiskRequest {
                        name: "blank".into(),
                        format: proto::v1::DiskFormat::Vhdx as i32,
                        variant: proto::v1::DiskVariant::Dynamic as i32,
                        size: 16 << 20,
                        logical_sector_size: 0,
                    })
                    .await?;
                anyhow::Ok(())
            })
            .unwrap();
        ok(t, &["vm", "create", "--name", "blank", "--disk", "blank"]);
        let v = json(t, &["vm", "get", "blank", "--json"]);
        assert_eq!(v["boot_source"], "image", "{v}");

        // … and at start.
        ok(t, &["vm", "create", "--name", "nothing", "--disk", "empty"]);
        let (started, _, err) = cli(t, &["vm", "start", "nothing"]);
        assert!(!started);
        assert!(
            err.contains(&format!("disk 'empty' cannot be booted: {why}")),
            "{err}"
        );

        // Picking entries: one the disk has, one it does not, then back to the image.
        ok(t, &["vm", "boot", "g2", "--entry", &release]);
        let v = json(t, &["vm", "get", "g2", "--json"]);
        assert_eq!(v["boot_entry"], release.as_str());
        ok(t, &["vm", "boot", "g2", "--entry", "5.10.0-99-amd64"]);
        let (started, _, err) = cli(t, &["vm", "start", "g2"]);
        assert!(!started);
        assert!(
            err.contains("disk 'gen2' has no boot entry '5.10.0-99-amd64'; its entries: ")
                && err.contains(&release),
            "{err}"
        );
        ok(t, &["vm", "boot", "g2", "--from", "image"]);
        let v = json(t, &["vm", "get", "g2", "--json"]);
        assert_eq!(
            (&v["boot_source"], &v["boot_entry"]),
            (&"image".into(), &"".into())
        );
        assert_eq!(v["boot_image"], "default");
    });
    let _ = agent.kill();
    let _ = agent.wait();
    if let Err(e) = result {
        eprintln!(
            "agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
}
