//! COM1: a 16550 UART (vm-superio) whose output goes to the worker's console and log, and
//! whose input comes from the console (stdin or a socket).

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use super::platform::{IrqSlot, PlatformDevice, WireError, Wiring};
use super::{BusDevice, Irq};
use crate::acpi::{self, COM1_IRQ};

/// Standard COM1 port base.
pub const COM1_PORT: u16 = 0x3f8;

/// Adapts an [`Irq`] to vm-superio's trigger.
pub struct IrqTrigger(pub Irq);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger();
        Ok(())
    }
}

/// Where serial output goes: any number of writers (console, log file, test capture). A
/// writer that fails is dropped, so a closed console never stalls the guest.
#[derive(Default)]
pub struct SerialOutput {
    sinks: Vec<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialOutput")
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl SerialOutput {
    /// Add a writer.
    pub fn add(&mut self, w: Box<dyn Write + Send>) {
        self.sinks.push(w);
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sinks.retain_mut(|s| s.write_all(buf).is_ok());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sinks.retain_mut(|s| s.flush().is_ok());
        Ok(())
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOutput>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: Irq, out: SerialOutput) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queue input bytes for the guest; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // The only error is the trigger's, which is infallible; output errors are
            // handled by SerialOutput.
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}

/// COM1 on the platform: the UART lives as long as the partition (the console keeps writing
/// to it across reboots); each boot connects its interrupt to IRQ 4.
#[derive(Debug)]
pub struct Com1 {
    device: Arc<Mutex<SerialDevice>>,
    irq: Arc<IrqSlot>,
}

impl Com1 {
    /// COM1 writing to `out`.
    pub fn new(out: SerialOutput) -> Self {
        let irq = Arc::new(IrqSlot::default());
        Com1 {
            device: Arc::new(Mutex::new(SerialDevice::new(irq.clone(), out))),
            irq,
        }
    }

    /// The UART, to feed console input into.
    pub fn device(&self) -> Arc<Mutex<SerialDevice>> {
        self.device.clone()
    }
}

impl PlatformDevice for Com1 {
    fn name(&self) -> String {
        "COM1".into()
    }

    fn aml(&self) -> Option<Vec<u8>> {
        use acpi_tables::aml;
        Some(acpi::aml_device(
            "COM1",
            &aml::EISAName::new("PNP0501"),
            1,
            vec![
                &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                &aml::Interrupt::new(true, true, false, false, u32::from(COM1_IRQ)),
            ],
        ))
    }

    fn wire(&self, w: &mut dyn Wiring) -> Result<(), WireError> {
        self.irq.connect(w.edge_irq(u32::from(COM1_IRQ))?);
        w.pio(self.device.clone(), COM1_PORT, 8)
    }
}

/// Feed `input` into the guest's receive FIFO, waiting while it is full. Runs on the
/// console-input thread; returns when the reader ends.
pub fn pump_input(serial: &Arc<Mutex<SerialDevice>>, mut input: impl std::io::Read) {
    let mut buf = [0u8; 64];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = super::bus::lock(serial).enqueue_input(pending);
            pending = &pending[taken..];
            if !pending.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl super::super::IrqLine for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_goes_to_every_sink_even_when_one_breaks() {
        let cap = Capture::default();
        let mut out = SerialOutput::default();
        out.add(Box::new(Broken));
        out.add(Box::new(cap.clone()));
        let irq = Arc::new(Count::default());
        let mut dev = SerialDevice::new(irq, out);
        for b in b"hello\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*cap.0.lock().unwrap(), b"hello\n");
    }

    #[test]
    fn receive_sets_data_ready_and_interrupts_when_enabled() {
        let irq = Arc::new(Count::default());
        let mut dev = SerialDevice::new(irq.clone(), SerialOutput::default());
        dev.write(1, &[0x01]); // IER: received-data interrupt
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'a');
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'b');
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0);
    }

    #[test]
    fn full_fifo_accepts_nothing_and_odd_accesses_are_ignored() {
        let mut dev = SerialDevice::new(Arc::new(Count::default()), SerialOutput::default());
        let big = [b'x'; 200];
        let first = dev.enqueue_input(&big);
        assert!(first > 0 && first < 200);
        assert_eq!(dev.enqueue_input(&big), 0);
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(9, &[1]);
    }

    #[test]
    fn pump_input_delivers_everything_through_a_small_fifo() {
        let dev = Arc::new(Mutex::new(SerialDevice::new(
            Arc::new(Count::default()),
            SerialOutput::default(),
        )));
        let data: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let reader = {
            let dev = dev.clone();
            let data = data.clone();
            std::thread::spawn(move || pump_input(&dev, std::io::Cursor::new(data)))
        };
        let mut got = Vec::new();
        while got.len() < data.len() {
            let mut lsr = [0u8];
            dev.lock().unwrap().read(5, &mut lsr);
            if lsr[0] & 1 == 1 {
                let mut b = [0u8];
                dev.lock().unwrap().read(0, &mut b);
                got.push(b[0]);
            } else {
                std::thread::yield_now();
            }
        }
        reader.join().unwrap();
        assert_eq!(got, data);
    }
}
