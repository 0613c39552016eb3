//! The i8042 keyboard controller, reduced to what a guest without a PS/2 keyboard needs: the
//! "pulse reset line" command (0xfe to port 0x64), which reboots the partition.

use vm_superio::{I8042Device, Trigger};

use std::sync::{Arc, Mutex};

use super::platform::{PlatformDevice, WireError, Wiring};
use super::{BusDevice, PlatformRequest, PlatformSink};

/// Base port (data at 0x60, command/status at 0x64).
pub const I8042_PORT: u16 = 0x60;
/// Ports decoded from the base.
pub const I8042_LEN: u64 = 5;

/// Sends a reset request when triggered.
pub struct ResetTrigger(PlatformSink);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)(PlatformRequest::Reset);
        Ok(())
    }
}

/// The controller as a bus device.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller that reports resets to `sink`.
    pub fn new(sink: PlatformSink) -> Self {
        Self {
            dev: I8042Device::new(ResetTrigger(sink)),
        }
    }
}

/// The controller on the platform (no ACPI entry: Linux probes port 0x64).
#[derive(Debug, Default)]
pub struct I8042Controller;

impl PlatformDevice for I8042Controller {
    fn name(&self) -> String {
        "i8042".into()
    }

    fn wire(&self, w: &mut dyn Wiring) -> Result<(), WireError> {
        w.pio(
            Arc::new(Mutex::new(I8042::new(w.platform()))),
            I8042_PORT,
            I8042_LEN,
        )
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.dev.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let _ = self.dev.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_command_requests_a_reset_and_nothing_else_does() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = I8042::new(Arc::new(move |r| s.lock().unwrap().push(r)));
        dev.write(0, &[0xfe]); // data port: not a command
        dev.write(4, &[0xaa]);
        dev.write(4, &[0xfe, 0xfe]); // wrong width
        assert!(seen.lock().unwrap().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformRequest::Reset]);
        let mut b = [0xffu8; 1];
        dev.read(4, &mut b);
        assert_eq!(b[0], 0);
    }
}
