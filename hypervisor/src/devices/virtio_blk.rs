//! virtio-blk (virtio 1.2 §5.2) on a [`BlockDevice`].
//!
//! One request queue of [`QUEUE_SIZE`] entries, processed synchronously when the guest
//! notifies. Every descriptor chain is hostile: lengths, addresses, ordering and sector ranges
//! are checked, guest memory is only touched through vm-memory, and no request can make the
//! device panic or allocate more than [`MAX_CHUNK`] bytes.

use std::sync::Arc;

use parvis_disk::counters::IoCounters;
use parvis_disk::{BlockDevice, SECTOR_SIZE, check_range};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;
use super::platform::{PlatformDevice, WireError, Wiring};
use super::virtio_mmio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, VirtioMmio};

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
        self.step(buf.len(), |addr, r| {
            mem.write_slice(&buf[r], addr).map_err(drop)
        })
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
    /// What the guest read and wrote.
    counters: Arc<IoCounters>,
    features: u64,
    config: [u8; CONFIG_LEN],
    acked_features: u64,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    buf: Vec<u8>,
    warned: bool,
}

impl VirtioBlk {
    /// Count the guest's reads and writes in `counters`.
    pub fn with_counters(mut self, counters: Arc<IoCounters>) -> Self {
        self.counters = counters;
        self
    }

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
            counters: Arc::default(),
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
                // Stop here rather than walk a 65535-entry indirect table; without the rest
                // of the chain the status byte is unknown, so the chain is dropped.
                too_many = true;
                break;
            } else if desc.is_write_only() {
                self.writable.push(seg);
            } else {
                self.readable.push(seg);
            }
        }
        // The status is the last byte of the last device-writable buffer.
        let Some(status_seg) = status_seg.filter(|_| !too_many) else {
            self.warn("no device-writable status byte, or too many descriptors");
            return 0;
        };
        let status_addr = status_seg
            .addr
            .0
            .checked_add(u64::from(status_seg.len) - 1)
            .map(GuestAddress);
        let outcome = if misordered {
            self.warn("device-readable descriptor after a device-writable one");
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
        let data_out: u64 =
            self.readable.iter().map(|s| u64::from(s.len)).sum::<u64>() - HEADER_LEN as u64;
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
        if written == len {
            self.counters.read(len);
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
        self.counters.write(len);
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
        let mut empty_rounds = 0;
        'outer: loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped = true;
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
            // More buffers may have arrived while notifications were off: go round again.
            // A ring whose available index is corrupt reports "more" without ever yielding a
            // chain; give up after a second empty round, or a hostile guest could spin this
            // vCPU forever.
            if !popped {
                empty_rounds += 1;
            }
            match queue.enable_notification(mem) {
                Ok(true) if empty_rounds < 2 => continue,
                _ => break,
            }
        }
        used
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

/// First GSI of the virtio-mmio disks (COM1 uses 4, the SCI 9).
pub const FIRST_GSI: u32 = 5;

/// The `index`-th virtio-blk disk on the platform: a virtio-mmio window with its GSI, and
/// its `\_SB.Vnnn` entry (`LNRO0005`).
pub struct VirtioBlkSlot {
    index: usize,
    disk: Arc<dyn BlockDevice>,
    counters: Arc<IoCounters>,
}

impl std::fmt::Debug for VirtioBlkSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlkSlot")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl VirtioBlkSlot {
    pub fn new(index: usize, disk: Arc<dyn BlockDevice>, counters: Arc<IoCounters>) -> Self {
        VirtioBlkSlot {
            index,
            disk,
            counters,
        }
    }

    fn base(&self) -> u64 {
        crate::layout::virtio_mmio_base(self.index)
    }

    fn gsi(&self) -> u32 {
        // GSIs 5..=8, then 10.. (9 is the SCI).
        let g = FIRST_GSI + self.index as u32;
        if g >= u32::from(crate::acpi::SCI_IRQ) {
            g + 1
        } else {
            g
        }
    }
}

impl PlatformDevice for VirtioBlkSlot {
    fn name(&self) -> String {
        format!("virtio-blk {}", self.index)
    }

    fn aml(&self) -> Option<Vec<u8>> {
        use acpi_tables::aml;
        Some(crate::acpi::aml_device(
            &format!("V{:03X}", self.index),
            &"LNRO0005",
            self.index as u32,
            vec![
                &aml::Memory32Fixed::new(
                    true,
                    self.base() as u32,
                    crate::layout::VIRTIO_MMIO_SIZE as u32,
                ),
                &aml::Interrupt::new(true, true, false, false, self.gsi()),
            ],
        ))
    }

    fn wire(&self, w: &mut dyn Wiring) -> Result<(), WireError> {
        let irq = w.edge_irq(self.gsi())?;
        let dev = VirtioMmio::new(
            VirtioBlk::new(self.disk.clone()).with_counters(self.counters.clone()),
            w.memory(),
            irq,
        );
        w.mmio(
            Arc::new(std::sync::Mutex::new(dev)),
            self.base(),
            crate::layout::VIRTIO_MMIO_SIZE,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use parvis_disk::{RawFile, RawFileOptions};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::devices::BusDevice;
    use crate::devices::virtio_mmio::VirtioMmio;
    use crate::devices::virtio_mmio::tests::{
        CountingIrq, bring_up, guest_memory_of, notify, set_status, used_entry, used_ring,
    };

    const HDR: u64 = 0x1_0000;
    const STATUS: u64 = 0x1_f000;
    const DATA: u64 = 0x2_0000;
    const MEM_SIZE: usize = 0x40_0000;
    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;

    struct Env {
        _dir: tempfile::TempDir,
        path: PathBuf,
        mem: Arc<GuestMemory>,
        irq: Arc<CountingIrq>,
        dev: VirtioMmio<VirtioBlk>,
        /// Next free descriptor (every chain completes synchronously, so slots are reused).
        slot: u16,
        /// Chains made available so far: the avail index.
        chains: u16,
    }

    /// A `size`-byte raw disk behind a virtio-blk device with queue 0 at guest address 0.
    fn env(size: u64, options: RawFileOptions) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        drop(RawFile::create(&path, size).unwrap());
        let disk = Arc::new(RawFile::open_with(&path, &options).unwrap());
        let mem = guest_memory_of(MEM_SIZE);
        let irq = Arc::new(CountingIrq::default());
        let mut dev = VirtioMmio::new(VirtioBlk::new(disk), mem.clone(), irq.clone());
        let q = MockSplitQueue::create(&*mem, GuestAddress(0), QUEUE_SIZE);
        bring_up(&mut dev, FEATURES, 0, &q, QUEUE_SIZE);
        Env {
            _dir: dir,
            path,
            mem,
            irq,
            dev,
            slot: 0,
            chains: 0,
        }
    }

    fn rw() -> RawFileOptions {
        RawFileOptions::default()
    }

    impl Env {
        /// Submit one chain of (address, length, device-writable) buffers, notify, and return
        /// the used length of the completion.
        fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
            if usize::from(self.slot) + bufs.len() > usize::from(QUEUE_SIZE) {
                self.slot = 0;
            }
            let descs = chain(bufs, self.slot);
            self.submit_descs(&descs)
        }

        /// Submit one indirect descriptor whose table, at `table`, holds `bufs`.
        fn submit_indirect(&mut self, table: u64, bufs: &[(u64, u32, bool)]) -> u32 {
            for (i, desc) in chain(bufs, 0).into_iter().enumerate() {
                let at = GuestAddress(table + 16 * i as u64);
                self.mem.write_obj(desc, at).unwrap();
            }
            let len = 16 * bufs.len() as u32;
            self.slot %= QUEUE_SIZE;
            self.submit_descs(&[RawDescriptor::from(Descriptor::new(
                table, len, INDIRECT, 0,
            ))])
        }

        /// Put a chain, laid out from descriptor `self.slot` on, in the avail ring and notify.
        fn submit_descs(&mut self, descs: &[RawDescriptor]) -> u32 {
            let q = MockSplitQueue::create(&*self.mem, GuestAddress(0), QUEUE_SIZE);
            // `create` zeroes the avail index; restore it.
            q.avail().idx().store(self.chains);
            let n = descs.len() as u16;
            q.add_desc_chains(descs, self.slot).unwrap();
            let head = self.slot;
            self.slot += n;
            self.chains = self.chains.wrapping_add(1);
            notify(&mut self.dev, 0);
            let used = used_ring(&q, QUEUE_SIZE);
            let (_, _, idx) = used_entry(&self.mem, used, 0);
            assert_eq!(idx, self.chains, "exactly one completion per chain");
            let (id, len, _) = used_entry(&self.mem, used, idx.wrapping_sub(1) % QUEUE_SIZE);
            assert_eq!(id, u32::from(head));
            len
        }

        /// Submit header + data + status; returns (status, used length).
        fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut bufs = vec![(HDR, 16, false)];
            bufs.extend_from_slice(data);
            bufs.push((STATUS, 1, true));
            let len = self.submit(&bufs);
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }

        fn config(&mut self, offset: u64, len: usize) -> u64 {
            let mut data = [0u8; 8];
            self.dev.read(0x100 + offset, &mut data[..len]);
            u64::from_le_bytes(data)
        }
    }

    /// Descriptors for `bufs` chained from index `first` on.
    fn chain(bufs: &[(u64, u32, bool)], first: u16) -> Vec<RawDescriptor> {
        let n = bufs.len() as u16;
        let descs = bufs.iter().enumerate().map(|(i, &(addr, len, write))| {
            let i = i as u16;
            let flags = if write { WRITE } else { 0 } | if i + 1 < n { NEXT } else { 0 };
            let next = first.wrapping_add(i + 1);
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        });
        descs.collect()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn write_then_read_round_trip() {
        let mut e = env(1 << 20, rw());
        let data = pattern(1024, 7);
        e.mem.write_slice(&data[..512], GuestAddress(DATA)).unwrap();
        e.mem
            .write_slice(&data[512..], GuestAddress(DATA + 0x1000))
            .unwrap();
        let out = [(DATA, 512, false), (DATA + 0x1000, 512, false)];
        assert_eq!(e.request(VIRTIO_BLK_T_OUT, 8, &out), (VIRTIO_BLK_S_OK, 1));
        assert_eq!(
            &std::fs::read(&e.path).unwrap()[4096..4096 + 1024],
            &data[..]
        );
        assert!(e.irq.count() >= 1);

        // Read it back with the header split over two descriptors and data over three.
        let mut header = [0u8; 16];
        header[8..].copy_from_slice(&8u64.to_le_bytes());
        e.mem.write_slice(&header[..5], GuestAddress(HDR)).unwrap();
        e.mem
            .write_slice(&header[5..], GuestAddress(HDR + 0x100))
            .unwrap();
        let bufs = [
            (HDR, 5, false),
            (HDR + 0x100, 11, false),
            (DATA + 0x4000, 100, true),
            (DATA + 0x5000, 924, true),
            (STATUS, 1, true),
        ];
        assert_eq!(e.submit(&bufs), 1025);
        assert_eq!(e.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        let mut back = vec![0u8; 1024];
        e.mem
            .read_slice(&mut back[..100], GuestAddress(DATA + 0x4000))
            .unwrap();
        e.mem
            .read_slice(&mut back[100..], GuestAddress(DATA + 0x5000))
            .unwrap();
        assert_eq!(back, data);

        // The status byte may share the last data descriptor.
        let buf = [(DATA + 0x8000, 513, true)];
        let mut header = [0u8; 16];
        header[8..].copy_from_slice(&9u64.to_le_bytes());
        e.mem.write_slice(&header, GuestAddress(HDR)).unwrap();
        assert_eq!(e.submit(&[(HDR, 16, false), buf[0]]), 513);
        e.mem
            .read_slice(&mut back[..512], GuestAddress(DATA + 0x8000))
            .unwrap();
        assert_eq!(back[..512], data[512..]);
        assert_eq!(
            e.mem.read_obj::<u8>(GuestAddress(DATA + 0x8200)).unwrap(),
            0
        );
    }

    #[test]
    fn requests_larger_than_a_chunk() {
        let len = MAX_CHUNK + MAX_CHUNK / 2;
        let mut e = env(4 << 20, rw());
        let data = pattern(len, 3);
        e.mem.write_slice(&data, GuestAddress(0x10_0000)).unwrap();
        let out = [(0x10_0000, len as u32, false)];
        assert_eq!(e.request(VIRTIO_BLK_T_OUT, 16, &out), (VIRTIO_BLK_S_OK, 1));
        assert_eq!(
            &std::fs::read(&e.path).unwrap()[8192..8192 + len],
            &data[..]
        );
        let into = [(0x28_0000, len as u32, true)];
        let (status, used) = e.request(VIRTIO_BLK_T_IN, 16, &into);
        assert_eq!((status, used as usize), (VIRTIO_BLK_S_OK, len + 1));
        let mut back = vec![0u8; len];
        e.mem
            .read_slice(&mut back, GuestAddress(0x28_0000))
            .unwrap();
        assert!(back == data);
    }

    #[test]
    fn flush_get_id_and_unsupported() {
        let mut e = env(1 << 20, rw());
        assert_eq!(e.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
        e.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
        let id = [(DATA, 20, true)];
        assert_eq!(
            e.request(VIRTIO_BLK_T_GET_ID, 0, &id),
            (VIRTIO_BLK_S_OK, 21)
        );
        let mut serial = [0u8; 20];
        e.mem.read_slice(&mut serial, GuestAddress(DATA)).unwrap();
        assert_eq!(&serial[..11], b"parvis-disk");
        assert_eq!(serial[11..], [0; 9]);
        for kind in [2, 7, 11, 13, 0xffff_ffff] {
            assert_eq!(e.request(kind, 0, &id), (VIRTIO_BLK_S_UNSUPP, 1));
        }
    }

    #[test]
    fn bad_requests_fail_cleanly() {
        let mut e = env(64 * 1024, rw());
        let data = [(DATA, 512, true)];
        // Out of range, straddling the end, sector overflow.
        assert_eq!(
            e.request(VIRTIO_BLK_T_IN, 128, &data),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        let two = [(DATA, 1024, true)];
        assert_eq!(
            e.request(VIRTIO_BLK_T_IN, 127, &two),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        let out = [(DATA, 512, false)];
        let huge = u64::MAX / 256;
        assert_eq!(
            e.request(VIRTIO_BLK_T_OUT, huge, &out),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        assert_eq!(
            e.request(VIRTIO_BLK_T_IN, 127, &data),
            (VIRTIO_BLK_S_OK, 513)
        );
        // Lengths that are not whole sectors.
        let odd = [(DATA, 100, true)];
        assert_eq!(e.request(VIRTIO_BLK_T_IN, 0, &odd), (VIRTIO_BLK_S_IOERR, 1));
        // Data outside guest memory.
        let outside = [(MEM_SIZE as u64 - 256, 512, true)];
        assert_eq!(
            e.request(VIRTIO_BLK_T_IN, 0, &outside).0,
            VIRTIO_BLK_S_IOERR
        );
        let outside = [(u64::MAX - 100, 512, false)];
        assert_eq!(
            e.request(VIRTIO_BLK_T_OUT, 0, &outside).0,
            VIRTIO_BLK_S_IOERR
        );
        // Header too short.
        assert_eq!(e.submit(&[(HDR, 8, false), (STATUS, 1, true)]), 1);
        assert_eq!(e.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 1);
        // Readable after writable.
        let bufs = [
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA, 512, false),
            (STATUS, 1, true),
        ];
        assert_eq!(e.submit(&bufs), 1);
        // No status byte at all: dropped with length 0.
        assert_eq!(e.submit(&[(HDR, 16, false)]), 0);
        assert_eq!(e.submit(&[(HDR, 16, false), (STATUS, 0, true)]), 0);
        // Status byte outside guest memory.
        assert_eq!(e.submit(&[(HDR, 16, false), (u64::MAX, 1, true)]), 0);
        // The device still works.
        assert_eq!(e.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    }

    #[test]
    fn indirect_chains() {
        let mut e = env(1 << 20, rw());
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        header[8..].copy_from_slice(&3u64.to_le_bytes());
        e.mem.write_slice(&header, GuestAddress(HDR)).unwrap();
        let data = pattern(512, 9);
        e.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        let table = 0x30_0000;
        let bufs = [(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)];
        assert_eq!(e.submit_indirect(table, &bufs), 1);
        assert_eq!(&std::fs::read(&e.path).unwrap()[1536..2048], &data[..]);
        // More descriptors than a request may have: dropped without walking the whole table.
        let mut many = vec![(HDR, 16, false)];
        many.extend((0..MAX_SEGMENTS).map(|_| (DATA, 512, true)));
        many.push((STATUS, 1, true));
        e.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(e.submit_indirect(table, &many), 0);
        assert_eq!(e.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
        assert_eq!(e.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    }

    #[test]
    fn read_only_disk() {
        let ro = RawFileOptions {
            read_only: true,
            ..rw()
        };
        let mut e = env(1 << 20, ro);
        assert_ne!(e.dev.device().features() & VIRTIO_BLK_F_RO, 0);
        e.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        let out = [(DATA, 512, false)];
        assert_eq!(
            e.request(VIRTIO_BLK_T_OUT, 0, &out),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        assert!(std::fs::read(&e.path).unwrap().iter().all(|&b| b == 0));
        let into = [(DATA, 512, true)];
        assert_eq!(e.request(VIRTIO_BLK_T_IN, 0, &into), (VIRTIO_BLK_S_OK, 513));
        assert_eq!(e.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    }

    #[test]
    fn config_space() {
        let mut e = env(1 << 20, rw());
        assert_eq!(e.dev.device().device_type(), 2);
        assert_eq!(e.config(0, 8), 2048);
        assert_eq!(e.config(0, 4), 2048);
        assert_eq!(e.config(12, 4), u64::from(SEG_MAX));
        assert_eq!(e.config(20, 4), 512);
        assert_eq!(e.config(0x1000, 8), 0);
        let features = e.dev.device().features();
        let expected = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        assert_eq!(features, expected);
        assert_eq!(e.dev.device().acked_features(), FEATURES);
        set_status(&mut e.dev, 0);
        assert_eq!(e.dev.device().acked_features(), 0);

        let native = RawFileOptions {
            logical_sector_size: 4096,
            ..rw()
        };
        let mut e = env(1 << 20, native);
        assert_eq!(e.config(0, 8), 2048);
        assert_eq!(e.config(20, 4), 4096);
        assert_eq!(e.dev.device().features() & VIRTIO_BLK_F_TOPOLOGY, 0);

        let emulated = RawFileOptions {
            physical_sector_size: Some(4096),
            ..rw()
        };
        let mut e = env(1 << 20, emulated);
        assert_eq!(e.config(20, 4), 512);
        assert_ne!(e.dev.device().features() & VIRTIO_BLK_F_TOPOLOGY, 0);
        assert_eq!(e.config(24, 1), 3);
        assert_eq!(e.config(26, 2), 8);
    }

    /// xorshift64*: deterministic, no extra crates.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn hostile_descriptor_tables() {
        let mut e = env(64 * 1024, rw());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let avail = 0x1000u64;
        for round in 0..400 {
            // Random request headers and data in the data area.
            for i in 0..64u64 {
                let kind = [0u32, 1, 4, 8, 2, rng.next() as u32][rng.below(6) as usize];
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&kind.to_le_bytes());
                header[8..].copy_from_slice(&rng.below(160).to_le_bytes());
                e.mem
                    .write_slice(&header, GuestAddress(HDR + i * 16))
                    .unwrap();
            }
            // A random descriptor table.
            for i in 0..u64::from(QUEUE_SIZE) {
                let addr = match rng.below(5) {
                    0 => rng.next(),
                    1 => MEM_SIZE as u64 - rng.below(4096),
                    2 => rng.below(0x3000),
                    _ => HDR + 16 * rng.below(64) + rng.below(2) * rng.below(0x4_0000),
                };
                let len = match rng.below(5) {
                    0 => rng.next() as u32,
                    1 => rng.below(32) as u32,
                    2 => 16,
                    _ => 512 * rng.below(8) as u32 + rng.below(2) as u32,
                };
                let flags = (rng.next() & 7) as u16;
                let next = if rng.below(4) == 0 {
                    rng.next() as u16
                } else {
                    rng.below(u64::from(QUEUE_SIZE)) as u16
                };
                let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
                e.mem.write_obj(desc, GuestAddress(i * 16)).unwrap();
            }
            // Random avail entries and index, sometimes more than the queue holds.
            let old: u16 = e.mem.read_obj(GuestAddress(avail + 2)).unwrap();
            for i in 0..u64::from(QUEUE_SIZE) {
                let head = rng.below(u64::from(QUEUE_SIZE) + 8) as u16;
                e.mem
                    .write_obj(head, GuestAddress(avail + 4 + 2 * i))
                    .unwrap();
            }
            let added = match rng.below(8) {
                0 => rng.next() as u16,
                _ => rng.below(32) as u16,
            };
            let used_event = GuestAddress(avail + 4 + 2 * u64::from(QUEUE_SIZE));
            e.mem.write_obj(rng.next() as u16, used_event).unwrap();
            e.mem
                .write_obj(old.wrapping_add(added), GuestAddress(avail + 2))
                .unwrap();
            notify(&mut e.dev, 0);
            if round % 50 == 49 {
                // Reset and bring the device back up on the same rings.
                set_status(&mut e.dev, 0);
                let q = MockSplitQueue::create(&*e.mem, GuestAddress(0), QUEUE_SIZE);
                bring_up(&mut e.dev, FEATURES, 0, &q, QUEUE_SIZE);
            }
        }
        // Still serves honest requests afterwards.
        set_status(&mut e.dev, 0);
        let q = MockSplitQueue::create(&*e.mem, GuestAddress(0), QUEUE_SIZE);
        bring_up(&mut e.dev, FEATURES, 0, &q, QUEUE_SIZE);
        e.slot = 0;
        e.chains = 0;
        assert_eq!(e.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    }
}
