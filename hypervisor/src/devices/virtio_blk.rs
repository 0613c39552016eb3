//! virtio-blk (virtio 1.2 §5.2) on a [`BlockDevice`].
//!
//! One request queue of [`QUEUE_SIZE`] entries, processed synchronously when the guest
//! notifies. Every descriptor chain is hostile: lengths, addresses, ordering and sector ranges
//! are checked, guest memory is only touched through vm-memory, and no request can make the
//! device panic or allocate more than [`MAX_CHUNK`] bytes.

use std::sync::Arc;

use parvis_disk::{BlockDevice, SECTOR_SIZE, check_range};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;
use super::virtio_mmio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice};

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Entries in the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request advertised in `seg_max`.
pub const SEG_MAX: u32 = 126;
/// Largest piece of a request staged in host memory at once; bigger requests are split.
pub const MAX_CHUNK: usize = 1 << 20;
/// Serial number returned by `VIRTIO_BLK_T_GET_ID`.
pub const SERIAL: &[u8] = b"parvis-disk";

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const VIRTIO_BLK_ID_BYTES: usize = 20;
const HEADER_LEN: usize = 16;
/// Descriptors per chain we are willing to look at (queue entries plus indirect tables).
const MAX_SEGMENTS: usize = 1024;
/// Size of the config space we expose (`virtio_blk_config` up to the discard fields).
const CONFIG_LEN: usize = 64;

/// One guest buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// A position in a list of guest buffers, for copying a byte stream in and out of them.
struct Cursor<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    fn new(segments: &'a [Segment]) -> Self {
        Self {
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// Apply `f(guest address, host range)` to the next `len` bytes. Fails if the segments run
    /// out or `f` fails.
    fn step(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ()>,
    ) -> Result<(), ()> {
        let mut done = 0;
        while done < len {
            let seg = self.segments.get(self.index).ok_or(())?;
            let avail = (seg.len - self.offset) as usize;
            let n = avail.min(len - done);
            let addr = seg.addr.0.checked_add(u64::from(self.offset)).ok_or(())?;
            f(GuestAddress(addr), done..done + n)?;
            done += n;
            if n == avail {
                self.index += 1;
                self.offset = 0;
            } else {
                self.offset += n as u32;
            }
        }
        Ok(())
    }

    /// Move past `len` bytes.
    fn skip(&mut self, len: usize) -> Result<(), ()> {
        self.step(len, |_, _| Ok(()))
    }

    /// Fill `buf` from guest memory.
    fn read(&mut self, mem: &GuestMemory, buf: &mut [u8]) -> Result<(), ()> {
        self.step(buf.len(), |addr, r| {
            mem.read_slice(&mut buf[r], addr).map_err(drop)
        })
    }

    /// Copy `buf` into guest memory.
    fn write(&mut self, mem: &GuestMemory, buf: &[u8]) -> Result<(), ()> {
        self.step(buf.len(), |addr, r| mem.write_slice(&buf[r], addr).map_err(drop))
    }
}

/// What a request did: its status and how many bytes it wrote to the guest (before the
/// status byte).
struct Outcome {
    status: u8,
    written: u32,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Self { status, written: 0 }
    }
}

/// The virtio-blk device model.
pub struct VirtioBlk {
    disk: Arc<dyn BlockDevice>,
    features: u64,
    config: [u8; CONFIG_LEN],
    acked_features: u64,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    buf: Vec<u8>,
    warned: bool,
}

impl VirtioBlk {
    /// A block device serving `disk`.
    pub fn new(disk: Arc<dyn BlockDevice>) -> Self {
        let logical = disk.logical_sector_size();
        let physical = disk.physical_sector_size();
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if disk.read_only() {
            features |= VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(disk.size() / u64::from(SECTOR_SIZE)).to_le_bytes());
        // size_max (@8) stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (@16) stays 0: VIRTIO_BLK_F_GEOMETRY is not offered.
        config[20..24].copy_from_slice(&logical.to_le_bytes());
        if logical != 0 && physical > logical {
            features |= VIRTIO_BLK_F_TOPOLOGY;
            let ratio = physical / logical;
            config[24] = ratio.trailing_zeros() as u8; // physical_block_exp
            config[25] = 0; // alignment_offset
            config[26..28].copy_from_slice(&(ratio as u16).to_le_bytes()); // min_io_size
        }
        config[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        Self {
            disk,
            features,
            config,
            acked_features: 0,
            readable: Vec::new(),
            writable: Vec::new(),
            buf: Vec::new(),
            warned: false,
        }
    }

    /// The backing disk.
    pub fn disk(&self) -> &Arc<dyn BlockDevice> {
        &self.disk
    }

    /// Features the driver accepted (0 before activation).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Log the first malformed request only.
    fn warn(&mut self, what: &str) {
        if !self.warned {
            self.warned = true;
            tracing::warn!("virtio-blk: malformed request ({what}); further ones are not logged");
        }
    }

    /// Handle one chain; returns the used length to report.
    fn handle_chain(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        self.readable.clear();
        self.writable.clear();
        let mut misordered = false;
        let mut too_many = false;
        let mut status_seg = None;
        for desc in chain {
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                status_seg = Some(seg);
            } else if status_seg.is_some() {
                misordered = true;
            }
            if self.readable.len() + self.writable.len() >= MAX_SEGMENTS {
                too_many = true;
            } else if desc.is_write_only() {
                self.writable.push(seg);
            } else {
                self.readable.push(seg);
            }
        }
        // The status is the last byte of the last device-writable buffer.
        let Some(status_seg) = status_seg else {
            self.warn("no device-writable status byte");
            return 0;
        };
        let status_addr = status_seg
            .addr
            .0
            .checked_add(u64::from(status_seg.len) - 1)
            .map(GuestAddress);
        let outcome = if too_many || misordered {
            self.warn("too many or misordered descriptors");
            Outcome::status(VIRTIO_BLK_S_IOERR)
        } else {
            // Everything writable but the status byte is data-in space.
            if let Some(last) = self.writable.last_mut() {
                last.len -= 1;
                if last.len == 0 {
                    self.writable.pop();
                }
            }
            self.execute(mem)
        };
        match status_addr.map(|a| mem.write_obj(outcome.status, a)) {
            Some(Ok(())) => outcome.written.saturating_add(1),
            _ => {
                self.warn("status byte outside guest memory");
                0
            }
        }
    }

    /// Execute a parsed request (segments in `self.readable` / `self.writable`).
    fn execute(&mut self, mem: &GuestMemory) -> Outcome {
        let mut reader = Cursor::new(&self.readable);
        let mut header = [0u8; HEADER_LEN];
        if reader.read(mem, &mut header).is_err() {
            self.warn("request header shorter than 16 bytes or unreadable");
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        let data_out: u64 = self.readable.iter().map(|s| u64::from(s.len)).sum::<u64>()
            - HEADER_LEN as u64;
        let data_in: u64 = self.writable.iter().map(|s| u64::from(s.len)).sum();
        match kind {
            VIRTIO_BLK_T_IN => self.read_request(mem, sector, data_in),
            VIRTIO_BLK_T_OUT => self.write_request(mem, sector, data_out),
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => Outcome::status(VIRTIO_BLK_S_OK),
                Err(e) => {
                    tracing::error!("virtio-blk: flush failed: {e}");
                    Outcome::status(VIRTIO_BLK_S_IOERR)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
                id[..SERIAL.len()].copy_from_slice(SERIAL);
                let n = (data_in as usize).min(VIRTIO_BLK_ID_BYTES);
                match Cursor::new(&self.writable).write(mem, &id[..n]) {
                    Ok(()) => Outcome {
                        status: VIRTIO_BLK_S_OK,
                        written: n as u32,
                    },
                    Err(()) => Outcome::status(VIRTIO_BLK_S_IOERR),
                }
            }
            _ => Outcome::status(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Byte offset of a request, if `len` bytes there are whole sectors inside the disk.
    fn disk_range(&mut self, sector: u64, len: u64) -> Option<u64> {
        let valid = len.is_multiple_of(u64::from(SECTOR_SIZE));
        let offset = sector.checked_mul(u64::from(SECTOR_SIZE));
        match offset {
            Some(offset) if valid && check_range(offset, len, self.disk.size()).is_ok() => {
                Some(offset)
            }
            _ => {
                self.warn("request length or sector range invalid");
                None
            }
        }
    }

    fn read_request(&mut self, mem: &GuestMemory, sector: u64, len: u64) -> Outcome {
        let Some(mut offset) = self.disk_range(sector, len) else {
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        };
        let mut writer = Cursor::new(&self.writable);
        let mut written = 0u64;
        while written < len {
            let n = (len - written).min(MAX_CHUNK as u64) as usize;
            self.buf.resize(n, 0);
            if let Err(e) = self.disk.read_at(&mut self.buf, offset) {
                tracing::error!("virtio-blk: {e}");
                break;
            }
            if writer.write(mem, &self.buf).is_err() {
                break;
            }
            written += n as u64;
            offset += n as u64;
        }
        Outcome {
            status: if written == len {
                VIRTIO_BLK_S_OK
            } else {
                VIRTIO_BLK_S_IOERR
            },
            // The chain is at most 4 GiB (virtio-queue enforces it), so this fits.
            written: written as u32,
        }
    }

    fn write_request(&mut self, mem: &GuestMemory, sector: u64, len: u64) -> Outcome {
        if self.disk.read_only() {
            self.warn("write to a read-only disk");
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
        let Some(mut offset) = self.disk_range(sector, len) else {
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        };
        let mut reader = Cursor::new(&self.readable);
        if reader.skip(HEADER_LEN).is_err() {
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_CHUNK as u64) as usize;
            self.buf.resize(n, 0);
            if reader.read(mem, &mut self.buf).is_err() {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            }
            if let Err(e) = self.disk.write_at(&self.buf, offset) {
                tracing::error!("virtio-blk: {e}");
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            }
            done += n as u64;
            offset += n as u64;
        }
        Outcome::status(VIRTIO_BLK_S_OK)
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// The config space is read-only (no `VIRTIO_BLK_F_CONFIG_WCE`).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        if index != 0 {
            return false;
        }
        let mut used = false;
        // Bound the work per notification against a driver that keeps refilling the ring.
        let mut budget = 4 * usize::from(queue.size());
        'outer: loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = self.handle_chain(chain, mem);
                if queue.add_used(mem, head, len).is_ok() {
                    used = true;
                } else {
                    self.warn("descriptor head index out of range");
                }
                budget -= 1;
                if budget == 0 {
                    break 'outer;
                }
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        used
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}
