//! Importing a VHD/VHDX into a host's disk library: check the file, hash it, then stream it
//! from its path (never whole in memory) in resumable chunks; pause, resume and cancel;
//! finally wait for the agent's verification.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::client::Clients;
use proto::upload_source::{CHUNK, ChunkReader, SharedHash, SourceError, lock, shared_hash};
use proto::v1::{
    BeginUploadRequest, Disk, DiskRef, FinishUploadRequest, TaskRef, TaskState, UploadChunk,
    UploadRef, UploadState, UploadStatus,
};
use thiserror::Error;
use tokio::sync::watch;

use crate::conn::{CALL_TIMEOUT, Plain, Slot, UiWaker, plain_status};

/// What to upload.
#[derive(Debug, Clone)]
pub struct UploadRequest {
    pub path: PathBuf,
    /// The disk's name in the library.
    pub name: String,
    /// Pause by itself once the host has this many bytes (tests and demos of resuming).
    pub pause_at: Option<u64>,
    /// The host's address (resume records are per host and file).
    pub host_addr: String,
    /// Where unfinished uploads are remembered, so that importing the same file again
    /// (also after a restart) resumes instead of starting over. `None`: not remembered.
    pub resume_file: Option<PathBuf>,
}

/// An unfinished upload, remembered so that the same file resumes where the host is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ResumeRecord {
    host: String,
    path: PathBuf,
    size: u64,
    /// Modification time (ns since the epoch): a changed file is not resumed.
    mtime_ns: u64,
    name: String,
    upload_id: String,
}

fn load_records(file: &Path) -> Vec<ResumeRecord> {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_records(file: &Path, records: &[ResumeRecord]) {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(records)?)?;
        std::fs::rename(&tmp, file)
    };
    if let Err(e) = write() {
        tracing::warn!(
            "cannot save the upload resume records in {}: {e}",
            file.display()
        );
    }
}

fn forget_record(file: Option<&Path>, upload_id: &str) {
    if let Some(f) = file {
        let mut r = load_records(f);
        let before = r.len();
        r.retain(|x| x.upload_id != upload_id);
        if r.len() != before {
            save_records(f, &r);
        }
    }
}

/// The file's canonical path and modification time.
fn identity(path: &Path) -> Option<(PathBuf, u64)> {
    let canon = std::fs::canonicalize(path).ok()?;
    let mtime = std::fs::metadata(path)
        .ok()?
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some((canon, u64::try_from(mtime.as_nanos()).unwrap_or(u64::MAX)))
}

/// What the user wants the upload to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadControl {
    Run,
    Pause,
    Cancel,
}

/// Where an upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Checking,
    Hashing,
    Sending,
    Paused,
    /// Lost the connection; resumes by itself.
    Retrying,
    Verifying,
    Done,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Checking => "checking the file",
            Phase::Hashing => "computing the checksum",
            Phase::Sending => "uploading",
            Phase::Paused => "paused",
            Phase::Retrying => "connection lost, resuming",
            Phase::Verifying => "the host is verifying the image",
            Phase::Done => "done",
        }
    }
}

/// Progress shared with the UI.
#[derive(Debug)]
pub struct Progress {
    phase: Mutex<(Phase, Instant, u64)>,
    done: AtomicU64,
    total: AtomicU64,
    upload_id: Mutex<String>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            phase: Mutex::new((Phase::Checking, Instant::now(), 0)),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            upload_id: Mutex::new(String::new()),
        }
    }
}

impl Progress {
    fn set_phase(&self, p: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) =
            (p, Instant::now(), self.done.load(Ordering::Relaxed));
    }

    fn set(&self, done: u64, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
    }

    /// The agent's id of the upload, once it began.
    pub fn upload_id(&self) -> String {
        self.upload_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The phase, bytes done, bytes total.
    pub fn get(&self) -> (Phase, u64, u64) {
        let phase = self.phase.lock().unwrap_or_else(|e| e.into_inner()).0;
        (
            phase,
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// Bytes per second in the current phase, and the seconds left at that speed.
    pub fn speed_eta(&self) -> Option<(f64, f64)> {
        let (_, since, from) = *self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let secs = since.elapsed().as_secs_f64();
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        if secs < 0.2 || done <= from {
            return None;
        }
        let speed = (done - from) as f64 / secs;
        Some((speed, total.saturating_sub(done) as f64 / speed))
    }
}

/// Why an upload stopped, in plain words.
#[derive(Debug, Error)]
pub enum UploadError {
    #[error("{0}")]
    Check(String),
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Agent(String),
    /// The host refused a call (the technical chain in its details).
    #[error("{0}")]
    Refused(Plain),
    #[error("the upload was cancelled")]
    Cancelled,
}

impl UploadError {
    /// The failure for the tasks pane: its sentence, and the technical chain when there is
    /// one.
    pub fn plain(&self) -> Plain {
        match self {
            UploadError::Refused(p) => p.clone(),
            UploadError::File { source, .. } => Plain::new(self.to_string(), source.to_string()),
            e => Plain::new(e.to_string(), String::new()),
        }
    }
}

/// The image's format, as found in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Vhd,
    Vhdx,
}

/// Check that `path` is a VHD or VHDX whose size makes sense, before anything is sent.
/// Returns the format and the file size.
pub fn check_image(path: &Path) -> Result<(ImageKind, u64), String> {
    let name = path.display();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if ext != "vhd" && ext != "vhdx" {
        return Err(format!(
            "{name} is not a .vhd or .vhdx file; only virtual hard disks can be imported here"
        ));
    }
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open {name}: {e}"))?;
    let size = f
        .metadata()
        .map_err(|e| format!("cannot read {name}: {e}"))?
        .len();
    if size < 512 {
        return Err(format!(
            "{name} is only {size} bytes: too small to be a disk image"
        ));
    }
    let mut head = [0u8; 512];
    f.read_exact(&mut head)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    if &head[..8] == b"vhdxfile" {
        if ext != "vhdx" {
            return Err(format!(
                "{name} is a VHDX image named .vhd; rename it to .vhdx"
            ));
        }
        // File identifier, two headers, two region tables: 1 MiB at least.
        if size < 1 << 20 {
            return Err(format!(
                "{name} is {size} bytes, too small for a VHDX (at least 1 MiB); the file is truncated"
            ));
        }
        return Ok((ImageKind::Vhdx, size));
    }
    let mut foot = [0u8; 512];
    f.seek(SeekFrom::Start(size - 512))
        .and_then(|_| f.read_exact(&mut foot))
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    if &foot[..8] == b"conectix" {
        if ext != "vhd" {
            return Err(format!(
                "{name} is a VHD image named .vhdx; rename it to .vhd"
            ));
        }
        let sum: u32 = foot
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .map(|(_, b)| u32::from(*b))
            .sum();
        let stored = u32::from_be_bytes([foot[64], foot[65], foot[66], foot[67]]);
        if !sum != stored {
            return Err(format!(
                "{name}: the VHD footer's checksum is wrong; the file is damaged"
            ));
        }
        let current = u64::from_be_bytes(foot[48..56].try_into().unwrap_or_default());
        let disk_type = u32::from_be_bytes([foot[60], foot[61], foot[62], foot[63]]);
        if disk_type == 2 && size != current + 512 {
            return Err(format!(
                "{name}: a fixed VHD of {current} bytes should be {} bytes long, but the file is {size}; it is truncated or padded",
                current + 512
            ));
        }
        if disk_type != 2 && &head[..8] != b"conectix" {
            return Err(format!(
                "{name}: a dynamic VHD must start with a footer copy; the file is damaged"
            ));
        }
        return Ok((ImageKind::Vhd, size));
    }
    Err(format!(
        "{name} is neither a VHDX (no 'vhdxfile' signature) nor a VHD (no 'conectix' footer)"
    ))
}

async fn clients(
    slot: &Slot,
    ctl: &mut watch::Receiver<UploadControl>,
) -> Result<Clients, UploadError> {
    let start = Instant::now();
    loop {
        if *ctl.borrow() == UploadControl::Cancel {
            return Err(UploadError::Cancelled);
        }
        if let Some(c) = slot.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(c);
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(UploadError::Agent(
                "the host has been offline for 2 minutes; start the upload again later".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The whole upload. Returns the new disk.
pub async fn run(
    slot: Slot,
    req: UploadRequest,
    progress: std::sync::Arc<Progress>,
    mut ctl: watch::Receiver<UploadControl>,
    n: UiWaker,
) -> Result<Disk, UploadError> {
    progress.set_phase(Phase::Checking);
    let path = req.path.clone();
    let (_, size) = tokio::task::spawn_blocking(move || check_image(&path))
        .await
        .map_err(|e| UploadError::Check(e.to_string()))?
        .map_err(UploadError::Check)?;
    progress.set(0, size);
    let ident = identity(&req.path);
    let records = req.resume_file.as_deref();

    // The same file, partly uploaded to this host before (maybe before a restart)?
    let earlier = match (records, &ident) {
        (Some(f), Some((canon, mtime))) => load_records(f).into_iter().find(|r| {
            r.host == req.host_addr
                && r.path == *canon
                && r.size == size
                && r.mtime_ns == *mtime
                && r.name == req.name
        }),
        _ => None,
    };
    let mut resumed = None;
    if let Some(r) = earlier {
        let mut c = clients(&slot, &mut ctl).await?;
        let got = c
            .disk
            .get_upload(UploadRef {
                upload_id: r.upload_id.clone(),
            })
            .await;
        match got.map(tonic::Response::into_inner) {
            Ok(s)
                if matches!(
                    UploadState::try_from(s.state),
                    Ok(UploadState::Receiving
                        | UploadState::AwaitingChecksum
                        | UploadState::Verifying
                        | UploadState::Done)
                ) =>
            {
                tracing::info!(upload = %s.upload_id, offset = s.verified_offset, "resuming an earlier upload");
                resumed = Some(s);
            }
            _ => forget_record(records, &r.upload_id),
        }
    }
    let mut status = match resumed {
        Some(s) => s,
        None => {
            // The checksum is computed while the file is read for sending and declared
            // after the data (FinishUpload), so the file is read once.
            let mut c = clients(&slot, &mut ctl).await?;
            let begin = c.disk.begin_upload(BeginUploadRequest {
                name: req.name.clone(),
                size,
                sha256: String::new(),
            });
            let s = tokio::time::timeout(CALL_TIMEOUT, begin)
                .await
                .map_err(|_| UploadError::Agent("the host did not answer in time".into()))?
                .map_err(|s| UploadError::Refused(plain_status("the host refused the upload", &s)))?
                .into_inner();
            if let (Some(f), Some((canon, mtime))) = (records, &ident) {
                let mut all = load_records(f);
                all.retain(|r| !(r.host == req.host_addr && r.path == *canon));
                all.push(ResumeRecord {
                    host: req.host_addr.clone(),
                    path: canon.clone(),
                    size,
                    mtime_ns: *mtime,
                    name: req.name.clone(),
                    upload_id: s.upload_id.clone(),
                });
                save_records(f, &all);
            }
            s
        }
    };
    let id = status.upload_id.clone();
    *progress.upload_id.lock().unwrap_or_else(|e| e.into_inner()) = id.clone();
    let hash = shared_hash();
    let r = send_all(&slot, &req, &progress, &mut ctl, &n, &mut status, &hash).await;
    if let Err(UploadError::Cancelled) = r {
        forget_record(records, &id);
        let c = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(mut c) = c {
            let _ = c.disk.cancel_upload(UploadRef { upload_id: id }).await;
        }
        return Err(UploadError::Cancelled);
    }
    r?;
    let mut c = clients(&slot, &mut ctl).await?;
    if status.state == UploadState::AwaitingChecksum as i32 {
        // All data is there (maybe sent before a restart): the rest of the checksum.
        hash_to(&req.path, &hash, size, &progress, &ctl, &n).await?;
        let sha256 = lock(&hash).hex();
        let finish = c.disk.finish_upload(FinishUploadRequest {
            upload_id: id.clone(),
            sha256,
        });
        status = tokio::time::timeout(CALL_TIMEOUT, finish)
            .await
            .map_err(|_| UploadError::Agent("the host did not answer in time".into()))?
            .map_err(|s| UploadError::Refused(plain_status("the host refused the checksum", &s)))?
            .into_inner();
    }
    progress.set_phase(Phase::Verifying);
    n.wake();
    if status.state == UploadState::Verifying as i32 && !status.task_id.is_empty() {
        wait_task(&mut c, &status.task_id).await?;
        status = c
            .disk
            .get_upload(UploadRef {
                upload_id: id.clone(),
            })
            .await
            .map_err(|s| UploadError::Refused(plain_status("cannot read the upload", &s)))?
            .into_inner();
    }
    if status.state != UploadState::Done as i32 || status.disk_id.is_empty() {
        return Err(UploadError::Agent(format!(
            "the host did not accept the image{}",
            if status.error.is_empty() {
                String::new()
            } else {
                format!(": {}", status.error)
            }
        )));
    }
    let disk = c
        .disk
        .get_disk(DiskRef {
            disk_id: status.disk_id.clone(),
        })
        .await
        .map_err(|s| UploadError::Refused(plain_status("cannot read the new disk", &s)))?
        .into_inner();
    forget_record(records, &id);
    progress.set_phase(Phase::Done);
    Ok(disk)
}

/// Bring `hash` up to `to` bytes of the file (what the agent has of a resumed upload), off
/// the async threads, showing it as its own phase; stops on Cancel.
async fn hash_to(
    path: &Path,
    hash: &SharedHash,
    to: u64,
    progress: &std::sync::Arc<Progress>,
    ctl: &watch::Receiver<UploadControl>,
    n: &UiWaker,
) -> Result<(), UploadError> {
    let at = lock(hash).at();
    if at >= to {
        return Ok(());
    }
    progress.set(at, to);
    progress.set_phase(Phase::Hashing);
    n.wake();
    let (p, prog, ctl, h) = (
        path.to_path_buf(),
        progress.clone(),
        ctl.clone(),
        hash.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&p).map_err(|source| UploadError::File {
            path: p.clone(),
            source,
        })?;
        let done = lock(&h)
            .read_to(
                &f,
                to,
                &|| *ctl.borrow() == UploadControl::Cancel,
                &mut |at| prog.set(at, to),
            )
            .map_err(|e| source_error(&p, e))?;
        if done {
            Ok(())
        } else {
            Err(UploadError::Cancelled)
        }
    })
    .await
    .map_err(|e| UploadError::Check(e.to_string()))?
}

fn source_error(path: &Path, e: SourceError) -> UploadError {
    match e {
        SourceError::Read { source, .. } => UploadError::File {
            path: path.to_path_buf(),
            source,
        },
        e => UploadError::Check(format!("{}: {e}", path.display())),
    }
}

/// Streams from the agent's verified offset until it has every byte; pauses, resumes after
/// a broken connection, stops on Cancel.
async fn send_all(
    slot: &Slot,
    req: &UploadRequest,
    progress: &std::sync::Arc<Progress>,
    ctl: &mut watch::Receiver<UploadControl>,
    n: &UiWaker,
    status: &mut UploadStatus,
    hash: &SharedHash,
) -> Result<(), UploadError> {
    // The agent's size is the file's (it was declared from it).
    let size = status.size;
    let mut failures = 0u32;
    let mut pause_at = req.pause_at;
    let mut paused_itself = false;
    while status.state == UploadState::Receiving as i32 {
        let want = *ctl.borrow_and_update();
        if want == UploadControl::Cancel {
            return Err(UploadError::Cancelled);
        }
        if want == UploadControl::Pause || paused_itself {
            paused_itself = false;
            progress.set(status.verified_offset, size);
            progress.set_phase(Phase::Paused);
            n.wake();
            ctl.changed().await.map_err(|_| UploadError::Cancelled)?;
            continue;
        }
        let from = status.verified_offset;
        let end = pause_at.filter(|&p| p > from && p < size).unwrap_or(size);
        // A resumed upload: what the agent has is hashed first.
        hash_to(&req.path, hash, from, progress, ctl, n).await?;
        progress.set(from, size);
        progress.set_phase(Phase::Sending);
        n.wake();
        let mut c = clients(slot, ctl).await?;
        let sent = send_stream(
            &mut c,
            &req.path,
            (&status.upload_id, from, end),
            hash,
            progress,
            ctl.clone(),
        );
        let r = tokio::select! {
            r = sent => r,
            _ = wait_not_run(ctl) => Err(Stop::User),
        };
        match r {
            Ok(s) => {
                if s.state == UploadState::Receiving as i32 && s.verified_offset <= from {
                    return Err(UploadError::Agent(format!(
                        "the host kept nothing of the data sent from offset {from}"
                    )));
                }
                failures = 0;
                if end < size && s.verified_offset >= end {
                    pause_at = None;
                    paused_itself = true;
                }
                *status = s;
            }
            Err(Stop::File(e)) => return Err(e),
            Err(Stop::Rpc(s)) if !proto::client::upload_retryable(&s) || failures >= 8 => {
                return Err(UploadError::Refused(plain_status("the upload failed", &s)));
            }
            Err(Stop::User | Stop::Rpc(_)) => {
                let user = *ctl.borrow() != UploadControl::Run;
                if !user {
                    failures += 1;
                    progress.set_phase(Phase::Retrying);
                    n.wake();
                    tokio::time::sleep(Duration::from_millis(500 << failures.min(4))).await;
                }
                // Where did the agent get to?
                let mut c = clients(slot, ctl).await?;
                let id = status.upload_id.clone();
                let mut tries = 0;
                loop {
                    match c
                        .disk
                        .get_upload(UploadRef {
                            upload_id: id.clone(),
                        })
                        .await
                    {
                        Ok(s) => {
                            *status = s.into_inner();
                            break;
                        }
                        Err(s) if proto::client::upload_retryable(&s) && tries < 10 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            c = clients(slot, ctl).await?;
                        }
                        Err(s) => {
                            return Err(UploadError::Refused(plain_status(
                                "cannot resume the upload",
                                &s,
                            )));
                        }
                    }
                }
            }
        }
    }
    match UploadState::try_from(status.state) {
        Ok(UploadState::AwaitingChecksum | UploadState::Verifying | UploadState::Done) => Ok(()),
        Ok(UploadState::Cancelled) => Err(UploadError::Cancelled),
        _ => Err(UploadError::Agent(format!(
            "the host stopped the upload{}",
            if status.error.is_empty() {
                String::new()
            } else {
                format!(": {}", status.error)
            }
        ))),
    }
}

async fn wait_not_run(ctl: &mut watch::Receiver<UploadControl>) {
    loop {
        if *ctl.borrow_and_update() != UploadControl::Run {
            return;
        }
        if ctl.changed().await.is_err() {
            return;
        }
    }
}

enum Stop {
    User,
    Rpc(tonic::Status),
    File(UploadError),
}

/// One UploadDisk stream of the file's bytes `from..end` of upload `id`, each piece
/// hashed into `hash` as it is read.
async fn send_stream(
    c: &mut Clients,
    path: &Path,
    (upload_id, from, end): (&str, u64, u64),
    hash: &SharedHash,
    progress: &std::sync::Arc<Progress>,
    ctl: watch::Receiver<UploadControl>,
) -> Result<UploadStatus, Stop> {
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk>(4);
    let p = path.to_path_buf();
    let id = upload_id.to_string();
    let prog = progress.clone();
    let hash = hash.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<(), UploadError> {
        let f = std::fs::File::open(&p).map_err(|source| UploadError::File {
            path: p.clone(),
            source,
        })?;
        let mut chunks = ChunkReader::new(f, from, Some(hash)).map_err(|e| source_error(&p, e))?;
        let total = prog.get().2;
        while chunks.offset() < end {
            if *ctl.borrow() != UploadControl::Run {
                return Ok(());
            }
            let off = chunks.offset();
            let n = CHUNK.min((end - off) as usize);
            let data = chunks.next(n).map_err(|e| source_error(&p, e))?;
            let chunk = UploadChunk {
                upload_id: id.clone(),
                offset: off,
                data,
            };
            if tx.blocking_send(chunk).is_err() {
                return Ok(());
            }
            prog.set(chunks.offset(), total);
        }
        Ok(())
    });
    let res = c
        .upload_disk(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let read = reader
        .await
        .map_err(|e| Stop::File(UploadError::Check(e.to_string())))?;
    read.map_err(Stop::File)?;
    res.map_err(Stop::Rpc)
}

/// Wait for the agent's verification task.
async fn wait_task(c: &mut Clients, task_id: &str) -> Result<(), UploadError> {
    let mut s = c
        .disk
        .watch_task(TaskRef {
            task_id: task_id.to_string(),
        })
        .await
        .map_err(|s| UploadError::Refused(plain_status("cannot follow the verification", &s)))?
        .into_inner();
    loop {
        match s.message().await {
            Ok(Some(t)) if t.state == TaskState::Running as i32 => {}
            Ok(Some(t)) if t.state == TaskState::Succeeded as i32 => return Ok(()),
            Ok(Some(t)) if t.state == TaskState::Cancelled as i32 => {
                return Err(UploadError::Cancelled);
            }
            Ok(Some(t)) => {
                return Err(UploadError::Agent(format!(
                    "the host rejected the image: {}",
                    if t.error.is_empty() {
                        t.description
                    } else {
                        t.error
                    }
                )));
            }
            Ok(None) => return Ok(()),
            Err(st) => {
                return Err(UploadError::Refused(plain_status(
                    "lost the verification",
                    &st,
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sound_vhd_and_vhdx_files_pass() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("a.iso"), vec![0u8; 4096]).unwrap();
        assert!(
            check_image(&p("a.iso"))
                .unwrap_err()
                .contains(".vhd or .vhdx")
        );
        std::fs::write(p("tiny.vhdx"), b"vhdxfile").unwrap();
        assert!(
            check_image(&p("tiny.vhdx"))
                .unwrap_err()
                .contains("too small")
        );
        let mut v = b"vhdxfile".to_vec();
        v.resize(512 * 1024, 0);
        std::fs::write(p("short.vhdx"), &v).unwrap();
        assert!(
            check_image(&p("short.vhdx"))
                .unwrap_err()
                .contains("truncated")
        );
        v.resize(1 << 20, 0);
        std::fs::write(p("ok.vhdx"), &v).unwrap();
        assert_eq!(
            check_image(&p("ok.vhdx")).unwrap(),
            (ImageKind::Vhdx, 1 << 20)
        );
        std::fs::write(p("ok.vhd"), &v).unwrap();
        assert!(check_image(&p("ok.vhd")).unwrap_err().contains("rename"));
        // A fixed VHD: 4096 bytes of data and a footer.
        let mut foot = [0u8; 512];
        foot[..8].copy_from_slice(b"conectix");
        foot[48..56].copy_from_slice(&4096u64.to_be_bytes());
        foot[60..64].copy_from_slice(&2u32.to_be_bytes());
        let sum: u32 = foot.iter().map(|b| u32::from(*b)).sum();
        foot[64..68].copy_from_slice(&(!sum).to_be_bytes());
        let mut fixed = vec![0u8; 4096];
        fixed.extend_from_slice(&foot);
        std::fs::write(p("fixed.vhd"), &fixed).unwrap();
        assert_eq!(
            check_image(&p("fixed.vhd")).unwrap(),
            (ImageKind::Vhd, 4608)
        );
        fixed.insert(0, 0);
        std::fs::write(p("padded.vhd"), &fixed).unwrap();
        assert!(
            check_image(&p("padded.vhd"))
                .unwrap_err()
                .contains("truncated or padded")
        );
    }
}
