//! A real `parvis-agent` on this machine (TLS on loopback) as a foreign client meets it:
//! Python grpcio with stubs generated from the `.proto` files alone (the scripts are in
//! `tests/python/`; `tests/setup-host.sh` installs grpcio).
//!
//! - Bad requests get the status codes gRPC's conventions give them, with short messages.
//! - The agent is killed at every step of turning acknowledged uploads into disks (its fault
//!   points, and kill -9 at random moments, again during the restart), round after round:
//!   every upload ends as exactly one disk holding exactly its bytes, and `GetUpload` reports
//!   it DONE with that disk after every restart.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ lives in the workspace")
        .to_path_buf()
}

/// Python stubs for the public API, generated into `dir`.
fn generate_stubs(dir: &Path) {
    let schema = workspace().join("proto/schema");
    let out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", schema.display()))
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .args([
            "parvis/v1/common.proto",
            "parvis/v1/host.proto",
            "parvis/v1/vm.proto",
            "parvis/v1/console.proto",
            "parvis/v1/disk.proto",
        ])
        .current_dir(&schema)
        .output()
        .expect("cannot run python3 (tests/setup-host.sh installs what these tests need)");
    assert!(
        out.status.success(),
        "python3 -m grpc_tools.protoc failed (is grpcio-tools installed? tests/setup-host.sh \
         installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `tests/python/upload_faults.py` with `args` after the agent and state arguments;
/// returns its stdout.
fn run_script(rounds: u32, seed: u64, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    generate_stubs(dir.path());
    let state = dir.path().join("state");
    let out = Command::new("python3")
        .arg(workspace().join("tests/python/upload_faults.py"))
        .arg(env!("CARGO_BIN_EXE_parvis-agent"))
        .arg(&state)
        .arg(rounds.to_string())
        .arg(seed.to_string())
        .args(extra)
        .env("PYTHONPATH", dir.path())
        .output()
        .expect("cannot run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "the script failed (seed {seed}):\n{stdout}\n{}\nagent log (last lines):\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    stdout
}

#[test]
fn bad_requests_get_conventional_codes_and_short_messages() {
    let out = run_script(0, 1, &["bad-requests"]);
    assert!(out.contains("BAD-REQUESTS-OK"), "{out}");
}

#[test]
fn killing_the_agent_while_it_installs_uploads_never_loses_or_doubles_one() {
    let seed = std::env::var("PARVIS_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    let rounds = 60;
    let out = run_script(rounds, seed, &[]);
    eprintln!("{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAULTS "))
        .unwrap_or_else(|| panic!("no counts printed:\n{out}"));
    let count = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    assert_eq!(count("rounds"), u64::from(rounds), "{line}");
    assert_eq!(count("losses"), 0, "{line}");
    // Every fault point was reached (6 points, 3/4 of the rounds) and some kills were random.
    assert_eq!(count("fault_point_kills"), 45, "{line}");
    assert_eq!(count("random_kills"), 15, "{line}");
    // After round r, all r+1 uploads so far are checked: 60*61/2.
    assert_eq!(count("uploads_checked"), 1830, "{line}");
    assert_eq!(count("disks_checked"), 1830, "{line}");
}

#[test]
fn a_first_start_with_stdout_closed_fails_cleanly_and_keeps_no_unseen_token() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let agent = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_parvis-agent"));
        c.arg("--state-dir")
            .arg(&state)
            .args(["--listen", "127.0.0.1:0", "--log", "warn"]);
        c
    };
    // `parvis-agent | true`: the reading end is gone before the agent prints.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = agent()
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("standard output is closed"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line says why: {err}");
    assert!(
        !state.join("secrets/token.sha256").exists(),
        "a token nobody saw was kept"
    );
    // With its output visible, the next start shows a token.
    let mut child = agent()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let token = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("token: ").map(str::to_string));
    let _ = child.kill();
    let _ = child.wait();
    assert!(token.is_some_and(|t| t.starts_with("pvs_")));
    assert!(state.join("secrets/token.sha256").exists());
}
