//! Emulated devices and the buses that route guest port and MMIO accesses to them.
//!
//! Every access comes from the guest and is hostile input: offsets and sizes are checked by
//! the bus before a device sees them, and a device answers anything it does not decode with
//! all-ones reads and ignored writes, never a panic.

pub mod bus;
pub mod i8042;
pub mod pci;
pub mod platform;
pub mod pm;
pub mod pvpanic;
pub mod serial;
pub mod virtio_blk;
pub mod virtio_mmio;

use std::sync::Arc;

pub use bus::{Bus, BusError};

/// A device on the port-I/O or MMIO bus. `offset` is relative to the start of the range the
/// device was registered at; `data.len()` is 1, 2, 4 or 8.
pub trait BusDevice: Send {
    /// Guest read: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// An edge-triggered interrupt line into the guest (an irqfd in the real partition).
pub trait IrqLine: Send + Sync {
    /// Raise one interrupt.
    fn trigger(&self);
}

/// Shared handle to an interrupt line.
pub type Irq = Arc<dyn IrqLine>;

/// The guest memory every DMA-capable device reads and writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap;

/// Something the guest asked the platform to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformRequest {
    /// ACPI S5.
    PowerOff,
    /// Reset through the i8042 or the ACPI reset register.
    Reset,
    /// The guest reported a kernel panic through pvpanic.
    Panic,
}

/// Where devices send [`PlatformRequest`]s.
pub type PlatformSink = Arc<dyn Fn(PlatformRequest) + Send + Sync>;

/// A level-triggered interrupt line (KVM_IRQ_LINE in the real partition).
pub trait LevelIrq: Send + Sync {
    /// Drive the line high (asserted) or low.
    fn set_level(&self, high: bool);
}
