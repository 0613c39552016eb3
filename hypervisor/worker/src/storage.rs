//! The VM's disks: virtio-blk disks fixed at boot, and SCSI disks on the synthetic SCSI
//! controllers (storvsp) that can be added and removed while the guest runs. One table
//! says what is attached where and counts each disk's I/O for the status.

use std::sync::{Arc, Mutex};

use hypervisor::config::{DiskBus, DiskSpec};
use hypervisor::partition::DiskAttachment;
use parvis_disk::counters::{IoCounters, IoTotals};
use parvis_disk::image::{self, OpenOptions};
use scsi_disk::{DiskIdentity, ScsiDisk, ScsiDiskOptions};
use storvsp::{ControllerHandle, IO_THREADS, LunError, ScsiController};
use vmbus_core::SharedVsp;

/// Why a disk cannot be attached or detached; the words are fit for a person and name no
/// host path (the worker's log has those).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("SCSI disks need the VM's VMBus (Hyper-V enlightenments are off)")]
    NoVmbus,
    #[error("the VM has {0} SCSI controller(s); controller {1} does not exist")]
    NoController(usize, u8),
    #[error("a disk with id '{0}' is attached already")]
    Duplicate(String),
    #[error("no SCSI disk with id '{0}' is attached")]
    Unknown(String),
    #[error("virtio-blk disks cannot be added or removed while the VM runs")]
    Virtio,
    #[error("the disk image cannot be opened (the worker's log says why)")]
    Open,
    #[error("the disk cannot be used on SCSI: {0}")]
    Config(String),
    #[error(transparent)]
    Lun(#[from] LunError),
}

/// One attached disk.
struct Entry {
    key: String,
    bus: DiskBus,
    controller: u8,
    lun: u8,
    counters: Arc<IoCounters>,
}

struct Table {
    entries: Vec<Entry>,
    /// I/O of disks removed while the VM ran.
    retired: IoTotals,
}

/// The VM's disks and SCSI controllers.
pub struct Storage {
    controllers: Vec<ControllerHandle>,
    vsps: Vec<SharedVsp>,
    table: Mutex<Table>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("controllers", &self.controllers.len())
            .finish_non_exhaustive()
    }
}

fn open(spec: &DiskSpec) -> Result<Arc<dyn parvis_disk::BlockDevice>, StorageError> {
    // Raw, VHD or VHDX, detected from the contents. A VHDX with an unreplayed log is
    // replayed only when the disk is attached writable (as Hyper-V does on attach); a
    // read-only attachment never modifies the file.
    let opts = OpenOptions {
        read_only: spec.read_only,
        allow_replay: !spec.read_only,
        format: None,
        raw_sector_size: spec.sector_size,
    };
    let img = image::open(&spec.path, &opts).map_err(|e| {
        tracing::warn!(path = %spec.path.display(), error = %e, "cannot open disk");
        StorageError::Open
    })?;
    Ok(Arc::new(img))
}

impl Storage {
    /// Open every disk of `specs`. virtio-blk disks come back for the partition; SCSI ones
    /// go onto controllers, of which there is one more than the highest a disk names (at
    /// least one when `vmbus`, so disks can be added later).
    pub fn new(
        vmbus: bool,
        specs: &[DiskSpec],
    ) -> Result<(Self, Vec<DiskAttachment>), StorageError> {
        let scsi: Vec<&DiskSpec> = specs.iter().filter(|d| d.bus == DiskBus::Scsi).collect();
        if !scsi.is_empty() && !vmbus {
            return Err(StorageError::NoVmbus);
        }
        let count = if vmbus {
            scsi.iter().map(|d| d.controller + 1).max().unwrap_or(1)
        } else {
            0
        };
        let mut controllers = Vec::new();
        let mut vsps: Vec<SharedVsp> = Vec::new();
        for i in 0..count {
            let (dev, handle) = ScsiController::new(i, IO_THREADS)
                .map_err(|e| StorageError::Config(format!("cannot create controller: {e}")))?;
            controllers.push(handle);
            vsps.push(Arc::new(Mutex::new(dev)));
        }
        let storage = Storage {
            controllers,
            vsps,
            table: Mutex::new(Table {
                entries: Vec::new(),
                retired: IoTotals::default(),
            }),
        };
        let mut virtio = Vec::new();
        for spec in specs {
            match spec.bus {
                DiskBus::Virtio => {
                    let counters = Arc::new(IoCounters::default());
                    virtio.push(DiskAttachment {
                        name: spec.path.display().to_string(),
                        device: open(spec)?,
                        counters: counters.clone(),
                    });
                    let mut t = storage.lock();
                    let lun = t.entries.len() as u8;
                    t.entries.push(Entry {
                        key: spec.identity_key(),
                        bus: DiskBus::Virtio,
                        controller: 0,
                        lun,
                        counters,
                    });
                }
                DiskBus::Scsi => {
                    storage.attach(spec)?;
                }
            }
        }
        Ok((storage, virtio))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The SCSI controllers to offer on VMBus.
    pub fn vsps(&self) -> Vec<SharedVsp> {
        self.vsps.clone()
    }

    /// Put a SCSI disk on its controller (at its LUN or the lowest free one); returns the
    /// LUN. On a running guest, the controller tells the guest to scan.
    pub fn attach(&self, spec: &DiskSpec) -> Result<u8, StorageError> {
        if spec.bus != DiskBus::Scsi {
            return Err(StorageError::Virtio);
        }
        let handle = self.controllers.get(usize::from(spec.controller)).ok_or(
            if self.controllers.is_empty() {
                StorageError::NoVmbus
            } else {
                StorageError::NoController(self.controllers.len(), spec.controller)
            },
        )?;
        let key = spec.identity_key();
        if self.lock().entries.iter().any(|e| e.key == key) {
            return Err(StorageError::Duplicate(key));
        }
        let lun = match spec.lun {
            Some(l) => l,
            None => handle.free_lun()?,
        };
        let counters = Arc::new(IoCounters::default());
        let backend = open(spec)?;
        let disk = ScsiDisk::new(
            backend,
            DiskIdentity::derive(&key),
            counters.clone(),
            ScsiDiskOptions {
                unmap: spec.discard && !spec.read_only,
                write_same_16: false,
                lun: u16::from(lun),
            },
        )
        .map_err(|e| StorageError::Config(e.to_string()))?;
        let mut t = self.lock();
        if t.entries.iter().any(|e| e.key == key) {
            return Err(StorageError::Duplicate(key));
        }
        handle.attach(lun, Arc::new(disk))?;
        t.entries.push(Entry {
            key,
            bus: DiskBus::Scsi,
            controller: spec.controller,
            lun,
            counters,
        });
        tracing::info!(path = %spec.path.display(), controller = spec.controller, lun, "SCSI disk attached");
        Ok(lun)
    }

    /// Take the SCSI disk `key` away; returns once its commands in flight have finished and
    /// its writes are flushed.
    pub fn detach(&self, key: &str) -> Result<(), StorageError> {
        let (bus, controller, lun) = {
            let t = self.lock();
            let e = t
                .entries
                .iter()
                .find(|e| e.key == key)
                .ok_or_else(|| StorageError::Unknown(key.to_string()))?;
            (e.bus, e.controller, e.lun)
        };
        if bus != DiskBus::Scsi {
            return Err(StorageError::Virtio);
        }
        let handle = &self.controllers[usize::from(controller)];
        let result = handle.detach(lun);
        // Gone from the guest's view either way: drop it from the table.
        let mut t = self.lock();
        if let Some(i) = t.entries.iter().position(|e| e.key == key) {
            let e = t.entries.remove(i);
            let x = e.counters.totals();
            t.retired.read_bytes += x.read_bytes;
            t.retired.write_bytes += x.write_bytes;
            t.retired.read_ops += x.read_ops;
            t.retired.write_ops += x.write_ops;
        }
        drop(t);
        result?;
        tracing::info!(controller, lun, "SCSI disk detached");
        Ok(())
    }

    /// Every attached disk with its I/O, and one entry for removed disks if there were any.
    pub fn io(&self) -> Vec<proto::worker::DiskIo> {
        use proto::worker::{DiskBus as Bus, DiskIo};
        let t = self.lock();
        let mut v: Vec<DiskIo> = t
            .entries
            .iter()
            .map(|e| {
                let x = e.counters.totals();
                DiskIo {
                    read_bytes: x.read_bytes,
                    write_bytes: x.write_bytes,
                    read_ops: x.read_ops,
                    write_ops: x.write_ops,
                    id: e.key.clone(),
                    bus: match e.bus {
                        DiskBus::Virtio => Bus::Virtio,
                        DiskBus::Scsi => Bus::Scsi,
                    } as i32,
                    controller: u32::from(e.controller),
                    lun: u32::from(e.lun),
                }
            })
            .collect();
        v.sort_by_key(|d| (d.bus, d.controller, d.lun));
        let r = &t.retired;
        if r.read_ops + r.write_ops > 0 {
            v.push(DiskIo {
                read_bytes: r.read_bytes,
                write_bytes: r.write_bytes,
                read_ops: r.read_ops,
                write_ops: r.write_ops,
                ..DiskIo::default()
            });
        }
        v
    }

    /// Where the disk `key` sits, as the status reports it.
    pub fn slot(&self, key: &str) -> Option<proto::worker::DiskIo> {
        self.io().into_iter().find(|d| d.id == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        p
    }

    fn scsi(path: &std::path::Path, id: &str) -> DiskSpec {
        DiskSpec {
            bus: DiskBus::Scsi,
            id: Some(id.into()),
            ..DiskSpec::new(path)
        }
    }

    #[test]
    fn boot_disks_split_by_bus_and_scsi_disks_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![
            DiskSpec::new(raw(dir.path(), "v.img")),
            scsi(&raw(dir.path(), "s.img"), "s"),
            DiskSpec {
                controller: 1,
                lun: Some(4),
                ..scsi(&raw(dir.path(), "c1.img"), "c1")
            },
        ];
        let (storage, virtio) = Storage::new(true, &specs).unwrap();
        assert_eq!(virtio.len(), 1);
        assert_eq!(storage.vsps().len(), 2, "controllers 0 and 1");
        let io = storage.io();
        let places: Vec<(i32, u32, u32, &str)> = io
            .iter()
            .map(|d| (d.bus, d.controller, d.lun, d.id.as_str()))
            .collect();
        let (v, s) = (
            proto::worker::DiskBus::Virtio as i32,
            proto::worker::DiskBus::Scsi as i32,
        );
        assert_eq!(
            places,
            [(v, 0, 0, "v.img"), (s, 0, 0, "s"), (s, 1, 4, "c1")]
        );

        // Hot add takes the lowest free LUN; ids are unique; virtio cannot be added.
        let lun = storage
            .attach(&scsi(&raw(dir.path(), "h.img"), "h"))
            .unwrap();
        assert_eq!(lun, 1);
        assert!(matches!(
            storage.attach(&scsi(&raw(dir.path(), "h2.img"), "h")),
            Err(StorageError::Duplicate(_))
        ));
        assert!(matches!(
            storage.attach(&DiskSpec::new(raw(dir.path(), "x.img"))),
            Err(StorageError::Virtio)
        ));
        assert!(matches!(
            storage.attach(&DiskSpec {
                controller: 2,
                ..scsi(&raw(dir.path(), "y.img"), "y")
            }),
            Err(StorageError::NoController(2, 2))
        ));
        assert!(matches!(
            storage.attach(&scsi(&dir.path().join("missing.img"), "m")),
            Err(StorageError::Open)
        ));
        assert_eq!(storage.slot("h").unwrap().lun, 1);
        storage.detach("h").unwrap();
        assert!(storage.slot("h").is_none());
        assert!(matches!(storage.detach("h"), Err(StorageError::Unknown(_))));
        assert!(matches!(storage.detach("v.img"), Err(StorageError::Virtio)));
        // No VMBus: SCSI disks are refused with the reason.
        assert!(matches!(
            Storage::new(false, &specs[1..2]),
            Err(StorageError::NoVmbus)
        ));
        let (none, _) = Storage::new(false, &specs[..1]).unwrap();
        assert!(none.vsps().is_empty());
        assert!(matches!(
            none.attach(&scsi(&raw(dir.path(), "z.img"), "z")),
            Err(StorageError::NoVmbus)
        ));
    }
}
