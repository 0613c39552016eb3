//! Synthetic mouse (`hid_hyperv`): an absolute HID pointer over VMBus
//! (VMBUS-ON-KVM.md §5.2; Linux `drivers/hid/hid-hyperv.c`).
//!
//! Pipe framing: pipe header {type 1, size} then synthhid header {type, size} then payload.
//! Handshake: PROTOCOL_REQUEST → PROTOCOL_RESPONSE, then at once INITIAL_DEVICE_INFO (device
//! info, HID descriptor, report descriptor); after the guest's ACK, input reports.

use std::sync::Arc;

use crate::{InputQueue, u32_at};
use vmbus_core::Guid;
use vmbus_core::ring::Packet;
use vmbus_core::{Channel, OfferParams, Vsp, VspError, Wakeup};

/// Interface class cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a.
pub const CLASS: Guid = Guid::new(
    0xcfa8_b69e,
    0x5b4a,
    0x4cc0,
    [0xb9, 0x8b, 0x8b, 0xa1, 0xa1, 0xf3, 0xf9, 0x5a],
);
/// Instance 58f75a6d-d949-4320-99e1-a2a2576d581c.
pub const INSTANCE: Guid = Guid::new(
    0x58f7_5a6d,
    0xd949,
    0x4320,
    [0x99, 0xe1, 0xa2, 0xa2, 0x57, 0x6d, 0x58, 0x1c],
);

const PIPE_DATA: u32 = 1;
const PROTOCOL_REQUEST: u32 = 0;
const PROTOCOL_RESPONSE: u32 = 1;
const INITIAL_DEVICE_INFO: u32 = 2;
const INITIAL_DEVICE_INFO_ACK: u32 = 3;
const INPUT_REPORT: u32 = 4;
/// Protocol 2.0.
pub const VERSION_2_0: u32 = 0x0002_0000;

/// Vendor, product, version the guest sees (Microsoft's synthetic mouse ids).
pub const VENDOR: u16 = 0x045e;
/// Product id.
pub const PRODUCT: u16 = 0x0621;

/// Largest coordinate.
pub const ABS_MAX: u32 = 32767;

/// Absolute pointer: 5 buttons, X and Y 0..32767, a relative 16-bit wheel; no report id.
pub const REPORT_DESCRIPTOR: [u8; 65] = [
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x02, // Usage (Mouse)
    0xa1, 0x01, // Collection (Application)
    0x09, 0x01, //   Usage (Pointer)
    0xa1, 0x00, //   Collection (Physical)
    0x05, 0x09, //     Usage Page (Button)
    0x19, 0x01, //     Usage Minimum (1)
    0x29, 0x05, //     Usage Maximum (5)
    0x15, 0x00, //     Logical Minimum (0)
    0x25, 0x01, //     Logical Maximum (1)
    0x95, 0x05, //     Report Count (5)
    0x75, 0x01, //     Report Size (1)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x95, 0x01, //     Report Count (1)
    0x75, 0x03, //     Report Size (3)
    0x81, 0x01, //     Input (Constant)
    0x05, 0x01, //     Usage Page (Generic Desktop)
    0x09, 0x30, //     Usage (X)
    0x09, 0x31, //     Usage (Y)
    0x15, 0x00, //     Logical Minimum (0)
    0x26, 0xff, 0x7f, // Logical Maximum (32767)
    0x75, 0x10, //     Report Size (16)
    0x95, 0x02, //     Report Count (2)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x09, 0x38, //     Usage (Wheel)
    0x16, 0x01, 0x80, // Logical Minimum (-32767)
    0x26, 0xff, 0x7f, // Logical Maximum (32767)
    0x75, 0x10, //     Report Size (16)
    0x95, 0x01, //     Report Count (1)
    0x81, 0x06, //     Input (Data, Variable, Relative)
    0xc0, //   End Collection
    0xc0, // End Collection
];

/// A pointer state from the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerEvent {
    /// 0..=32767 across the screen.
    pub x: u32,
    /// 0..=32767 down the screen.
    pub y: u32,
    /// Bit 0 left, 1 right, 2 middle (5 buttons).
    pub buttons: u32,
    /// Wheel clicks (positive = away from the user).
    pub wheel: i32,
}

/// The raw HID input report for a pointer state.
pub fn report(p: PointerEvent) -> [u8; 7] {
    let x = p.x.min(ABS_MAX) as u16;
    let y = p.y.min(ABS_MAX) as u16;
    let w = p.wheel.clamp(-32767, 32767) as i16;
    let mut r = [0u8; 7];
    r[0] = (p.buttons & 0x1f) as u8;
    r[1..3].copy_from_slice(&x.to_le_bytes());
    r[3..5].copy_from_slice(&y.to_le_bytes());
    r[5..7].copy_from_slice(&w.to_le_bytes());
    r
}

/// A pipe + synthhid framed message.
fn framed(ty: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + payload.len());
    m.extend_from_slice(&PIPE_DATA.to_le_bytes());
    m.extend_from_slice(&(8 + payload.len() as u32).to_le_bytes());
    m.extend_from_slice(&ty.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// INITIAL_DEVICE_INFO: device info (32 bytes), HID descriptor (9), report descriptor.
pub fn device_info() -> Vec<u8> {
    let mut p = Vec::with_capacity(32 + 9 + REPORT_DESCRIPTOR.len());
    p.extend_from_slice(&32u32.to_le_bytes());
    p.extend_from_slice(&VENDOR.to_le_bytes());
    p.extend_from_slice(&PRODUCT.to_le_bytes());
    p.extend_from_slice(&1u16.to_le_bytes());
    p.extend_from_slice(&[0u8; 22]);
    p.extend_from_slice(&[9, 0x21, 0x01, 0x01, 0, 1, 0x22]);
    p.extend_from_slice(&(REPORT_DESCRIPTOR.len() as u16).to_le_bytes());
    p.extend_from_slice(&REPORT_DESCRIPTOR);
    framed(INITIAL_DEVICE_INFO, &p)
}

/// What the guest can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    /// Protocol version request.
    Protocol(u32),
    /// Device info received.
    DeviceInfoAck,
}

/// Parse a guest message (hostile input).
pub fn parse(payload: &[u8]) -> Result<GuestRequest, VspError> {
    let bad = |m: &str| VspError::Protocol(format!("mouse: {m}"));
    if u32_at(payload, 0) != Some(PIPE_DATA) {
        return Err(bad("not a pipe data message"));
    }
    let pipe_size = u32_at(payload, 4).ok_or_else(|| bad("short pipe header"))? as usize;
    let body = payload
        .get(8..8usize.saturating_add(pipe_size))
        .ok_or_else(|| bad("pipe size beyond the packet"))?;
    let ty = u32_at(body, 0).ok_or_else(|| bad("short synthhid header"))?;
    match ty {
        PROTOCOL_REQUEST => Ok(GuestRequest::Protocol(
            u32_at(body, 8).ok_or_else(|| bad("short protocol request"))?,
        )),
        INITIAL_DEVICE_INFO_ACK => Ok(GuestRequest::DeviceInfoAck),
        t => Err(bad(&format!("unknown message type {t}"))),
    }
}

/// The mouse VSP.
#[derive(Debug)]
pub struct Mouse {
    input: Arc<InputQueue<PointerEvent>>,
    ready: bool,
}

impl Mouse {
    /// A mouse fed through `input`.
    pub fn new(input: Arc<InputQueue<PointerEvent>>) -> Self {
        Self {
            input,
            ready: false,
        }
    }
}

impl Vsp for Mouse {
    fn name(&self) -> &'static str {
        "mouse"
    }

    fn offer(&self) -> OfferParams {
        OfferParams {
            class: CLASS,
            instance: INSTANCE,
            flags: 0x10,
            mmio_megabytes: 0,
            pipe_mode: 4,
        }
    }

    fn opened(&mut self, _tx: &mut dyn Channel) -> Result<(), VspError> {
        self.ready = false;
        self.input.clear();
        Ok(())
    }

    fn packet(&mut self, pkt: &Packet, tx: &mut dyn Channel) -> Result<(), VspError> {
        match parse(pkt.payload())? {
            GuestRequest::Protocol(v) => {
                let ok = v == VERSION_2_0;
                let mut p = [0u8; 5];
                p[0..4].copy_from_slice(&v.to_le_bytes());
                p[4] = u8::from(ok);
                tx.send(&framed(PROTOCOL_RESPONSE, &p))?;
                if ok {
                    tx.send(&device_info())?;
                }
            }
            GuestRequest::DeviceInfoAck => self.ready = true,
        }
        Ok(())
    }

    fn poll_host(&mut self, tx: &mut dyn Channel) -> Result<(), VspError> {
        if !self.ready {
            return Ok(());
        }
        for p in self.input.drain() {
            tx.send(&framed(INPUT_REPORT, &report(p)))?;
        }
        Ok(())
    }

    fn closed(&mut self) {
        self.ready = false;
    }

    fn host_wakeup(&self) -> Option<Arc<Wakeup>> {
        Some(self.input.wakeup())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus_core::fake::FakeGuest;

    /// A guest message in the pipe + synthhid framing `parse` expects.
    fn guest(ty: u32, body: &[u8]) -> Vec<u8> {
        framed(ty, body)
    }

    #[test]
    fn negotiates_2_0_sends_its_descriptor_then_reports_host_pointer_moves() {
        let q = Arc::new(InputQueue::new().unwrap());
        let mut m = Mouse::new(q.clone());
        let mut g = FakeGuest::new();
        g.open(&mut m).unwrap();
        // A refused version: the response says so and no device info follows.
        g.send_inband(1, &guest(PROTOCOL_REQUEST, &0x0001_0000u32.to_le_bytes()))
            .unwrap();
        g.run(&mut m).unwrap();
        let r = g.recv_all().unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(u32_at(r[0].payload(), 8), Some(PROTOCOL_RESPONSE));
        assert_eq!(r[0].payload()[20], 0);

        g.send_inband(2, &guest(PROTOCOL_REQUEST, &VERSION_2_0.to_le_bytes()))
            .unwrap();
        g.run(&mut m).unwrap();
        let r = g.recv_all().unwrap();
        assert_eq!(r.len(), 2, "the response, then the device info");
        assert_eq!(r[0].payload()[20], 1);
        assert_eq!(&r[1].payload()[..device_info().len()], &device_info()[..]);
        // Until the guest acknowledges the device info, pointer moves wait.
        q.push(PointerEvent {
            x: 100,
            y: 200,
            buttons: 1,
            wheel: 0,
        });
        g.run(&mut m).unwrap();
        assert!(g.recv().unwrap().is_none());
        g.send_inband(3, &guest(INITIAL_DEVICE_INFO_ACK, &[0]))
            .unwrap();
        g.run(&mut m).unwrap();
        let r = g.recv_all().unwrap();
        assert_eq!(r.len(), 1, "the queued move is reported");
        let p = r[0].payload();
        assert_eq!(u32_at(p, 8), Some(INPUT_REPORT));
        let want = report(PointerEvent {
            x: 100,
            y: 200,
            buttons: 1,
            wheel: 0,
        });
        assert_eq!(&p[16..16 + want.len()], &want);
    }

    #[test]
    fn device_info_sizes_satisfy_the_guest() {
        let d = device_info();
        let pipe = u32_at(&d, 4).unwrap() as usize;
        assert_eq!(pipe + 8, d.len());
        assert!(pipe >= 49);
        assert_eq!(u32_at(&d, 8), Some(INITIAL_DEVICE_INFO));
        assert_eq!(u32_at(&d, 12).unwrap() as usize, pipe - 8);
        // HID descriptor after the 32-byte device info.
        let hid = &d[16 + 32..16 + 41];
        assert_eq!((hid[0], hid[1], hid[6]), (9, 0x21, 0x22));
        assert_eq!(
            u16::from_le_bytes([hid[7], hid[8]]) as usize,
            REPORT_DESCRIPTOR.len()
        );
        assert_ne!(REPORT_DESCRIPTOR[14], 0x25, "the guest would patch byte 14");
        // PROTOCOL_RESPONSE pipe size must not exceed 13.
        let r = framed(PROTOCOL_RESPONSE, &[0; 5]);
        assert_eq!(u32_at(&r, 4), Some(13));
    }

    #[test]
    fn reports_clamp_and_pack() {
        let r = report(PointerEvent {
            x: 40000,
            y: 16384,
            buttons: 0xff,
            wheel: -1,
        });
        assert_eq!(r, [0x1f, 0xff, 0x7f, 0x00, 0x40, 0xff, 0xff]);
    }

    #[test]
    fn parses_guest_requests() {
        let p = framed(PROTOCOL_REQUEST, &VERSION_2_0.to_le_bytes());
        assert_eq!(parse(&p).unwrap(), GuestRequest::Protocol(VERSION_2_0));
        let a = framed(INITIAL_DEVICE_INFO_ACK, &[0]);
        assert_eq!(parse(&a).unwrap(), GuestRequest::DeviceInfoAck);
        assert!(parse(&p[..10]).is_err());
        let mut huge = p.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&huge).is_err());
        assert!(parse(&[]).is_err());
    }
}
