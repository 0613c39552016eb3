//! Disk upload throughput: a real `parvis-agent` (TLS on loopback) receiving a file
//! through `DiskService.UploadDisk`, against two peers on the same filesystem: copying the
//! file with `cp` + `sync` (through the page cache), and `dd` with direct writes and a final
//! `fsync` (what the disk alone allows).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use proto::client;
use proto::v1::{BeginUploadRequest, UploadChunk, UploadRef, UploadState};
use sha2::{Digest, Sha256};

/// Measured figures.
#[derive(Debug)]
pub struct UploadResult {
    pub bytes: u64,
    /// Until the agent reported the disk usable (hash + structure check included).
    pub upload_secs: f64,
    /// Streaming alone (until the last chunk was acknowledged).
    pub stream_secs: f64,
    pub cp_secs: f64,
    /// `dd bs=4M oflag=direct conv=fsync` of the same file.
    pub dd_secs: f64,
    /// CPU seconds the agent and this client used during the upload.
    pub cpu_agent: f64,
    pub cpu_client: f64,
    /// The 1, 5 and 15 minute load averages before the upload and after the peers.
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

/// Upload a `gib` GiB raw image to a fresh agent in `dir`.
pub fn run(dir: &Path, gib: u64) -> Result<UploadResult> {
    let state = dir.join("agent-state");
    let (mut agent, target) =
        crate::agent_proc::spawn_agent(&state, &["--worker", "/bin/false"], None)?;
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
    let data = std::fs::read(&file)?;
    let sha = hex::encode(Sha256::digest(&data));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let load_before = load_average();
    let cpu0 = [agent.id(), std::process::id()].map(crate::fb_bench::cpu_secs);
    let (upload_secs, stream_secs) = rt.block_on(async {
        let mut c = client::connect(&target).await?;
        let start = Instant::now();
        let st = c
            .disk
            .begin_upload(BeginUploadRequest {
                name: "bench".into(),
                size,
                sha256: sha,
            })
            .await?
            .into_inner();
        let id = st.upload_id.clone();
        let chunk = 1usize << 20;
        let bytes = bytes::Bytes::from(data);
        let msgs = (0..bytes.len().div_ceil(chunk)).map(move |i| UploadChunk {
            upload_id: if i == 0 { id.clone() } else { String::new() },
            offset: (i * chunk) as u64,
            data: bytes.slice(i * chunk..((i + 1) * chunk).min(bytes.len())),
        });
        c.disk.upload_disk(tokio_stream::iter(msgs)).await?;
        let stream_secs = start.elapsed().as_secs_f64();
        loop {
            let st = c
                .disk
                .get_upload(UploadRef {
                    upload_id: st.upload_id.clone(),
                })
                .await?
                .into_inner();
            if st.state == UploadState::Done as i32 {
                break;
            }
            if st.state != UploadState::Verifying as i32
                && st.state != UploadState::Receiving as i32
            {
                bail!("upload ended as {st:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, anyhow::Error>((start.elapsed().as_secs_f64(), stream_secs))
    })?;
    let cpu1 = [agent.id(), std::process::id()].map(crate::fb_bench::cpu_secs);
    let _ = agent.kill();
    let _ = agent.wait();
    // The agent's copy of the image goes first: the peers get the same free space.
    let _ = std::fs::remove_dir_all(&state);
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
        upload_secs,
        stream_secs,
        cp_secs,
        dd_secs,
        cpu_agent: cpu1[0] - cpu0[0],
        cpu_client: cpu1[1] - cpu0[1],
        load_before,
        load_after: load_average(),
    })
}

/// Print the figures and ratios.
pub fn print(r: &UploadResult) {
    let mb = r.bytes as f64 / 1e6;
    println!(
        "upload ({} MiB raw image, TLS on loopback, 1 MiB chunks)",
        r.bytes >> 20
    );
    println!(
        "  parvis upload, until the disk is usable: {:.2} s  {:.0} MB/s",
        r.upload_secs,
        mb / r.upload_secs
    );
    println!(
        "  parvis upload, streaming only:          {:.2} s  {:.0} MB/s",
        r.stream_secs,
        mb / r.stream_secs
    );
    println!(
        "  cp + sync of the same file (peer):      {:.2} s  {:.0} MB/s",
        r.cp_secs,
        mb / r.cp_secs
    );
    println!(
        "  dd bs=4M oflag=direct conv=fsync (peer): {:.2} s  {:.0} MB/s",
        r.dd_secs,
        mb / r.dd_secs
    );
    let gb = r.bytes as f64 / 1e9;
    println!(
        "  CPU per GB: agent {:.2} s, client {:.2} s (so one free core each would allow {:.0} MB/s)",
        r.cpu_agent / gb,
        r.cpu_client / gb,
        1e3 / (r.cpu_agent.max(r.cpu_client) / gb)
    );
    println!(
        "  load average before the run: {}, after: {}",
        r.load_before, r.load_after
    );
    println!(
        "  ratio upload/cp speed: {:.2}x (streaming only {:.2}x)",
        r.cp_secs / r.upload_secs,
        r.cp_secs / r.stream_secs
    );
    println!(
        "  ratio upload/dd speed: {:.2}x (streaming only {:.2}x)",
        r.dd_secs / r.upload_secs,
        r.dd_secs / r.stream_secs
    );
}
