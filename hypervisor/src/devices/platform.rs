//! How a platform device becomes part of a partition: it describes itself to the guest (its
//! `\_SB` entry in the DSDT) and, at every boot, puts itself on the new VM's buses and
//! interrupt lines through a [`Wiring`]. The partition keeps one list of these; adding a
//! device is its own file plus one line in that list (see `partition::devices`).
//!
//! Nothing here knows KVM: the partition implements [`Wiring`] for a real VM, and tests can
//! implement it to check what a device asks for.

use std::sync::{Arc, RwLock};

use super::{BusDevice, BusError, GuestMemory, Irq, IrqLine, LevelIrq, PlatformSink};

/// Why a device could not be wired.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Its range is taken or invalid.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The interrupt line could not be made.
    #[error("interrupt line {gsi}: {source}")]
    Irq {
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A shared bus device.
pub type SharedBusDevice = Arc<std::sync::Mutex<dyn BusDevice>>;

/// One boot's buses and interrupt lines, as a device asks for them.
pub trait Wiring {
    /// Put `dev` at ports `[base, base + len)`.
    fn pio(&mut self, dev: SharedBusDevice, base: u16, len: u64) -> Result<(), WireError>;
    /// Put `dev` at guest addresses `[base, base + len)`.
    fn mmio(&mut self, dev: SharedBusDevice, base: u64, len: u64) -> Result<(), WireError>;
    /// A new edge-triggered (active-high) interrupt line into `gsi`.
    fn edge_irq(&mut self, gsi: u32) -> Result<Irq, WireError>;
    /// The level-triggered line `gsi`.
    fn level_irq(&mut self, gsi: u32) -> Arc<dyn LevelIrq>;
    /// Guest RAM, for devices that do DMA.
    fn memory(&self) -> Arc<GuestMemory>;
    /// Where devices send power-off, reset and panic.
    fn platform(&self) -> PlatformSink;
}

/// A device of the platform.
pub trait PlatformDevice: Send + Sync {
    /// For logs and errors.
    fn name(&self) -> String;
    /// The device's entry in the DSDT's `\_SB` scope (encoded AML), if the guest finds it
    /// through ACPI.
    fn aml(&self) -> Option<Vec<u8>> {
        None
    }
    /// Attach the device to a new boot's buses and lines.
    fn wire(&self, w: &mut dyn Wiring) -> Result<(), WireError>;
}

/// An interrupt line a long-lived device keeps across boots: each boot connects it to that
/// boot's line. Until then (and between boots) triggers go nowhere.
#[derive(Default)]
pub struct IrqSlot(RwLock<Option<Irq>>);

impl std::fmt::Debug for IrqSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IrqSlot")
    }
}

impl IrqSlot {
    /// Connect the slot to `irq`.
    pub fn connect(&self, irq: Irq) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(irq);
    }
}

impl IrqLine for IrqSlot {
    fn trigger(&self) {
        if let Some(i) = &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            i.trigger();
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A wiring that records what devices ask for.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::devices::Bus;

    #[derive(Default)]
    pub struct Count(pub AtomicUsize);
    impl IrqLine for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    impl LevelIrq for Count {
        fn set_level(&self, high: bool) {
            if high {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    pub struct Recorder {
        pub pio: Bus,
        pub mmio: Bus,
        pub edge: Vec<(u32, Arc<Count>)>,
        pub level: Vec<u32>,
        pub mem: Arc<GuestMemory>,
        pub requests: Arc<Mutex<Vec<crate::devices::PlatformRequest>>>,
    }

    impl Recorder {
        pub fn new() -> Self {
            Recorder {
                pio: Bus::new(),
                mmio: Bus::new(),
                edge: Vec::new(),
                level: Vec::new(),
                mem: Arc::new(
                    GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap(),
                ),
                requests: Arc::default(),
            }
        }
    }

    impl Wiring for Recorder {
        fn pio(&mut self, dev: SharedBusDevice, base: u16, len: u64) -> Result<(), WireError> {
            Ok(self.pio.insert(dev, u64::from(base), len)?)
        }
        fn mmio(&mut self, dev: SharedBusDevice, base: u64, len: u64) -> Result<(), WireError> {
            Ok(self.mmio.insert(dev, base, len)?)
        }
        fn edge_irq(&mut self, gsi: u32) -> Result<Irq, WireError> {
            let c = Arc::new(Count::default());
            self.edge.push((gsi, c.clone()));
            Ok(c)
        }
        fn level_irq(&mut self, gsi: u32) -> Arc<dyn LevelIrq> {
            self.level.push(gsi);
            Arc::new(Count::default())
        }
        fn memory(&self) -> Arc<GuestMemory> {
            self.mem.clone()
        }
        fn platform(&self) -> PlatformSink {
            let r = self.requests.clone();
            Arc::new(move |req| r.lock().unwrap().push(req))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::testing::Recorder;
    use super::*;
    use crate::devices::i8042::I8042Controller;
    use crate::devices::pm::AcpiPm;
    use crate::devices::pvpanic::PvPanicPort;
    use crate::devices::serial::Com1;
    use crate::devices::virtio_blk::VirtioBlkSlot;

    /// Each device asks for its own ranges and lines; the one place that lists them only
    /// wires them in order.
    #[test]
    fn each_device_wires_its_own_ranges_and_lines() {
        let dir = tempfile::tempdir().unwrap();
        let disk: Arc<dyn parvis_disk::BlockDevice> =
            Arc::new(parvis_disk::RawFile::create(dir.path().join("d"), 1 << 20).unwrap());
        let com1 = Arc::new(Com1::new(Default::default()));
        let pm = Arc::new(AcpiPm::default());
        let devices: Vec<Arc<dyn PlatformDevice>> = vec![
            com1.clone(),
            Arc::new(I8042Controller),
            pm.clone(),
            Arc::new(PvPanicPort),
            Arc::new(VirtioBlkSlot::new(0, disk.clone(), Default::default())),
            Arc::new(VirtioBlkSlot::new(1, disk.clone(), Default::default())),
        ];
        let mut w = Recorder::new();
        for d in &devices {
            d.wire(&mut w).unwrap();
        }
        // Ports: COM1, the i8042, the PM1a blocks, the reset register, pvpanic.
        let mut b = [0u8; 1];
        for port in [0x3f8, 0x3ff, 0x60, 0x64, 0x600, 0x605, 0xcf9, 0x505] {
            assert!(w.pio.read(port, &mut b), "nothing at port {port:#x}");
        }
        assert!(!w.pio.read(0x3f7, &mut b));
        // The disks' windows, and their edge lines after COM1's.
        for base in [0xd000_0000u64, 0xd000_1000] {
            assert!(w.mmio.read(base, &mut [0u8; 4]), "no disk at {base:#x}");
        }
        let gsis: Vec<u32> = w.edge.iter().map(|(g, _)| *g).collect();
        assert_eq!(gsis, vec![4, 5, 6]);
        assert_eq!(w.level, vec![9], "the SCI");
        // COM1's line reaches this boot's: the transmitter-empty interrupt fires.
        w.pio.write(0x3f9, &[0x02]);
        assert!(w.edge[0].1.0.load(Ordering::SeqCst) > 0);
        // The power button presses the current boot's PM block.
        w.pio.write(0x602, &[0x00, 0x01]);
        pm.press_power_button();
        let mut sts = [0u8; 2];
        w.pio.read(0x600, &mut sts);
        assert_ne!(u16::from_le_bytes(sts) & 0x100, 0, "PWRBTN_STS");
        // The DSDT entries come from the devices that have one.
        let names: Vec<String> = devices
            .iter()
            .filter(|d| d.aml().is_some())
            .map(|d| d.name())
            .collect();
        assert_eq!(names, ["COM1", "pvpanic", "virtio-blk 0", "virtio-blk 1"]);
        // A second device claiming a range already wired is refused, not overlaid.
        assert!(
            VirtioBlkSlot::new(1, disk, Default::default())
                .wire(&mut w)
                .is_err()
        );
    }
}
