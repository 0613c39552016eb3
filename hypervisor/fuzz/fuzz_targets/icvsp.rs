//! The four integration services (heartbeat, shutdown, time sync, KVP) driven through the
//! fake guest channel with arbitrary guest packets, as they run on a channel thread. The
//! first byte's low bits say which services get Linux's version answer first (bit n for
//! service n), so the service messages are reached. Then each step is a kind byte, a
//! little-endian u16 length and that many bytes. Kind bits 0-1 pick the service; bits 2-4
//! the action: 0 the bytes as an inband answer to the host's last request (same
//! transaction id), 1 the host's last request sent back with the bytes XORed over it and
//! the response flag set (a near-valid answer), 2 an inband packet whose first 8 bytes are
//! the transaction id, 3 the clock moved by the first byte in seconds, 4 a host action
//! (shutdown, refresh, resync), 5 a packet of another type. Nothing may panic; a refused
//! packet closes the channel and a new one is opened.
#![no_main]

use std::time::Duration;

use icvsp::icmsg::{BODY, Header, MAX_MESSAGE, flags};
use icvsp::{Heartbeat, Kvp, ManualClock, Shutdown, TimeSync};
use libfuzzer_sys::fuzz_target;
use vmbus_core::Vsp;
use vmbus_core::fake::FakeGuest;
use vmbus_core::ring::{Packet, pkt};

struct Slot {
    dev: Box<dyn Vsp>,
    guest: FakeGuest,
    last: Option<Packet>,
}

impl Slot {
    fn new(mut dev: Box<dyn Vsp>) -> Self {
        let mut guest = FakeGuest::new();
        guest.open(&mut *dev).unwrap();
        Slot {
            dev,
            guest,
            last: None,
        }
    }

    /// Read what the host sent; every packet must be a well-formed IC request.
    fn drain(&mut self) {
        for p in self.guest.recv_all().unwrap() {
            assert_eq!(p.header.ptype, pkt::DATA_INBAND);
            let h = Header::parse(p.payload()).expect("an IC header");
            assert!(h.flags & flags::REQUEST != 0);
            assert!(BODY + usize::from(h.size) <= p.payload().len());
            assert!(p.payload().len() <= MAX_MESSAGE);
            self.last = Some(p);
        }
    }

    /// Let the device run; reopen on a refused packet.
    fn run(&mut self) {
        if self.guest.run(&mut *self.dev).is_err() {
            self.dev.closed();
            self.guest = FakeGuest::new();
            self.last = None;
            self.guest.open(&mut *self.dev).unwrap();
        }
        self.drain();
    }

    /// Answer the host's last request with `buf`.
    fn answer(&mut self, buf: &[u8]) {
        let id = self.last.as_ref().map_or(0, |p| p.header.trans_id);
        let _ = self.guest.send_raw(pkt::DATA_INBAND, 0, id, &[], buf);
    }
}

/// Linux's answer to a negotiate request: framework 3.0 and the newest message version
/// offered, counts 1 and 1.
fn linux_negotiate(p: &Packet) -> Vec<u8> {
    let mut b = p.payload().to_vec();
    let fw = usize::from(u16::from_le_bytes([b[BODY], b[BODY + 1]]));
    let msg = usize::from(u16::from_le_bytes([b[BODY + 2], b[BODY + 3]]));
    let last = BODY + 8 + 4 * (fw + msg - 1);
    let (major, minor) = (b[last..last + 2].to_vec(), b[last + 2..last + 4].to_vec());
    b[BODY..BODY + 4].copy_from_slice(&[1, 0, 1, 0]);
    b[BODY + 8..BODY + 12].copy_from_slice(&[3, 0, 0, 0]);
    b[BODY + 12..BODY + 14].copy_from_slice(&major);
    b[BODY + 14..BODY + 16].copy_from_slice(&minor);
    b[18..20].copy_from_slice(&16u16.to_le_bytes());
    b[BODY - 3] = flags::TRANSACTION | flags::RESPONSE;
    b
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let clock = ManualClock::new(133_000_000_000_000_000);
    let secs = Duration::from_secs;
    let (hb, _hb) = Heartbeat::new(clock.clone(), secs(2), secs(10)).unwrap();
    let (sd, sdh) = Shutdown::new(clock.clone(), secs(10)).unwrap();
    let (ts, tsh) = TimeSync::new(clock.clone(), secs(5), Some(Box::new(|| 42))).unwrap();
    let (kv, kvh) = Kvp::new(clock.clone(), secs(60), secs(45)).unwrap();
    let mut slots = [
        Slot::new(Box::new(hb)),
        Slot::new(Box::new(sd)),
        Slot::new(Box::new(ts)),
        Slot::new(Box::new(kv)),
    ];
    for (i, s) in slots.iter_mut().enumerate() {
        s.drain();
        if first & (1 << i) != 0
            && let Some(p) = s.last.clone()
        {
            s.answer(&linux_negotiate(&p));
            s.run();
        }
    }
    let mut steps = 0;
    while rest.len() >= 3 && steps < 128 {
        steps += 1;
        let kind = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let bytes = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let which = usize::from(kind & 3);
        let s = &mut slots[which];
        match (kind >> 2) & 7 {
            0 => s.answer(bytes),
            1 => {
                let Some(p) = &s.last else { continue };
                let mut b = p.payload().to_vec();
                for (d, x) in b.iter_mut().zip(bytes) {
                    *d ^= x;
                }
                if b.len() > BODY {
                    b[BODY - 3] |= flags::RESPONSE;
                }
                s.answer(&b);
            }
            2 => {
                let mut id = [0u8; 8];
                let n = bytes.len().min(8);
                id[..n].copy_from_slice(&bytes[..n]);
                let _ = s.guest.send_raw(
                    pkt::DATA_INBAND,
                    0,
                    u64::from_le_bytes(id),
                    &[],
                    &bytes[n..],
                );
            }
            3 => {
                clock.advance(secs(u64::from(bytes.first().copied().unwrap_or(1))));
                for s in slots.iter_mut() {
                    s.run();
                }
                continue;
            }
            4 => match bytes.first().copied().unwrap_or(0) % 3 {
                0 => {
                    let _ = sdh.request_shutdown(kind & 0x80 != 0, "fuzz");
                }
                1 => kvh.refresh(),
                _ => tsh.resync(),
            },
            _ => {
                let _ = s.guest.send_raw(pkt::COMP, 0, 0, &[], bytes);
            }
        }
        s.run();
    }
});
