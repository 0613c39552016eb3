//! Synthetic keyboard (`hyperv_keyboard`): PC/XT set-1 scan codes over VMBus
//! (VMBUS-ON-KVM.md §5.1; Linux `drivers/input/serio/hyperv-keyboard.c`).
//!
//! No pipe header: the inband payload starts with a u32 message type. The guest asks for
//! protocol 1.0; we accept, then send one EVENT per make or break. The guest turns each event
//! back into the byte stream (E0/E1 prefix, make | 0x80 for a break) for `atkbd`.

use std::sync::Arc;

use crate::{InputQueue, u32_at};
use vmbus_core::Guid;
use vmbus_core::ring::Packet;
use vmbus_core::{Channel, OfferParams, Vsp, VspError, Wakeup};

/// Interface class f912ad6d-2b17-48ea-bd65-f927a61c7684.
pub const CLASS: Guid = Guid::new(
    0xf912_ad6d,
    0x2b17,
    0x48ea,
    [0xbd, 0x65, 0xf9, 0x27, 0xa6, 0x1c, 0x76, 0x84],
);
/// Instance d34b2567-b9b6-42b9-8778-0a4ec0b955bf.
pub const INSTANCE: Guid = Guid::new(
    0xd34b_2567,
    0xb9b6,
    0x42b9,
    [0x87, 0x78, 0x0a, 0x4e, 0xc0, 0xb9, 0x55, 0xbf],
);

const PROTOCOL_REQUEST: u32 = 1;
const PROTOCOL_RESPONSE: u32 = 2;
const EVENT: u32 = 3;
const SET_LED_INDICATORS: u32 = 4;
/// Protocol 1.0.
pub const VERSION_1_0: u32 = 0x0001_0000;

const INFO_BREAK: u32 = 1 << 1;
const INFO_E0: u32 = 1 << 2;
const INFO_E1: u32 = 1 << 3;

/// One key transition, as the console sends it: a set-1 make code with an optional 0xE0 or
/// 0xE1 prefix in the high byte (0xE048 = Up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEvent {
    /// Scan code, e.g. 0x1e (A) or 0xe048 (Up).
    pub scancode: u32,
    /// Make (true) or break.
    pub pressed: bool,
}

/// The EVENT message for a key transition, or None for a code that is not set 1.
pub fn event_message(k: KeyEvent) -> Option<[u8; 12]> {
    let prefix = k.scancode >> 8;
    let make = k.scancode & 0xff;
    if make == 0 || make & 0x80 != 0 {
        return None;
    }
    let mut info = match prefix {
        0 => 0,
        0xe0 => INFO_E0,
        0xe1 => INFO_E1,
        _ => return None,
    };
    if !k.pressed {
        info |= INFO_BREAK;
    }
    let mut m = [0u8; 12];
    m[0..4].copy_from_slice(&EVENT.to_le_bytes());
    m[4..6].copy_from_slice(&(make as u16).to_le_bytes());
    m[8..12].copy_from_slice(&info.to_le_bytes());
    Some(m)
}

/// What the guest can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    /// Asks for a protocol version.
    Protocol(u32),
    /// LED state (ignored).
    Leds(u32),
}

/// Parse a guest message (hostile input).
pub fn parse(payload: &[u8]) -> Result<GuestRequest, VspError> {
    let bad = |m: &str| VspError::Protocol(format!("keyboard: {m}"));
    match u32_at(payload, 0).ok_or_else(|| bad("short message"))? {
        PROTOCOL_REQUEST => Ok(GuestRequest::Protocol(
            u32_at(payload, 4).ok_or_else(|| bad("short protocol request"))?,
        )),
        SET_LED_INDICATORS => Ok(GuestRequest::Leds(u32_at(payload, 4).unwrap_or(0))),
        t => Err(bad(&format!("unknown message type {t}"))),
    }
}

/// The keyboard VSP.
#[derive(Debug)]
pub struct Keyboard {
    input: Arc<InputQueue<KeyEvent>>,
    connected: bool,
}

impl Keyboard {
    /// A keyboard fed through `input`.
    pub fn new(input: Arc<InputQueue<KeyEvent>>) -> Self {
        Self {
            input,
            connected: false,
        }
    }
}

impl Vsp for Keyboard {
    fn name(&self) -> &'static str {
        "keyboard"
    }

    fn offer(&self) -> OfferParams {
        OfferParams {
            class: CLASS,
            instance: INSTANCE,
            flags: 0,
            mmio_megabytes: 0,
            pipe_mode: 0,
        }
    }

    fn opened(&mut self, _tx: &mut dyn Channel) -> Result<(), VspError> {
        self.connected = false;
        // Keys typed while no driver listened are stale.
        self.input.clear();
        Ok(())
    }

    fn packet(&mut self, pkt: &Packet, tx: &mut dyn Channel) -> Result<(), VspError> {
        match parse(pkt.payload())? {
            GuestRequest::Protocol(v) => {
                let ok = v == VERSION_1_0;
                let mut m = [0u8; 8];
                m[0..4].copy_from_slice(&PROTOCOL_RESPONSE.to_le_bytes());
                m[4..8].copy_from_slice(&u32::from(ok).to_le_bytes());
                tx.send(&m)?;
                self.connected = ok;
                tracing::debug!(version = v, ok, "keyboard protocol");
            }
            GuestRequest::Leds(_) => {}
        }
        Ok(())
    }

    fn poll_host(&mut self, tx: &mut dyn Channel) -> Result<(), VspError> {
        if !self.connected {
            return Ok(());
        }
        for k in self.input.drain() {
            if let Some(m) = event_message(k) {
                tx.send(&m)?;
            }
        }
        Ok(())
    }

    fn closed(&mut self) {
        self.connected = false;
    }

    fn host_wakeup(&self) -> Option<Arc<Wakeup>> {
        Some(self.input.wakeup())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus_core::fake::FakeGuest;
    use vmbus_core::ring::pkt;

    fn protocol_request(v: u32) -> [u8; 8] {
        let mut m = [0u8; 8];
        m[0..4].copy_from_slice(&PROTOCOL_REQUEST.to_le_bytes());
        m[4..8].copy_from_slice(&v.to_le_bytes());
        m
    }

    /// The whole exchange through the channel: a refused version, the accepted one, then
    /// keys typed on the host arrive as EVENT packets; keys from before the driver are
    /// dropped.
    #[test]
    fn negotiates_1_0_then_delivers_host_keys_through_the_channel() {
        let q = Arc::new(InputQueue::new().unwrap());
        let mut kb = Keyboard::new(q.clone());
        let mut g = FakeGuest::new();
        q.push(KeyEvent {
            scancode: 0x10,
            pressed: true,
        });
        g.open(&mut kb).unwrap();
        g.send_inband(1, &protocol_request(0x0002_0000)).unwrap();
        g.run(&mut kb).unwrap();
        let r = g.recv().unwrap().unwrap();
        assert_eq!(r.header.ptype, pkt::DATA_INBAND);
        assert_eq!(u32_at(r.payload(), 0), Some(PROTOCOL_RESPONSE));
        assert_eq!(u32_at(r.payload(), 4), Some(0), "2.0 refused");
        q.push(KeyEvent {
            scancode: 0x1e,
            pressed: true,
        });
        g.run(&mut kb).unwrap();
        assert!(
            g.recv().unwrap().is_none(),
            "no events before 1.0 is agreed"
        );

        g.send_inband(2, &protocol_request(VERSION_1_0)).unwrap();
        g.run(&mut kb).unwrap();
        let r = g.recv().unwrap().unwrap();
        assert_eq!(u32_at(r.payload(), 4), Some(1), "1.0 accepted");
        // The key typed while the driver was negotiating is kept for it; the one from
        // before the channel opened was dropped.
        let held = g.recv_all().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(
            u16::from_le_bytes([held[0].payload()[4], held[0].payload()[5]]),
            0x1e
        );
        for (scancode, pressed) in [(0x1e, true), (0x1e, false), (0xe048, true)] {
            q.push(KeyEvent { scancode, pressed });
        }
        g.run(&mut kb).unwrap();
        let events = g.recv_all().unwrap();
        let seen: Vec<(u32, u16, u32)> = events
            .iter()
            .map(|p| {
                let b = p.payload();
                (
                    u32_at(b, 0).unwrap(),
                    u16::from_le_bytes([b[4], b[5]]),
                    u32_at(b, 8).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (EVENT, 0x1e, 0),
                (EVENT, 0x1e, INFO_BREAK),
                (EVENT, 0x48, INFO_E0)
            ]
        );
        // A malformed message is the guest's error: the channel closes, nothing panics.
        g.send_inband(3, &[9, 0, 0, 0]).unwrap();
        assert!(g.run(&mut kb).is_err());
    }

    #[test]
    fn events_carry_prefix_and_break_flags_never_or_0x80() {
        let a = event_message(KeyEvent {
            scancode: 0x1e,
            pressed: true,
        })
        .unwrap();
        assert_eq!(u32_at(&a, 0), Some(3));
        assert_eq!(u16::from_le_bytes([a[4], a[5]]), 0x1e);
        assert_eq!(u32_at(&a, 8), Some(0));
        let up_release = event_message(KeyEvent {
            scancode: 0xe048,
            pressed: false,
        })
        .unwrap();
        assert_eq!(u16::from_le_bytes([up_release[4], up_release[5]]), 0x48);
        assert_eq!(u32_at(&up_release, 8), Some(INFO_E0 | INFO_BREAK));
        let pause = event_message(KeyEvent {
            scancode: 0xe11d,
            pressed: true,
        })
        .unwrap();
        assert_eq!(u32_at(&pause, 8), Some(INFO_E1));
        for bad in [0, 0x9e, 0xe0, 0xf01e, 0x1_001e] {
            assert_eq!(
                event_message(KeyEvent {
                    scancode: bad,
                    pressed: true
                }),
                None,
                "{bad:#x}"
            );
        }
    }

    #[test]
    fn parses_guest_requests() {
        let mut m = vec![1, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(parse(&m).unwrap(), GuestRequest::Protocol(VERSION_1_0));
        m.truncate(6);
        assert!(parse(&m).is_err());
        assert!(parse(&[9, 0, 0, 0]).is_err());
        assert_eq!(
            parse(&[4, 0, 0, 0, 1, 0, 0, 0]).unwrap(),
            GuestRequest::Leds(1)
        );
    }
}
