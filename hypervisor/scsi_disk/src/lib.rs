//! SCSI disk emulation for Parvis: one logical unit over a [`parvis_disk::BlockDevice`],
//! as the VMBus storage device (storvsp, which Linux's `hv_storvsc` and Windows' storvsc
//! drive) needs it. The transport is not here: the caller hands [`ScsiDisk::execute`] a CDB
//! and the command's buffers and sends back the [`Outcome`].
//!
//! May depend on: `parvis_disk` (CDBs and parameter lists come from the guest: hostile
//! input, no `unsafe`, fuzzed by `fuzz/`).
//!
//! # Commands
//!
//! TEST UNIT READY, REQUEST SENSE, INQUIRY (standard data "Msft" / "Virtual Disk", VPD pages
//! 00h, 80h, 83h, B0h, B1h, B2h), REPORT LUNS, READ CAPACITY(10)/(16), MODE SENSE(6)/(10)
//! (pages 08h caching, 0Ah control, 3Fh all), MODE SELECT(6)/(10) (caching page: WCE and
//! RCD), READ/WRITE(6)/(10)/(12)/(16), SYNCHRONIZE CACHE(10)/(16), START STOP UNIT, and, when
//! enabled in [`ScsiDiskOptions`], UNMAP and WRITE SAME(16). Anything else is refused with
//! CHECK CONDITION and fixed-format sense (see [`Sense`]): unknown operation codes with
//! ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE (20h), bad fields with INVALID FIELD IN
//! CDB (24h) or IN PARAMETER LIST (26h) plus a field pointer, ranges past the end of the
//! disk with LBA OUT OF RANGE (21h), writes to a read-only disk with DATA PROTECT / WRITE
//! PROTECTED (27h), backend failures with MEDIUM ERROR (reads 11h, writes 0Ch) or HARDWARE
//! ERROR / INTERNAL TARGET FAILURE (44h) and a rate-limited log line.
//!
//! # Data path
//!
//! The caller owns the buffers, so data is copied once in each direction, between guest
//! memory and the caller's buffer: a READ fills the front of `data_in` straight from
//! [`BlockDevice::read_at`], a WRITE passes `data_out` straight to
//! [`BlockDevice::write_at`]. A storvsp keeps one [`MAX_TRANSFER_BYTES`] buffer per channel,
//! copies guest pages into it for data-out commands and out of it for data-in ones.
//! Guest-chosen lengths never size an allocation here: responses are built in small fixed
//! buffers (REPORT LUNS in one proportional to the caller's LUN list), WRITE SAME repeats
//! its block in at most 1 MiB, and [`ScsiDisk::execute_vec`] caps its buffer at
//! [`MAX_TRANSFER_BYTES`].

#![forbid(unsafe_code)]

mod cdb;
pub mod controller;
mod identity;
mod inquiry;
mod io;
mod mode;
mod ratelimit;
mod sense;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use parvis_disk::counters::IoCounters;
use parvis_disk::{BlockDevice, DiskError};

use crate::cdb::Cdb;
pub use crate::identity::{DiskIdentity, MAX_SERIAL_LEN};
use crate::ratelimit::RateLimit;
pub use crate::sense::{Asc, FieldPointer, Outcome, SENSE_LEN, ScsiStatus, Sense, SenseKey};
use crate::sense::{Xfer, put};

/// Largest READ/WRITE transfer accepted, in bytes (VPD B0h MAXIMUM TRANSFER LENGTH). A
/// storvsp must not offer a larger `max_transfer_bytes` in QUERY_PROPERTIES.
pub const MAX_TRANSFER_BYTES: usize = 2 << 20;

/// Largest WRITE SAME(16) range, in bytes (VPD B0h MAXIMUM WRITE SAME LENGTH).
pub const MAX_WRITE_SAME_BYTES: u64 = 8 << 20;

/// Most UNMAP block descriptors in one command (VPD B0h).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

/// What a disk offers beyond the mandatory commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScsiDiskOptions {
    /// Advertise logical block provisioning (READ CAPACITY(16) LBPME, VPD B0h/B2h) and
    /// accept UNMAP, mapped to [`BlockDevice::discard`]. Not advertised on a read-only disk.
    pub unmap: bool,
    /// Accept WRITE SAME(16) (and report it in VPD B0h/B2h). Linux sends it only to a
    /// "Msft" disk behind storvsp protocol 6.2 (WIN10); offer it only together with 6.2.
    pub write_same_16: bool,
    /// The LUN this disk reports if REPORT LUNS reaches it. A controller with several LUNs
    /// answers REPORT LUNS itself ([`controller::report_luns`]).
    pub lun: u16,
}

/// Why a [`ScsiDisk`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Logical sector not 512 or 4096, or physical not a power-of-two multiple of it.
    #[error("unsupported sector sizes: logical {logical}, physical {physical}")]
    SectorSize {
        /// Logical sector size of the backend.
        logical: u32,
        /// Physical sector size of the backend.
        physical: u32,
    },
    /// The disk is empty or not a whole number of logical blocks.
    #[error("disk size {size:#x} is not a non-zero multiple of the {block}-byte block")]
    Size {
        /// Size of the backend in bytes.
        size: u64,
        /// Logical block size in bytes.
        block: u32,
    },
    /// The serial number is empty, too long or not printable ASCII.
    #[error("serial number must be 1 to {max} printable ASCII characters")]
    Serial {
        /// Longest accepted serial number.
        max: usize,
    },
    /// The WWN is not an 8-byte NAA designator.
    #[error("WWN {wwn:#018x} is not an 8-byte NAA designator (NAA 2h, 3h or 5h)")]
    Wwn {
        /// The rejected value.
        wwn: u64,
    },
}

/// One SCSI direct-access logical unit. All methods take `&self`; several channels may
/// execute commands on one disk at once.
pub struct ScsiDisk {
    disk: Arc<dyn BlockDevice>,
    identity: DiskIdentity,
    counters: Arc<IoCounters>,
    options: ScsiDiskOptions,
    /// log2 of the logical block size (9 or 12).
    block_shift: u32,
    /// log2 of logical blocks per physical block.
    phys_exponent: u8,
    /// Caching mode page WCE: when clear, every write is followed by a flush.
    write_cache: AtomicBool,
    /// Caching mode page RCD: reported only (reads are always correct).
    read_cache_disabled: AtomicBool,
    /// Sense of the last failed command, for REQUEST SENSE.
    pending: AtomicBool,
    last_sense: Mutex<Option<Sense>>,
    log: RateLimit,
}

impl std::fmt::Debug for ScsiDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiDisk")
            .field("identity", &self.identity)
            .field("options", &self.options)
            .field("block_size", &self.block_size())
            .field("capacity_blocks", &self.capacity_blocks())
            .finish_non_exhaustive()
    }
}

/// Which backend call failed (chooses the sense code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackendOp {
    Read,
    Write,
    Flush,
    Discard,
}

impl ScsiDisk {
    /// A disk over `disk`. Its sector sizes must be 512 or 4096 (logical) and a power-of-two
    /// multiple of that (physical), its size a non-zero multiple of the logical size.
    /// Completed READs and WRITEs are counted in `counters`.
    pub fn new(
        disk: Arc<dyn BlockDevice>,
        identity: DiskIdentity,
        counters: Arc<IoCounters>,
        options: ScsiDiskOptions,
    ) -> Result<Self, ConfigError> {
        let logical = disk.logical_sector_size();
        let physical = disk.physical_sector_size();
        let ratio_ok = physical >= logical
            && physical.is_multiple_of(logical)
            && (physical / logical).is_power_of_two()
            && (physical / logical).trailing_zeros() <= 15;
        if !matches!(logical, 512 | 4096) || !ratio_ok {
            return Err(ConfigError::SectorSize { logical, physical });
        }
        let size = disk.size();
        if size == 0 || !size.is_multiple_of(u64::from(logical)) {
            return Err(ConfigError::Size {
                size,
                block: logical,
            });
        }
        Ok(Self {
            disk,
            identity,
            counters,
            options,
            block_shift: logical.trailing_zeros(),
            phys_exponent: (physical / logical).trailing_zeros() as u8,
            write_cache: AtomicBool::new(true),
            read_cache_disabled: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            last_sense: Mutex::new(None),
            log: RateLimit::new(),
        })
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        1 << self.block_shift
    }

    /// Number of logical blocks (read from the backend on every call).
    pub fn capacity_blocks(&self) -> u64 {
        self.disk.size() >> self.block_shift
    }

    /// The identity given at construction.
    pub fn identity(&self) -> &DiskIdentity {
        &self.identity
    }

    /// The backend this disk runs on (the host flushes it when the disk is removed).
    pub fn backend(&self) -> &Arc<dyn BlockDevice> {
        &self.disk
    }

    /// Execute one command.
    ///
    /// * `cdb`: the CDB as the guest sent it; bytes beyond the operation code's length are
    ///   ignored, so a transport may pass its whole 16-byte CDB field.
    /// * `data_out`: the data the guest sent with the command (WRITE data, MODE SELECT and
    ///   UNMAP parameter lists); empty for data-in commands.
    /// * `data_in`: the caller's buffer for data to the guest, as long as the guest's
    ///   buffer; empty for data-out commands. On return the first
    ///   [`Outcome::data_in_len`] bytes are the command's data; responses are truncated to
    ///   both the CDB's allocation length and this buffer.
    ///
    /// READ and WRITE transfers must fit in the buffers and in [`MAX_TRANSFER_BYTES`]: a
    /// transfer past the end of the disk or longer than the buffer is refused with LBA OUT
    /// OF RANGE, one longer than the maximum with INVALID FIELD IN CDB.
    pub fn execute(&self, cdb: &[u8], data_out: &[u8], data_in: &mut [u8]) -> Outcome {
        let result = Cdb::parse(cdb).and_then(|c| self.dispatch(&c, data_out, data_in));
        match &result {
            Err(sense) => {
                tracing::debug!(
                    opcode = cdb.first().copied(),
                    key = sense.key.code(),
                    asc = sense.asc.0,
                    ascq = sense.asc.1,
                    "scsi command refused"
                );
                self.set_sense(Some(*sense));
            }
            Ok(_) if cdb.first() != Some(&cdb::REQUEST_SENSE) => self.set_sense(None),
            Ok(_) => {}
        }
        Outcome::from_result(result, data_in.len(), data_out.len())
    }

    /// [`ScsiDisk::execute`] with a data-in buffer allocated here: `data_in_len` is the
    /// guest's buffer size; the returned vector holds the `data_in_len` bytes of the outcome.
    /// Allocates at most [`MAX_TRANSFER_BYTES`] whatever `data_in_len` says; the residual is
    /// still counted against `data_in_len`. Meant for tests, fuzzing and callers without a
    /// reusable buffer.
    pub fn execute_vec(
        &self,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: usize,
    ) -> (Outcome, Vec<u8>) {
        let mut buf = vec![0u8; data_in_len.min(MAX_TRANSFER_BYTES)];
        let mut outcome = self.execute(cdb, data_out, &mut buf);
        // Every response is at most MAX_TRANSFER_BYTES long, so a capped buffer only changes
        // the residual (and the READ/WRITE "longer than the buffer" check, which cannot
        // trigger below the cap either).
        outcome.residual += data_in_len - buf.len();
        buf.truncate(outcome.data_in_len);
        (outcome, buf)
    }

    fn dispatch(&self, cdb: &Cdb, data_out: &[u8], data_in: &mut [u8]) -> Result<Xfer, Sense> {
        match cdb.op() {
            cdb::TEST_UNIT_READY => Ok(Xfer::NONE),
            cdb::REQUEST_SENSE => self.request_sense(cdb, data_in),
            cdb::INQUIRY => self.inquiry(cdb, data_in),
            cdb::REPORT_LUNS => controller::report_luns_into(cdb, &[self.options.lun], data_in),
            cdb::READ_CAPACITY_10 => self.read_capacity_10(cdb, data_in),
            cdb::SERVICE_ACTION_IN_16 => match cdb.u8(1) & 0x1F {
                cdb::SA_READ_CAPACITY_16 => self.read_capacity_16(cdb, data_in),
                _ => Err(Sense::invalid_cdb_field(1, Some(4))),
            },
            cdb::MODE_SENSE_6 | cdb::MODE_SENSE_10 => self.mode_sense(cdb, data_in),
            cdb::MODE_SELECT_6 | cdb::MODE_SELECT_10 => self.mode_select(cdb, data_out),
            cdb::READ_6 | cdb::READ_10 | cdb::READ_12 | cdb::READ_16 => self.read(cdb, data_in),
            cdb::WRITE_6 | cdb::WRITE_10 | cdb::WRITE_12 | cdb::WRITE_16 => {
                self.write(cdb, data_out)
            }
            cdb::SYNCHRONIZE_CACHE_10 | cdb::SYNCHRONIZE_CACHE_16 => self.synchronize_cache(cdb),
            cdb::START_STOP_UNIT => self.start_stop_unit(cdb),
            cdb::UNMAP if self.options.unmap => self.unmap(cdb, data_out),
            cdb::WRITE_SAME_16 if self.options.write_same_16 => self.write_same_16(cdb, data_out),
            _ => Err(Sense::invalid_opcode()),
        }
    }

    /// REQUEST SENSE: the sense of the last failed command (cleared by reading it or by the
    /// next successful command), else NO SENSE. Descriptor format (DESC = 1) is refused.
    fn request_sense(&self, cdb: &Cdb, data_in: &mut [u8]) -> Result<Xfer, Sense> {
        if cdb.u8(1) & 0x01 != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(0)));
        }
        let sense = self.take_sense().unwrap_or_else(Sense::no_sense);
        let n = put(data_in, &sense.to_fixed(), usize::from(cdb.u8(4)));
        Ok(Xfer::data_in(n))
    }

    fn set_sense(&self, sense: Option<Sense>) {
        match sense {
            // Skip the lock in the common case of success after success.
            None if !self.pending.load(Ordering::Relaxed) => {}
            None => {
                self.pending.store(false, Ordering::Relaxed);
                *self.last_sense.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Some(s) => {
                *self.last_sense.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                self.pending.store(true, Ordering::Release);
            }
        }
    }

    fn take_sense(&self) -> Option<Sense> {
        if !self.pending.swap(false, Ordering::Acquire) {
            return None;
        }
        self.last_sense
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Unmapping is advertised and accepted.
    fn unmap_enabled(&self) -> bool {
        self.options.unmap && !self.disk.read_only()
    }

    /// The sense for a failed backend call, logged (rate-limited: the guest can repeat it).
    fn backend_error(&self, op: BackendOp, error: &DiskError) -> Sense {
        let sense = match error {
            DiskError::ReadOnly => Sense::write_protected(),
            DiskError::OutOfRange { .. } => Sense::lba_out_of_range(),
            DiskError::Io { .. } | DiskError::Corrupt { .. } => match op {
                BackendOp::Read => Sense::new(SenseKey::MediumError, Asc::UNRECOVERED_READ_ERROR),
                _ => Sense::new(SenseKey::MediumError, Asc::WRITE_ERROR),
            },
            _ => Sense::new(SenseKey::HardwareError, Asc::INTERNAL_TARGET_FAILURE),
        };
        if let Some(dropped) = self.log.allow() {
            tracing::warn!(
                serial = self.identity.serial(),
                ?op,
                error = %error,
                dropped,
                "scsi disk: backend request failed"
            );
        }
        sense
    }
}
