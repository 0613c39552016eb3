//! Resumable uploads.
//!
//! `uploads/<id>/upload.json` describes an upload (name, size, SHA-256 if declared) and its
//! `verified_offset`: the bytes of `uploads/<id>/data.partial` that are durably on disk. A
//! stream writes at the verified offset; every [`CHECKPOINT`] bytes a separate thread makes
//! the data durable (`fdatasync`) and only then advances and persists `verified_offset`, so
//! after a crash it never claims more than the disk holds (bytes past it are truncated away
//! when the library is opened). When the last byte is in and the SHA-256 is known (declared
//! up front, or by `FinishUpload` after the data), a task checks it and the image's
//! structure; only then does the file move into the library.
//!
//! A kill loses at most the last [`CHECKPOINT`] (64 MiB) of a running stream: the client
//! sends them again from `verified_offset`.
//!
//! Moving a verified upload into the library survives a crash at any instant ([`commit`]):
//! the disk's id and description are written into `upload.json` before anything moves, every
//! step after that can run again, and the next start runs them again. So at every instant
//! either the upload (resumable, or verified and committing) or the registered disk exists,
//! and an upload acknowledged complete ends as exactly one disk. An upload that ended (done,
//! failed or cancelled) keeps its `upload.json`, without data, saying how it ended and which
//! disk it became, for [`KEEP_ENDED_MS`] (7 days; the newest [`KEEP_FINISHED`] at most), so
//! `GetUpload` answers the same after a restart.
//!
//! The data path: the gRPC handler hands each chunk (a refcounted `Bytes`, never copied) to
//! a writer thread, which copies it into an aligned staging buffer and hashes (SHA-256) each
//! piece right after staging it, while it is in cache; full staging buffers are written out
//! with direct I/O by an I/O thread while the next fills ([`super::staged`]; buffered where
//! the filesystem has no direct I/O). The writer writes out the staged rest when the stream
//! ends, so then the hasher's state matches the written offset exactly; it is kept in memory
//! for the next stream if all of it is durable. After a restart it is rebuilt by reading the
//! partial file. Checkpoints fall where a staging buffer was written out.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::Context;
use parvis_disk::image::Image;
use parvis_disk::storage::FileStorage;
use parvis_disk::vhd::Vhd;
use parvis_disk::vhdx::{Vhdx, VhdxOpenOptions};
use parvis_disk::{ImageFormat, RawFile, RawFileOptions};
use prost::bytes::Bytes;
use proto::v1::{Disk, UploadChunk, UploadState, UploadStatus};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_stream::{Stream, StreamExt};

use super::staged::StagedFile;
use super::{
    DiskLibrary, DiskMeta, Inner, MAX_DISK_SIZE, blocking, disk_from_info, free_space,
    validate_name,
};
use crate::error::{AgentError, AgentResult};
use crate::fault;
use crate::store::{self, Layout, is_id, new_id, now_ms};
use crate::tasks::TaskHandle;

/// Data is made durable and `verified_offset` advanced at most this often.
const CHECKPOINT: u64 = 64 << 20;
/// Batches of data queued between the handler and the writer.
const QUEUE: usize = 4;
/// The handler hands data to the writer in batches of this many bytes (or what has come
/// when the stream has nothing more at once).
const BATCH: u64 = 1 << 20;
/// Ended uploads remembered for `GetUpload`, at most.
const KEEP_FINISHED: usize = 1000;
/// How long an ended upload is remembered.
const KEEP_ENDED_MS: i64 = 7 * 24 * 3600 * 1000;
const DATA: &str = "data.partial";
const META: &str = "upload.json";

/// What `upload.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadMeta {
    id: String,
    name: String,
    size: u64,
    /// Lower-case hex; empty until declared (`FinishUpload`).
    #[serde(default)]
    sha256: String,
    created_ms: i64,
    verified_offset: u64,
    /// The disk a verified upload becomes, recorded before its data moves (see [`commit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disk: Option<DiskMeta>,
    /// How the upload ended; then the data is gone and only this record stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ended: Option<Ended>,
}

/// How an upload ended, as `upload.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ended {
    /// "done", "failed" or "cancelled".
    state: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    disk_id: String,
    finished_ms: i64,
}

impl Ended {
    fn state(&self) -> Option<UploadState> {
        match self.state.as_str() {
            "done" => Some(UploadState::Done),
            "failed" => Some(UploadState::Failed),
            "cancelled" => Some(UploadState::Cancelled),
            _ => None,
        }
    }
}

/// An upload, in memory.
pub(crate) struct UploadEntry {
    meta: UploadMeta,
    state: UploadState,
    task_id: String,
    disk_id: String,
    error: String,
    /// A stream owns the data file.
    streaming: bool,
    /// The verified image is being moved into the library; too late to cancel.
    committing: bool,
    /// Set by `cancel_upload` to stop a running stream.
    cancel: Arc<AtomicBool>,
    /// SHA-256 state over the first `meta.verified_offset` bytes (None: rebuild from the
    /// file). Only meaningful while no stream runs.
    hasher: Option<Sha256>,
    finished_ms: i64,
}

impl UploadEntry {
    fn new(meta: UploadMeta) -> Self {
        UploadEntry {
            meta,
            state: UploadState::Receiving,
            task_id: String::new(),
            disk_id: String::new(),
            error: String::new(),
            streaming: false,
            committing: false,
            cancel: Arc::new(AtomicBool::new(false)),
            hasher: None,
            finished_ms: 0,
        }
    }

    fn status(&self) -> UploadStatus {
        UploadStatus {
            upload_id: self.meta.id.clone(),
            name: self.meta.name.clone(),
            size: self.meta.size,
            verified_offset: self.meta.verified_offset,
            state: self.state as i32,
            task_id: self.task_id.clone(),
            disk_id: self.disk_id.clone(),
            error: self.error.clone(),
        }
    }

    /// Why an upload that failed or was cancelled takes nothing more.
    fn ended_error(&self) -> AgentError {
        let id = &self.meta.id;
        AgentError::precondition(if self.state == UploadState::Failed {
            format!("upload '{id}' failed: {}", self.error)
        } else {
            format!("upload '{id}' was cancelled")
        })
    }

    fn end(&mut self, state: UploadState, error: String) {
        self.state = state;
        self.error = error;
        self.finished_ms = now_ms();
        self.hasher = None;
        self.streaming = false;
        self.committing = false;
    }

    /// The record of an ended upload.
    fn ended(&self) -> Ended {
        Ended {
            state: match self.state {
                UploadState::Done => "done",
                UploadState::Cancelled => "cancelled",
                _ => "failed",
            }
            .into(),
            error: self.error.clone(),
            disk_id: self.disk_id.clone(),
            finished_ms: self.finished_ms,
        }
    }

    /// An upload that ended before the agent started, from its record.
    fn from_record(meta: UploadMeta, ended: &Ended, state: UploadState) -> Self {
        let mut e = UploadEntry::new(meta);
        e.state = state;
        e.error = ended.error.clone();
        e.disk_id = ended.disk_id.clone();
        e.finished_ms = ended.finished_ms;
        e
    }
}

impl DiskLibrary {
    /// Declare an upload: the image's name, exact size and SHA-256 (empty: declared by
    /// [`DiskLibrary::finish_upload`] after the data). The data follows in
    /// [`DiskLibrary::upload_stream`]s.
    pub async fn begin_upload(
        &self,
        name: &str,
        size: u64,
        sha256: &str,
    ) -> AgentResult<UploadStatus> {
        validate_name(name, "name")?;
        if size == 0 {
            return Err(AgentError::invalid("size", "must be more than 0"));
        }
        if size > MAX_DISK_SIZE {
            return Err(AgentError::invalid("size", "must be at most 64 TiB"));
        }
        if !size.is_multiple_of(512) {
            return Err(AgentError::invalid("size", "must be a multiple of 512"));
        }
        let sha256 = if sha256.is_empty() {
            String::new()
        } else {
            parse_sha256(sha256)?
        };
        let meta = UploadMeta {
            id: new_id(),
            name: name.to_string(),
            size,
            sha256,
            created_ms: now_ms(),
            verified_offset: 0,
            disk: None,
            ended: None,
        };
        let inner = self.inner.clone();
        blocking(move || {
            let free = free_space(&inner.layout.uploads())?;
            {
                let mut map = inner.lock_uploads();
                // What the running uploads still need is spoken for.
                let promised: u64 = map
                    .values()
                    .filter(|u| u.state == UploadState::Receiving)
                    .map(|u| u.meta.size - u.meta.verified_offset)
                    .sum();
                if size.saturating_add(promised) > free {
                    return Err(AgentError::ResourceExhausted(format!(
                        "not enough free space for {size} bytes: {free} bytes are free and \
                         {promised} of them are promised to other uploads"
                    )));
                }
                for old in prune(&mut map) {
                    let _ = fs::remove_dir_all(inner.upload_dir(&old));
                }
                let mut e = UploadEntry::new(meta.clone());
                // Nobody may stream until the files exist.
                e.streaming = true;
                map.insert(meta.id.clone(), e);
            }
            let dir = inner.upload_dir(&meta.id);
            let made = (|| {
                fs::create_dir(&dir)?;
                File::create(dir.join(DATA))?.sync_all()?;
                store::write_json(&dir.join(META), &meta)?;
                store::sync_dir(&inner.layout.uploads())
            })();
            let mut map = inner.lock_uploads();
            match made {
                Ok(()) => {
                    let e = map.get_mut(&meta.id).expect("inserted above");
                    e.streaming = false;
                    e.hasher = Some(Sha256::new());
                    Ok(e.status())
                }
                Err(err) => {
                    map.remove(&meta.id);
                    drop(map);
                    let _ = fs::remove_dir_all(&dir);
                    Err(AgentError::internal("creating an upload", err))
                }
            }
        })
        .await
    }

    /// Declare the SHA-256 of an upload begun without one, once all its data is stored, and
    /// start verifying it. Declaring the same checksum again returns the upload's state.
    pub async fn finish_upload(&self, id: &str, sha256: &str) -> AgentResult<UploadStatus> {
        let sha256 = parse_sha256(sha256)?;
        let inner = self.inner.clone();
        let id = id.to_string();
        // The lock is held while upload.json is rewritten (one small file), so no stream,
        // cancel or second FinishUpload comes in between.
        blocking(move || {
            inner.with_upload(&id, |e| {
                match e.state {
                    UploadState::AwaitingChecksum => {}
                    UploadState::Receiving => {
                        return Err(AgentError::precondition(format!(
                            "upload '{id}' has {} of its {} bytes: send the rest before \
                             declaring its checksum",
                            e.meta.verified_offset, e.meta.size
                        )));
                    }
                    UploadState::Verifying | UploadState::Done if e.meta.sha256 == sha256 => {
                        return Ok(e.status());
                    }
                    UploadState::Verifying | UploadState::Done => {
                        return Err(AgentError::precondition(format!(
                            "upload '{id}' has a different SHA-256 declared already"
                        )));
                    }
                    _ => return Err(e.ended_error()),
                }
                let mut meta = e.meta.clone();
                meta.sha256 = sha256;
                // Persisted first: after a restart the agent verifies it without being asked.
                store::write_json(&inner.upload_dir(&id).join(META), &meta)
                    .map_err(|err| AgentError::internal("saving an upload's checksum", err))?;
                e.meta.sha256 = meta.sha256;
                start_verify(&inner, e);
                Ok(e.status())
            })
        })
        .await
    }

    /// An upload's state.
    pub fn get_upload(&self, id: &str) -> AgentResult<UploadStatus> {
        self.inner.with_upload(id, |e| Ok(e.status()))
    }

    /// Stop an upload and delete its data. Verification can be cancelled until the image
    /// is being moved into the library.
    pub async fn cancel_upload(&self, id: &str) -> AgentResult<UploadStatus> {
        let inner = self.inner.clone();
        let id = id.to_string();
        // The lock is held while the record is written: nobody sees the upload cancelled
        // before that is durable.
        blocking(move || {
            inner.with_upload(&id, |e| {
                let remove = match e.state {
                    UploadState::Cancelled => return Ok(e.status()),
                    UploadState::Receiving | UploadState::AwaitingChecksum => {
                        e.cancel.store(true, Ordering::SeqCst);
                        // A running stream removes the data when it stops.
                        !e.streaming
                    }
                    UploadState::Verifying if e.committing => {
                        return Err(AgentError::precondition(format!(
                            "upload '{id}' has been verified and is being added to the library"
                        )));
                    }
                    UploadState::Verifying => {
                        // The verification task removes the data when it notices.
                        let _ = inner.tasks.cancel(&e.task_id);
                        false
                    }
                    _ => {
                        return Err(AgentError::precondition(format!(
                            "upload '{id}' has already ended"
                        )));
                    }
                };
                e.end(UploadState::Cancelled, String::new());
                if remove {
                    inner.retire(&e.meta, e.ended());
                }
                Ok(e.status())
            })
        })
        .await
    }

    /// Receive one stream of upload data. The first message names the upload and the
    /// offset of its data, which must be the upload's `verified_offset`; the following
    /// messages carry the data after it. Whatever arrives before the stream ends or breaks
    /// is kept (and counted in `verified_offset`), so a client resumes with a new stream.
    pub async fn upload_stream<S, E>(&self, mut stream: S) -> AgentResult<UploadStatus>
    where
        S: Stream<Item = Result<UploadChunk, E>> + Unpin + Send,
        E: Into<AgentError>,
    {
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e.into()),
            None => {
                return Err(AgentError::invalid(
                    "upload_id",
                    "the stream carried no messages",
                ));
            }
        };
        if first.upload_id.is_empty() {
            return Err(AgentError::invalid(
                "upload_id",
                "the first message must name the upload",
            ));
        }
        let mut claim = self.inner.claim(&first.upload_id, first.offset)?;
        let id = claim.meta.id.clone();
        let size = claim.meta.size;
        let start = claim.meta.verified_offset;
        let path = self.inner.upload_dir(&id).join(DATA);
        let hasher = claim.hasher.take();
        let sync = Arc::new(SyncState {
            req: Mutex::new((start, false)),
            cv: Condvar::new(),
            durable: AtomicU64::new(start),
        });
        let on_written = {
            let sync = sync.clone();
            // Checkpoints fall where a staging buffer was written out (the file is that long
            // already, holes at its end included).
            move |written: u64| {
                let mut r = sync.req.lock().unwrap_or_else(|e| e.into_inner());
                if written >= r.0 + CHECKPOINT {
                    r.0 = written;
                    sync.cv.notify_one();
                }
            }
        };
        let (out, sync_file, hasher) = blocking(move || {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .and_then(|f| {
                    // Anything past the verified offset is not trusted (and must read as
                    // zeros where the writer leaves holes).
                    f.set_len(start)?;
                    Ok(f)
                })
                .map_err(|e| AgentError::internal("opening upload data", e))?;
            let hasher = match hasher {
                Some(h) => h,
                None => hash_prefix(&file, start, None)?,
            };
            let sync_file = file
                .try_clone()
                .map_err(|e| AgentError::internal("opening upload data", e))?;
            let out = StagedFile::new(file, &path, start, true, on_written)
                .map_err(|e| AgentError::internal("opening upload data", e))?;
            Ok((out, sync_file, hasher))
        })
        .await?;

        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(QUEUE);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let cancel = claim.cancel.clone();
        let writer = Writer {
            claim,
            out,
            sync_file,
            sync,
            hasher,
        };
        std::thread::Builder::new()
            .name("upload-writer".into())
            .spawn(move || {
                let _ = done_tx.send(writer.run(rx));
            })
            .map_err(|e| AgentError::internal("starting an upload thread", e))?;

        let mut expected = start;
        let mut failure: Option<AgentError> = None;
        let mut data = first.data;
        // Pieces go to the writer in batches of about BATCH bytes, or whatever has come when
        // the stream has nothing more at once.
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batched = 0;
        loop {
            if cancel.load(Ordering::SeqCst) {
                failure = Some(AgentError::Cancelled);
                break;
            }
            let len = data.len() as u64;
            if len > 0 {
                if expected + len > size {
                    failure = Some(AgentError::invalid(
                        "data",
                        format!(
                            "{len} bytes at offset {expected} go past the declared size {size}"
                        ),
                    ));
                    break;
                }
                batch.push(data);
                batched += len;
                expected += len;
            }
            let mut next = now(&mut stream);
            if (next.is_none() || batched >= BATCH) && !batch.is_empty() {
                batched = 0;
                if tx.send(std::mem::take(&mut batch)).await.is_err() {
                    // The writer stopped; its result says why.
                    break;
                }
            }
            if next.is_none() {
                next = Some(stream.next().await);
            }
            data = match next.expect("waited for above") {
                None => break,
                Some(Err(e)) => {
                    failure = Some(e.into());
                    break;
                }
                Some(Ok(c)) => {
                    if !c.upload_id.is_empty() && c.upload_id != id {
                        failure = Some(AgentError::invalid(
                            "upload_id",
                            "all messages of a stream belong to one upload",
                        ));
                        break;
                    }
                    if c.offset != 0 && c.offset != expected {
                        failure = Some(AgentError::invalid(
                            "offset",
                            format!("data must be contiguous: expected offset {expected}"),
                        ));
                        break;
                    }
                    c.data
                }
            };
        }
        // Everything that came before the stream ended or broke is kept. (If the writer has
        // stopped, its result says why.)
        if !batch.is_empty() {
            let _ = tx.send(batch).await;
        }
        drop(tx);
        let written = done_rx
            .await
            .map_err(|e| AgentError::internal("upload writer thread", e))?;
        match (failure, written) {
            (_, Err(e)) | (Some(e), Ok(_)) => Err(e),
            (None, Ok(status)) => Ok(status),
        }
    }
}

/// The stream's next item if it is there at once; `None` if it would have to be waited for.
fn now<S: Stream + Unpin>(stream: &mut S) -> Option<Option<S::Item>> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match std::pin::Pin::new(stream).poll_next(&mut cx) {
        std::task::Poll::Ready(item) => Some(item),
        std::task::Poll::Pending => None,
    }
}

impl Inner {
    fn upload_dir(&self, id: &str) -> PathBuf {
        self.layout.uploads().join(id)
    }

    fn with_upload<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut UploadEntry) -> AgentResult<T>,
    ) -> AgentResult<T> {
        if !is_id(id) {
            return Err(AgentError::not_found("upload", id));
        }
        match self.lock_uploads().get_mut(id) {
            Some(e) => f(e),
            None => Err(AgentError::not_found("upload", id)),
        }
    }

    /// Take an upload for one stream starting at `offset`.
    fn claim(self: &Arc<Self>, id: &str, offset: u64) -> AgentResult<Claim> {
        self.with_upload(id, |e| {
            match e.state {
                UploadState::Receiving => {}
                UploadState::AwaitingChecksum => {
                    return Err(AgentError::precondition(format!(
                        "upload '{id}' has all its data: declare its SHA-256 (FinishUpload)"
                    )));
                }
                UploadState::Verifying => {
                    return Err(AgentError::precondition(format!(
                        "upload '{id}' has all its data and is being verified"
                    )));
                }
                UploadState::Done => {
                    return Err(AgentError::precondition(format!(
                        "upload '{id}' is complete (disk '{}')",
                        e.disk_id
                    )));
                }
                _ => return Err(e.ended_error()),
            }
            if e.streaming {
                return Err(AgentError::precondition(format!(
                    "upload '{id}': upload already in progress (another stream is sending \
                     its data)"
                )));
            }
            let verified = e.meta.verified_offset;
            if offset != verified {
                return Err(AgentError::precondition(format!(
                    "upload '{id}' continues at offset {verified}, not {offset}: send the data \
                     from offset {verified}"
                )));
            }
            e.streaming = true;
            Ok(Claim {
                inner: self.clone(),
                meta: e.meta.clone(),
                hasher: e.hasher.take(),
                cancel: e.cancel.clone(),
                released: false,
            })
        })
    }

    /// Set the durable offset of a running stream's upload.
    fn set_verified(&self, id: &str, offset: u64) {
        if let Some(e) = self.lock_uploads().get_mut(id) {
            e.meta.verified_offset = e.meta.verified_offset.max(offset);
        }
    }
}

/// One stream's hold on an upload. Dropping it without [`Claim::release`] (an error before
/// the writer started) just lets the next stream in.
struct Claim {
    inner: Arc<Inner>,
    meta: UploadMeta,
    hasher: Option<Sha256>,
    cancel: Arc<AtomicBool>,
    released: bool,
}

impl Claim {
    /// End the stream: `verified` bytes are durable and `hasher` (if known) covers exactly
    /// them. A complete upload goes on to verification; a cancelled one is removed.
    fn release(mut self, verified: u64, hasher: Option<Sha256>) -> UploadStatus {
        self.released = true;
        let mut map = self.inner.lock_uploads();
        let Some(e) = map.get_mut(&self.meta.id) else {
            return UploadStatus::default();
        };
        e.streaming = false;
        e.meta.verified_offset = verified;
        if e.state != UploadState::Receiving {
            // Cancelled while streaming: the data goes.
            self.inner.retire(&e.meta, e.ended());
            return e.status();
        }
        e.hasher = hasher;
        if verified == e.meta.size {
            complete(&self.inner, e);
        }
        e.status()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let mut map = self.inner.lock_uploads();
        let Some(e) = map.get_mut(&self.meta.id) else {
            return;
        };
        e.streaming = false;
        if e.state == UploadState::Receiving {
            e.hasher = self.hasher.take();
        } else {
            self.inner.retire(&e.meta, e.ended());
        }
    }
}

/// All of an upload's data is stored: verify it, or wait for its checksum (the uploads lock
/// is held).
fn complete(inner: &Arc<Inner>, e: &mut UploadEntry) {
    if e.meta.sha256.is_empty() {
        e.state = UploadState::AwaitingChecksum;
    } else {
        start_verify(inner, e);
    }
}

/// 64 hex digits, as lower case.
fn parse_sha256(s: &str) -> AgentResult<String> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AgentError::invalid("sha256", "must be 64 hex digits"));
    }
    Ok(s.to_ascii_lowercase())
}

/// Start the verification task of a complete upload (the uploads lock is held).
fn start_verify(inner: &Arc<Inner>, e: &mut UploadEntry) {
    let h = inner.tasks.start(
        format!("verify upload '{}'", e.meta.name),
        "bytes",
        e.meta.size,
    );
    e.state = UploadState::Verifying;
    e.task_id = h.id().to_string();
    let hasher = e.hasher.take();
    let meta = e.meta.clone();
    let inner2 = inner.clone();
    let spawned = std::thread::Builder::new()
        .name("upload-verify".into())
        .spawn(move || verify(&inner2, meta, hasher, h));
    if let Err(err) = spawned {
        tracing::error!("starting an upload verification thread: {err}");
        e.end(
            UploadState::Failed,
            "internal error (details are in the agent's log)".into(),
        );
    }
}

/// The verification task: checksum, structure, then the move into the library.
fn verify(inner: &Arc<Inner>, meta: UploadMeta, hasher: Option<Sha256>, h: TaskHandle) {
    let result = verify_and_install(inner, &meta, hasher, &h);
    {
        // Under the lock: nobody sees the upload ended before its record is durable.
        let mut map = inner.lock_uploads();
        if let Some(e) = map.get_mut(&meta.id) {
            match &result {
                // Its record says so already (written before the disk was announced).
                Ok(disk) => {
                    e.disk_id = disk.id.clone();
                    e.end(UploadState::Done, String::new());
                }
                Err(err) => {
                    if matches!(err, AgentError::Cancelled)
                        || e.state == UploadState::Cancelled
                        || h.is_cancelled()
                    {
                        e.end(UploadState::Cancelled, String::new());
                    } else {
                        e.end(UploadState::Failed, err.client_message());
                    }
                    // The data is unwanted: only the record of how the upload ended stays.
                    inner.retire(&e.meta, e.ended());
                }
            }
        }
    }
    if let Ok(disk) = &result {
        h.set_disk(&disk.id);
    }
    if let Err(e) = &result {
        tracing::info!("upload {} ('{}'): {e}", meta.id, meta.name);
    }
    h.finish(&result.map(drop));
}

fn verify_and_install(
    inner: &Arc<Inner>,
    meta: &UploadMeta,
    hasher: Option<Sha256>,
    h: &TaskHandle,
) -> AgentResult<Disk> {
    let dir = inner.upload_dir(&meta.id);
    let data = dir.join(DATA);
    let digest = match hasher {
        Some(hs) => hs.finalize(),
        None => {
            let f =
                File::open(&data).map_err(|e| AgentError::internal("opening upload data", e))?;
            hash_prefix(&f, meta.size, Some(h))?.finalize()
        }
    };
    h.progress(meta.size, meta.size);
    if hex::encode(digest) != meta.sha256 {
        return Err(AgentError::FailedPrecondition(
            "checksum mismatch: the data received does not have the declared SHA-256".into(),
        ));
    }
    if h.is_cancelled() {
        return Err(AgentError::Cancelled);
    }
    let (img, format) = open_upload(&data)?;
    let info = img.info(&data);
    if info.variant == "differencing" {
        return Err(AgentError::Image(
            "differencing images need their parent; upload a merged image instead".into(),
        ));
    }
    let report = img.check()?;
    if let Some(first) = report.errors.first() {
        let more = report.errors.len() - 1;
        return Err(AgentError::Image(if more > 0 {
            format!("the image failed its structure check: {first} (and {more} more problems)")
        } else {
            format!("the image failed its structure check: {first}")
        }));
    }
    fault::point("upload-verified");
    // Past this point cancelling is refused: the image becomes a disk.
    {
        let mut map = inner.lock_uploads();
        match map.get_mut(&meta.id) {
            Some(e) if e.state == UploadState::Verifying && !h.is_cancelled() => {
                e.committing = true;
            }
            _ => return Err(AgentError::Cancelled),
        }
    }
    let mut disk_meta = DiskMeta::new(
        new_id(),
        meta.name.clone(),
        format,
        info.logical_sector_size,
    );
    disk_meta.imported = true;
    // The intent first: once it is durable, a restart finishes the move whatever happens.
    let mut record = meta.clone();
    record.disk = Some(disk_meta.clone());
    store::write_json(&dir.join(META), &record)
        .map_err(|e| AgentError::internal("recording an upload's disk", e))?;
    fault::point("upload-commit-intent");
    let path = inner.disk_dir(&disk_meta.id).join(&disk_meta.file);
    let committed = commit(&inner.layout, &dir, &disk_meta)
        .and_then(|()| {
            record.ended = Some(Ended {
                state: "done".into(),
                error: String::new(),
                disk_id: disk_meta.id.clone(),
                finished_ms: now_ms(),
            });
            store::write_json(&dir.join(META), &record)
        })
        .map_err(|e| AgentError::internal("moving an upload into the library", e));
    if let Err(e) = committed {
        // The upload ends failed (its record says so): nothing of the disk may stay.
        let _ = fs::remove_dir_all(inner.disk_dir(&disk_meta.id));
        return Err(e);
    }
    fault::point("upload-commit-done");
    let disk = disk_from_info(&disk_meta, &img.info(&path));
    Ok(inner.register(disk_meta, disk))
}

/// Make the verified upload in `upload_dir` the disk `disk` describes: its directory, the
/// data moved in as its image, then `disk.json`. Each step is skipped when done already, so
/// after a crash anywhere in here the next start runs it again to the end.
fn commit(layout: &Layout, upload_dir: &Path, disk: &DiskMeta) -> std::io::Result<()> {
    let ddir = layout.disks().join(&disk.id);
    let image = ddir.join(&disk.file);
    let data = upload_dir.join(DATA);
    match fs::create_dir(&ddir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    store::sync_dir(&layout.disks())?;
    fault::point("upload-commit-dir");
    if data.exists() {
        fs::rename(&data, &image)?;
        store::sync_dir(&ddir)?;
        store::sync_dir(upload_dir)?;
        fault::point("upload-commit-moved");
    }
    if !ddir.join(super::DISK_JSON).exists() {
        if !image.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the upload's data is neither in the upload nor in its disk",
            ));
        }
        store::write_json(&ddir.join(super::DISK_JSON), disk)?;
        store::sync_dir(&layout.disks())?;
        fault::point("upload-commit-registered");
    }
    Ok(())
}

impl Inner {
    /// Make an upload's end durable: `upload.json` keeps how it ended (for `GetUpload`, across
    /// restarts) and its data goes. If the record cannot be written the whole upload goes,
    /// as it did before uploads were remembered.
    fn retire(&self, meta: &UploadMeta, ended: Ended) {
        let dir = self.upload_dir(&meta.id);
        let mut m = meta.clone();
        m.ended = Some(ended);
        let kept = store::write_json(&dir.join(META), &m).and_then(|()| {
            match fs::remove_file(dir.join(DATA)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            store::sync_dir(&dir)
        });
        if let Err(e) = kept {
            tracing::warn!("upload {}: cannot keep its record: {e}", meta.id);
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!("removing {}: {e}", dir.display());
            }
        }
    }
}

/// Open an uploaded image for checking. A differencing image's parent is not looked for
/// next to it; a VHDX log is replayed (the file is ours).
fn open_upload(path: &Path) -> AgentResult<(Image, ImageFormat)> {
    let format = parvis_disk::image::detect(path)?;
    let open = |write: bool| {
        fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| AgentError::internal("opening upload data", e))
    };
    let img = match format {
        ImageFormat::Raw => Image::Raw(RawFile::open_with(
            path,
            &RawFileOptions {
                read_only: true,
                logical_sector_size: 512,
                physical_sector_size: None,
            },
        )?),
        ImageFormat::Vhd => Image::Vhd(Box::new(Vhd::open_storage(
            Box::new(FileStorage(open(false)?)),
            true,
            None,
        )?)),
        ImageFormat::Vhdx => Image::Vhdx(Box::new(Vhdx::open_storage(
            Box::new(FileStorage(open(true)?)),
            &VhdxOpenOptions {
                read_only: false,
                allow_replay: true,
            },
            None,
        )?)),
    };
    Ok((img, format))
}

/// SHA-256 of the first `len` bytes of `file`; a task handle gets progress and can cancel.
fn hash_prefix(file: &File, len: u64, h: Option<&TaskHandle>) -> AgentResult<Sha256> {
    let mut hasher = Sha256::new();
    // Small reads are hashed while they are still in the CPU's cache.
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0u64;
    while off < len {
        let n = buf.len().min((len - off) as usize);
        file.read_exact_at(&mut buf[..n], off)
            .map_err(|e| AgentError::internal("reading upload data", e))?;
        hasher.update(&buf[..n]);
        off += n as u64;
        if let Some(h) = h {
            if h.is_cancelled() {
                return Err(AgentError::Cancelled);
            }
            if off.is_multiple_of(4 << 20) || off == len {
                h.progress(off, len);
            }
        }
    }
    Ok(hasher)
}

/// The writer side of one stream.
struct Writer {
    claim: Claim,
    out: StagedFile,
    /// The same file, for `fdatasync` (from the syncer thread too).
    sync_file: File,
    /// Checkpoint requests, from the staged file's I/O thread to the syncer.
    sync: Arc<SyncState>,
    hasher: Sha256,
}

/// Between the writer and the syncer thread.
struct SyncState {
    /// (offset written that should become durable, stop)
    req: Mutex<(u64, bool)>,
    cv: Condvar,
    /// Durable and persisted in upload.json.
    durable: AtomicU64,
}

impl Writer {
    /// Write what arrives on `rx` from the claim's verified offset on, then make it durable
    /// and release the claim.
    fn run(self, mut rx: tokio::sync::mpsc::Receiver<Vec<Bytes>>) -> AgentResult<UploadStatus> {
        let Writer {
            claim,
            mut out,
            sync_file,
            sync,
            mut hasher,
        } = self;
        let start = claim.meta.verified_offset;
        let json = claim.inner.upload_dir(&claim.meta.id).join(META);
        tracing::debug!(
            "upload {}: stream from offset {start}, direct I/O: {}",
            claim.meta.id,
            out.is_direct()
        );
        let mut failure: Option<std::io::Error> = None;
        std::thread::scope(|s| {
            let syncing = std::thread::Builder::new()
                .name("upload-syncer".into())
                .spawn_scoped(s, || syncer(&sync_file, &sync, &claim, &json));
            if let Err(e) = &syncing {
                failure = Some(std::io::Error::new(e.kind(), e.to_string()));
            }
            'recv: while failure.is_none()
                && let Some(batch) = rx.blocking_recv()
            {
                for b in batch {
                    // Hashed right after staging, while the bytes are in cache.
                    if let Err(e) = out.write(&b, |piece| hasher.update(piece)) {
                        failure = Some(e);
                        break 'recv;
                    }
                }
            }
            // Refuse further data at once if writing failed.
            drop(rx);
            sync.req.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
            sync.cv.notify_one();
            if let Ok(h) = syncing {
                let _ = h.join();
            }
        });
        // Without a failure, every byte received is staged and hashed.
        let off = out.offset();
        let mut durable = sync.durable.load(Ordering::SeqCst);
        if failure.is_none() && off > durable {
            let done = (|| {
                out.finish()?;
                sync_file.sync_data()?;
                persist(&json, &claim.meta, off)
            })();
            match done {
                Ok(()) => durable = off,
                Err(e) => failure = Some(e),
            }
        }
        drop(out);
        drop(sync_file);
        // The hasher covers `off` bytes: keep it only if they are all durable.
        let hasher = (failure.is_none() && durable == off).then_some(hasher);
        let status = claim.release(durable, hasher);
        match failure {
            Some(e) => Err(AgentError::internal("writing upload data", e)),
            None => Ok(status),
        }
    }
}

/// Make written data durable in the background, then advance the verified offset.
fn syncer(file: &File, sync: &SyncState, claim: &Claim, json: &Path) {
    loop {
        let want = {
            let mut r = sync.req.lock().unwrap_or_else(|e| e.into_inner());
            while r.0 <= sync.durable.load(Ordering::SeqCst) && !r.1 {
                r = sync.cv.wait(r).unwrap_or_else(|e| e.into_inner());
            }
            if r.1 {
                // The writer makes the rest durable itself.
                return;
            }
            r.0
        };
        if let Err(e) = file
            .sync_data()
            .and_then(|()| persist(json, &claim.meta, want))
        {
            tracing::warn!("upload {}: checkpoint at {want}: {e}", claim.meta.id);
            return;
        }
        sync.durable.store(want, Ordering::SeqCst);
        claim.inner.set_verified(&claim.meta.id, want);
    }
}

fn persist(json: &Path, meta: &UploadMeta, verified: u64) -> std::io::Result<()> {
    let mut m = meta.clone();
    m.verified_offset = verified;
    store::write_json(json, &m)
}

/// Drop the oldest ended uploads beyond [`KEEP_FINISHED`]; returns their ids (their records
/// are the caller's to remove).
fn prune(map: &mut HashMap<String, UploadEntry>) -> Vec<String> {
    let mut finished: Vec<(i64, String)> = map
        .values()
        .filter(|e| e.finished_ms != 0)
        .map(|e| (e.finished_ms, e.meta.id.clone()))
        .collect();
    if finished.len() <= KEEP_FINISHED {
        return Vec::new();
    }
    finished.sort();
    finished.truncate(finished.len() - KEEP_FINISHED);
    for (_, id) in &finished {
        map.remove(id);
    }
    finished.into_iter().map(|(_, id)| id).collect()
}

/// What [`scan`] found in `uploads/`.
pub(super) struct Scanned {
    uploads: Vec<UploadMeta>,
    /// Disks whose commit could not be finished now: their directories hold the data and
    /// must not be removed as half-made; the next start tries again.
    pub(super) unfinished: HashSet<String>,
}

/// Read `uploads/` before the disks are loaded: data past the verified offset is cut off,
/// half-made uploads and records past [`KEEP_ENDED_MS`] are removed, and a commit that a
/// crash interrupted is finished, so its disk is complete when the library loads it.
pub(super) fn scan(layout: &Layout) -> anyhow::Result<Scanned> {
    let root = layout.uploads();
    let mut out = Scanned {
        uploads: Vec::new(),
        unfinished: HashSet::new(),
    };
    for ent in fs::read_dir(&root).with_context(|| format!("reading {}", root.display()))? {
        let ent = ent?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let dir = ent.path();
        if !is_id(&name) || !ent.file_type()?.is_dir() {
            if name.starts_with('.') && name.contains(".tmp") {
                let _ = fs::remove_file(&dir);
            } else {
                tracing::warn!("ignoring {} in the uploads directory", dir.display());
            }
            continue;
        }
        super::remove_temp_files(&dir);
        let mut meta = match load_one(&dir, &name) {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                tracing::info!("removing the unusable upload {}", dir.display());
                if let Err(e) = fs::remove_dir_all(&dir) {
                    tracing::warn!("removing {}: {e}", dir.display());
                }
                continue;
            }
            Err(e) => {
                tracing::warn!("ignoring upload {}: {e:#}", dir.display());
                continue;
            }
        };
        if let Some(ended) = &meta.ended
            && now_ms().saturating_sub(ended.finished_ms) > KEEP_ENDED_MS
        {
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!("removing {}: {e}", dir.display());
            }
            continue;
        }
        if let (Some(disk), None) = (meta.disk.clone(), &meta.ended) {
            match finish_commit(layout, &dir, &mut meta, &disk) {
                Ok(()) => tracing::info!("upload {name}: finished becoming disk {}", disk.id),
                Err(e) => {
                    tracing::error!(
                        "upload {name}: cannot finish becoming disk {} (tried again at the next \
                         start): {e}",
                        disk.id
                    );
                    out.unfinished.insert(disk.id.clone());
                }
            }
        }
        out.uploads.push(meta);
    }
    Ok(out)
}

/// Finish the commit an upload's record names, and record the upload done.
fn finish_commit(
    layout: &Layout,
    dir: &Path,
    meta: &mut UploadMeta,
    disk: &DiskMeta,
) -> std::io::Result<()> {
    let ddir = layout.disks().join(&disk.id);
    let gone = !dir.join(DATA).exists()
        && !ddir.join(&disk.file).exists()
        && !ddir.join(super::DISK_JSON).exists();
    // With neither the data nor the disk left, the disk was made, announced and deleted
    // before the record of it could be written.
    if !gone {
        commit(layout, dir, disk)?;
    }
    let ended = Ended {
        state: "done".into(),
        error: String::new(),
        disk_id: disk.id.clone(),
        finished_ms: now_ms(),
    };
    let mut m = meta.clone();
    m.ended = Some(ended);
    store::write_json(&dir.join(META), &m)?;
    *meta = m;
    Ok(())
}

/// Put the uploads [`scan`] found in memory: ended ones as their records say, complete ones
/// verified again, unfinished commits failed until the next start.
pub(super) fn load(inner: &Arc<Inner>, scanned: Scanned) {
    let mut map = inner.lock_uploads();
    for meta in scanned.uploads {
        let id = meta.id.clone();
        let e = match (&meta.ended, &meta.disk) {
            (Some(ended), _) => match ended.state() {
                Some(state) => {
                    let ended = ended.clone();
                    UploadEntry::from_record(meta, &ended, state)
                }
                None => continue,
            },
            (None, Some(disk)) if scanned.unfinished.contains(&disk.id) => {
                let mut e = UploadEntry::new(meta);
                e.end(
                    UploadState::Failed,
                    "the upload was verified but could not be added to the library; the agent \
                     tries again when it restarts"
                        .into(),
                );
                e
            }
            _ => {
                let mut e = UploadEntry::new(meta);
                if e.meta.verified_offset == e.meta.size {
                    complete(inner, &mut e);
                }
                e
            }
        };
        map.insert(id, e);
    }
    for old in prune(&mut map) {
        let _ = fs::remove_dir_all(inner.upload_dir(&old));
    }
}

/// One upload directory: its metadata, with the data file cut back to what is verified.
/// `None` for a half-made or broken upload.
fn load_one(dir: &Path, id: &str) -> anyhow::Result<Option<UploadMeta>> {
    let json = dir.join(META);
    let data = dir.join(DATA);
    if !json.exists() {
        return Ok(None);
    }
    let Ok(mut meta) = store::read_json::<UploadMeta>(&json) else {
        return Ok(None);
    };
    if meta.id != id
        || meta.size == 0
        || meta.size > MAX_DISK_SIZE
        || meta.verified_offset > meta.size
        || !(meta.sha256.is_empty() || meta.sha256.len() == 64)
        || meta
            .disk
            .as_ref()
            .is_some_and(|d| !is_id(&d.id) || d.image_format().is_none())
    {
        return Ok(None);
    }
    // An ended upload is only its record; a committing one's data may be in its disk now.
    if meta.ended.is_some() || meta.disk.is_some() {
        return Ok(Some(meta));
    }
    if !data.exists() {
        return Ok(None);
    }
    let f = fs::OpenOptions::new().write(true).open(&data)?;
    let len = f.metadata()?.len();
    if len > meta.verified_offset {
        // Written but never made durable: not trusted.
        f.set_len(meta.verified_offset)?;
        f.sync_all()?;
    } else if len < meta.verified_offset {
        tracing::warn!(
            "upload {id}: {len} bytes of data but {} verified; resuming from {len}",
            meta.verified_offset
        );
        meta.verified_offset = len;
        store::write_json(&json, &meta)?;
    }
    Ok(Some(meta))
}
