//! A minimal PCI bus 0 with the two functions a Hyper-V Generation 1 guest looks for: a host
//! bridge at 00:00.0 and Hyper-V's legacy video device (1414:5353) at 00:08.0, whose BAR 0
//! tells `hyperv_fb` (and `vmbus_reserve_fb`) where the synthetic video device's VRAM may go
//! when the guest was not booted through EFI. Debian's cloud kernels have no DRM, so without
//! this their only Hyper-V screen driver fails with "Unable to find PCI Hyper-V video".
//!
//! Configuration mechanism #1: the address latch at port 0xcf8 (dword), the data window at
//! 0xcfc..0xcff. Port 0xcf9 (a byte) is the platform's reset control register, which this
//! device owns when it is present and hands to [`ResetRegister`]. There are no interrupts,
//! no I/O BARs, no bridges, no extended configuration space; the BAR can be moved by the
//! guest but the VRAM is only ever placed through the synthetic video protocol.

use super::BusDevice;
use super::pm::ResetRegister;

/// The address latch; the data window is at +4.
pub const CONFIG_PORT: u16 = 0xcf8;
/// Ports the device decodes: 0xcf8..0xcff.
pub const CONFIG_LEN: u64 = 8;
/// Hyper-V's legacy video device: where Hyper-V puts it, and its ids.
pub const VIDEO_SLOT: u8 = 8;
pub const VIDEO_VENDOR: u16 = 0x1414;
pub const VIDEO_DEVICE: u16 = 0x5353;
/// The host bridge: an Intel 440BX, as Hyper-V Generation 1 shows it (Linux's type-1 probe
/// looks for a host bridge or a VGA device on bus 0).
const BRIDGE_VENDOR: u16 = 0x8086;
const BRIDGE_DEVICE: u16 = 0x7192;

/// One function's 256-byte configuration space and which bits the guest may change.
#[derive(Debug, Clone)]
struct Function {
    slot: u8,
    space: [u8; 256],
    writable: [u8; 256],
}

impl Function {
    fn new(slot: u8, vendor: u16, device: u16, class: [u8; 3]) -> Self {
        let mut f = Function {
            slot,
            space: [0; 256],
            writable: [0; 256],
        };
        f.put16(0x00, vendor);
        f.put16(0x02, device);
        // Revision 0, then programming interface, subclass, class.
        f.space[0x09] = class[2];
        f.space[0x0a] = class[1];
        f.space[0x0b] = class[0];
        f.put16(0x2c, vendor);
        f.put16(0x2e, device);
        // Command: I/O, memory, bus master; cache line size, latency timer, interrupt line.
        f.writable[0x04] = 0x07;
        f.writable[0x0c] = 0xff;
        f.writable[0x0d] = 0xff;
        f.writable[0x3c] = 0xff;
        f
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.space[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, at: usize, v: u32) {
        self.space[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A 32-bit prefetchable memory BAR 0 of `size` (a power of two) at `base`, decoding
    /// already, as firmware leaves the boot display (Linux's sysfb checks this).
    fn bar0(mut self, base: u32, size: u32) -> Self {
        self.put32(0x10, base | 0x8);
        self.space[0x04] |= 0x02;
        // Only the address bits above the size may change; the flag bits never do.
        let mask = !(size - 1) & !0xf;
        self.writable[0x10..0x14].copy_from_slice(&mask.to_le_bytes());
        self
    }

    fn read(&self, reg: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.space.get(reg + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, reg: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = reg + i;
            if let (Some(s), Some(w)) = (self.space.get_mut(at), self.writable.get(at)) {
                *s = (*s & !w) | (b & w);
            }
        }
    }
}

/// The configuration ports of bus 0.
pub struct PciConfig {
    latch: u32,
    functions: Vec<Function>,
    reset: ResetRegister,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("latch", &format_args!("{:#x}", self.latch))
            .finish_non_exhaustive()
    }
}

impl PciConfig {
    /// Bus 0 with the host bridge and the video device, its BAR 0 at `vram_base`, `vram_size`
    /// long (a power of two of at least 16 bytes, below 4 GiB); `reset` answers port 0xcf9.
    pub fn new(vram_base: u32, vram_size: u32, reset: ResetRegister) -> Self {
        assert!(vram_size.is_power_of_two() && vram_size >= 16);
        let bridge = Function::new(0, BRIDGE_VENDOR, BRIDGE_DEVICE, [0x06, 0x00, 0x00]);
        let video = Function::new(VIDEO_SLOT, VIDEO_VENDOR, VIDEO_DEVICE, [0x03, 0x00, 0x00])
            .bar0(vram_base, vram_size);
        PciConfig {
            latch: 0,
            functions: vec![bridge, video],
            reset,
        }
    }

    /// The function the latch selects and the register offset, if the latch is enabled and
    /// names one that exists (bus 0, function 0).
    fn selected(&mut self) -> Option<(&mut Function, usize)> {
        if self.latch & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.latch >> 16) & 0xff;
        let slot = ((self.latch >> 11) & 0x1f) as u8;
        let func = (self.latch >> 8) & 0x7;
        let reg = (self.latch & 0xfc) as usize;
        if bus != 0 || func != 0 {
            return None;
        }
        self.functions
            .iter_mut()
            .find(|f| f.slot == slot)
            .map(|f| (f, reg))
    }
}

impl BusDevice for PciConfig {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.latch.to_le_bytes()),
            (1, 1) => self.reset.read(0, data),
            (4..=7, n) if offset as usize - 4 + n <= 4 => {
                let within = offset as usize - 4;
                match self.selected() {
                    Some((f, reg)) => f.read(reg + within, data),
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.latch = v & 0x80ff_fffc;
            }
            (1, 1) => self.reset.write(0, data),
            (4..=7, n) if offset as usize - 4 + n <= 4 => {
                let within = offset as usize - 4;
                if let Some((f, reg)) = self.selected() {
                    f.write(reg + within, data);
                }
            }
            // Byte writes to the latch (the type-2 probe) and anything else: ignored.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::devices::PlatformRequest;

    fn bus() -> (PciConfig, Arc<Mutex<Vec<PlatformRequest>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let reset = ResetRegister::new(Arc::new(move |r| s.lock().unwrap().push(r)));
        (PciConfig::new(0xf800_0000, 16 << 20, reset), seen)
    }

    fn cfg_read(p: &mut PciConfig, slot: u8, reg: u32, len: usize) -> u32 {
        p.write(
            0,
            &(0x8000_0000 | u32::from(slot) << 11 | reg).to_le_bytes(),
        );
        let mut d = vec![0u8; len];
        p.read(4 + u64::from(reg & 3), &mut d);
        d.resize(4, 0);
        u32::from_le_bytes([d[0], d[1], d[2], d[3]])
    }

    fn cfg_write(p: &mut PciConfig, slot: u8, reg: u32, v: u32) {
        p.write(
            0,
            &(0x8000_0000 | u32::from(slot) << 11 | reg).to_le_bytes(),
        );
        p.write(4, &v.to_le_bytes());
    }

    #[test]
    fn the_type1_probe_finds_a_host_bridge_and_the_video_device() {
        let (mut p, _) = bus();
        // Linux's check: the latch reads back what was written.
        p.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        p.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        // The sanity check: class 0x0600 at 00:00.0.
        assert_eq!(cfg_read(&mut p, 0, 0x0a, 2), 0x0600);
        assert_eq!(cfg_read(&mut p, 0, 0, 4), 0x7192_8086);
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0, 4), 0x5353_1414);
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0x08, 4) >> 8, 0x03_0000);
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0x2c, 4), 0x5353_1414);
        // Nothing else: all ones, and a disabled latch reads nothing.
        assert_eq!(cfg_read(&mut p, 3, 0, 4), 0xffff_ffff);
        p.write(0, &(0x8001_0000u32).to_le_bytes());
        let mut d = [0u8; 4];
        p.read(4, &mut d);
        assert_eq!(d, [0xff; 4], "bus 1 does not exist");
        p.write(0, &0u32.to_le_bytes());
        p.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn bar0_sizes_and_moves_like_a_16_mib_memory_bar() {
        let (mut p, _) = bus();
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0x10, 4), 0xf800_0008);
        cfg_write(&mut p, VIDEO_SLOT, 0x10, 0xffff_ffff);
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0x10, 4), 0xff00_0008);
        cfg_write(&mut p, VIDEO_SLOT, 0x10, 0xf800_0000);
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0x10, 4), 0xf800_0008);
        // Read-only ids stay; the command register takes its three bits.
        cfg_write(&mut p, VIDEO_SLOT, 0x00, 0);
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0, 4), 0x5353_1414);
        assert_eq!(
            cfg_read(&mut p, VIDEO_SLOT, 0x04, 2),
            0x0002,
            "memory decoding on"
        );
        cfg_write(&mut p, VIDEO_SLOT, 0x04, 0xffff);
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0x04, 2), 0x0007);
        // No other BAR, no interrupt pin.
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0x14, 4), 0);
        assert_eq!(cfg_read(&mut p, VIDEO_SLOT, 0x3d, 1), 0);
    }

    #[test]
    fn port_0xcf9_still_resets_and_odd_accesses_are_harmless() {
        let (mut p, seen) = bus();
        p.write(1, &[0x06]);
        assert_eq!(*seen.lock().unwrap(), [PlatformRequest::Reset]);
        for (off, len) in [(0u64, 1usize), (2, 2), (3, 1), (5, 4), (7, 2), (6, 8)] {
            let mut d = vec![0u8; len];
            p.read(off, &mut d);
            p.write(off, &d);
        }
        // Sub-dword reads of the data window see the right bytes.
        p.write(
            0,
            &(0x8000_0000u32 | u32::from(VIDEO_SLOT) << 11).to_le_bytes(),
        );
        let mut b = [0u8; 1];
        p.read(7, &mut b);
        assert_eq!(b[0], 0x53);
        let mut w = [0u8; 2];
        p.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5353);
    }
}
