//! pvpanic (QEMU's ISA panic device, ACPI `QEMU0001`): the guest kernel writes here when it
//! panics, so the worker can report a crash instead of a silent reboot loop.

use std::sync::{Arc, Mutex};

use super::platform::{PlatformDevice, WireError, Wiring};
use super::{BusDevice, PlatformRequest, PlatformSink};

pub use crate::acpi::PVPANIC_PORT;
/// Event bit: the guest panicked.
pub const PANICKED: u8 = 1;
/// Event bit: a crash kernel was loaded (kdump).
pub const CRASH_LOADED: u8 = 2;

/// The device.
pub struct PvPanic {
    sink: PlatformSink,
}

impl std::fmt::Debug for PvPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvPanic").finish_non_exhaustive()
    }
}

impl PvPanic {
    /// A device reporting panics to `sink`.
    pub fn new(sink: PlatformSink) -> Self {
        Self { sink }
    }
}

/// pvpanic on the platform: `\_SB.PEVT` at port 0x505.
#[derive(Debug, Default)]
pub struct PvPanicPort;

impl PlatformDevice for PvPanicPort {
    fn name(&self) -> String {
        "pvpanic".into()
    }

    fn aml(&self) -> Option<Vec<u8>> {
        use acpi_tables::aml;
        Some(crate::acpi::aml_device(
            "PEVT",
            &"QEMU0001",
            0,
            vec![&aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1)],
        ))
    }

    fn wire(&self, w: &mut dyn Wiring) -> Result<(), WireError> {
        w.pio(
            Arc::new(Mutex::new(PvPanic::new(w.platform()))),
            PVPANIC_PORT,
            1,
        )
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = PANICKED | CRASH_LOADED;
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.len() == 1 && data[0] & PANICKED != 0 {
            (self.sink)(PlatformRequest::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn advertises_events_and_reports_panics() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut d = PvPanic::new(Arc::new(move |r| s.lock().unwrap().push(r)));
        let mut b = [0u8];
        d.read(0, &mut b);
        assert_eq!(b[0], 3);
        d.write(0, &[CRASH_LOADED]);
        assert!(seen.lock().unwrap().is_empty());
        d.write(0, &[PANICKED]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformRequest::Panic]);
    }
}
