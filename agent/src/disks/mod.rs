//! The host's disk library: one directory per disk, resumable uploads, conversion and
//! resizing as tasks.
//!
//! On disk, `disks/<id>/disk.json` (written atomically, and always last) says that
//! `disks/<id>/image.<ext>` is a complete disk. A directory without `disk.json` is a
//! half-made disk (a crash during create or convert) and is removed when the library is
//! opened, unless a verified upload is still becoming it: that one is finished first (see
//! [`upload`]). Uploads live in `uploads/<id>/` until verified; see
//! [`upload`].
//!
//! Everything here that touches files runs on blocking threads: async methods use
//! `spawn_blocking`, tasks run on their own threads.

mod bootinfo;
mod staged;
mod upload;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use parvis_disk::convert::{ConvertError, ConvertOptions};
use parvis_disk::image::{self, CreateOptions, Image, OpenOptions, Variant};
use parvis_disk::{DiskError, ImageFormat, ImageInfo};
use proto::v1::{
    ConvertDiskRequest, CreateDiskRequest, Disk, DiskFormat, DiskVariant, ResizeDiskRequest, Task,
};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, AgentResult};
use crate::events::EventBus;
use crate::store::{self, Layout, is_id, new_id, now_ms};
use crate::tasks::{TaskHandle, Tasks};

/// A disk directory's description; a directory without it is no disk.
const DISK_JSON: &str = "disk.json";
/// The largest virtual disk (and upload) the library accepts: the VHDX maximum.
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// The largest VHD.
const MAX_VHD_SIZE: u64 = 2040 << 30;
/// The longest disk name, in characters.
const MAX_NAME_CHARS: usize = 200;

/// What `disk.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskMeta {
    id: String,
    name: String,
    created_ms: i64,
    /// "raw", "vhd" or "vhdx".
    format: String,
    /// The image file's name in the disk's directory: `image.<format>`.
    file: String,
    /// Raw images have no header to say it.
    #[serde(default = "default_sector")]
    logical_sector_size: u32,
    /// Uploaded (or converted from an uploaded disk): a VM made from it boots its own
    /// system by default.
    #[serde(default)]
    imported: bool,
}

fn default_sector() -> u32 {
    512
}

impl DiskMeta {
    fn new(id: String, name: String, format: ImageFormat, logical_sector_size: u32) -> Self {
        DiskMeta {
            file: image_file_name(format),
            id,
            name,
            created_ms: now_ms(),
            format: format.to_string(),
            logical_sector_size,
            imported: false,
        }
    }

    fn image_format(&self) -> Option<ImageFormat> {
        image::parse_format(&self.format)
    }
}

fn image_file_name(format: ImageFormat) -> String {
    format!("image.{format}")
}

/// One disk of the library, as cached in memory.
#[derive(Debug)]
struct DiskEntry {
    meta: DiskMeta,
    /// Without `attached_to` and `check_findings`.
    disk: Disk,
    /// Conversions reading the disk.
    readers: u32,
    /// An operation changing the disk ("being resized", "being deleted").
    writer: Option<&'static str>,
}

impl DiskEntry {
    fn busy(&self) -> Option<String> {
        match (self.writer, self.readers) {
            (Some(w), _) => Some(w.to_string()),
            (None, 0) => None,
            (None, _) => Some("being converted".to_string()),
        }
    }
}

pub(crate) struct Inner {
    layout: Layout,
    events: Arc<EventBus>,
    tasks: Arc<Tasks>,
    disks: Mutex<HashMap<String, DiskEntry>>,
    uploads: Mutex<HashMap<String, upload::UploadEntry>>,
    /// Disks whose boot entries are to be read (see [`bootinfo`]); None until the agent
    /// knows its worker program.
    boot_queue: Mutex<Option<std::sync::mpsc::Sender<String>>>,
}

/// The host's disk library. Cheap to share: clone the `Arc` it lives in.
pub struct DiskLibrary {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DiskLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // try_lock: formatting must never wait for (or deadlock on) the library's locks.
        let disks = self.inner.disks.try_lock().map(|m| m.len()).ok();
        let uploads = self.inner.uploads.try_lock().map(|m| m.len()).ok();
        f.debug_struct("DiskLibrary")
            .field("root", &self.inner.layout.disks())
            .field("disks", &disks)
            .field("uploads", &uploads)
            .finish()
    }
}

/// Run `f` on a blocking thread.
async fn blocking<T, F>(f: F) -> AgentResult<T>
where
    F: FnOnce() -> AgentResult<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::internal("disk library worker thread", e))?
}

impl DiskLibrary {
    /// Load the library from `layout.disks()` and resume the uploads in `layout.uploads()`.
    /// Half-made disks and uploads are removed.
    pub fn open(layout: &Layout, events: Arc<EventBus>, tasks: Arc<Tasks>) -> anyhow::Result<Self> {
        for d in [layout.disks(), layout.uploads()] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let inner = Arc::new(Inner {
            layout: layout.clone(),
            events,
            tasks,
            disks: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashMap::new()),
            boot_queue: Mutex::new(None),
        });
        // Uploads first: one that a crash stopped while it became a disk finishes becoming it.
        let uploads = upload::scan(layout)?;
        let disks = load_disks(&layout.disks(), &uploads.unfinished)?;
        {
            let mut map = inner.lock_disks();
            for e in disks {
                map.insert(e.meta.id.clone(), e);
            }
        }
        upload::load(&inner, uploads);
        Ok(DiskLibrary { inner })
    }

    /// Read each disk's boot entries with the confined reader of `worker_bin`: from now on
    /// for every disk that enters the library, and now for every disk not read yet. One
    /// disk is read at a time, on a thread of its own.
    pub fn read_boot_entries_with(&self, worker_bin: PathBuf) {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let weak = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("disk-boot-reader".into())
            .spawn(move || boot_reader(&weak, &worker_bin, &rx))
            .ok();
        let unread: Vec<String> = self
            .inner
            .lock_disks()
            .values()
            .filter(|e| e.disk.boot.is_none())
            .map(|e| e.meta.id.clone())
            .collect();
        for id in unread {
            let _ = tx.send(id);
        }
        *self
            .inner
            .boot_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    /// Read a disk's boot entries again (a VM that writes it has stopped).
    pub fn reread_boot_entries(&self, id: &str) {
        self.inner.queue_boot_read(id);
    }

    /// Whether a VM made from this disk boots the disk's own system by default: it was
    /// imported, or its boot entries were found.
    pub fn boots_by_default(&self, id: &str) -> bool {
        self.inner
            .with_disk(id, |e| {
                Ok(e.meta.imported || e.disk.boot.as_ref().is_some_and(|b| b.bootable))
            })
            .unwrap_or(false)
    }

    /// Every disk, by name (`attached_to` and `check_findings` are left empty).
    pub fn list(&self) -> Vec<Disk> {
        let mut v: Vec<Disk> = self
            .inner
            .lock_disks()
            .values()
            .map(|e| e.disk.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        v
    }

    /// One disk, as last seen (no file access).
    pub fn get(&self, id: &str) -> AgentResult<Disk> {
        self.inner.with_disk(id, |e| Ok(e.disk.clone()))
    }

    /// One disk with fresh sizes and the structure check's findings. An image that cannot
    /// be opened right now (a running VM holds a dirty VHDX log) reports why as a finding.
    pub async fn inspect(&self, id: &str) -> AgentResult<Disk> {
        let (meta, cached, busy) = self
            .inner
            .with_disk(id, |e| Ok((e.meta.clone(), e.disk.clone(), e.writer)))?;
        if let Some(w) = busy {
            let mut d = cached;
            d.check_findings = vec![format!("not checked: the disk is {w}")];
            return Ok(d);
        }
        let dir = self.inner.disk_dir(&meta.id);
        let (fresh, findings) = blocking(move || {
            let path = dir.join(&meta.file);
            let img = match open_library_image(&path, &meta, true) {
                Ok(img) => img,
                Err(e) => return Ok((None, vec![format!("cannot open the image: {}", safe(&e))])),
            };
            let disk = disk_from_info(&meta, &img.info(&path));
            let findings = match img.check() {
                Ok(r) => r
                    .errors
                    .into_iter()
                    .chain(r.warnings.into_iter().map(|w| format!("warning: {w}")))
                    .collect(),
                Err(e) => vec![format!("check failed: {}", safe(&e))],
            };
            Ok((Some(disk), findings))
        })
        .await?;
        let mut d = match fresh {
            Some(d) => self.inner.update_cached(d),
            None => cached,
        };
        d.check_findings = findings;
        Ok(d)
    }

    /// The image file of a disk, for a worker to open.
    pub fn path_of(&self, id: &str) -> AgentResult<PathBuf> {
        self.inner.with_disk(id, |e| {
            Ok(self.inner.disk_dir(&e.meta.id).join(&e.meta.file))
        })
    }

    /// A disk's name.
    pub fn name_of(&self, id: &str) -> AgentResult<String> {
        self.inner.with_disk(id, |e| Ok(e.meta.name.clone()))
    }

    /// Why a disk cannot be used right now ("being resized", "being converted"), if so.
    /// The VM manager should not start a VM on a busy disk.
    pub fn busy_reason(&self, id: &str) -> Option<String> {
        self.inner.lock_disks().get(id).and_then(DiskEntry::busy)
    }

    /// Create an empty disk.
    pub async fn create(&self, req: CreateDiskRequest) -> AgentResult<Disk> {
        validate_name(&req.name, "name")?;
        let format = format_from_proto(req.format, "format")?;
        let variant = variant_from_proto(format, req.variant, "variant")?;
        let sector = match req.logical_sector_size {
            0 | 512 => 512,
            4096 if format == ImageFormat::Vhdx => 4096,
            4096 => {
                return Err(AgentError::invalid(
                    "logical_sector_size",
                    "4096-byte sectors need the VHDX format",
                ));
            }
            n => {
                return Err(AgentError::invalid(
                    "logical_sector_size",
                    format!("{n} is not 512 or 4096"),
                ));
            }
        };
        validate_size(req.size, format, sector, "size")?;
        let inner = self.inner.clone();
        blocking(move || {
            let id = new_id();
            let meta = DiskMeta::new(id.clone(), req.name, format, sector);
            let dir = inner.disk_dir(&id);
            fs::create_dir(&dir)
                .map_err(|e| AgentError::internal("creating a disk directory", e))?;
            let result = (|| {
                let path = dir.join(&meta.file);
                let img = image::create(
                    &path,
                    &CreateOptions {
                        format,
                        variant,
                        size: req.size,
                        block_size: None,
                        logical_sector_size: sector,
                    },
                )?;
                img.device().flush()?;
                inner.install(meta, &img, &path)
            })();
            if result.is_err() {
                let _ = fs::remove_dir_all(&dir);
            }
            result
        })
        .await
    }

    /// Delete a disk. `users` are the VMs that use it (from the VM manager): a disk in use
    /// is not deleted.
    pub async fn delete(&self, id: &str, users: &[String]) -> AgentResult<()> {
        let meta = self.inner.with_disk_mut(id, |e| {
            if !users.is_empty() {
                return Err(AgentError::precondition(format!(
                    "disk '{}' is used by VM(s) {}",
                    e.meta.name,
                    users.join(", ")
                )));
            }
            if let Some(b) = e.busy() {
                return Err(AgentError::precondition(format!(
                    "disk '{}' is {b}",
                    e.meta.name
                )));
            }
            e.writer = Some("being deleted");
            Ok(e.meta.clone())
        })?;
        let dir = self.inner.disk_dir(&meta.id);
        let root = self.inner.layout.disks();
        let removed = blocking(move || {
            // Without disk.json the directory is no disk, whatever happens next.
            fs::remove_file(dir.join(DISK_JSON))
                .and_then(|()| store::sync_dir(&root))
                .map_err(|e| AgentError::internal("removing disk.json", e))?;
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!(
                    "removing {}: {e} (it is removed at the next start)",
                    dir.display()
                );
            }
            Ok(())
        })
        .await;
        let mut map = self.inner.lock_disks();
        match removed {
            Ok(()) => {
                map.remove(&meta.id);
                drop(map);
                self.inner.events.disk_deleted(meta.id);
                Ok(())
            }
            Err(e) => {
                if let Some(e) = map.get_mut(&meta.id) {
                    e.writer = None;
                }
                Err(e)
            }
        }
    }

    /// Convert a disk into a new disk of another format or variant, as a task. A failed or
    /// cancelled conversion leaves nothing behind.
    pub fn convert(&self, req: ConvertDiskRequest) -> AgentResult<Task> {
        let format = format_from_proto(req.format, "format")?;
        let variant = variant_from_proto(format, req.variant, "variant")?;
        if !req.name.is_empty() {
            validate_name(&req.name, "name")?;
        }
        // Claim the source for reading before anything else can change it.
        let (src_meta, src_disk) = self.inner.with_disk_mut(&req.disk_id, |e| {
            if let Some(w) = e.writer {
                return Err(AgentError::precondition(format!(
                    "disk '{}' is {w}",
                    e.meta.name
                )));
            }
            e.readers += 1;
            Ok((e.meta.clone(), e.disk.clone()))
        })?;
        let reader = ReaderGuard {
            inner: self.inner.clone(),
            id: src_meta.id.clone(),
        };
        let sector = src_disk.logical_sector_size.max(512);
        if format == ImageFormat::Vhd && sector != 512 {
            return Err(AgentError::invalid(
                "format",
                "VHD has 512-byte sectors only; this disk has 4096-byte sectors",
            ));
        }
        if format == ImageFormat::Vhd && src_disk.virtual_size > MAX_VHD_SIZE {
            return Err(AgentError::invalid(
                "format",
                "the disk is larger than a VHD can be (2040 GiB)",
            ));
        }
        let free = free_space(&self.inner.layout.disks())?;
        if src_disk.allocated_bytes > free {
            return Err(AgentError::ResourceExhausted(format!(
                "not enough free space: the copy may need {} bytes, {free} are free",
                src_disk.allocated_bytes
            )));
        }
        let name = if req.name.is_empty() {
            default_convert_name(&src_meta.name, format)
        } else {
            req.name
        };
        let handle = self.inner.tasks.start(
            format!(
                "convert disk '{}' to {}",
                src_meta.name,
                format.to_string().to_ascii_uppercase()
            ),
            "bytes",
            src_disk.virtual_size,
        );
        let task = handle.task();
        let inner = self.inner.clone();
        spawn_task(handle, move |h| {
            let _reader = reader;
            inner.convert_blocking(h, &src_meta, name, format, variant, sector)
        })?;
        Ok(task)
    }

    /// Change a disk's virtual size, as a task. Shrinking needs `allow_shrink` and is not
    /// possible for VHD.
    pub fn resize(&self, req: ResizeDiskRequest) -> AgentResult<Task> {
        let meta = self.inner.with_disk_mut(&req.disk_id, |e| {
            let format = e.meta.image_format().ok_or_else(|| {
                AgentError::internal("disk format", anyhow::anyhow!("unknown {}", e.meta.format))
            })?;
            let cur = e.disk.virtual_size;
            let sector = e.disk.logical_sector_size.max(512);
            validate_size(req.new_size, format, sector, "new_size")?;
            if req.new_size < cur {
                if format == ImageFormat::Vhd {
                    return Err(AgentError::invalid(
                        "new_size",
                        "shrinking a VHD is not supported (convert it to VHDX first)",
                    ));
                }
                if !req.allow_shrink {
                    return Err(AgentError::invalid(
                        "new_size",
                        format!(
                            "{} is smaller than the current size {cur}; set allow_shrink to \
                             shrink (the data past the new end is lost)",
                            req.new_size
                        ),
                    ));
                }
            }
            if let Some(b) = e.busy() {
                return Err(AgentError::precondition(format!(
                    "disk '{}' is {b}",
                    e.meta.name
                )));
            }
            e.writer = Some("being resized");
            Ok(e.meta.clone())
        })?;
        let writer = WriterGuard {
            inner: self.inner.clone(),
            id: meta.id.clone(),
        };
        let handle = self.inner.tasks.start(
            format!("resize disk '{}' to {} bytes", meta.name, req.new_size),
            "bytes",
            0,
        );
        let task = handle.task();
        let inner = self.inner.clone();
        spawn_task(handle, move |h| {
            let _writer = writer;
            inner.resize_blocking(h, &meta, req.new_size)
        })?;
        Ok(task)
    }
}

/// Run a task's work on its own thread and finish it with the result.
fn spawn_task<F>(handle: TaskHandle, work: F) -> AgentResult<()>
where
    F: FnOnce(&TaskHandle) -> AgentResult<()> + Send + 'static,
{
    std::thread::Builder::new()
        .name("disk-task".into())
        .spawn(move || {
            let result = work(&handle);
            if let Err(e) = &result {
                tracing::info!("task {} ended: {e}", handle.id());
            }
            handle.finish(&result);
        })
        .map(drop)
        .map_err(|e| AgentError::internal("starting a task thread", e))
}

/// Releases a conversion's read claim on its source.
struct ReaderGuard {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        if let Some(e) = self.inner.lock_disks().get_mut(&self.id) {
            e.readers = e.readers.saturating_sub(1);
        }
    }
}

/// Releases a resize's claim.
struct WriterGuard {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        if let Some(e) = self.inner.lock_disks().get_mut(&self.id) {
            e.writer = None;
        }
    }
}

impl Inner {
    fn lock_disks(&self) -> MutexGuard<'_, HashMap<String, DiskEntry>> {
        self.disks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_uploads(&self) -> MutexGuard<'_, HashMap<String, upload::UploadEntry>> {
        self.uploads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn disk_dir(&self, id: &str) -> PathBuf {
        self.layout.disks().join(id)
    }

    fn with_disk<T>(
        &self,
        id: &str,
        f: impl FnOnce(&DiskEntry) -> AgentResult<T>,
    ) -> AgentResult<T> {
        if !is_id(id) {
            return Err(AgentError::not_found("disk", id));
        }
        match self.lock_disks().get(id) {
            Some(e) if e.writer != Some("being deleted") => f(e),
            _ => Err(AgentError::not_found("disk", id)),
        }
    }

    fn with_disk_mut<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut DiskEntry) -> AgentResult<T>,
    ) -> AgentResult<T> {
        if !is_id(id) {
            return Err(AgentError::not_found("disk", id));
        }
        match self.lock_disks().get_mut(id) {
            Some(e) if e.writer != Some("being deleted") => f(e),
            _ => Err(AgentError::not_found("disk", id)),
        }
    }

    /// Replace the cached description of a disk; publishes a change if there is one.
    fn update_cached(&self, mut disk: Disk) -> Disk {
        let changed = {
            let mut map = self.lock_disks();
            match map.get_mut(&disk.id) {
                // What the disk boots is read separately (see `bootinfo`).
                Some(e) if disk.boot.is_none() && e.disk.boot.is_some() => {
                    disk.boot = e.disk.boot.clone();
                    let changed = e.disk != disk;
                    e.disk = disk.clone();
                    changed
                }
                Some(e) if e.disk != disk => {
                    e.disk = disk.clone();
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.events.disk_changed(disk.clone());
        }
        disk
    }

    /// Make the image at `path` (in `disks/<meta.id>/`) a disk: write `disk.json` (last),
    /// add it to the library, announce it.
    fn install(&self, meta: DiskMeta, img: &Image, path: &Path) -> AgentResult<Disk> {
        let disk = disk_from_info(&meta, &img.info(path));
        let dir = self.disk_dir(&meta.id);
        store::write_json(&dir.join(DISK_JSON), &meta)
            .and_then(|()| store::sync_dir(&self.layout.disks()))
            .map_err(|e| AgentError::internal("writing disk.json", e))?;
        Ok(self.register(meta, disk))
    }

    /// Add a disk whose `disk.json` is written to the library and announce it.
    fn register(&self, meta: DiskMeta, disk: Disk) -> Disk {
        self.lock_disks().insert(
            meta.id.clone(),
            DiskEntry {
                meta: meta.clone(),
                disk: disk.clone(),
                readers: 0,
                writer: None,
            },
        );
        self.events.disk_changed(disk.clone());
        self.queue_boot_read(&meta.id);
        disk
    }

    fn queue_boot_read(&self, id: &str) {
        if let Some(tx) = &*self.boot_queue.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(id.to_string());
        }
    }

    fn convert_blocking(
        &self,
        h: &TaskHandle,
        src_meta: &DiskMeta,
        name: String,
        format: ImageFormat,
        variant: Variant,
        sector: u32,
    ) -> AgentResult<()> {
        let src_path = self.disk_dir(&src_meta.id).join(&src_meta.file);
        let src = open_library_image(&src_path, src_meta, true)?;
        let id = new_id();
        let mut meta = DiskMeta::new(id.clone(), name, format, sector);
        meta.imported = src_meta.imported;
        let dir = self.disk_dir(&id);
        fs::create_dir(&dir).map_err(|e| AgentError::internal("creating a disk directory", e))?;
        let result = (|| {
            let path = dir.join(&meta.file);
            let dst = image::create(
                &path,
                &CreateOptions {
                    format,
                    variant,
                    size: src.device().size(),
                    block_size: None,
                    logical_sector_size: sector,
                },
            )?;
            parvis_disk::convert::convert(
                src.device(),
                dst.device(),
                ConvertOptions::default(),
                h.cancel_flag(),
                &|done, total| h.progress(done, total),
            )
            .map_err(|e| match e {
                ConvertError::Cancelled => AgentError::Cancelled,
                ConvertError::Read(e) | ConvertError::Write(e) => AgentError::from(e),
                e @ ConvertError::TooSmall { .. } => AgentError::internal("convert", e),
            })?;
            if h.is_cancelled() {
                return Err(AgentError::Cancelled);
            }
            dst.device().flush()?;
            let disk = self.install(meta, &dst, &path)?;
            h.set_disk(&disk.id);
            Ok(())
        })();
        if result.is_err() {
            // Never leave a partial copy: the directory has no disk.json, remove it all.
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!("removing {}: {e}", dir.display());
            }
        }
        result
    }

    fn resize_blocking(&self, h: &TaskHandle, meta: &DiskMeta, new_size: u64) -> AgentResult<()> {
        let path = self.disk_dir(&meta.id).join(&meta.file);
        h.set_disk(&meta.id);
        let img = if meta.image_format() == Some(ImageFormat::Raw) {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| AgentError::internal("opening a raw image", e))?;
            f.set_len(new_size)
                .and_then(|()| f.sync_all())
                .map_err(|e| AgentError::internal("resizing a raw image", e))?;
            drop(f);
            open_library_image(&path, meta, true)?
        } else {
            let img = open_library_image(&path, meta, false)?;
            img.resize(new_size)?;
            img.device().flush()?;
            img
        };
        let disk = disk_from_info(meta, &img.info(&path));
        self.update_cached(disk);
        Ok(())
    }
}

/// Load `disks/`: every `<id>/disk.json` with its image. Directories without `disk.json`
/// are half-made disks and are removed, but for those in `keep` (uploads still becoming
/// them); temporary files are removed.
fn load_disks(root: &Path, keep: &HashSet<String>) -> anyhow::Result<Vec<DiskEntry>> {
    let mut out = Vec::new();
    for ent in fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let ent = ent?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let path = ent.path();
        if !is_id(&name) || !ent.file_type()?.is_dir() {
            if name.starts_with('.') && name.contains(".tmp") {
                let _ = fs::remove_file(&path);
            } else {
                tracing::warn!("ignoring {} in the disk library", path.display());
            }
            continue;
        }
        remove_temp_files(&path);
        let json = path.join(DISK_JSON);
        if !json.exists() && keep.contains(&name) {
            continue;
        }
        if !json.exists() {
            tracing::info!("removing the half-made disk {}", path.display());
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!("removing {}: {e}", path.display());
            }
            continue;
        }
        let meta: DiskMeta = match store::read_json(&json) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("ignoring disk {}: {e}", json.display());
                continue;
            }
        };
        let Some(format) = meta.image_format() else {
            tracing::warn!(
                "ignoring disk {}: unknown format {}",
                json.display(),
                meta.format
            );
            continue;
        };
        if meta.id != name || meta.file != image_file_name(format) {
            tracing::warn!(
                "ignoring disk {}: it names another id or file",
                json.display()
            );
            continue;
        }
        let img_path = path.join(&meta.file);
        if !img_path.exists() {
            tracing::warn!("ignoring disk {}: its image is missing", path.display());
            continue;
        }
        // Never replay a log here: a worker that outlived an agent restart may have the
        // image open.
        let mut disk = match open_library_image(&img_path, &meta, true) {
            Ok(img) => disk_from_info(&meta, &img.info(&img_path)),
            Err(e) => {
                tracing::warn!("disk {}: cannot open its image: {e}", meta.id);
                fallback_disk(&meta, &img_path)
            }
        };
        disk.boot = bootinfo::load(&path);
        out.push(DiskEntry {
            meta,
            disk,
            readers: 0,
            writer: None,
        });
    }
    Ok(out)
}

/// Remove the temporary files an interrupted atomic write leaves in `dir`.
fn remove_temp_files(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.contains(".tmp-") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Open a library image. Read-only opens of a VHDX that needs its log replayed fail; a
/// writable open replays it (the library's images are ours).
fn open_library_image(path: &Path, meta: &DiskMeta, read_only: bool) -> Result<Image, DiskError> {
    let opts = OpenOptions {
        read_only,
        allow_replay: !read_only,
        format: meta.image_format(),
        raw_sector_size: Some(meta.logical_sector_size),
    };
    image::open(path, &opts)
}

/// A disk's description from its image.
fn disk_from_info(meta: &DiskMeta, info: &ImageInfo) -> Disk {
    Disk {
        id: meta.id.clone(),
        name: meta.name.clone(),
        format: format_to_proto(info.format) as i32,
        variant: match info.variant {
            "dynamic" => DiskVariant::Dynamic,
            "differencing" => DiskVariant::Differencing,
            _ => DiskVariant::Fixed,
        } as i32,
        virtual_size: info.virtual_size,
        file_size: info.file_size,
        allocated_bytes: info.allocated,
        logical_sector_size: info.logical_sector_size,
        physical_sector_size: info.physical_sector_size,
        attached_to: Vec::new(),
        created_ms: meta.created_ms,
        check_findings: Vec::new(),
        block_size: info.block_size.unwrap_or(0),
        boot: None,
    }
}

/// The boot-entry reader's thread: reads the disks queued, one at a time, until the
/// library is gone.
fn boot_reader(
    inner: &std::sync::Weak<Inner>,
    worker_bin: &Path,
    rx: &std::sync::mpsc::Receiver<String>,
) {
    while let Ok(first) = rx.recv() {
        // Reading a disk once answers every request for it queued meanwhile.
        let mut ids = vec![first];
        while let Ok(more) = rx.try_recv() {
            if !ids.contains(&more) {
                ids.push(more);
            }
        }
        for id in ids {
            let Some(inner) = inner.upgrade() else { return };
            let Ok((dir, file)) =
                inner.with_disk(&id, |e| Ok((inner.disk_dir(&id), e.meta.file.clone())))
            else {
                continue;
            };
            let info = match bootinfo::read(worker_bin, &dir.join(file)) {
                Ok(i) => i,
                Err(why) => {
                    tracing::warn!(disk = %id, "cannot read the disk's boot entries: {why}");
                    continue;
                }
            };
            if let Err(e) = bootinfo::save(&dir, &info) {
                tracing::warn!(disk = %id, "cannot keep the disk's boot entries: {e}");
            }
            let changed = inner.with_disk_mut(&id, |e| {
                e.disk.boot = Some(info);
                Ok(e.disk.clone())
            });
            if let Ok(d) = changed {
                tracing::info!(
                    disk = %id,
                    bootable = d.boot.as_ref().is_some_and(|b| b.bootable),
                    "read the disk's boot entries"
                );
                inner.events.disk_changed(d);
            }
        }
    }
}

/// What is known of a disk whose image cannot be opened.
fn fallback_disk(meta: &DiskMeta, path: &Path) -> Disk {
    Disk {
        id: meta.id.clone(),
        name: meta.name.clone(),
        format: meta
            .image_format()
            .map_or(DiskFormat::Unspecified, format_to_proto) as i32,
        file_size: fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        logical_sector_size: meta.logical_sector_size,
        created_ms: meta.created_ms,
        ..Default::default()
    }
}

fn format_to_proto(f: ImageFormat) -> DiskFormat {
    match f {
        ImageFormat::Raw => DiskFormat::Raw,
        ImageFormat::Vhd => DiskFormat::Vhd,
        ImageFormat::Vhdx => DiskFormat::Vhdx,
    }
}

fn format_from_proto(v: i32, field: &str) -> AgentResult<ImageFormat> {
    match DiskFormat::try_from(v) {
        Ok(DiskFormat::Raw) => Ok(ImageFormat::Raw),
        Ok(DiskFormat::Vhd) => Ok(ImageFormat::Vhd),
        Ok(DiskFormat::Vhdx) => Ok(ImageFormat::Vhdx),
        _ => Err(AgentError::invalid(field, "give RAW, VHD or VHDX")),
    }
}

/// The variant to create; unspecified means dynamic (raw: fixed).
fn variant_from_proto(format: ImageFormat, v: i32, field: &str) -> AgentResult<Variant> {
    match (DiskVariant::try_from(v), format) {
        (Ok(DiskVariant::Unspecified | DiskVariant::Fixed), ImageFormat::Raw) => Ok(Variant::Fixed),
        (Ok(DiskVariant::Dynamic), ImageFormat::Raw) => {
            Err(AgentError::invalid(field, "raw disks are always fixed"))
        }
        (Ok(DiskVariant::Fixed), _) => Ok(Variant::Fixed),
        (Ok(DiskVariant::Unspecified | DiskVariant::Dynamic), _) => Ok(Variant::Dynamic),
        (Ok(DiskVariant::Differencing), _) => Err(AgentError::invalid(
            field,
            "differencing disks are not supported in the library",
        )),
        (Err(_), _) => Err(AgentError::invalid(field, format!("unknown variant {v}"))),
    }
}

fn validate_size(size: u64, format: ImageFormat, sector: u32, field: &str) -> AgentResult<()> {
    if size == 0 {
        return Err(AgentError::invalid(field, "must be more than 0"));
    }
    if size > MAX_DISK_SIZE {
        return Err(AgentError::invalid(field, "must be at most 64 TiB"));
    }
    if format == ImageFormat::Vhd && size > MAX_VHD_SIZE {
        return Err(AgentError::invalid(field, "a VHD can be at most 2040 GiB"));
    }
    if !size.is_multiple_of(u64::from(sector)) {
        return Err(AgentError::invalid(
            field,
            format!("must be a multiple of the {sector}-byte sector size"),
        ));
    }
    Ok(())
}

/// Disk and upload names: what people see; never used in paths.
pub(crate) fn validate_name(name: &str, field: &str) -> AgentResult<()> {
    if name.trim().is_empty() {
        return Err(AgentError::invalid(field, "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(AgentError::invalid(
            field,
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(AgentError::invalid(field, "must not contain '/' or NUL"));
    }
    Ok(())
}

/// "web.vhd" → "web.vhdx"; "web" → "web.vhdx".
fn default_convert_name(src: &str, format: ImageFormat) -> String {
    let stem = match src.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && image::parse_format(ext).is_some() => stem,
        _ => src,
    };
    let name = format!("{stem}.{format}");
    if name.chars().count() > MAX_NAME_CHARS {
        name.chars()
            .skip(name.chars().count() - MAX_NAME_CHARS)
            .collect()
    } else {
        name
    }
}

/// Bytes available to the agent on the filesystem holding `path`.
fn free_space(path: &Path) -> AgentResult<u64> {
    let s = rustix::fs::statvfs(path)
        .map_err(|e| AgentError::internal("statvfs", std::io::Error::from(e)))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// A disk error's message for clients (no host paths).
fn safe(e: &DiskError) -> String {
    match e {
        DiskError::Parent { .. } | DiskError::ParentChain { .. } => {
            "it is a differencing image whose parent is not in the library".into()
        }
        DiskError::NeedsLogReplay => {
            "its VHDX log needs replaying (it is in use by a running VM, or its VM stopped \
             uncleanly)"
                .into()
        }
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("web", "name").is_ok());
        for bad in ["", "  ", "a/b", "a\0b"] {
            assert!(validate_name(bad, "name").is_err(), "{bad:?}");
        }
        assert!(validate_name(&"x".repeat(201), "name").is_err());
        assert!(validate_name(&"é".repeat(200), "name").is_ok());
        assert_eq!(
            default_convert_name("web.vhd", ImageFormat::Vhdx),
            "web.vhdx"
        );
        assert_eq!(default_convert_name("web", ImageFormat::Raw), "web.raw");
        assert_eq!(default_convert_name("v1.2", ImageFormat::Vhd), "v1.2.vhd");
    }

    #[test]
    fn sizes_and_variants() {
        assert!(validate_size(512, ImageFormat::Raw, 512, "size").is_ok());
        assert!(validate_size(0, ImageFormat::Raw, 512, "size").is_err());
        assert!(validate_size(513, ImageFormat::Raw, 512, "size").is_err());
        assert!(validate_size(512, ImageFormat::Vhdx, 4096, "size").is_err());
        assert!(validate_size(3 << 40, ImageFormat::Vhd, 512, "size").is_err());
        assert!(validate_size(MAX_DISK_SIZE + 512, ImageFormat::Vhdx, 512, "size").is_err());
        assert_eq!(
            variant_from_proto(ImageFormat::Raw, 0, "v").unwrap(),
            Variant::Fixed
        );
        assert_eq!(
            variant_from_proto(ImageFormat::Vhdx, 0, "v").unwrap(),
            Variant::Dynamic
        );
        assert!(variant_from_proto(ImageFormat::Raw, DiskVariant::Dynamic as i32, "v").is_err());
        assert!(variant_from_proto(ImageFormat::Vhd, 3, "v").is_err());
    }
}
