//! README's first command as a new user runs it, under Xvfb: `demo` builds what it needs,
//! starts the agent with the demo VM (in the test host where this machine's KVM cannot run
//! it), and opens the console on it. The window is saved once the guest's shell is up
//! (`tests/output/demo-window.png`, with what it shows in `demo-window.json`): the host
//! must be online with the demo VM running, and the VM's screen must not be black. Then
//! closing the window must leave nothing running.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

fn output_dir() -> PathBuf {
    parvis_tests::build::workspace().join("tests/output")
}

/// Processes whose command line mentions `what` (other than this test's own).
fn processes_with(what: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(what) {
            found.push(format!("{pid}: {cmd}"));
        }
    }
    found
}

#[test]
fn readmes_first_command_opens_the_console_on_the_running_demo_vm() {
    let shot = output_dir().join("demo-window.png");
    let report = shot.with_extension("json");
    std::fs::create_dir_all(output_dir()).unwrap();
    let _ = std::fs::remove_file(&shot);
    let _ = std::fs::remove_file(&report);
    let t0 = Instant::now();
    let out = Command::new("timeout")
        .args(["1500", "xvfb-run", "-a", "-s", "-screen 0 1440x960x24"])
        .arg(env!("CARGO_BIN_EXE_demo"))
        .arg("--window-screenshot")
        .arg(&shot)
        .env("LIBGL_ALWAYS_SOFTWARE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run xvfb-run ({e}); install the packages in tests/setup-host.sh")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the demo failed ({}):\n{stderr}",
        out.status
    );
    eprintln!(
        "demo: picture after {:.0} s (builds included when cold)",
        t0.elapsed().as_secs_f64()
    );
    assert!(shot.is_file(), "no screenshot:\n{stderr}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("the report beside the PNG"))
            .unwrap();
    let host = &r["hosts"][0];
    assert_eq!(host["name"], "demo-host", "{r}");
    assert_eq!(host["status"], "online", "{r}");
    assert!(
        host["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "demo" && v["state"] == "Running"),
        "{r}"
    );
    let screen = &r["consoles"][0];
    assert_eq!(screen["vm"], "demo on demo-host", "{r}");
    assert_eq!(
        (screen["width"].as_u64(), screen["height"].as_u64()),
        (Some(1024), Some(768))
    );
    // Text on black: a little of the screen is lit, and it is not blank.
    let lit = screen["lit_fraction"].as_f64().unwrap();
    assert!(lit > 0.002, "the VM's screen is black: {r}");
    // Closing the window ended everything the demo started: the test host (QEMU runs from
    // the demo's share) and the console (started with the demo's hosts file) both name a
    // `parvis-demo-` folder; the agent and the VM's worker ran inside the test host.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let left = processes_with("parvis-demo-");
    assert!(left.is_empty(), "still running after the demo: {left:?}");
}
