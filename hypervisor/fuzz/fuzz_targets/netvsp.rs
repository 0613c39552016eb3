//! The synthetic NIC driven through the fake guest channel with arbitrary packets, as it
//! runs on a channel thread. The first byte: bit 0 runs Linux's NVSP setup first (version,
//! receive and send buffers), bit 1 then the RNDIS initialize and packet filter. Then each
//! step is a kind byte, a little-endian u16 length and that many bytes. Kind (low 3 bits):
//! 0 an inband packet, 1 a GPA-direct packet over one page list, 2 a completion of a
//! receive section (the length's low byte is the section), 3 a frame from the host,
//! 4 the bytes written into send-buffer section (length's low byte) before the next step,
//! 5 the link flipped. Nothing may panic; a refused packet closes the channel, and a new
//! one is opened.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use netvsp::protocol::{msg, nvsp, rndis, rndis_message, words};
use netvsp::{Netvsp, Transmit};
use vmbus_core::fake::FakeGuest;
use vmbus_core::memory::Gpadl;
use vmbus_core::ring::pkt;
use vmbus_core::{PageList, Vsp};

struct Drop;

impl Transmit for Drop {
    fn transmit(&mut self, frame: &[u8], o: &netvsp::offload::Offload) -> std::io::Result<()> {
        assert!(frame.len() >= 14);
        if let Some((start, offset)) = o.csum {
            assert!(usize::from(start) + usize::from(offset) + 2 <= frame.len());
        }
        if let Some(g) = o.gso {
            assert!(usize::from(g.hdr_len) <= frame.len() && g.mss > 0);
        } else {
            assert!(frame.len() <= netvsp::MAX_FRAME);
        }
        Ok(())
    }

    fn offloads(&self) -> bool {
        true
    }
}

fn setup(guest: &mut FakeGuest, dev: &mut Netvsp, rndis_too: bool) -> Option<Arc<Gpadl>> {
    let recv = guest.create_gpadl(1, 8)?;
    let send = guest.create_gpadl(2, 4)?;
    let _ = recv;
    let mut rb = nvsp(msg::SEND_RECV_BUF, &[1]);
    rb[8..10].copy_from_slice(&0xcafeu16.to_le_bytes());
    for (i, m) in [
        nvsp(msg::INIT, &[0x60001, 0x60001]),
        rb,
        nvsp(msg::SEND_SEND_BUF, &[2]),
    ]
    .iter()
    .enumerate()
    {
        guest.send_inband(i as u64 + 1, m).ok()?;
        guest.run(dev).ok()?;
        guest.recv_all().ok()?;
    }
    if rndis_too {
        for (i, r) in [
            rndis_message(rndis::INIT, &words(&[1, 1, 0, 0x4000])),
            rndis_message(rndis::SET, &words(&[2, 0x0001_010e, 4, 20, 0, 0xb])),
        ]
        .iter()
        .enumerate()
        {
            send.write(guest.memory(), 0, r).ok()?;
            let m = nvsp(msg::SEND_RNDIS_PKT, &[1, 0, r.len() as u32]);
            guest.send_inband(10 + i as u64, &m).ok()?;
            guest.run(dev).ok()?;
            for p in guest.recv_all().ok()? {
                if p.header.ptype == pkt::DATA_USING_XFER_PAGES {
                    let c = nvsp(msg::SEND_RNDIS_PKT_COMPLETE, &[1]);
                    guest.send_raw(pkt::COMP, 0, p.header.trans_id, &[], &c).ok()?;
                }
            }
            guest.run(dev).ok()?;
        }
    }
    Some(send)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let (mut dev, nic) = Netvsp::new(0, [2, 0, 0, 0, 0, 1], Box::new(Drop)).unwrap();
    let mut guest = FakeGuest::new();
    guest.open(&mut dev).unwrap();
    let mut send = None;
    if first & 1 != 0 {
        send = setup(&mut guest, &mut dev, first & 2 != 0);
    }
    let mut steps = 0u64;
    while rest.len() >= 3 && steps < 128 {
        steps += 1;
        let kind = rest[0];
        let word = u16::from_le_bytes([rest[1], rest[2]]);
        let len = usize::from(word & 0x7fff).min(rest.len() - 3);
        let payload = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let sent = match kind & 7 {
            0 => guest.send_inband(steps, payload),
            1 => {
                let pages = usize::from((kind >> 3) & 3) + 1;
                let offset = u32::from(kind >> 5) * 256;
                let Some(pfns) = guest.alloc(pages) else {
                    break;
                };
                let list = PageList::new(offset, pages as u32 * 4096 - offset, pfns).unwrap();
                let _ = list.write(guest.memory(), 0, payload);
                let m = nvsp(msg::SEND_RNDIS_PKT, &[u32::from(kind >> 7), u32::MAX, 0]);
                guest.send_gpa_direct(steps, &[list], &m)
            }
            2 => {
                let id = (0x6e76_7370u64 << 32) | u64::from(word & 0xff);
                guest.send_raw(pkt::COMP, 0, id, &[], payload)
            }
            3 => {
                nic.receive(payload);
                Ok(())
            }
            4 => {
                if let Some(s) = &send {
                    let _ = s.write(guest.memory(), usize::from(word & 0xff) * 6144 % s.len(), payload);
                }
                Ok(())
            }
            _ => {
                nic.set_link(!nic.link_up());
                Ok(())
            }
        };
        if sent.is_err() {
            break;
        }
        if guest.run(&mut dev).is_err() {
            dev.closed();
            guest = FakeGuest::new();
            guest.open(&mut dev).unwrap();
            send = None;
            continue;
        }
        for p in guest.recv_all().unwrap() {
            assert!(p.header.offset <= p.bytes.len());
            // Completions carry a whole NVSP message, or nothing (a data-path switch).
            if p.header.ptype == pkt::COMP {
                let n = p.payload().len();
                assert!(n == 0 || n == netvsp::protocol::NVSP_MESSAGE_SIZE, "{n}");
            }
        }
    }
});
