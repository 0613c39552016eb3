//! Disk upload throughput: a real `parvis-agent` on loopback receiving a file through
//! `DiskService.UploadDisk`, against two peers on the same filesystem: copying the file with
//! `cp` + `sync` (through the page cache), and `dd` with direct writes and a final `fsync`
//! (what the disk alone allows).
//!
//! Each upload is measured twice over: with TLS (what a console or CLI on another machine
//! gets, there the agent always uses TLS) and in plaintext (how the agent listens on
//! loopback by default, for the CLI on the host itself). The client shares this machine's
//! cores with the agent either way.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};
use proto::client;
use proto::v1::{BeginUploadRequest, TaskRef, TaskState, UploadChunk, UploadRef, UploadState};
use sha2::{Digest, Sha256};

use crate::bench_support::ok;

/// One upload's figures.
#[derive(Debug, Clone)]
pub struct UploadRun {
    /// Until the agent reported the disk usable (hash + structure check included).
    pub upload_secs: f64,
    /// Streaming alone (until the agent answered the stream).
    pub stream_secs: f64,
    /// CPU seconds the agent and this client used during the upload.
    pub cpu_agent: f64,
    pub cpu_client: f64,
}

/// `parvis disk upload FILE`, as a user runs it: the stream (the CLI hashes the file as it
/// reads it), the checksum declared after the data, and the agent's verification.
#[derive(Debug, Clone)]
pub struct CliRun {
    pub secs: f64,
    /// CPU seconds of the CLI and of the agent.
    pub cpu_cli: f64,
    pub cpu_agent: f64,
}

/// Uploads over one kind of connection.
#[derive(Debug)]
pub struct Transport {
    pub tls: bool,
    /// Each upload, to a fresh agent.
    pub runs: Vec<UploadRun>,
    /// The same file through the CLI, to a fresh agent.
    pub cli: CliRun,
}

impl Transport {
    /// The run with the median time until the disk was usable.
    pub fn median(&self) -> &UploadRun {
        let mut order: Vec<&UploadRun> = self.runs.iter().collect();
        order.sort_by(|a, b| a.upload_secs.total_cmp(&b.upload_secs));
        order[order.len() / 2]
    }

    fn label(&self) -> &'static str {
        if self.tls {
            "TLS (from another machine)"
        } else {
            "plaintext (the loopback default, CLI on the host)"
        }
    }
}

/// Measured figures.
#[derive(Debug)]
pub struct UploadResult {
    pub bytes: u64,
    /// With TLS, then in plaintext.
    pub transports: Vec<Transport>,
    pub cp_secs: f64,
    /// `dd bs=4M oflag=direct conv=fsync` of the same file.
    pub dd_secs: f64,
    /// The 1, 5 and 15 minute load averages before the uploads and after the peers.
    pub load_before: String,
    pub load_after: String,
}

fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run `sh -c cmd` after a `sync`, and time it.
fn timed_shell(cmd: &str) -> Result<f64> {
    let _ = Command::new("sync").status();
    let start = Instant::now();
    let ok = Command::new("sh").arg("-c").arg(cmd).status()?.success();
    let secs = start.elapsed().as_secs_f64();
    if !ok {
        bail!("'{cmd}' failed");
    }
    Ok(secs)
}

/// Upload a `gib` GiB raw image `runs` times, each to a fresh agent in `dir`, then copy it
/// with the peers.
pub fn run(dir: &Path, gib: u64, runs: usize) -> Result<UploadResult> {
    let file = dir.join("upload.raw");
    let size = gib << 30;
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file)?);
        let block = crate::pattern(1 << 20, 7);
        for i in 0..(size >> 20) {
            let mut b = block.clone();
            b[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&b)?;
        }
        f.flush()?;
    }
    let data = bytes::Bytes::from(std::fs::read(&file)?);
    let sha = hex::encode(Sha256::digest(&data));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let load_before = load_average();
    let mut transports = Vec::new();
    for tls in [true, false] {
        let mut out = Vec::new();
        for _ in 0..runs.max(1) {
            out.push(upload_once(&rt, dir, data.clone(), &sha, tls)?);
        }
        transports.push(Transport {
            tls,
            runs: out,
            cli: cli_once(dir, &file, size, tls)?,
        });
    }
    drop(data);
    let copy = dir.join("copy.raw");
    let cp_secs = timed_shell(&format!(
        "cp '{}' '{}' && sync",
        file.display(),
        copy.display()
    ))?;
    let _ = std::fs::remove_file(&copy);
    let dd_secs = timed_shell(&format!(
        "dd if='{}' of='{}' bs=4M oflag=direct conv=fsync status=none",
        file.display(),
        copy.display()
    ))?;
    let _ = std::fs::remove_file(&copy);
    let _ = std::fs::remove_file(&file);
    Ok(UploadResult {
        bytes: size,
        transports,
        cp_secs,
        dd_secs,
        load_before,
        load_after: load_average(),
    })
}

/// One upload of `data` to a fresh agent.
fn upload_once(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    data: bytes::Bytes,
    sha: &str,
    tls: bool,
) -> Result<UploadRun> {
    let state = dir.join("agent-state");
    let (mut agent, target) =
        crate::agent_proc::spawn_agent_on(&state, &["--worker", "/bin/false"], None, tls)?;
    let size = data.len() as u64;
    let cpu0 = [agent.id(), std::process::id()].map(crate::fb_bench::cpu_secs);
    let timed = rt.block_on(async {
        let c = client::connect(&target).await?;
        let start = Instant::now();
        let st = c
            .disk
            .clone()
            .begin_upload(BeginUploadRequest {
                name: "bench".into(),
                size,
                sha256: sha.to_string(),
            })
            .await?
            .into_inner();
        let id = st.upload_id.clone();
        let chunk = 1usize << 20;
        let msgs = (0..data.len().div_ceil(chunk)).map(move |i| UploadChunk {
            upload_id: if i == 0 { id.clone() } else { String::new() },
            offset: (i * chunk) as u64,
            data: data.slice(i * chunk..((i + 1) * chunk).min(data.len())),
        });
        let sent = c.upload_disk(tokio_stream::iter(msgs)).await?;
        let stream_secs = start.elapsed().as_secs_f64();
        // Follow the verification task, as the CLI does, until it ends.
        if sent.state == UploadState::Verifying as i32 {
            let mut watch = c
                .disk
                .clone()
                .watch_task(TaskRef {
                    task_id: sent.task_id.clone(),
                })
                .await?
                .into_inner();
            while let Some(t) = watch.message().await? {
                if t.state != TaskState::Running as i32 {
                    break;
                }
            }
        }
        let end = start.elapsed().as_secs_f64();
        let st = c
            .disk
            .clone()
            .get_upload(UploadRef {
                upload_id: sent.upload_id.clone(),
            })
            .await?
            .into_inner();
        if st.state != UploadState::Done as i32 {
            bail!("upload ended as {st:?}");
        }
        Ok::<_, anyhow::Error>((end, stream_secs))
    });
    let cpu1 = [agent.id(), std::process::id()].map(crate::fb_bench::cpu_secs);
    let _ = agent.kill();
    let _ = agent.wait();
    // The agent's copy of the image goes: the next run and the peers get the same space.
    let _ = std::fs::remove_dir_all(&state);
    let (upload_secs, stream_secs) = timed?;
    Ok(UploadRun {
        upload_secs,
        stream_secs,
        cpu_agent: cpu1[0] - cpu0[0],
        cpu_client: cpu1[1] - cpu0[1],
    })
}

/// `parvis disk upload FILE --json` to a fresh agent in `dir`; checks that the new disk is
/// `size` bytes.
fn cli_once(dir: &Path, file: &Path, size: u64, tls: bool) -> Result<CliRun> {
    use rustix::process::{Pid, WaitId, WaitIdOptions, waitid};
    let art = crate::build::artifacts()?;
    let state = dir.join("agent-state");
    let (mut agent, target) =
        crate::agent_proc::spawn_agent_on(&state, &["--worker", "/bin/false"], None, tls)?;
    let agent0 = crate::fb_bench::cpu_secs(agent.id());
    let mut cmd = Command::new(art.bin.join("parvis"));
    cmd.args(["disk", "upload", "-q", "--json"])
        .arg(file)
        .env("PARVIS_ADDR", &target.addr)
        .env("PARVIS_TOKEN", &target.token)
        // The CLI's resume records and hosts stay in the bench's folder.
        .env("XDG_CACHE_HOME", dir.join("cli-cache"))
        .env("XDG_CONFIG_HOME", dir.join("cli-config"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(fp) = &target.fingerprint {
        cmd.env("PARVIS_FINGERPRINT", fp);
    }
    let start = Instant::now();
    let child = cmd.spawn()?;
    // Wait for the exit without reaping, so the CLI's CPU times can still be read.
    let waited = waitid(
        WaitId::Pid(Pid::from_child(&child)),
        WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
    );
    let secs = start.elapsed().as_secs_f64();
    let cpu_cli = crate::fb_bench::cpu_secs(child.id());
    let cpu_agent = crate::fb_bench::cpu_secs(agent.id()) - agent0;
    let out = child.wait_with_output()?;
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&state);
    waited?;
    if !out.status.success() {
        bail!(
            "parvis disk upload failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let disk: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if disk["virtual_size"] != size {
        bail!("parvis disk upload made an unexpected disk: {disk}");
    }
    Ok(CliRun {
        secs,
        cpu_cli,
        cpu_agent,
    })
}

/// Print the figures and ratios.
pub fn print(r: &UploadResult) {
    let mb = r.bytes as f64 / 1e6;
    let gb = r.bytes as f64 / 1e9;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "upload ({} MiB raw image, loopback, 1 MiB chunks, {} runs per transport, each to a \
         fresh agent; client and agent share {cores} cores)",
        r.bytes >> 20,
        r.transports.first().map_or(0, |t| t.runs.len())
    );
    for t in &r.transports {
        println!("  {}:", t.label());
        for (i, u) in t.runs.iter().enumerate() {
            println!(
                "    run {}: until the disk is usable {:.2} s {:.0} MB/s, streaming only {:.0} \
                 MB/s; CPU per GB: agent {:.2} s, client {:.2} s",
                i + 1,
                u.upload_secs,
                mb / u.upload_secs,
                mb / u.stream_secs,
                u.cpu_agent / gb,
                u.cpu_client / gb
            );
        }
        let m = t.median();
        println!(
            "    parvis upload, until the disk is usable (median): {:.2} s  {:.0} MB/s \
             (streaming only {:.0} MB/s)",
            m.upload_secs,
            mb / m.upload_secs,
            mb / m.stream_secs
        );
        // The agent runs several threads (TLS and decoding on the runtime, O_DIRECT writes
        // on its I/O thread), so the bound is the whole CPU budget of the machine over the
        // CPU both sides spend per GB.
        println!(
            "    CPU per GB (that run): agent {:.2} s, client {:.2} s (so {cores} cores doing \
             nothing else would allow {:.0} MB/s)",
            m.cpu_agent / gb,
            m.cpu_client / gb,
            1e3 * cores as f64 / ((m.cpu_agent + m.cpu_client) / gb)
        );
        println!(
            "    parvis disk upload FILE (the CLI, its checksum included): {:.2} s  {:.0} MB/s; \
             CPU per GB: CLI {:.2} s, agent {:.2} s",
            t.cli.secs,
            mb / t.cli.secs,
            t.cli.cpu_cli / gb,
            t.cli.cpu_agent / gb
        );
        println!(
            "    target: >= 800 MB/s until the disk is usable (median): {}",
            ok(mb / m.upload_secs >= 800.0)
        );
        println!(
            "    ratio upload/cp speed: {:.2}x, upload/dd: {:.2}x, CLI/cp: {:.2}x",
            r.cp_secs / m.upload_secs,
            r.dd_secs / m.upload_secs,
            r.cp_secs / t.cli.secs
        );
    }
    println!(
        "  cp + sync of the same file (peer):       {:.2} s  {:.0} MB/s",
        r.cp_secs,
        mb / r.cp_secs
    );
    println!(
        "  dd bs=4M oflag=direct conv=fsync (peer): {:.2} s  {:.0} MB/s",
        r.dd_secs,
        mb / r.dd_secs
    );
    println!(
        "  load average before the runs: {}, after: {}",
        r.load_before, r.load_after
    );
}
