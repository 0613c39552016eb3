//! ACPI fixed hardware: the PM1a event block (status/enable) and control block, with the
//! fixed-feature power button and S5 power-off, plus the reset register.

use std::sync::{Arc, Mutex};

use super::platform::{PlatformDevice, WireError, Wiring};
use super::{BusDevice, LevelIrq, PlatformRequest, PlatformSink};
use crate::acpi::{PM1A_EVT_PORT, RESET_PORT, RESET_VALUE, S5_SLP_TYP, SCI_IRQ};

/// PM1 status: power button pressed.
pub const PWRBTN_STS: u16 = 1 << 8;
/// PM1 status: wake.
pub const WAK_STS: u16 = 1 << 15;
/// PM1 control: SCI enabled (always set: there is no legacy mode).
pub const SCI_EN: u16 = 1;
/// PM1 control: sleep enable.
pub const SLP_EN: u16 = 1 << 13;
/// Bytes the PM1a event (4) and control (2) blocks span.
pub const PM_BLOCK_LEN: u64 = 6;

/// The PM1a blocks as one device at [`crate::acpi::PM1A_EVT_PORT`].
pub struct PmDevice {
    status: u16,
    enable: u16,
    control: u16,
    sci: Arc<dyn LevelIrq>,
    sink: PlatformSink,
}

impl std::fmt::Debug for PmDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmDevice")
            .field("status", &self.status)
            .field("enable", &self.enable)
            .field("control", &self.control)
            .finish()
    }
}

impl PmDevice {
    /// PM registers raising `sci` and reporting power-off to `sink`.
    pub fn new(sci: Arc<dyn LevelIrq>, sink: PlatformSink) -> Self {
        Self {
            status: 0,
            enable: 0,
            control: SCI_EN,
            sci,
            sink,
        }
    }

    /// Press the power button (ACPI shutdown request).
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN_STS;
        self.update_sci();
    }

    fn update_sci(&self) {
        self.sci
            .set_level(self.status & self.enable & PWRBTN_STS != 0);
    }

    fn bytes(&self) -> [u8; 6] {
        let [s0, s1] = self.status.to_le_bytes();
        let [e0, e1] = self.enable.to_le_bytes();
        let [c0, c1] = self.control.to_le_bytes();
        [s0, s1, e0, e1, c0, c1]
    }
}

impl BusDevice for PmDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = regs.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut clear = [0u8; 2];
        let mut regs = self.bytes();
        for (i, d) in data.iter().enumerate() {
            match offset as usize + i {
                o @ 0..=1 => clear[o] = *d, // status: write one to clear
                o @ 2..=5 => regs[o] = *d,
                _ => {}
            }
        }
        self.status &= !u16::from_le_bytes(clear);
        self.enable = u16::from_le_bytes([regs[2], regs[3]]);
        let control = u16::from_le_bytes([regs[4], regs[5]]);
        self.control = (control & !SLP_EN) | SCI_EN;
        if offset + data.len() as u64 > 4 && control & SLP_EN != 0 {
            let slp_typ = ((control >> 10) & 7) as u8;
            if slp_typ == S5_SLP_TYP {
                (self.sink)(PlatformRequest::PowerOff);
            } else {
                tracing::debug!(slp_typ, "guest requested an unsupported sleep state");
            }
        }
        self.update_sci();
    }
}

/// ACPI fixed hardware on the platform: the PM1a blocks on the SCI and the reset register
/// (described by the FADT, not the DSDT). Each boot gets fresh registers; the power button
/// presses the current boot's.
#[derive(Debug)]
pub struct AcpiPm {
    current: Mutex<Option<Arc<Mutex<PmDevice>>>>,
    /// Whether port 0xcf9 is the reset register's alone (without PCI, whose configuration
    /// ports span it and pass it on).
    reset_port: bool,
}

impl Default for AcpiPm {
    fn default() -> Self {
        Self::new(true)
    }
}

impl AcpiPm {
    /// The PM blocks; `reset_port`: also put the reset register on port 0xcf9 (false when
    /// the PCI configuration ports, 0xcf8..0xcff, own it).
    pub fn new(reset_port: bool) -> Self {
        AcpiPm {
            current: Mutex::default(),
            reset_port,
        }
    }

    /// Press the current boot's power button.
    pub fn press_power_button(&self) {
        let pm = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(pm) = pm {
            pm.lock()
                .unwrap_or_else(|e| e.into_inner())
                .press_power_button();
        }
    }
}

impl PlatformDevice for AcpiPm {
    fn name(&self) -> String {
        "ACPI PM".into()
    }

    fn wire(&self, w: &mut dyn Wiring) -> Result<(), WireError> {
        let pm = Arc::new(Mutex::new(PmDevice::new(
            w.level_irq(u32::from(SCI_IRQ)),
            w.platform(),
        )));
        w.pio(pm.clone(), PM1A_EVT_PORT, PM_BLOCK_LEN)?;
        if self.reset_port {
            w.pio(
                Arc::new(Mutex::new(ResetRegister::new(w.platform()))),
                RESET_PORT,
                1,
            )?;
        }
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(pm);
        Ok(())
    }
}

/// The FADT reset register (port 0xcf9).
pub struct ResetRegister {
    sink: PlatformSink,
}

impl std::fmt::Debug for ResetRegister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResetRegister").finish_non_exhaustive()
    }
}

impl ResetRegister {
    /// A reset register reporting to `sink`.
    pub fn new(sink: PlatformSink) -> Self {
        Self { sink }
    }
}

impl BusDevice for ResetRegister {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Bit 2 set is a reset in the conventional 0xcf9 encoding; our FADT value is 0x06.
        if data.len() == 1 && data[0] & 0x04 != 0 && data[0] & RESET_VALUE != 0 {
            (self.sink)(PlatformRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct Line(AtomicBool);
    impl LevelIrq for Line {
        fn set_level(&self, high: bool) {
            self.0.store(high, Ordering::SeqCst);
        }
    }

    fn dev() -> (PmDevice, Arc<Line>, Arc<Mutex<Vec<PlatformRequest>>>) {
        let line = Arc::new(Line::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let pm = PmDevice::new(line.clone(), Arc::new(move |r| s.lock().unwrap().push(r)));
        (pm, line, seen)
    }

    fn r16(pm: &mut PmDevice, off: u64) -> u16 {
        let mut b = [0u8; 2];
        pm.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn s5_write_powers_off_and_sci_en_reads_set() {
        let (mut pm, _, seen) = dev();
        assert_eq!(r16(&mut pm, 4) & SCI_EN, SCI_EN);
        // SLP_TYP = S5 without SLP_EN: nothing.
        pm.write(4, &(u16::from(S5_SLP_TYP) << 10).to_le_bytes());
        assert!(seen.lock().unwrap().is_empty());
        // Another sleep type with SLP_EN: ignored.
        pm.write(4, &((1u16 << 10) | SLP_EN).to_le_bytes());
        assert!(seen.lock().unwrap().is_empty());
        pm.write(4, &((u16::from(S5_SLP_TYP) << 10) | SLP_EN).to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), vec![PlatformRequest::PowerOff]);
        // SLP_EN is write-only.
        assert_eq!(r16(&mut pm, 4) & SLP_EN, 0);
    }

    #[test]
    fn power_button_raises_sci_only_when_enabled_and_clears_on_ack() {
        let (mut pm, line, _) = dev();
        pm.press_power_button();
        assert!(!line.0.load(Ordering::SeqCst), "not enabled yet");
        assert_eq!(r16(&mut pm, 0) & PWRBTN_STS, PWRBTN_STS);
        pm.write(2, &PWRBTN_STS.to_le_bytes());
        assert!(line.0.load(Ordering::SeqCst));
        // Writing zero to status changes nothing; writing one clears.
        pm.write(0, &0u16.to_le_bytes());
        assert!(line.0.load(Ordering::SeqCst));
        pm.write(0, &PWRBTN_STS.to_le_bytes());
        assert!(!line.0.load(Ordering::SeqCst));
        assert_eq!(r16(&mut pm, 0), 0);
    }

    #[test]
    fn dword_access_to_the_event_block_works() {
        let (mut pm, line, _) = dev();
        pm.press_power_button();
        // Enable in the high half and clear status in the low half in one 32-bit write.
        pm.write(0, &(u32::from(PWRBTN_STS) << 16).to_le_bytes());
        assert!(line.0.load(Ordering::SeqCst));
        let mut b = [0u8; 4];
        pm.read(0, &mut b);
        assert_eq!(
            u32::from_le_bytes(b),
            u32::from(PWRBTN_STS) | (u32::from(PWRBTN_STS) << 16)
        );
        let mut past = [0u8; 4];
        pm.read(4, &mut past);
        assert_eq!(past[2..], [0xff, 0xff]);
    }

    #[test]
    fn reset_register() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut r = ResetRegister::new(Arc::new(move |x| s.lock().unwrap().push(x)));
        r.write(0, &[0x02]);
        assert!(seen.lock().unwrap().is_empty());
        r.write(0, &[RESET_VALUE]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformRequest::Reset]);
    }
}
