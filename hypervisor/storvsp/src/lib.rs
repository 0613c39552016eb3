//! The synthetic SCSI controller (storvsp): the host end of the VMBus storage channel that
//! Linux's `hv_storvsc` and Windows' storvsc drive, so that a guest made on Hyper-V or Azure
//! finds its disks where it expects them (IMPORTED-GUESTS.md §2).
//!
//! One [`ScsiController`] is one VMBus offer of the SCSI class with up to [`MAX_LUNS`] disks
//! ([`scsi_disk::ScsiDisk`]) at path 0, target 0, LUN 0..63, as Hyper-V places them. The
//! host adds and removes disks on a running guest through its [`ControllerHandle`]; the
//! controller then asks the guest to scan the bus again (ENUMERATE_BUS), and the guest finds
//! new LUNs and drops removed ones (they answer `SRB_STATUS_INVALID_LUN`).
//!
//! Protocol: BEGIN_INITIALIZATION, QUERY_PROTOCOL_VERSION (5.1 and 6.0 accepted; 6.2 is
//! refused so Linux does not send WRITE SAME), QUERY_PROPERTIES (one channel,
//! [`MAX_TRANSFER`] bytes per command), END_INITIALIZATION, then EXECUTE_SRB as inband or
//! GPA-direct packets. Every packet is the guest's and hostile: lengths and page lists are
//! checked, memory outside guest RAM closes the channel (the VM goes on), and nothing
//! panics.
//!
//! May depend on: `vmbus_core`, `scsi_disk`, `parvis_disk`. Not on KVM or the VMM.

#![forbid(unsafe_code)]

mod io;
pub mod protocol;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use scsi_disk::ScsiDisk;
use scsi_disk::controller::{absent_lun, report_luns};
use vmbus_core::ring::{Packet, pkt};
use vmbus_core::{Channel, Guid, OfferParams, PageList, Vsp, VspError, Wakeup};

use crate::io::{Done, Job, Pool};
use crate::protocol::{Direction, ProtocolError, SrbResult, op, srb_status, status};

/// Interface class of a synthetic SCSI controller: ba6163d9-04a1-4d29-b605-72e2ffb1dc7f.
pub const SCSI_CLASS: Guid = Guid::new(
    0xba61_63d9,
    0x04a1,
    0x4d29,
    [0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f],
);

/// LUNs per controller (Hyper-V's 64).
pub const MAX_LUNS: u8 = 64;

/// Controllers per VM (Hyper-V's 4).
pub const MAX_CONTROLLERS: u8 = 4;

/// Largest command the guest is told it may send (QUERY_PROPERTIES `max_transfer_bytes`);
/// Linux sets `max_sectors` from it.
pub const MAX_TRANSFER: u32 = 1 << 20;

/// I/O threads per controller the worker asks for: none. Commands run on the channel
/// thread and their completions go out together when the guest's batch is done, so the
/// guest takes one interrupt per batch and no command waits for a thread hand-off; this
/// measured fastest (bench --only storage). A controller built with threads runs disk
/// commands on them instead, for backends whose reads block for long.
pub const IO_THREADS: usize = 0;

/// Completions held back for one batch at most; more go out at once.
const MAX_HELD: usize = 256;

/// How long removing a disk waits for its commands in flight.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// The instance GUID of controller `index`: fixed, so the guest's `/dev/disk/by-path`
/// names stay the same from boot to boot.
pub fn instance_guid(index: u8) -> Guid {
    Guid::new(
        0x5061_7276,
        0x6973,
        0x5343,
        [0x53, 0x49, 0x00, 0x00, 0x00, 0x00, 0x00, index],
    )
}

/// Why a disk cannot be added or removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LunError {
    #[error("LUN {0} is out of range (0 to 63)")]
    OutOfRange(u8),
    #[error("LUN {0} already holds a disk")]
    Busy(u8),
    #[error("LUN {0} holds no disk")]
    Empty(u8),
    #[error("the controller has no free LUN")]
    Full,
    #[error("the guest still had commands in flight for LUN {0} after {1} s")]
    StillBusy(u8, u64),
}

/// What the host side and the channel thread share.
struct Shared {
    luns: RwLock<BTreeMap<u8, Arc<ScsiDisk>>>,
    /// LUNs whose disk was removed (and flushed) while the guest ran: see
    /// [`ScsiController::execute_srb`].
    removed: std::sync::Mutex<std::collections::BTreeSet<u8>>,
    /// The LUN set changed since the guest last scanned.
    rescan: AtomicBool,
    pool: Arc<Pool>,
    wakeup: Arc<Wakeup>,
    /// Guest-triggered warnings logged so far (rate limit).
    warnings: AtomicU32,
}

impl Shared {
    fn disk(&self, lun: u8) -> Option<Arc<ScsiDisk>> {
        self.luns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&lun)
            .cloned()
    }

    fn lun_list(&self) -> Vec<u16> {
        self.luns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .map(|&l| u16::from(l))
            .collect()
    }
}

/// The host's side of a controller: add and remove disks, on a running guest too.
#[derive(Clone)]
pub struct ControllerHandle(Arc<Shared>);

impl std::fmt::Debug for ControllerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerHandle")
            .field("luns", &self.0.lun_list())
            .finish()
    }
}

impl ControllerHandle {
    /// Put `disk` at `lun` and tell a running guest to look.
    pub fn attach(&self, lun: u8, disk: Arc<ScsiDisk>) -> Result<(), LunError> {
        if lun >= MAX_LUNS {
            return Err(LunError::OutOfRange(lun));
        }
        {
            let mut luns = self.0.luns.write().unwrap_or_else(|e| e.into_inner());
            if luns.contains_key(&lun) {
                return Err(LunError::Busy(lun));
            }
            luns.insert(lun, disk);
        }
        self.0
            .removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&lun);
        self.request_rescan();
        Ok(())
    }

    /// The lowest free LUN.
    pub fn free_lun(&self) -> Result<u8, LunError> {
        let luns = self.0.luns.read().unwrap_or_else(|e| e.into_inner());
        (0..MAX_LUNS)
            .find(|l| !luns.contains_key(l))
            .ok_or(LunError::Full)
    }

    /// Take the disk at `lun` away: new commands to it fail as for an absent LUN, the guest
    /// is told to scan, and this returns once the commands already running on it have
    /// finished and its writes are flushed, so the caller may close its file.
    pub fn detach(&self, lun: u8) -> Result<Arc<ScsiDisk>, LunError> {
        let disk = self
            .0
            .luns
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&lun)
            .ok_or(LunError::Empty(lun))?;
        self.0
            .removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(lun);
        self.request_rescan();
        // Queued and running commands hold the disk; when they are done only we do.
        let deadline = Instant::now() + DETACH_WAIT;
        while Arc::strong_count(&disk) > 1 {
            if Instant::now() > deadline {
                return Err(LunError::StillBusy(lun, DETACH_WAIT.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Err(e) = disk.backend().flush() {
            tracing::warn!(lun, error = %e, "storvsp: flushing a removed disk failed");
        }
        Ok(disk)
    }

    /// The disks, by LUN.
    pub fn disks(&self) -> Vec<(u8, Arc<ScsiDisk>)> {
        self.0
            .luns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(l, d)| (*l, d.clone()))
            .collect()
    }

    fn request_rescan(&self) {
        self.0.rescan.store(true, Ordering::SeqCst);
        self.0.wakeup.signal();
    }
}

/// Where the channel's initialization stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Init {
    /// Opened, waiting for BEGIN_INITIALIZATION.
    Fresh,
    /// Between BEGIN and a version both sides speak.
    Begun,
    /// Version agreed.
    Versioned(u16),
    /// END_INITIALIZATION done: SRBs accepted.
    Ready(u16),
}

/// One synthetic SCSI controller (a VSP).
pub struct ScsiController {
    index: u8,
    shared: Arc<Shared>,
    init: Init,
    /// I/O threads; 0 runs every command on the channel thread (tests, fuzzing).
    threads: usize,
    started: bool,
    /// Buffer for commands run on the channel thread.
    buf: Vec<u8>,
    /// Completions of commands run on the channel thread, sent when the batch is done.
    held: Vec<(u64, [u8; protocol::PACKET_LEN])>,
}

impl std::fmt::Debug for ScsiController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiController")
            .field("index", &self.index)
            .field("init", &self.init)
            .finish_non_exhaustive()
    }
}

impl ScsiController {
    /// Controller `index` (0..[`MAX_CONTROLLERS`]) with no disks, running disk commands on
    /// `threads` I/O threads (0: on the channel thread).
    pub fn new(index: u8, threads: usize) -> std::io::Result<(Self, ControllerHandle)> {
        let wakeup = Arc::new(Wakeup::new()?);
        let shared = Arc::new(Shared {
            luns: RwLock::new(BTreeMap::new()),
            removed: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            rescan: AtomicBool::new(false),
            pool: Arc::new(Pool::new(wakeup.clone())),
            wakeup,
            warnings: AtomicU32::new(0),
        });
        let handle = ControllerHandle(shared.clone());
        Ok((
            ScsiController {
                index,
                shared,
                init: Init::Fresh,
                threads,
                started: false,
                buf: Vec::new(),
                held: Vec::new(),
            },
            handle,
        ))
    }

    /// Log a guest mistake that does not close the channel (rate-limited: the guest can
    /// repeat it at will).
    fn warn(&self, what: &str) {
        let n = self.shared.warnings.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 10 || n.is_power_of_two() {
            tracing::warn!(controller = self.index, count = n, "storvsp: {what}");
        }
    }

    fn send_done(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        for (trans_id, packet) in std::mem::take(&mut self.held) {
            ch.complete(trans_id, &packet)?;
        }
        self.send_pool_done(ch)
    }

    fn execute_srb(&mut self, p: &Packet, ch: &mut dyn Channel) -> Result<(), VspError> {
        let trans_id = p.header.trans_id;
        let srb = match protocol::parse_srb(p.payload()) {
            Ok(s) => s,
            Err(e @ ProtocolError::ShortSrb(_)) => return Err(VspError::Protocol(e.to_string())),
            Err(e) => {
                self.warn(&format!("refused a request block: {e}"));
                return ch.complete(trans_id, &protocol::complete(status::INVALID_PARAMETER));
            }
        };
        let lists: Vec<PageList> = match p.header.ptype {
            pkt::DATA_USING_GPA_DIRECT => p.gpa_direct()?,
            _ => Vec::new(),
        };
        let len = srb.transfer_len as usize;
        let refuse = if len > scsi_disk::MAX_TRANSFER_BYTES {
            Some("a transfer longer than the controller's maximum")
        } else if srb.direction != Direction::None && io::total_len(&lists) < len {
            Some("a transfer longer than its buffer")
        } else {
            None
        };
        if let Some(why) = refuse {
            self.warn(why);
            let r = SrbResult::transport(srb_status::INVALID_REQUEST);
            return ch.complete(trans_id, &protocol::complete_srb(&srb, &r));
        }
        let disk = (srb.path_id == 0 && srb.target_id == 0)
            .then(|| self.shared.disk(srb.lun))
            .flatten();
        let is_report_luns = srb.cdb[0] == 0xA0;
        match disk {
            Some(disk) if !is_report_luns => {
                let job = Job {
                    trans_id,
                    srb,
                    lists,
                    disk,
                    mem: ch.memory().clone(),
                    generation: self.shared.pool.generation(),
                };
                if self.threads == 0 {
                    match io::execute(&job, &mut self.buf) {
                        Done::Complete { trans_id, packet } => {
                            self.held.push((trans_id, packet));
                            if self.held.len() >= MAX_HELD {
                                self.send_done(ch)?;
                            }
                            Ok(())
                        }
                        Done::Fault(e) => Err(e.into()),
                    }
                } else {
                    self.shared.pool.submit(job);
                    Ok(())
                }
            }
            // The controller answers REPORT LUNS for its one target and the scan of every
            // other address; other commands to an empty address end at the transport. A LUN
            // whose disk was removed answers SYNCHRONIZE CACHE with success: the removal
            // flushed it, and Linux sends one while it drops the disk (an error there would
            // be logged as a failed cache flush).
            _ => {
                let removed = srb.path_id == 0
                    && srb.target_id == 0
                    && matches!(srb.cdb[0], 0x35 | 0x91)
                    && self
                        .shared
                        .removed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&srb.lun);
                if removed {
                    let r = SrbResult::transport(srb_status::SUCCESS);
                    return ch.complete(trans_id, &protocol::complete_srb(&srb, &r));
                }
                let luns = if srb.path_id == 0 && srb.target_id == 0 {
                    self.shared.lun_list()
                } else {
                    Vec::new()
                };
                let mem = ch.memory().clone();
                let r = if is_report_luns {
                    io::run_srb(&mem, &srb, &lists, &mut self.buf, |_, inp| {
                        report_luns(srb.cdb(), &luns, inp)
                    })?
                } else if matches!(srb.cdb[0], 0x12 | 0x03) {
                    // INQUIRY (peripheral qualifier 3: nothing here) and REQUEST SENSE.
                    io::run_srb(&mem, &srb, &lists, &mut self.buf, |_, inp| {
                        absent_lun(srb.cdb(), inp)
                    })?
                } else {
                    SrbResult::transport(srb_status::INVALID_LUN)
                };
                ch.complete(trans_id, &protocol::complete_srb(&srb, &r))
            }
        }
    }

    fn send_pool_done(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        for d in self.shared.pool.take_done() {
            match d {
                Done::Complete { trans_id, packet } => ch.complete(trans_id, &packet)?,
                Done::Fault(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Wait for every command in flight and send its completion (before a reset completes).
    fn flush_in_flight(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        if !self.shared.pool.drain(DETACH_WAIT) {
            self.warn("commands still running after a reset");
        }
        self.send_done(ch)
    }
}

impl Drop for ScsiController {
    fn drop(&mut self) {
        self.shared.pool.stop();
    }
}

impl Vsp for ScsiController {
    fn name(&self) -> &'static str {
        "storvsp"
    }

    fn offer(&self) -> OfferParams {
        OfferParams {
            class: SCSI_CLASS,
            instance: instance_guid(self.index),
            flags: 0,
            mmio_megabytes: 0,
            pipe_mode: 0,
        }
    }

    fn opened(&mut self, _ch: &mut dyn Channel) -> Result<(), VspError> {
        if !self.started && self.threads > 0 {
            self.shared
                .pool
                .spawn(&format!("storvsp{}", self.index), self.threads)
                .map_err(|e| VspError::Protocol(format!("cannot start I/O threads: {e}")))?;
            self.started = true;
        }
        self.init = Init::Fresh;
        Ok(())
    }

    fn packet(&mut self, p: &Packet, ch: &mut dyn Channel) -> Result<(), VspError> {
        // Completions the I/O threads finished meanwhile go first: the guest gets them
        // sooner and the queue stays short however fast the guest sends. (Completions of
        // commands run here wait for the end of the batch, in `poll_host`.)
        if self.threads > 0 {
            self.send_pool_done(ch)?;
        }
        match p.header.ptype {
            pkt::DATA_INBAND | pkt::DATA_USING_GPA_DIRECT => {}
            // The guest completing something we sent: nothing asks for that.
            pkt::COMP => return Ok(()),
            t => return Err(VspError::Protocol(format!("unexpected packet type {t:#x}"))),
        }
        let h = protocol::header(p.payload()).map_err(|e| VspError::Protocol(e.to_string()))?;
        let id = p.header.trans_id;
        let answer = |ch: &mut dyn Channel, s: u32| ch.complete(id, &protocol::complete(s));
        match (h.operation, self.init) {
            (op::EXECUTE_SRB, Init::Ready(_)) => self.execute_srb(p, ch),
            (op::EXECUTE_SRB, _) => answer(ch, status::INVALID_DEVICE_STATE),
            (op::BEGIN_INITIALIZATION, _) => {
                self.flush_in_flight(ch)?;
                self.init = Init::Begun;
                answer(ch, status::SUCCESS)
            }
            (op::QUERY_PROTOCOL_VERSION, Init::Fresh) => answer(ch, status::INVALID_DEVICE_STATE),
            (op::QUERY_PROTOCOL_VERSION, _) => {
                let v = protocol::requested_version(p.payload());
                let s = if protocol::version::ACCEPTED.contains(&v) {
                    self.init = Init::Versioned(v);
                    status::SUCCESS
                } else {
                    status::REVISION_MISMATCH
                };
                ch.complete(id, &protocol::complete_version(s, v))
            }
            (op::QUERY_PROPERTIES, Init::Versioned(_) | Init::Ready(_)) => {
                ch.complete(id, &protocol::complete_properties(0, 0, MAX_TRANSFER))
            }
            (op::END_INITIALIZATION, Init::Versioned(v)) => {
                // The guest scans the bus next: it sees every LUN there is now.
                self.shared.rescan.store(false, Ordering::SeqCst);
                self.init = Init::Ready(v);
                answer(ch, status::SUCCESS)
            }
            (op::QUERY_PROPERTIES | op::END_INITIALIZATION, _) => {
                answer(ch, status::INVALID_DEVICE_STATE)
            }
            (op::RESET_LUN | op::RESET_BUS | op::RESET_ADAPTER, _) => {
                // Every command sent before the reset is answered before it.
                self.flush_in_flight(ch)?;
                answer(ch, status::SUCCESS)
            }
            // Sub-channels were not offered (QUERY_PROPERTIES flags 0).
            (op::CREATE_SUB_CHANNELS, _) => answer(ch, status::NOT_SUPPORTED),
            (other, _) => {
                self.warn(&format!("unknown operation {other}"));
                answer(ch, status::INVALID_PARAMETER)
            }
        }
    }

    fn poll_host(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        self.send_done(ch)?;
        if matches!(self.init, Init::Ready(_)) && self.shared.rescan.swap(false, Ordering::SeqCst) {
            ch.send_packet(pkt::DATA_INBAND, 0, 0, &protocol::enumerate_bus())?;
        }
        Ok(())
    }

    fn closed(&mut self) {
        self.init = Init::Fresh;
        self.held.clear();
        // Commands still running may write guest memory the guest reuses: wait for them.
        self.shared.pool.reset();
        if !self.shared.pool.drain(DETACH_WAIT) {
            self.warn("commands still running after the channel closed");
        }
        self.shared.pool.take_done();
    }

    fn host_wakeup(&self) -> Option<Arc<Wakeup>> {
        Some(self.shared.wakeup.clone())
    }
}
