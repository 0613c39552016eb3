//! `parvis disk …`: the local image commands (see `disk.rs`) plus the host's disk library:
//! `list`, `get`, `delete`, `tasks`, `upload`, and `convert DISK --format F` (one argument:
//! remote; two paths: local).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use indicatif::ProgressBar;
use proto::client::Clients;
use proto::upload_source::{CHUNK, ChunkReader, SharedHash, lock, shared_hash};
use proto::v1::{
    BeginUploadRequest, ConvertDiskRequest, Disk, DiskFormat, DiskRef, DiskVariant,
    FinishUploadRequest, ListDisksRequest, ListTasksRequest, UploadChunk, UploadRef, UploadState,
    UploadStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::Code;

use crate::disk::{self, DiskCommand, human};
use crate::remote::{
    self, CtrlC, OnCtrlC, Rpc, Watched, backoff, disk_format, disk_variant, print_json,
    print_table, resolve, status_error, task_json, task_result, task_state, time_ms, upload_state,
    watch_task,
};

#[derive(Debug, Subcommand)]
pub enum DiskCli {
    #[command(flatten)]
    Local(DiskCommand),
    /// List the disks in the host's library.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show one disk of the host's library, with its structure check.
    Get {
        /// Disk id or name.
        disk: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a disk from the host's library (no VM may use it).
    Delete {
        /// Disk id or name.
        disk: String,
    },
    /// List the host's long-running operations (uploads, conversions, resizes).
    Tasks {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Upload an image file (raw, VHD, VHDX) into the host's library. An interrupted upload
    /// resumes when the same command is run again.
    Upload {
        /// The image file.
        file: PathBuf,
        /// The disk's name (default: the file's name).
        #[arg(long)]
        name: Option<String>,
        /// How often a broken stream is retried (with backoff) before giving up.
        #[arg(long, default_value_t = 5)]
        retries: u32,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
        /// For tests: end the first stream after this many bytes, as if interrupted.
        #[arg(long, hide = true)]
        interrupt_after: Option<u64>,
        /// Print the new disk as JSON (as `disk list --json` does) instead of its id.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: DiskCli, host: Option<&str>) -> Result<i32> {
    match cmd {
        DiskCli::Local(DiskCommand::Convert {
            src,
            dst: None,
            format,
            variant,
            name,
            quiet,
            block_size,
            threads,
            json,
        }) => {
            if block_size.is_some() || threads.is_some() {
                bail!("--block-size and --threads are for local conversions (SRC DST)");
            }
            let format = format.context(
                "give --format for a conversion on the host (or SRC and DST paths for a local one)",
            )?;
            let src = src.to_string_lossy().into_owned();
            crate::block_on(async move {
                let mut c = remote::connect(host).await?;
                let opts = RemoteConvert {
                    variant,
                    name,
                    quiet,
                    json,
                };
                convert(&mut c, &src, &format, opts).await
            })
        }
        DiskCli::Local(c) => disk::run(c),
        remote_cmd => crate::block_on(async move {
            let mut c = remote::connect(host).await?;
            run_remote(&mut c, remote_cmd, host).await
        }),
    }
}

async fn run_remote(c: &mut Clients, cmd: DiskCli, host: Option<&str>) -> Result<i32> {
    match cmd {
        DiskCli::Local(_) => unreachable!("handled by run"),
        DiskCli::List { json } => {
            let disks = list(c).await?;
            if json {
                print_json(&json!(disks.iter().map(disk_json).collect::<Vec<_>>()))?;
                return Ok(0);
            }
            if disks.is_empty() {
                eprintln!("No disks; add one with `parvis disk upload FILE`.");
                return Ok(0);
            }
            let mut rows = vec![vec![
                "ID".into(),
                "NAME".into(),
                "FORMAT".into(),
                "SIZE".into(),
                "ALLOCATED".into(),
                "USED BY".into(),
            ]];
            for d in &disks {
                rows.push(vec![
                    d.id.clone(),
                    d.name.clone(),
                    format!("{} {}", disk_format(d.format), disk_variant(d.variant)),
                    human(d.virtual_size),
                    human(d.allocated_bytes),
                    if d.attached_to.is_empty() {
                        "-".into()
                    } else {
                        d.attached_to.join(",")
                    },
                ]);
            }
            print_table(&rows);
            Ok(0)
        }
        DiskCli::Get { disk, json } => {
            let id = disk_id(c, &disk).await?;
            let d = c
                .disk
                .get_disk(DiskRef { disk_id: id })
                .await
                .rpc("reading the disk")?;
            if json {
                print_json(&disk_json(&d))?;
            } else {
                print_disk(&d);
            }
            Ok(0)
        }
        DiskCli::Delete { disk } => {
            let id = disk_id(c, &disk).await?;
            c.disk
                .delete_disk(DiskRef {
                    disk_id: id.clone(),
                })
                .await
                .rpc(&format!("deleting disk '{disk}'"))?;
            println!("Deleted disk '{disk}' ({id}).");
            Ok(0)
        }
        DiskCli::Tasks { json } => {
            let tasks = c
                .disk
                .list_tasks(ListTasksRequest {})
                .await
                .rpc("listing tasks")?
                .tasks;
            if json {
                print_json(&json!(tasks.iter().map(task_json).collect::<Vec<_>>()))?;
                return Ok(0);
            }
            if tasks.is_empty() {
                eprintln!("No tasks.");
                return Ok(0);
            }
            let mut rows = vec![vec![
                "ID".into(),
                "STATE".into(),
                "PROGRESS".into(),
                "STARTED".into(),
                "DESCRIPTION".into(),
            ]];
            for t in &tasks {
                let progress = (t.done.saturating_mul(100))
                    .checked_div(t.total)
                    .map_or_else(|| "-".to_string(), |p| format!("{p}%"));
                let mut what = t.description.clone();
                if !t.error.is_empty() {
                    what.push_str(&format!(" ({})", t.error));
                }
                rows.push(vec![
                    t.id.clone(),
                    task_state(t.state),
                    progress,
                    time_ms(t.created_ms),
                    what,
                ]);
            }
            print_table(&rows);
            Ok(0)
        }
        DiskCli::Upload {
            file,
            name,
            retries,
            quiet,
            interrupt_after,
            json,
        } => {
            let (_, target) = remote::target(host)?;
            let opts = UploadOptions {
                name,
                retries,
                quiet,
                interrupt_after,
                json,
            };
            upload(c, &target.addr, &file, opts).await
        }
    }
}

pub async fn list(c: &mut Clients) -> Result<Vec<Disk>> {
    Ok(c.disk
        .list_disks(ListDisksRequest {})
        .await
        .rpc("listing disks")?
        .disks)
}

/// A disk id from an id, a name or a unique id prefix.
pub async fn disk_id(c: &mut Clients, query: &str) -> Result<String> {
    let disks = list(c).await?;
    let items: Vec<(&str, &str)> = disks
        .iter()
        .map(|d| (d.id.as_str(), d.name.as_str()))
        .collect();
    resolve("disk", items.iter().copied(), query)
}

fn parse_format(f: &str) -> Result<DiskFormat> {
    Ok(match f.to_ascii_lowercase().as_str() {
        "raw" | "img" => DiskFormat::Raw,
        "vhd" | "vpc" => DiskFormat::Vhd,
        "vhdx" => DiskFormat::Vhdx,
        _ => bail!("unknown format '{f}' (raw, vhd, vhdx)"),
    })
}

fn parse_variant(v: &str) -> Result<DiskVariant> {
    Ok(match v.to_ascii_lowercase().as_str() {
        "fixed" => DiskVariant::Fixed,
        "dynamic" => DiskVariant::Dynamic,
        _ => bail!("unknown variant '{v}' (fixed or dynamic)"),
    })
}

/// `parvis disk convert DISK`'s options.
struct RemoteConvert {
    variant: Option<String>,
    name: Option<String>,
    quiet: bool,
    json: bool,
}

async fn convert(c: &mut Clients, src: &str, format: &str, opts: RemoteConvert) -> Result<i32> {
    let RemoteConvert {
        variant,
        name,
        quiet,
        json,
    } = opts;
    let format = parse_format(format)?;
    let variant = variant.as_deref().map(parse_variant).transpose()?;
    let id = disk_id(c, src).await?;
    let task = c
        .disk
        .convert_disk(ConvertDiskRequest {
            disk_id: id,
            format: format as i32,
            variant: variant.map_or(0, |v| v as i32),
            name: name.unwrap_or_default(),
        })
        .await
        .rpc(&format!("converting disk '{src}'"))?;
    let t = match watch_task(c, &task.id, quiet, OnCtrlC::Cancel).await? {
        Watched::Ended(t) => t,
        Watched::Detached => {
            eprintln!(
                "parvis: stopped waiting; the conversion may still be running (`parvis disk tasks`)"
            );
            return Ok(130);
        }
    };
    task_result(&t)?;
    let d = c
        .disk
        .get_disk(DiskRef {
            disk_id: t.disk_id.clone(),
        })
        .await
        .rpc("reading the new disk")?;
    eprintln!(
        "Converted '{src}' into disk '{}' ({} {}, {}).",
        d.name,
        disk_format(d.format),
        disk_variant(d.variant),
        human(d.virtual_size)
    );
    if json {
        print_json(&disk_json(&d))?;
    } else {
        println!("{}", d.id);
    }
    Ok(0)
}

// ---- Upload -------------------------------------------------------------------------------

/// What is remembered of an upload so the same command can resume it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct ResumeRecord {
    /// The agent's address.
    host: String,
    upload_id: String,
    path: PathBuf,
    size: u64,
    /// Modification time (ns since the epoch): a changed file is not resumed.
    mtime_ns: i128,
    /// The checksum declared when the upload began; empty when it is declared after the
    /// data (FinishUpload), as this CLI does.
    #[serde(default)]
    sha256: String,
    name: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ResumeFile {
    #[serde(default)]
    uploads: Vec<ResumeRecord>,
}

/// `$PARVIS_CACHE_DIR`, else `$XDG_CACHE_HOME/parvis`, else `~/.cache/parvis`.
fn resume_path() -> Result<PathBuf> {
    let dir = if let Some(d) = std::env::var_os("PARVIS_CACHE_DIR").filter(|d| !d.is_empty()) {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(d).join("parvis")
    } else {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .context("HOME is not set (needed for the upload resume records)")?;
        PathBuf::from(home).join(".cache/parvis")
    };
    Ok(dir.join("uploads.json"))
}

/// Write `data` to `path` atomically (temporary file, fsync, rename), readable only by the
/// owner; the directory is made (0700) if missing.
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .context("the path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok::<_, std::io::Error>(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

impl ResumeFile {
    fn load() -> ResumeFile {
        resume_path()
            .ok()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self) {
        let saved = resume_path().and_then(|p| {
            let mut text = serde_json::to_vec_pretty(self)?;
            text.push(b'\n');
            write_private(&p, &text)
        });
        if let Err(e) = saved {
            eprintln!("parvis: warning: cannot save the upload's resume record: {e:#}");
        }
    }

    fn put(r: &ResumeRecord) {
        let mut f = Self::load();
        f.uploads
            .retain(|u| !(u.host == r.host && u.path == r.path) && u.upload_id != r.upload_id);
        f.uploads.push(r.clone());
        f.save();
    }

    fn forget(upload_id: &str) {
        let mut f = Self::load();
        let before = f.uploads.len();
        f.uploads.retain(|u| u.upload_id != upload_id);
        if f.uploads.len() != before {
            f.save();
        }
    }
}

/// Hash the file up to `to` (what the agent already has of an upload resumed by a new
/// command), with a progress bar; false when Ctrl-C stopped it.
async fn hash_up_to(path: &Path, hash: &SharedHash, to: u64, quiet: bool) -> Result<bool> {
    if lock(hash).at() >= to {
        return Ok(true);
    }
    let bar = crate::disk::progress(to, quiet, "checksum");
    let stop = Arc::new(AtomicBool::new(false));
    let mut ctrl = CtrlC::claim();
    let (p, b, s, h) = (path.to_path_buf(), bar.clone(), stop.clone(), hash.clone());
    let work = tokio::task::spawn_blocking(move || -> Result<bool> {
        let f = std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
        Ok(
            lock(&h).read_to(&f, to, &|| s.load(Ordering::Relaxed), &mut |at| {
                b.set_position(at)
            })?,
        )
    });
    tokio::pin!(work);
    let r = tokio::select! {
        r = &mut work => r?,
        () = ctrl.pressed() => {
            stop.store(true, Ordering::Relaxed);
            work.await?
        }
    };
    bar.finish_and_clear();
    r
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

/// `parvis disk upload`'s options.
struct UploadOptions {
    name: Option<String>,
    retries: u32,
    quiet: bool,
    interrupt_after: Option<u64>,
    json: bool,
}

async fn upload(c: &mut Clients, host_addr: &str, file: &Path, opts: UploadOptions) -> Result<i32> {
    let UploadOptions {
        name,
        retries,
        quiet,
        interrupt_after,
        json,
    } = opts;
    let meta =
        std::fs::metadata(file).with_context(|| format!("cannot open {}", file.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", file.display());
    }
    let path =
        std::fs::canonicalize(file).with_context(|| format!("cannot open {}", file.display()))?;
    let size = meta.len();
    let name = match name {
        Some(n) => n,
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the file has no name; give --name")?,
    };
    let mtime = mtime_ns(&meta);

    // An earlier, interrupted upload of the same file?
    let earlier = ResumeFile::load().uploads.into_iter().find(|r| {
        r.host == host_addr
            && r.path == path
            && r.size == size
            && r.mtime_ns == mtime
            && r.name == name
    });
    let mut status: Option<UploadStatus> = None;
    if let Some(r) = &earlier {
        match c
            .disk
            .get_upload(UploadRef {
                upload_id: r.upload_id.clone(),
            })
            .await
        {
            Ok(s) => {
                let s = s.into_inner();
                match UploadState::try_from(s.state) {
                    Ok(UploadState::Receiving) => {
                        eprintln!(
                            "Resuming upload {} of '{name}' at {} of {}.",
                            s.upload_id,
                            human(s.verified_offset),
                            human(size)
                        );
                        status = Some(s);
                    }
                    Ok(
                        UploadState::AwaitingChecksum | UploadState::Verifying | UploadState::Done,
                    ) => status = Some(s),
                    _ => {
                        eprintln!(
                            "The earlier upload of this file {}; starting again.",
                            if s.error.is_empty() {
                                format!("was {}", upload_state(s.state))
                            } else {
                                format!("failed: {}", s.error)
                            }
                        );
                        ResumeFile::forget(&r.upload_id);
                    }
                }
            }
            Err(s) if s.code() == Code::NotFound => {
                eprintln!(
                    "The agent no longer has the earlier upload of this file; starting again."
                );
                ResumeFile::forget(&r.upload_id);
            }
            Err(s) => return Err(status_error("checking the earlier upload", &s)),
        }
    }

    // An upload resumed from an older record may have declared its checksum when it began;
    // otherwise it is computed over what is read of the file.
    let declared = status.is_some() && earlier.as_ref().is_some_and(|r| !r.sha256.is_empty());
    let hash = (!declared).then(shared_hash);
    let mut status = match status {
        Some(s) => s,
        None => {
            // The checksum is declared after the data (FinishUpload): it is computed while
            // the file is read for sending.
            let s = c
                .disk
                .begin_upload(BeginUploadRequest {
                    name: name.clone(),
                    size,
                    sha256: String::new(),
                })
                .await
                .rpc(&format!("starting the upload of '{name}'"))?;
            ResumeFile::put(&ResumeRecord {
                host: host_addr.to_string(),
                upload_id: s.upload_id.clone(),
                path: path.clone(),
                size,
                mtime_ns: mtime,
                sha256: String::new(),
                name: name.clone(),
            });
            s
        }
    };
    let upload_id = status.upload_id.clone();
    let interrupted = || {
        eprintln!(
            "parvis: upload interrupted; run the same command again to resume it (upload \
             {upload_id})"
        );
        Ok(130)
    };

    // Send the data, from wherever the agent has it up to.
    if status.state == UploadState::Receiving as i32 {
        // A resumed upload: the part the agent has is hashed first.
        if let Some(h) = &hash
            && !hash_up_to(&path, h, status.verified_offset, quiet).await?
        {
            return interrupted();
        }
        let bar = crate::disk::progress(size, quiet, "upload");
        let mut ctrl = CtrlC::claim();
        let mut failures = 0u32;
        let mut stop_after = interrupt_after;
        while status.state == UploadState::Receiving as i32 {
            let from = status.verified_offset;
            bar.set_position(from);
            let sent = tokio::select! {
                r = send_stream(
                    c,
                    &path,
                    Stream { upload_id: &upload_id, from, size, stop_after: stop_after.take() },
                    hash.as_ref(),
                    &bar,
                ) => r,
                () = ctrl.pressed() => {
                    bar.abandon();
                    return interrupted();
                }
            };
            match sent {
                Ok(Sent::Done(s)) => {
                    if s.state == UploadState::Receiving as i32 && s.verified_offset <= from {
                        bail!(
                            "the agent kept nothing of the data sent from offset {from}; giving up"
                        );
                    }
                    status = s;
                }
                Ok(Sent::Interrupted(n)) => {
                    bar.abandon();
                    bail!(
                        "upload interrupted after {n} bytes as asked (--interrupt-after); run the \
                         same command again to resume it"
                    );
                }
                Err(SendError::File(e)) => {
                    bar.abandon();
                    return Err(e.context(format!(
                        "the upload stopped; run the same command again to resume it (upload \
                         {upload_id})"
                    )));
                }
                Err(SendError::Rpc(s))
                    if proto::client::upload_retryable(&s) && failures < retries =>
                {
                    failures += 1;
                    let wait = backoff(failures - 1);
                    bar.suspend(|| {
                        eprintln!(
                            "parvis: upload stream broken ({}); retry {failures} of {retries} in \
                             {:.1} s",
                            s.message(),
                            wait.as_secs_f64()
                        )
                    });
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = ctrl.pressed() => {
                            bar.abandon();
                            return interrupted();
                        }
                    }
                    match c
                        .disk
                        .get_upload(UploadRef {
                            upload_id: upload_id.clone(),
                        })
                        .await
                    {
                        Ok(s) => {
                            let s = s.into_inner();
                            if s.verified_offset > from {
                                failures = 0;
                            }
                            status = s;
                        }
                        Err(s) if proto::client::upload_retryable(&s) => {}
                        Err(s) => {
                            bar.abandon();
                            return Err(status_error("checking the upload", &s));
                        }
                    }
                }
                Err(SendError::Rpc(s)) => {
                    bar.abandon();
                    if s.code() != Code::Unauthenticated && !proto::client::upload_retryable(&s) {
                        ResumeFile::forget(&upload_id);
                    }
                    let e = status_error(&format!("uploading '{name}'"), &s);
                    if proto::client::upload_retryable(&s) {
                        return Err(anyhow!(
                            "{e:#} (gave up after {retries} retries; run the same command \
                             again to resume)"
                        ));
                    }
                    return Err(e);
                }
            }
        }
        bar.finish_and_clear();
    }

    // The checksum, if the agent waits for it.
    if status.state == UploadState::AwaitingChecksum as i32 {
        let h = hash.unwrap_or_else(shared_hash);
        if !hash_up_to(&path, &h, size, quiet).await? {
            return interrupted();
        }
        let sha256 = lock(&h).hex();
        status = c
            .disk
            .finish_upload(FinishUploadRequest {
                upload_id: upload_id.clone(),
                sha256,
            })
            .await
            .rpc("declaring the upload's checksum")?;
    }

    // Verification.
    match UploadState::try_from(status.state) {
        Ok(UploadState::Verifying) => {
            match watch_task(c, &status.task_id, quiet, OnCtrlC::Detach).await? {
                Watched::Ended(t) => {
                    if let Err(e) = task_result(&t) {
                        ResumeFile::forget(&upload_id);
                        return Err(e);
                    }
                    status = c
                        .disk
                        .get_upload(UploadRef {
                            upload_id: upload_id.clone(),
                        })
                        .await
                        .rpc("reading the upload")?;
                    if status.disk_id.is_empty() {
                        status.disk_id = t.disk_id;
                    }
                }
                Watched::Detached => {
                    eprintln!(
                        "parvis: the agent goes on verifying the upload; run the same command \
                         again to see the result"
                    );
                    return Ok(130);
                }
            }
        }
        Ok(UploadState::Done) => {}
        _ => {
            ResumeFile::forget(&upload_id);
            bail!(
                "the upload {}{}",
                upload_state(status.state),
                if status.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", status.error)
                }
            );
        }
    }
    ResumeFile::forget(&upload_id);
    if status.disk_id.is_empty() {
        bail!("the upload finished but the agent named no disk");
    }
    let d = c
        .disk
        .get_disk(DiskRef {
            disk_id: status.disk_id.clone(),
        })
        .await
        .rpc("reading the new disk")?;
    eprintln!(
        "Uploaded {} as disk '{}' ({} {}, {}).",
        file.display(),
        d.name,
        disk_format(d.format),
        disk_variant(d.variant),
        human(d.virtual_size)
    );
    if json {
        print_json(&disk_json(&d))?;
    } else {
        println!("{}", d.id);
    }
    Ok(0)
}

enum Sent {
    Done(UploadStatus),
    Interrupted(u64),
}

enum SendError {
    Rpc(tonic::Status),
    File(anyhow::Error),
}

/// Where one UploadDisk stream starts and ends.
struct Stream<'a> {
    upload_id: &'a str,
    from: u64,
    size: u64,
    /// For tests: send only this many bytes.
    stop_after: Option<u64>,
}

/// One UploadDisk stream of the file from `from` to the end (or `stop_after` bytes), each
/// piece hashed into `hash` (when given) as it is read.
async fn send_stream(
    c: &mut Clients,
    path: &Path,
    st: Stream<'_>,
    hash: Option<&SharedHash>,
    bar: &ProgressBar,
) -> Result<Sent, SendError> {
    let Stream {
        upload_id,
        from,
        size,
        stop_after,
    } = st;
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk>(4);
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))
        .map_err(SendError::File)?;
    let end = stop_after.map_or(size, |n| size.min(from.saturating_add(n)));
    let id = upload_id.to_string();
    let b = bar.clone();
    let hash = hash.cloned();
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut chunks = ChunkReader::new(file, from, hash)?;
        while chunks.offset() < end {
            let off = chunks.offset();
            let n = CHUNK.min((end - off) as usize);
            let data = chunks.next(n)?;
            let chunk = UploadChunk {
                upload_id: id.clone(),
                offset: off,
                data,
            };
            if tx.blocking_send(chunk).is_err() {
                // The call ended; its result says why.
                return Ok(());
            }
            b.set_position(chunks.offset());
        }
        Ok(())
    });
    let res = c
        .upload_disk(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    // The call has ended, so the reader stops at its next piece; it is waited for, so that
    // only one reader at a time hashes.
    let read = reader.await.map_err(|e| SendError::File(e.into()))?;
    match res {
        Ok(s) => {
            // The agent saw the stream end; did the reader fail?
            if let Err(e) = read {
                return Err(SendError::File(e));
            }
            if stop_after.is_some() && end < size {
                return Ok(Sent::Interrupted(end - from));
            }
            Ok(Sent::Done(s))
        }
        Err(s) => Err(SendError::Rpc(s)),
    }
}

fn print_disk(d: &Disk) {
    println!("name:             {}", d.name);
    println!("id:               {}", d.id);
    println!(
        "format:           {} ({})",
        disk_format(d.format),
        disk_variant(d.variant)
    );
    println!(
        "virtual size:     {} ({} bytes)",
        human(d.virtual_size),
        d.virtual_size
    );
    println!("file size:        {}", human(d.file_size));
    println!("allocated:        {}", human(d.allocated_bytes));
    if d.block_size > 0 {
        println!("block size:       {}", human(u64::from(d.block_size)));
    }
    println!(
        "sector size:      {} logical, {} physical",
        d.logical_sector_size, d.physical_sector_size
    );
    println!(
        "used by:          {}",
        if d.attached_to.is_empty() {
            "-".to_string()
        } else {
            d.attached_to.join(", ")
        }
    );
    println!("created:          {}", time_ms(d.created_ms));
    print_boot(d.boot.as_ref());
    if d.check_findings.is_empty() {
        println!("check:            clean");
    } else {
        println!("check:");
        for f in &d.check_findings {
            println!("  {f}");
        }
    }
}

/// What the disk boots, as a VM made from it would find it.
fn print_boot(b: Option<&proto::v1::DiskBootInfo>) {
    let Some(b) = b.filter(|b| b.inspected) else {
        println!("boots:            not read yet");
        return;
    };
    if b.bootable {
        println!(
            "boots:            {}",
            if b.os.is_empty() { "Linux" } else { &b.os }
        );
    } else {
        println!("boots:            no: {}", b.reason);
    }
    println!("partitions:       {}", b.partition_table);
    for v in &b.volumes {
        let mut what = vec![if v.partition == 0 {
            "whole disk".to_string()
        } else {
            format!("{}. {}", v.partition, v.kind)
        }];
        if !v.file_system.is_empty() {
            what.push(v.file_system.clone());
        }
        if !v.label.is_empty() {
            what.push(format!("\"{}\"", v.label));
        }
        if v.size > 0 {
            what.push(human(v.size));
        }
        println!("                  {}", what.join(", "));
    }
    for (i, e) in b.entries.iter().enumerate() {
        println!(
            "{:<18}{}{}",
            if i == 0 { "boot entries:" } else { "" },
            e.title,
            if i as u32 == b.default_entry {
                " (default)"
            } else {
                ""
            }
        );
        println!("                    {}  {}", e.kernel, e.cmdline);
    }
}

fn boot_json(b: Option<&proto::v1::DiskBootInfo>) -> serde_json::Value {
    let Some(b) = b.filter(|b| b.inspected) else {
        return json!({ "inspected": false });
    };
    json!({
        "inspected": true,
        "bootable": b.bootable,
        "reason": b.reason,
        "partition_table": b.partition_table,
        "os": b.os,
        "volumes": b.volumes.iter().map(|v| json!({
            "partition": v.partition,
            "kind": v.kind,
            "file_system": v.file_system,
            "uuid": v.uuid,
            "label": v.label,
            "size": v.size,
        })).collect::<Vec<_>>(),
        "entries": b.entries.iter().map(|e| json!({
            "title": e.title,
            "version": e.version,
            "kernel": e.kernel,
            "initrd": e.initrd,
            "cmdline": e.cmdline,
        })).collect::<Vec<_>>(),
        "default_entry": b.default_entry,
    })
}

pub fn disk_json(d: &Disk) -> serde_json::Value {
    json!({
        "id": d.id,
        "name": d.name,
        "format": disk_format(d.format),
        "variant": disk_variant(d.variant),
        "virtual_size": d.virtual_size,
        "file_size": d.file_size,
        "allocated_bytes": d.allocated_bytes,
        "block_size": d.block_size,
        "logical_sector_size": d.logical_sector_size,
        "physical_sector_size": d.physical_sector_size,
        "attached_to": d.attached_to,
        "created_ms": d.created_ms,
        "check_findings": d.check_findings,
        "boot": boot_json(d.boot.as_ref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_retries() {
        assert_eq!(parse_format("VHDX").unwrap(), DiskFormat::Vhdx);
        assert!(parse_format("qcow2").is_err());
        assert_eq!(parse_variant("fixed").unwrap(), DiskVariant::Fixed);
        assert!(proto::client::upload_retryable(
            &tonic::Status::unavailable("x")
        ));
        assert!(proto::client::upload_retryable(
            &tonic::Status::failed_precondition("upload 'x': upload already in progress")
        ));
        assert!(!proto::client::upload_retryable(
            &tonic::Status::failed_precondition("upload 'x' was cancelled")
        ));
        assert!(!proto::client::upload_retryable(
            &tonic::Status::invalid_argument("size")
        ));
        assert!(!proto::client::upload_retryable(
            &tonic::Status::resource_exhausted("a message over the limit")
        ));
        assert!(!proto::client::upload_retryable(
            &tonic::Status::unimplemented("compressed messages are not supported")
        ));
    }
}
