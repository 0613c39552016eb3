//! The virtio-mmio transport (virtio 1.x, §4.2; version 2 register layout only).
//!
//! [`VirtioMmio`] owns the queues and the register state; a [`VirtioDevice`] supplies the
//! device type, features, config space and request processing. A queue notification is
//! handled synchronously on the vCPU thread that wrote `QueueNotify`.
//!
//! Everything the guest writes is hostile: bad widths, bad queue indexes, bad sizes, queue
//! reconfiguration while live, notifications for unusable queues and feature or status
//! violations are ignored, and each kind of mistake is logged once per device.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{BusDevice, GuestMemory, Irq};

/// `MagicValue`: "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The only register layout we implement (virtio 1.x "modern").
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` reported by every Parvis device ("PVRS").
pub const MMIO_VENDOR_ID: u32 = 0x5056_5253;
/// Size of one virtio-mmio window (registers plus config space).
pub const MMIO_WINDOW_SIZE: u64 = 0x200;

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Bit 0 of `InterruptStatus`: the used ring of some queue changed.
pub const INT_VRING: u32 = 1;

// Register offsets (virtio 1.2 §4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

// Device status bits (virtio 1.2 §2.1).
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

/// A virtio device model behind a [`VirtioMmio`] transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues. Sizes should be powers
    /// of two up to 32768 (others are rounded down to one).
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits, including [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;
    /// Guest read of device config space at `offset` (relative to the config space).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Guest write of device config space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set `DRIVER_OK` after accepting `acked_features`.
    fn activate(&mut self, acked_features: u64);
    /// Process the available requests of queue `index`. Returns true if the used ring
    /// changed and the guest may need an interrupt.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool;
    /// The driver reset the device (wrote 0 to `Status`).
    fn reset(&mut self);
}

/// Kinds of guest mistakes, each logged once per device.
#[derive(Debug, Clone, Copy)]
enum Mistake {
    AccessWidth,
    QueueSel,
    QueueSize,
    QueueLive,
    QueueAddress,
    QueueInvalid,
    Notify,
    Features,
    Status,
}

/// One queue and whether its rings were found inside guest memory when it was made ready.
struct QueueSlot {
    queue: Queue,
    usable: bool,
}

/// A virtio-mmio transport around a device; register it on the MMIO bus with a window of
/// [`MMIO_WINDOW_SIZE`] bytes.
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    mem: Arc<GuestMemory>,
    irq: Irq,
    queues: Vec<QueueSlot>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    warned: u32,
}

/// Largest power of two that is at most `max` (at least 1).
fn queue_size_floor(max: u16) -> u16 {
    1 << (15 - max.max(1).leading_zeros())
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// Wrap `device`, whose queues live in `mem` and whose interrupt is `irq`.
    pub fn new(device: D, mem: Arc<GuestMemory>, irq: Irq) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueSlot {
                queue: Queue::new(queue_size_floor(max))
                    .expect("a power of two in 1..=32768 is a valid queue size"),
                usable: false,
            })
            .collect();
        Self {
            device,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            warned: 0,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Log a guest mistake, once per kind.
    fn warn(&mut self, kind: Mistake, detail: std::fmt::Arguments<'_>) {
        let bit = 1u32 << (kind as u32);
        if self.warned & bit == 0 {
            self.warned |= bit;
            tracing::warn!(
                device_type = self.device.device_type(),
                "virtio-mmio: guest error ({kind:?}): {detail}; further ones are not logged"
            );
        }
    }

    /// The queue selected by `QueueSel`.
    fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The selected queue if it may still be configured (exists and is not ready).
    fn configurable(&mut self) -> Option<&mut Queue> {
        let sel = self.queue_sel;
        match self.queues.get(sel as usize).map(|q| q.queue.ready()) {
            None => {
                self.warn(
                    Mistake::QueueSel,
                    format_args!("queue {sel} does not exist"),
                );
                None
            }
            Some(true) => {
                self.warn(
                    Mistake::QueueLive,
                    format_args!("queue {sel} reconfigured while ready"),
                );
                None
            }
            Some(false) => self.selected().map(|q| &mut q.queue),
        }
    }

    fn reset(&mut self) {
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.usable = false;
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.device.reset();
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.queue.max_size())),
            REG_QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.queue.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(queue) = self.configurable() {
                    let ok = u16::try_from(value)
                        .ok()
                        .is_some_and(|size| queue.try_set_size(size).is_ok());
                    if !ok {
                        self.warn(Mistake::QueueSize, format_args!("queue size {value}"));
                    }
                }
            }
            REG_QUEUE_READY => self.write_queue_ready(value),
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_address(offset, value),
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            self.warn(
                Mistake::Features,
                format_args!("features written after FEATURES_OK"),
            );
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel if value != 0 => self.warn(
                Mistake::Features,
                format_args!("features {value:#x} in word {sel}"),
            ),
            _ => {}
        }
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(queue) = self.configurable() else {
            return;
        };
        let current = match offset {
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => queue.desc_table(),
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => queue.avail_ring(),
            _ => queue.used_ring(),
        };
        let addr = GuestAddress(if offset & 4 == 0 {
            (current & !0xffff_ffff) | u64::from(value)
        } else {
            (current & 0xffff_ffff) | (u64::from(value) << 32)
        });
        let result = match offset {
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => queue.try_set_desc_table_address(addr),
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => queue.try_set_avail_ring_address(addr),
            _ => queue.try_set_used_ring_address(addr),
        };
        if let Err(e) = result {
            self.warn(
                Mistake::QueueAddress,
                format_args!("{e} (register {offset:#x}, address {:#x})", addr.0),
            );
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let sel = self.queue_sel;
        let mem = self.mem.clone();
        let Some(slot) = self.selected() else {
            self.warn(
                Mistake::QueueSel,
                format_args!("queue {sel} does not exist"),
            );
            return;
        };
        if value == 0 {
            slot.queue.set_ready(false);
            slot.usable = false;
            return;
        }
        if slot.queue.ready() {
            return;
        }
        slot.queue.set_ready(true);
        // Rings cannot move while the queue is ready, and guest memory does not change, so
        // checking once here is enough.
        slot.usable = slot.queue.is_valid(&*mem);
        if !slot.usable {
            self.warn(
                Mistake::QueueInvalid,
                format_args!("queue {sel} rings are outside guest memory"),
            );
        }
    }

    fn features_acceptable(&self) -> bool {
        let device = self.device.features();
        self.driver_features & !device == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            self.warn(
                Mistake::Status,
                format_args!("status {old:#x} -> {value:#x} clears bits"),
            );
            return;
        }
        let mut value = value;
        let new_bits = value & !old;
        if new_bits & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            let features = self.driver_features;
            self.warn(
                Mistake::Features,
                format_args!("driver features {features:#x} refused"),
            );
            value &= !STATUS_FEATURES_OK;
        }
        if new_bits & STATUS_DRIVER_OK != 0 {
            if value & STATUS_FEATURES_OK == 0 {
                self.warn(
                    Mistake::Status,
                    format_args!("DRIVER_OK without FEATURES_OK"),
                );
                value &= !STATUS_DRIVER_OK;
            } else {
                let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
                for slot in &mut self.queues {
                    slot.queue.set_event_idx(event_idx);
                }
                self.device.activate(self.driver_features);
            }
        }
        self.status = value;
    }

    fn notify(&mut self, value: u32) {
        if self.status & STATUS_DRIVER_OK == 0 {
            self.warn(Mistake::Notify, format_args!("notify before DRIVER_OK"));
            return;
        }
        let index = value as usize;
        match self.queues.get(index) {
            Some(slot) if slot.queue.ready() && slot.usable => {}
            Some(_) => {
                self.warn(
                    Mistake::Notify,
                    format_args!("notify for unusable queue {index}"),
                );
                return;
            }
            None => {
                self.warn(
                    Mistake::Notify,
                    format_args!("notify for missing queue {value}"),
                );
                return;
            }
        }
        let mem = &*self.mem;
        let queue = &mut self.queues[index].queue;
        if !self.device.process_queue(index, queue, mem) {
            return;
        }
        // An error reading `used_event` means broken rings: interrupt anyway, it is harmless.
        if queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt_status |= INT_VRING;
            self.irq.trigger();
        }
    }
}

impl<D: VirtioDevice> BusDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.warn(
                Mistake::AccessWidth,
                format_args!("{}-byte read at {offset:#x}", data.len()),
            );
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.warn(
                Mistake::AccessWidth,
                format_args!("{}-byte write at {offset:#x}", data.len()),
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            self.warn(
                Mistake::AccessWidth,
                format_args!("unaligned write at {offset:#x}"),
            );
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use super::*;
    use crate::devices::IrqLine;

    /// An interrupt line counting its triggers.
    #[derive(Default)]
    pub(crate) struct CountingIrq(pub(crate) AtomicUsize);

    impl IrqLine for CountingIrq {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl CountingIrq {
        pub(crate) fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    pub(crate) fn guest_memory() -> Arc<GuestMemory> {
        guest_memory_of(0x10_0000)
    }

    pub(crate) fn guest_memory_of(size: usize) -> Arc<GuestMemory> {
        Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap())
    }

    /// Guest write of `QueueNotify`.
    pub(crate) fn notify<D: VirtioDevice>(dev: &mut VirtioMmio<D>, index: u32) {
        write32(dev, REG_QUEUE_NOTIFY, index);
    }

    /// Guest write of `Status`.
    pub(crate) fn set_status<D: VirtioDevice>(dev: &mut VirtioMmio<D>, status: u32) {
        write32(dev, REG_STATUS, status);
    }

    pub(crate) fn read32<D: VirtioDevice>(dev: &mut VirtioMmio<D>, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        dev.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub(crate) fn write32<D: VirtioDevice>(dev: &mut VirtioMmio<D>, offset: u64, value: u32) {
        dev.write(offset, &value.to_le_bytes());
    }

    /// Negotiate `features`, set up queue `index` on the mock rings and set DRIVER_OK.
    pub(crate) fn bring_up<D: VirtioDevice>(
        dev: &mut VirtioMmio<D>,
        features: u64,
        index: u32,
        q: &MockSplitQueue<'_, GuestMemory>,
        size: u16,
    ) {
        let rings = [q.desc_table_addr(), q.avail_addr(), used_ring(q, size)];
        bring_up_at(dev, features, index, rings, size);
    }

    /// Where [`bring_up`] puts the used ring: the mock's own layout overlaps its avail ring
    /// (virtio-queue 0.18 computes ring ends in elements, not bytes), so use the next page.
    pub(crate) fn used_ring(q: &MockSplitQueue<'_, GuestMemory>, size: u16) -> GuestAddress {
        GuestAddress((q.avail_addr().0 + 6 + 2 * u64::from(size) + 0xfff) & !0xfff)
    }

    /// Entry `i` (id, len) of the used ring at `used`, and the used index.
    pub(crate) fn used_entry(mem: &GuestMemory, used: GuestAddress, i: u16) -> (u32, u32, u16) {
        let idx: u16 = mem.read_obj(GuestAddress(used.0 + 2)).unwrap();
        let elem = GuestAddress(used.0 + 4 + 8 * u64::from(i));
        let id: u32 = mem.read_obj(elem).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(elem.0 + 4)).unwrap();
        (id, len, idx)
    }

    /// [`bring_up`] with explicit ring addresses (descriptors, driver area, device area).
    pub(crate) fn bring_up_at<D: VirtioDevice>(
        dev: &mut VirtioMmio<D>,
        features: u64,
        index: u32,
        rings: [GuestAddress; 3],
        size: u16,
    ) {
        write32(dev, REG_STATUS, 1);
        write32(dev, REG_STATUS, 1 | 2);
        write32(dev, REG_DRIVER_FEATURES_SEL, 0);
        write32(dev, REG_DRIVER_FEATURES, features as u32);
        write32(dev, REG_DRIVER_FEATURES_SEL, 1);
        write32(dev, REG_DRIVER_FEATURES, (features >> 32) as u32);
        write32(dev, REG_STATUS, 1 | 2 | STATUS_FEATURES_OK);
        assert_eq!(read32(dev, REG_STATUS), 1 | 2 | STATUS_FEATURES_OK);
        write32(dev, REG_QUEUE_SEL, index);
        write32(dev, REG_QUEUE_NUM, u32::from(size));
        for (low, addr) in [
            REG_QUEUE_DESC_LOW,
            REG_QUEUE_DRIVER_LOW,
            REG_QUEUE_DEVICE_LOW,
        ]
        .into_iter()
        .zip(rings)
        {
            write32(dev, low, addr.0 as u32);
            write32(dev, low + 4, (addr.0 >> 32) as u32);
        }
        write32(dev, REG_QUEUE_READY, 1);
        assert_eq!(read32(dev, REG_QUEUE_READY), 1);
        write32(
            dev,
            REG_STATUS,
            1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(
            read32(dev, REG_STATUS),
            1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK
        );
    }

    /// A device that completes every chain with length 0.
    #[derive(Default)]
    struct Mock {
        processed: usize,
        activated: Option<u64>,
        resets: usize,
        config: [u8; 8],
    }

    const MOCK_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1;

    impl VirtioDevice for Mock {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            MOCK_FEATURES
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = *usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.config.get(o + i))
                    .unwrap_or(&0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(b) = self.config.get_mut(offset as usize) {
                *b = data[0];
            }
        }
        fn activate(&mut self, acked: u64) {
            self.activated = Some(acked);
        }
        fn process_queue(&mut self, _: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
            let mut used = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                self.processed += 1;
                used |= queue.add_used(mem, chain.head_index(), 0).is_ok();
            }
            used
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
    }

    fn new_mock() -> (VirtioMmio<Mock>, Arc<GuestMemory>, Arc<CountingIrq>) {
        let mem = guest_memory();
        let irq = Arc::new(CountingIrq::default());
        let dev = VirtioMmio::new(Mock::default(), mem.clone(), irq.clone());
        (dev, mem, irq)
    }

    fn add_request(q: &MockSplitQueue<'_, GuestMemory>, slot: u16) {
        let desc = Descriptor::new(0x8_0000, 16, 0, 0);
        q.add_desc_chains(&[RawDescriptor::from(desc)], slot)
            .unwrap();
    }

    #[test]
    fn identification_registers() {
        let (mut dev, _, _) = new_mock();
        assert_eq!(read32(&mut dev, REG_MAGIC), 0x7472_6976);
        assert_eq!(read32(&mut dev, REG_VERSION), 2);
        assert_eq!(read32(&mut dev, REG_DEVICE_ID), 42);
        assert_eq!(read32(&mut dev, REG_VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(read32(&mut dev, REG_CONFIG_GENERATION), 0);
        // Only aligned 4-byte register accesses are decoded.
        let mut short = [0xffu8; 2];
        dev.read(REG_MAGIC, &mut short);
        assert_eq!(short, [0, 0]);
        let mut wide = [0xffu8; 8];
        dev.read(REG_MAGIC, &mut wide);
        assert_eq!(wide, [0; 8]);
        let mut odd = [0xffu8; 4];
        dev.read(REG_MAGIC + 2, &mut odd);
        assert_eq!(odd, [0; 4]);
        dev.write(REG_STATUS, &[1, 0]);
        assert_eq!(read32(&mut dev, REG_STATUS), 0);
        // Config space: any width.
        dev.write(CONFIG_SPACE + 3, &[0x5a]);
        let mut b = [0u8; 1];
        dev.read(CONFIG_SPACE + 3, &mut b);
        assert_eq!(b, [0x5a]);
        let mut far = [0xffu8; 8];
        dev.read(CONFIG_SPACE + 0x1000, &mut far);
        assert_eq!(far, [0; 8]);
    }

    #[test]
    fn feature_negotiation() {
        let (mut dev, _, _) = new_mock();
        assert_eq!(read32(&mut dev, REG_DEVICE_FEATURES), MOCK_FEATURES as u32);
        write32(&mut dev, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut dev, REG_DEVICE_FEATURES), 1);
        write32(&mut dev, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read32(&mut dev, REG_DEVICE_FEATURES), 0);

        // Without VERSION_1 FEATURES_OK does not stick.
        write32(&mut dev, REG_STATUS, 3);
        write32(&mut dev, REG_DRIVER_FEATURES, 1);
        write32(&mut dev, REG_STATUS, 3 | STATUS_FEATURES_OK);
        assert_eq!(read32(&mut dev, REG_STATUS), 3);
        // A feature the device does not offer is refused too.
        write32(&mut dev, REG_DRIVER_FEATURES_SEL, 1);
        write32(&mut dev, REG_DRIVER_FEATURES, 1 | 2);
        write32(&mut dev, REG_STATUS, 3 | STATUS_FEATURES_OK);
        assert_eq!(read32(&mut dev, REG_STATUS), 3);
        // DRIVER_OK without FEATURES_OK is refused.
        write32(&mut dev, REG_STATUS, 3 | STATUS_DRIVER_OK);
        assert_eq!(read32(&mut dev, REG_STATUS), 3);
        assert_eq!(dev.device().activated, None);
        // A valid set is accepted, then frozen.
        write32(&mut dev, REG_DRIVER_FEATURES, 1);
        write32(&mut dev, REG_STATUS, 3 | STATUS_FEATURES_OK);
        assert_eq!(read32(&mut dev, REG_STATUS), 3 | STATUS_FEATURES_OK);
        write32(&mut dev, REG_DRIVER_FEATURES_SEL, 0);
        write32(&mut dev, REG_DRIVER_FEATURES, 0);
        // Clearing bits is ignored.
        write32(&mut dev, REG_STATUS, 1);
        assert_eq!(read32(&mut dev, REG_STATUS), 3 | STATUS_FEATURES_OK);
        write32(
            &mut dev,
            REG_STATUS,
            3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(dev.device().activated, Some((1 << 32) | 1));
    }

    #[test]
    fn queue_setup_notify_and_reset() {
        let (mut dev, mem, irq) = new_mock();
        let q = MockSplitQueue::create(&*mem, GuestAddress(0x1000), 16);
        // Queue size checks: power of two, at most the maximum, queue must exist.
        write32(&mut dev, REG_QUEUE_SEL, 1);
        assert_eq!(read32(&mut dev, REG_QUEUE_NUM_MAX), 8);
        write32(&mut dev, REG_QUEUE_SEL, 7);
        assert_eq!(read32(&mut dev, REG_QUEUE_NUM_MAX), 0);
        write32(&mut dev, REG_QUEUE_NUM, 4);
        write32(&mut dev, REG_QUEUE_READY, 1);
        assert_eq!(read32(&mut dev, REG_QUEUE_READY), 0);
        write32(&mut dev, REG_QUEUE_SEL, 0);
        assert_eq!(read32(&mut dev, REG_QUEUE_NUM_MAX), 16);
        for bad in [0, 3, 32, 0x1_0010] {
            write32(&mut dev, REG_QUEUE_NUM, bad);
            assert_eq!(dev.queues[0].queue.size(), 16);
        }
        // Misaligned ring addresses are refused.
        write32(&mut dev, REG_QUEUE_DESC_LOW, 0x1001);
        assert_eq!(dev.queues[0].queue.desc_table(), 0);

        // Notify before DRIVER_OK is ignored.
        add_request(&q, 0);
        write32(&mut dev, REG_QUEUE_NOTIFY, 0);
        assert_eq!(dev.device().processed, 0);

        bring_up(&mut dev, VIRTIO_F_VERSION_1, 0, &q, 16);
        assert_eq!(dev.device().activated, Some(VIRTIO_F_VERSION_1));
        // Reconfiguration of a live queue is ignored.
        write32(&mut dev, REG_QUEUE_NUM, 8);
        write32(&mut dev, REG_QUEUE_DESC_LOW, 0x2000);
        assert_eq!(dev.queues[0].queue.size(), 16);
        assert_eq!(dev.queues[0].queue.desc_table(), 0x1000);
        // Notify for a missing or unready queue is ignored.
        write32(&mut dev, REG_QUEUE_NOTIFY, 1);
        write32(&mut dev, REG_QUEUE_NOTIFY, 99);
        assert_eq!(dev.device().processed, 0);
        assert_eq!(irq.count(), 0);

        write32(&mut dev, REG_QUEUE_NOTIFY, 0);
        assert_eq!(dev.device().processed, 1);
        assert_eq!(used_entry(&mem, used_ring(&q, 16), 0), (0, 0, 1));
        assert_eq!(irq.count(), 1);
        assert_eq!(read32(&mut dev, REG_INTERRUPT_STATUS), INT_VRING);
        write32(&mut dev, REG_INTERRUPT_ACK, INT_VRING);
        assert_eq!(read32(&mut dev, REG_INTERRUPT_STATUS), 0);
        // Nothing new: no interrupt.
        write32(&mut dev, REG_QUEUE_NOTIFY, 0);
        assert_eq!(irq.count(), 1);

        // Reset clears everything.
        write32(&mut dev, REG_STATUS, 0);
        assert_eq!(read32(&mut dev, REG_STATUS), 0);
        assert_eq!(read32(&mut dev, REG_QUEUE_READY), 0);
        assert_eq!(dev.device().resets, 1);
        assert_eq!(dev.device().activated, None);
        assert_eq!(dev.driver_features, 0);
        assert_eq!(dev.queues[0].queue.desc_table(), 0);
        add_request(&q, 1);
        write32(&mut dev, REG_QUEUE_NOTIFY, 0);
        assert_eq!(dev.device().processed, 1);
    }

    #[test]
    fn rings_outside_memory_are_never_used() {
        let (mut dev, mem, irq) = new_mock();
        // The used ring runs past the end of memory.
        let q = MockSplitQueue::create(&*mem, GuestAddress(0x1000), 16);
        add_request(&q, 0);
        let rings = [q.desc_table_addr(), q.avail_addr(), GuestAddress(0xf_fff0)];
        bring_up_at(&mut dev, VIRTIO_F_VERSION_1, 0, rings, 16);
        assert!(!dev.queues[0].usable);
        write32(&mut dev, REG_QUEUE_NOTIFY, 0);
        assert_eq!(dev.device().processed, 0);
        assert_eq!(irq.count(), 0);
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let (mut dev, mem, irq) = new_mock();
        let q = MockSplitQueue::create(&*mem, GuestAddress(0x1000), 16);
        bring_up(&mut dev, MOCK_FEATURES, 0, &q, 16);
        assert!(dev.queues[0].queue.event_idx_enabled());
        // used_event (after the 16 avail entries): interrupt only once used idx passes 2.
        let used_event = q.avail_addr().0 + 4 + 2 * 16;
        mem.write_obj(2u16, GuestAddress(used_event)).unwrap();
        add_request(&q, 0);
        write32(&mut dev, REG_QUEUE_NOTIFY, 0);
        assert_eq!(dev.device().processed, 1);
        assert_eq!(irq.count(), 0);
        add_request(&q, 1);
        add_request(&q, 2);
        write32(&mut dev, REG_QUEUE_NOTIFY, 0);
        assert_eq!(dev.device().processed, 3);
        assert_eq!(irq.count(), 1);
    }
}
