//! `parvis` against a real `parvis-agent` (worker: /bin/false, so VMs never run): hosts,
//! uploads, VMs, errors, and TLS pinning.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running agent in its own state directory.
struct Agent {
    child: Child,
    addr: String,
    token: String,
    fingerprint: Option<String>,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(tls: bool) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // A boot image VMs can name ("default"); it is never booted.
        std::fs::create_dir_all(state.join("boot/default")).unwrap();
        std::fs::write(state.join("boot/default/kernel"), b"not a kernel").unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parvis-agent"));
        cmd.arg("--state-dir")
            .arg(&state)
            .args(["--listen", "127.0.0.1:0", "--worker", "/bin/false"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if tls {
            cmd.arg("--tls");
        }
        let mut child = cmd.spawn().expect("parvis-agent starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let (mut addr, mut token, mut fingerprint) = (None, None, None);
        while token.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| {
                    panic!(
                        "the agent printed no token; its log:\n{}",
                        std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
                    )
                });
            if let Some(rest) = line.split(" listening on ").nth(1) {
                addr = rest.split_whitespace().next().map(str::to_string);
            } else if let Some(fp) = line.strip_prefix("TLS certificate SHA-256 fingerprint: ") {
                fingerprint = Some(fp.trim().to_string());
            } else if let Some(t) = line.strip_prefix("token: ") {
                token = Some(t.trim().to_string());
            }
        }
        assert_eq!(fingerprint.is_some(), tls);
        Agent {
            child,
            addr: addr.expect("the agent printed its address"),
            token: token.unwrap(),
            fingerprint,
            dir,
        }
    }

    /// `parvis` with no agent in the environment and a private hosts file and cache.
    fn bare(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parvis"));
        cmd.args(args)
            .env_remove("PARVIS_ADDR")
            .env_remove("PARVIS_TOKEN")
            .env_remove("PARVIS_FINGERPRINT")
            .env_remove("PARVIS_HOST")
            .env_remove("PARVIS_CACHE_DIR")
            .env("PARVIS_CONFIG", self.dir.path().join("hosts.json"))
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// `parvis` pointed at this agent by PARVIS_ADDR/PARVIS_TOKEN(/PARVIS_FINGERPRINT).
    fn parvis(&self, args: &[&str]) -> Output {
        let mut cmd = self.bare(args);
        cmd.env("PARVIS_ADDR", &self.addr)
            .env("PARVIS_TOKEN", &self.token);
        if let Some(fp) = &self.fingerprint {
            cmd.env("PARVIS_FINGERPRINT", fp);
        }
        cmd.output().expect("parvis runs")
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = ok(&self.parvis(args), &args.join(" "));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A failure with exit status 1 and one `parvis: error:` line; returns that line.
fn fails(o: &Output, what: &str) -> String {
    assert_eq!(o.status.code(), Some(1), "{what} should fail: {}", text(o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("parvis: error: "))
        .collect();
    assert_eq!(lines.len(), 1, "{what}: one error line expected: {err}");
    lines[0].to_string()
}

fn qemu_vhdx(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx"])
        .arg(&p)
        .arg(size)
        .output()
        .expect("qemu-img is needed for these tests (tests/setup-host.sh installs it)");
    assert!(o.status.success(), "qemu-img: {}", text(&o));
    p
}

#[test]
fn vms_and_disks_through_the_api() {
    let a = Agent::start(false);
    assert_eq!(a.json(&["vm", "list", "--json"]), serde_json::json!([]));

    // Upload a VHDX; the new disk's id is the only thing on stdout.
    let img = qemu_vhdx(a.dir.path(), "web.vhdx", "64M");
    let out = ok(
        &a.parvis(&["disk", "upload", img.to_str().unwrap()]),
        "upload",
    );
    let disk_id = out.trim().to_string();
    assert_eq!(disk_id.len(), 12, "{out}");
    let disks = a.json(&["disk", "list", "--json"]);
    let disks = disks.as_array().unwrap();
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert_eq!(disks[0]["id"], disk_id.as_str());
    assert_eq!(disks[0]["name"], "web.vhdx");
    assert_eq!(disks[0]["format"], "vhdx");
    assert_eq!(disks[0]["virtual_size"], 64u64 << 20);
    let d = a.json(&["disk", "get", "web.vhdx", "--json"]);
    assert_eq!(d["id"], disk_id.as_str());

    // The agent's validation reaches the user with the field's name.
    let e = fails(
        &a.parvis(&["vm", "create", "--name", "web", "--cpus", "0"]),
        "vm create --cpus 0",
    );
    assert!(e.contains("spec.cpus"), "{e}");

    let out = ok(
        &a.parvis(&[
            "vm",
            "create",
            "--name",
            "web",
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--disk",
            "web.vhdx,ro",
            "--boot-image",
            "default",
            "--display",
            "800x600",
        ]),
        "vm create",
    );
    assert!(out.contains("web"), "{out}");
    let vms = a.json(&["vm", "list", "--json"]);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    let vm = &vms[0];
    assert_eq!(vm["name"], "web");
    assert_eq!(vm["state"], "off");
    assert_eq!(vm["cpus"], 2);
    assert_eq!(vm["memory_bytes"], 256u64 << 20);
    assert_eq!(vm["disks"][0]["disk_id"], disk_id.as_str());
    assert_eq!(vm["disks"][0]["read_only"], true);
    assert_eq!(vm["display_width"], 800);
    let human = ok(&a.parvis(&["vm", "list"]), "vm list");
    assert!(human.contains("web") && human.contains("off"), "{human}");

    // The worker is /bin/false: starting fails cleanly and the VM is not left running.
    let e = fails(&a.parvis(&["vm", "start", "web"]), "vm start");
    assert!(e.contains("start"), "{e}");
    let vm = a.json(&["vm", "get", "web", "--json"]);
    let state = vm["state"].as_str().unwrap();
    assert!(state == "crashed" || state == "off", "{vm}");

    // Names resolve; unknown names are errors; so is a disk a VM uses.
    let e = fails(&a.parvis(&["vm", "get", "nope"]), "vm get nope");
    assert!(e.contains("nope"), "{e}");
    ok(&a.parvis(&["vm", "delete", "web"]), "vm delete");
    assert_eq!(a.json(&["vm", "list", "--json"]), serde_json::json!([]));
}

#[test]
fn uploads_resume_and_disks_convert_on_the_host() {
    let a = Agent::start(false);
    // A VHDX with 3 MiB of data, so the file is a few MiB long.
    let img = a.dir.path().join("big.vhdx");
    let raw = a.dir.path().join("data.raw");
    std::fs::write(&raw, vec![0x5au8; 3 << 20]).unwrap();
    let o = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "vhdx"])
        .arg(&raw)
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let size = std::fs::metadata(&img).unwrap().len();
    assert!(size > 2 << 20, "{size}");
    let path = img.to_str().unwrap();

    let e = fails(
        &a.parvis(&["disk", "upload", path, "--interrupt-after", "1048576"]),
        "interrupted upload",
    );
    assert!(e.contains("resume"), "{e}");
    assert!(a.dir.path().join("cache/parvis/uploads.json").exists());
    assert_eq!(a.json(&["disk", "list", "--json"]), serde_json::json!([]));

    let o = a.parvis(&["disk", "upload", path]);
    let id = ok(&o, "resumed upload").trim().to_string();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Resuming upload"), "{err}");
    assert!(err.contains("1.0 MiB"), "{err}");
    let cache = std::fs::read_to_string(a.dir.path().join("cache/parvis/uploads.json")).unwrap();
    assert!(
        !cache.contains(&id) && !cache.contains("big.vhdx"),
        "{cache}"
    );

    // Convert remotely (one argument + --format); the local two-path form is untouched.
    let out = ok(
        &a.parvis(&[
            "disk", "convert", "big.vhdx", "--format", "vhd", "--name", "big-copy",
        ]),
        "remote convert",
    );
    let new_id = out.trim().to_string();
    assert_ne!(new_id, id);
    let d = a.json(&["disk", "get", &new_id, "--json"]);
    assert_eq!(d["name"], "big-copy");
    assert_eq!(d["format"], "vhd");
    assert_eq!(d["virtual_size"], 3u64 << 20, "{d}");
    let e = fails(
        &a.parvis(&["disk", "convert", "big.vhdx"]),
        "convert without --format",
    );
    assert!(e.contains("--format"), "{e}");
    let tasks = a.json(&["disk", "tasks", "--json"]);
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] == "succeeded"),
        "{tasks}"
    );
    ok(&a.parvis(&["disk", "delete", "big-copy"]), "disk delete");
    assert_eq!(
        a.json(&["disk", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn bad_tokens_and_missing_agents_are_one_clear_line() {
    let a = Agent::start(false);
    let o = a
        .bare(&["vm", "list"])
        .env("PARVIS_ADDR", &a.addr)
        .env("PARVIS_TOKEN", "pvs_wrong")
        .output()
        .unwrap();
    let e = fails(&o, "wrong token");
    assert!(e.contains("token"), "{e}");

    let o = a
        .bare(&["vm", "list"])
        .env("PARVIS_ADDR", "127.0.0.1:1")
        .env("PARVIS_TOKEN", "x")
        .output()
        .unwrap();
    let e = fails(&o, "no agent");
    assert!(e.contains("127.0.0.1:1"), "{e}");

    let e = fails(
        &a.bare(&["vm", "list"]).output().unwrap(),
        "nothing configured",
    );
    assert!(e.contains("parvis host add"), "{e}");
}

#[test]
fn tls_agents_are_pinned_by_fingerprint() {
    let a = Agent::start(true);
    let fp = a.fingerprint.clone().unwrap();

    // Env only: PARVIS_FINGERPRINT selects TLS.
    assert_eq!(a.json(&["vm", "list", "--json"]), serde_json::json!([]));

    // A wrong fingerprint is refused and nothing is saved.
    let wrong: String = fp
        .chars()
        .map(|c| {
            if c == ':' {
                c
            } else if c == '0' {
                '1'
            } else {
                '0'
            }
        })
        .collect();
    let o = a
        .bare(&[
            "host",
            "add",
            "evil",
            &a.addr,
            "--token",
            &a.token,
            "--fingerprint",
            &wrong,
        ])
        .output()
        .unwrap();
    let e = fails(&o, "host add with a wrong fingerprint");
    assert!(e.contains("fingerprint"), "{e}");
    assert!(!a.dir.path().join("hosts.json").exists());

    // Without a fingerprint or a terminal, trust on first use refuses unless --yes.
    let o = a
        .bare(&["host", "add", "lab", &a.addr, "--token", &a.token])
        .output()
        .unwrap();
    let e = fails(&o, "host add without a terminal");
    assert!(e.contains("--fingerprint"), "{e}");

    // The right fingerprint (colons and case don't matter).
    let loose = fp.replace(':', "").to_lowercase();
    let o = a
        .bare(&[
            "host",
            "add",
            "lab",
            &a.addr,
            "--token",
            &a.token,
            "--fingerprint",
            &loose,
        ])
        .output()
        .unwrap();
    let out = ok(&o, "host add");
    assert!(out.contains("lab"), "{out}");
    let cfg = a.dir.path().join("hosts.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let list = ok(
        &a.bare(&["host", "list", "--json"]).output().unwrap(),
        "host list",
    );
    assert!(
        !list.contains(&a.token),
        "tokens stay out of listings: {list}"
    );
    let hosts: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(hosts[0]["name"], "lab");
    assert_eq!(hosts[0]["fingerprint"], fp.as_str());

    // The saved host is the default, and --host names it.
    let o = a.bare(&["vm", "list", "--json"]).output().unwrap();
    assert_eq!(ok(&o, "vm list (default host)").trim(), "[]");
    let o = a
        .bare(&["--host", "lab", "host", "info", "--json"])
        .output()
        .unwrap();
    let info: Value = serde_json::from_str(&ok(&o, "host info")).unwrap();
    assert_eq!(info["api_version"], "parvis.v1");
    let e = fails(
        &a.bare(&["--host", "other", "vm", "list"]).output().unwrap(),
        "unknown host",
    );
    assert!(e.contains("other"), "{e}");

    // --yes trusts what the agent presents (for scripts that checked it elsewhere).
    let o = a
        .bare(&["host", "add", "lab2", &a.addr, "--token", &a.token, "--yes"])
        .output()
        .unwrap();
    ok(&o, "host add --yes");
    ok(
        &a.bare(&["host", "remove", "lab2"]).output().unwrap(),
        "host remove",
    );
    let list = ok(
        &a.bare(&["host", "list", "--json"]).output().unwrap(),
        "host list",
    );
    assert!(!list.contains("lab2"), "{list}");
}
