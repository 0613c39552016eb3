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

    // --json: the new disk, as `disk list --json` shows it.
    let o = a.parvis(&["disk", "upload", path, "--json"]);
    let up: Value = serde_json::from_str(&ok(&o, "resumed upload")).unwrap();
    let id = up["id"].as_str().unwrap().to_string();
    assert_eq!(up["name"], "big.vhdx", "{up}");
    assert_eq!(up["format"], "vhdx", "{up}");
    assert_eq!(up["virtual_size"], 3u64 << 20, "{up}");
    assert_eq!(a.json(&["disk", "list", "--json"]), serde_json::json!([up]));
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
    let fixed = a.json(&[
        "disk",
        "convert",
        "big.vhdx",
        "--format",
        "vhdx",
        "--variant",
        "fixed",
        "--json",
    ]);
    assert_eq!(fixed["format"], "vhdx", "{fixed}");
    assert_eq!(fixed["variant"], "fixed", "{fixed}");
    assert_eq!(fixed["virtual_size"], 3u64 << 20, "{fixed}");
    assert_eq!(
        a.json(&["disk", "get", fixed["id"].as_str().unwrap(), "--json"])["id"],
        fixed["id"]
    );
    ok(
        &a.parvis(&["disk", "delete", fixed["id"].as_str().unwrap()]),
        "disk delete",
    );
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
fn a_file_changed_under_a_resumed_upload_never_becomes_a_disk() {
    // The CLI hashes the file as it sends it and declares the checksum after the data; on
    // resume it hashes the part the agent has from the file as it is now. A file edited in
    // between (its modification time put back, so the CLI resumes) must fail the check.
    let a = Agent::start(false);
    let img = a.dir.path().join("edited.raw");
    let mut data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&img, &data).unwrap();
    let path = img.to_str().unwrap();
    let e = fails(
        &a.parvis(&["disk", "upload", path, "--interrupt-after", "1048576"]),
        "interrupted upload",
    );
    assert!(e.contains("resume"), "{e}");
    let stamp = a.dir.path().join("stamp");
    std::fs::write(&stamp, b"").unwrap();
    let o = Command::new("touch")
        .arg("-r")
        .arg(&img)
        .arg(&stamp)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    data[1000] ^= 0xff;
    std::fs::write(&img, &data).unwrap();
    let o = Command::new("touch")
        .arg("-r")
        .arg(&stamp)
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    let o = a.parvis(&["disk", "upload", path]);
    let e = fails(&o, "resumed upload");
    assert!(e.contains("checksum mismatch"), "{e}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Resuming upload"), "{err}");
    assert_eq!(a.json(&["disk", "list", "--json"]), serde_json::json!([]));

    // The failed upload is forgotten: the next run starts again and succeeds.
    let up = a.json(&["disk", "upload", path, "--json"]);
    assert_eq!(up["name"], "edited.raw", "{up}");
    assert_eq!(up["virtual_size"], 3u64 << 20, "{up}");
    assert_eq!(a.json(&["disk", "list", "--json"]), serde_json::json!([up]));
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

/// UploadDisk on the wire: the agent decodes request bodies itself (`proto::upload_wire`),
/// so every way a client may frame the stream must land the same bytes on the disk, and
/// broken streams must end in a clear error that keeps what came before.
mod upload_wire {
    use super::Agent;

    use bytes::{BufMut, Bytes};
    use prost::Message;
    use proto::client::{self, Auth, Clients, Target};
    use proto::upload_wire::UPLOAD_DISK_PATH;
    use proto::v1::{BeginUploadRequest, UploadChunk, UploadRef, UploadState, UploadStatus};
    use sha2::{Digest, Sha256};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::service::interceptor::InterceptedService;
    use tonic::{Code, Status};

    /// Sends messages as given bytes (gRPC-framed by tonic), reads an `UploadStatus`.
    #[derive(Debug, Clone, Copy)]
    struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = UploadStatus;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> RawCodec {
            *self
        }
        fn decoder(&mut self) -> RawCodec {
            *self
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = UploadStatus;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<UploadStatus>, Status> {
            UploadStatus::decode(src)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }

    fn target(a: &Agent) -> Target {
        Target {
            addr: a.addr.clone(),
            fingerprint: a.fingerprint.clone(),
            token: a.token.clone(),
        }
    }

    /// An UploadDisk call whose messages are exactly `msgs`.
    async fn raw_upload(t: &Target, msgs: Vec<Vec<u8>>) -> Result<UploadStatus, Status> {
        let ch = client::channel(t).await.unwrap();
        let mut g =
            tonic::client::Grpc::new(InterceptedService::new(ch, Auth::new(&t.token).unwrap()));
        g.ready().await.unwrap();
        g.client_streaming(
            tonic::Request::new(tokio_stream::iter(msgs)),
            http::uri::PathAndQuery::from_static(UPLOAD_DISK_PATH),
            RawCodec,
        )
        .await
        .map(tonic::Response::into_inner)
    }

    fn string_field(n: u32, v: &str, out: &mut Vec<u8>) {
        prost::encoding::string::encode(n, &v.to_string(), out);
    }

    fn data(len: usize) -> Vec<u8> {
        let mut d: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        d[100_000..300_000].fill(0);
        d
    }

    async fn begin(c: &Clients, name: &str, data: &[u8]) -> String {
        c.disk
            .clone()
            .begin_upload(BeginUploadRequest {
                name: name.into(),
                size: data.len() as u64,
                sha256: hex::encode(Sha256::digest(data)),
            })
            .await
            .unwrap()
            .into_inner()
            .upload_id
    }

    /// Wait for the upload to end; the finished disk's bytes.
    async fn finished(a: &Agent, c: &Clients, id: &str) -> Vec<u8> {
        for _ in 0..500 {
            let s = c
                .disk
                .clone()
                .get_upload(UploadRef {
                    upload_id: id.into(),
                })
                .await
                .unwrap()
                .into_inner();
            if s.state == UploadState::Done as i32 {
                let dir = a.dir.path().join("state/disks").join(&s.disk_id);
                for e in std::fs::read_dir(&dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.extension().is_none_or(|x| x != "json") {
                        return std::fs::read(p).unwrap();
                    }
                }
                panic!("no image in {}", dir.display());
            }
            assert!(
                s.state == UploadState::Receiving as i32
                    || s.state == UploadState::Verifying as i32,
                "{s:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("upload {id} did not finish");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn every_framing_of_an_upload_lands_the_same_bytes() {
        let a = Agent::start(true);
        let t = target(&a);
        let c = client::connect(&t).await.unwrap();
        let want = data((3 << 20) + 512);

        // The zero-copy client, 1 MiB chunks.
        let id = begin(&c, "a.img", &want).await;
        let chunks: Vec<UploadChunk> = want
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, d)| UploadChunk {
                upload_id: id.clone(),
                offset: (i << 20) as u64,
                data: Bytes::copy_from_slice(d),
            })
            .collect();
        let s = c.upload_disk(tokio_stream::iter(chunks)).await.unwrap();
        assert_eq!(s.verified_offset, want.len() as u64);
        assert!(finished(&a, &c, &id).await == want);

        // tonic's own codec, odd chunk sizes, the id only in the first message.
        let id = begin(&c, "b.img", &want).await;
        let chunks: Vec<UploadChunk> = want
            .chunks(777_777)
            .enumerate()
            .map(|(i, d)| UploadChunk {
                upload_id: if i == 0 { id.clone() } else { String::new() },
                offset: 0,
                data: Bytes::copy_from_slice(d),
            })
            .collect();
        c.disk
            .clone()
            .upload_disk(tokio_stream::iter(chunks))
            .await
            .unwrap();
        assert!(finished(&a, &c, &id).await == want);

        // Fields in reverse order, then an unknown field before the data, then an empty
        // message: all valid protobuf.
        let id = begin(&c, "c.img", &want).await;
        let mut m1 = Vec::new();
        prost::encoding::bytes::encode(3, &want[..100_001].to_vec(), &mut m1);
        prost::encoding::uint64::encode(2, &0, &mut m1);
        string_field(1, &id, &mut m1);
        let mut m2 = Vec::new();
        prost::encoding::fixed64::encode(9, &7, &mut m2);
        prost::encoding::bytes::encode(3, &want[100_001..].to_vec(), &mut m2);
        let s = raw_upload(&t, vec![m1, m2, Vec::new()]).await.unwrap();
        assert_eq!(s.verified_offset, want.len() as u64);
        assert!(finished(&a, &c, &id).await == want);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn broken_upload_streams_end_in_an_error_and_keep_what_came_before() {
        let a = Agent::start(false);
        let t = target(&a);
        let c = client::connect(&t).await.unwrap();
        let want = data(1 << 20);
        let id = begin(&c, "d.img", &want).await;

        // Field number 0 in the first message.
        let e = raw_upload(&t, vec![vec![0x00, 0x01]]).await.unwrap_err();
        assert!(e.message().contains("malformed"), "{e:?}");

        // 512 good bytes, then a message whose data field claims more than it holds.
        let first = UploadChunk {
            upload_id: id.clone(),
            offset: 0,
            data: Bytes::copy_from_slice(&want[..512]),
        }
        .encode_to_vec();
        let mut bad = Vec::new();
        prost::encoding::encode_key(3, prost::encoding::WireType::LengthDelimited, &mut bad);
        prost::encoding::encode_varint(1 << 20, &mut bad);
        bad.extend_from_slice(&want[512..4096]);
        let e = raw_upload(&t, vec![first, bad]).await.unwrap_err();
        assert!(e.message().contains("malformed"), "{e:?}");
        let s = c
            .disk
            .clone()
            .get_upload(UploadRef {
                upload_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.verified_offset, 512, "{s:?}");

        // Without the token nothing is taken.
        let bad_token = client::clients(client::channel(&t).await.unwrap(), "nope").unwrap();
        let e = bad_token
            .upload_disk(tokio_stream::iter(vec![UploadChunk {
                upload_id: id.clone(),
                offset: 512,
                data: Bytes::copy_from_slice(&want[512..1024]),
            }]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

        // The upload goes on from where the broken stream left it.
        let rest = UploadChunk {
            upload_id: id.clone(),
            offset: 512,
            data: Bytes::copy_from_slice(&want[512..]),
        };
        c.upload_disk(tokio_stream::iter(vec![rest])).await.unwrap();
        assert!(finished(&a, &c, &id).await == want);
    }
}
