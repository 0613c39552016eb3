//! A range map from guest addresses (ports or MMIO) to devices, fixed when the partition is
//! built. Lookups are lock-free on the map; each device sits behind its own mutex so two vCPUs
//! touching different devices never contend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::BusDevice;

/// Why a device could not be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range at {base:#x} length {len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps a device already on the bus.
    #[error("bus range at {base:#x} length {len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A port-I/O or MMIO bus.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.ranges.iter().map(|(b, e)| (*b, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `device` for `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((b, e)) = self.ranges.range(..end).next_back()
            && b + e.len > base
        {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        if offset.checked_add(size as u64)? <= entry.len {
            Some((offset, &entry.device))
        } else {
            None
        }
    }

    /// Dispatch a guest read. Returns false (and fills `data` with ones) when no device
    /// decodes the address, as an unclaimed bus would.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a guest write. Returns false when no device decodes the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, recovering from a poisoned mutex: a device that panicked mid-access has
/// already been reported by the panic hook, and the guest keeps going.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last_write: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let a = Arc::new(Mutex::new(Reg::default()));
        let b = Arc::new(Mutex::new(Reg::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x600, 4).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fa, &mut d));
        assert_eq!(d, [2]);
        assert!(bus.write(0x603, &[7]));
        assert_eq!(b.lock().unwrap().last_write, vec![(3, vec![7])]);
        assert!(a.lock().unwrap().last_write.is_empty());
    }

    #[test]
    fn unclaimed_and_straddling_accesses() {
        let a = Arc::new(Mutex::new(Reg::default()));
        let mut bus = Bus::new();
        bus.insert(a, 0x1000, 0x10).unwrap();
        let mut d = [0u8; 4];
        assert!(!bus.read(0x0fff, &mut d));
        assert_eq!(d, [0xff; 4]);
        // Starts inside, ends outside: not decoded.
        assert!(!bus.read(0x100e, &mut d));
        assert!(!bus.write(0x2000, &[1]));
        assert!(!bus.read(u64::MAX, &mut d));
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Reg::default())) as SharedDevice;
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x108, 0x10),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10
            })
        );
        assert!(bus.insert(dev(), 0xf8, 0x10).is_err());
        assert!(bus.insert(dev(), 0x110, 0x10).is_ok());
        assert!(bus.insert(dev(), 0x200, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
    }
}
