//! A fake guest for one VMBus device: guest RAM in memory, a ring pair laid out in it as a
//! Linux driver lays it out, GPADLs, and the guest's ends of both rings. Tests and fuzz
//! targets write packets as the guest would, let the device take them through the same
//! ring code the VMM uses, and read what it answered.
//!
//! ```
//! use vmbus_core::fake::FakeGuest;
//! # use vmbus_core::{Channel, OfferParams, Vsp, VspError, ring::Packet};
//! # struct Echo;
//! # impl Vsp for Echo {
//! #     fn name(&self) -> &'static str { "echo" }
//! #     fn offer(&self) -> OfferParams { unimplemented!() }
//! #     fn packet(&mut self, p: &Packet, ch: &mut dyn Channel) -> Result<(), VspError> {
//! #         ch.complete(p.header.trans_id, p.payload())
//! #     }
//! # }
//! let mut guest = FakeGuest::new();
//! let mut dev = Echo;
//! guest.open(&mut dev).unwrap();
//! guest.send_inband(7, b"ping").unwrap();
//! guest.run(&mut dev).unwrap();
//! let answer = guest.recv().unwrap().unwrap();
//! assert_eq!(answer.header.trans_id, 7);
//! assert_eq!(&answer.payload()[..4], b"ping");
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::channel::{Channel, TransferRange, Vsp, VspError};
use crate::memory::{Gpadl, GuestMem, PAGE, PageList};
use crate::ring::{InRing, OutRing, Packet, RingError, pkt, transfer_page_descriptor};

/// Guest RAM of the fake guest.
pub const RAM_BYTES: u64 = 32 << 20;
/// Pages of each ring (header included): 256 KiB of data each way, as netvsc asks for.
pub const RING_PAGES: usize = 65;

/// The host end: what the device sees as its [`Channel`].
#[derive(Debug)]
pub struct FakeHost {
    mem: GuestMem,
    inbound: InRing,
    outbound: OutRing,
    gpadls: HashMap<u32, Arc<Gpadl>>,
    /// Interrupts the device raised.
    pub signals: usize,
}

impl Channel for FakeHost {
    fn send_packet(
        &mut self,
        ptype: u16,
        flags: u16,
        trans_id: u64,
        payload: &[u8],
    ) -> Result<(), VspError> {
        if self.outbound.write(ptype, flags, trans_id, payload)? {
            self.signals += 1;
        }
        Ok(())
    }

    fn send_transfer_pages(
        &mut self,
        set_id: u16,
        ranges: &[TransferRange],
        trans_id: u64,
        payload: &[u8],
    ) -> Result<(), VspError> {
        let desc = transfer_page_descriptor(set_id, ranges);
        if self.outbound.write_with(
            pkt::DATA_USING_XFER_PAGES,
            pkt::FLAG_COMPLETION_REQUESTED,
            trans_id,
            &desc,
            payload,
        )? {
            self.signals += 1;
        }
        Ok(())
    }

    fn memory(&self) -> &GuestMem {
        &self.mem
    }

    fn gpadl(&self, id: u32) -> Option<Arc<Gpadl>> {
        self.gpadls.get(&id).cloned()
    }
}

/// The guest side.
#[derive(Debug)]
pub struct FakeGuest {
    host: FakeHost,
    /// The guest's writer on the host's inbound ring.
    to_host: OutRing,
    /// The guest's reader of the host's outbound ring.
    from_host: InRing,
    /// Next free page for [`FakeGuest::alloc`].
    next_page: u64,
}

impl Default for FakeGuest {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeGuest {
    /// A guest with fresh RAM and an open ring pair.
    pub fn new() -> Self {
        let ram = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_BYTES as usize)])
                .expect("the fake guest's RAM can be allocated"),
        );
        let mem = GuestMem::new(ram.clone());
        // Page 0 stays unused; the rings follow.
        let up: Vec<u64> = (1..=RING_PAGES as u64).collect();
        let down: Vec<u64> = (RING_PAGES as u64 + 1..=2 * RING_PAGES as u64).collect();
        fn ring<T>(r: Result<T, RingError>) -> T {
            r.expect("the fake rings are well formed")
        }
        FakeGuest {
            host: FakeHost {
                mem,
                inbound: ring(InRing::new(ram.clone(), &up)),
                outbound: ring(OutRing::new(ram.clone(), &down)),
                gpadls: HashMap::new(),
                signals: 0,
            },
            to_host: ring(OutRing::new(ram.clone(), &up)),
            from_host: ring(InRing::new(ram, &down)),
            next_page: 2 * RING_PAGES as u64 + 1,
        }
    }

    /// The guest's RAM.
    pub fn memory(&self) -> &GuestMem {
        &self.host.mem
    }

    /// The device's end (to call a device with directly).
    pub fn host(&mut self) -> &mut FakeHost {
        &mut self.host
    }

    /// `pages` fresh guest pages (zeroed), or None when RAM is used up.
    pub fn alloc(&mut self, pages: usize) -> Option<Vec<u64>> {
        let end = self.next_page.checked_add(pages as u64)?;
        if end * PAGE > RAM_BYTES {
            return None;
        }
        let pfns = (self.next_page..end).collect();
        self.next_page = end;
        Some(pfns)
    }

    /// Create GPADL `id` over `pages` fresh pages for the device, as the guest's
    /// `vmbus_establish_gpadl` does; returns it.
    pub fn create_gpadl(&mut self, id: u32, pages: usize) -> Option<Arc<Gpadl>> {
        let pfns = self.alloc(pages)?;
        let len = u32::try_from(pages as u64 * PAGE).ok()?;
        let g = Arc::new(Gpadl::new(vec![PageList::new(0, len, pfns).ok()?]));
        self.host.gpadls.insert(id, g.clone());
        Some(g)
    }

    /// The channel opens: the device's `opened`.
    pub fn open(&mut self, vsp: &mut dyn Vsp) -> Result<(), VspError> {
        vsp.opened(&mut self.host)
    }

    /// Write an inband packet asking for a completion, as `vmbus_sendpacket` does.
    pub fn send_inband(&mut self, trans_id: u64, payload: &[u8]) -> Result<(), RingError> {
        self.send_raw(
            pkt::DATA_INBAND,
            pkt::FLAG_COMPLETION_REQUESTED,
            trans_id,
            &[],
            payload,
        )
    }

    /// Write a GPA-direct packet naming `lists`, as `vmbus_sendpacket_mpb_desc` does.
    pub fn send_gpa_direct(
        &mut self,
        trans_id: u64,
        lists: &[PageList],
        payload: &[u8],
    ) -> Result<(), RingError> {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_le_bytes());
        d.extend_from_slice(&(lists.len() as u32).to_le_bytes());
        for l in lists {
            d.extend_from_slice(&(l.len() as u32).to_le_bytes());
            d.extend_from_slice(&l.offset().to_le_bytes());
            for p in l.pfns() {
                d.extend_from_slice(&p.to_le_bytes());
            }
        }
        self.send_raw(
            pkt::DATA_USING_GPA_DIRECT,
            pkt::FLAG_COMPLETION_REQUESTED,
            trans_id,
            &d,
            payload,
        )
    }

    /// Write any packet (a fuzz target's, or a malformed one).
    pub fn send_raw(
        &mut self,
        ptype: u16,
        flags: u16,
        trans_id: u64,
        descriptor: &[u8],
        payload: &[u8],
    ) -> Result<(), RingError> {
        self.to_host
            .write_with(ptype, flags, trans_id, descriptor, payload)
            .map(drop)
    }

    /// Let the device take every packet the guest wrote, then do its host-side work: what
    /// the VMM's channel thread does after a doorbell.
    pub fn run(&mut self, vsp: &mut dyn Vsp) -> Result<(), VspError> {
        while let Some((p, _)) = self.host.inbound.read()? {
            vsp.packet(&p, &mut self.host)?;
        }
        vsp.poll_host(&mut self.host)
    }

    /// The next packet the device sent, if any.
    pub fn recv(&mut self) -> Result<Option<Packet>, RingError> {
        Ok(self.from_host.read()?.map(|(p, _)| p))
    }

    /// Everything the device sent so far.
    pub fn recv_all(&mut self) -> Result<Vec<Packet>, RingError> {
        let mut v = Vec::new();
        while let Some(p) = self.recv()? {
            v.push(p);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::OfferParams;
    use crate::messages::Guid;

    /// Answers every packet with a completion carrying its payload, fills its receive
    /// buffer on request, and copies GPA-direct data back.
    struct Echo {
        recv_gpadl: Option<u32>,
    }

    impl Vsp for Echo {
        fn name(&self) -> &'static str {
            "echo"
        }

        fn offer(&self) -> OfferParams {
            OfferParams {
                class: Guid::new(1, 2, 3, [4; 8]),
                instance: Guid::new(5, 6, 7, [8; 8]),
                flags: 0,
                mmio_megabytes: 0,
                pipe_mode: 0,
            }
        }

        fn packet(&mut self, p: &Packet, ch: &mut dyn Channel) -> Result<(), VspError> {
            match p.header.ptype {
                pkt::DATA_USING_GPA_DIRECT => {
                    let lists = p.gpa_direct()?;
                    let mut data = vec![0u8; lists[0].len()];
                    lists[0].read(ch.memory(), 0, &mut data)?;
                    ch.complete(p.header.trans_id, &data)
                }
                _ if p.payload().starts_with(b"recv") => {
                    let id = self.recv_gpadl.expect("a receive buffer");
                    let g = ch
                        .gpadl(id)
                        .ok_or(VspError::Protocol("no such GPADL".into()))?;
                    g.write(ch.memory(), 4096 + 100, b"frame")?;
                    ch.send_transfer_pages(
                        7,
                        &[TransferRange {
                            byte_count: 5,
                            byte_offset: 4096 + 100,
                        }],
                        p.header.trans_id,
                        b"rndis",
                    )
                }
                _ => ch.complete(p.header.trans_id, p.payload()),
            }
        }
    }

    #[test]
    fn a_device_answers_through_the_real_rings() {
        let mut g = FakeGuest::new();
        let mut dev = Echo { recv_gpadl: None };
        g.open(&mut dev).unwrap();
        for i in 0..500u64 {
            g.send_inband(i, &i.to_le_bytes()).unwrap();
            g.run(&mut dev).unwrap();
            let p = g.recv().unwrap().unwrap();
            assert_eq!(p.header.ptype, pkt::COMP);
            assert_eq!(p.header.trans_id, i);
            assert_eq!(&p.payload()[..8], &i.to_le_bytes());
        }
        assert!(g.recv().unwrap().is_none());
        assert!(g.host().signals > 0);
    }

    #[test]
    fn gpa_direct_data_and_transfer_pages_reach_guest_memory() {
        let mut g = FakeGuest::new();
        let buf = g.create_gpadl(0x1234, 4).unwrap();
        let mut dev = Echo {
            recv_gpadl: Some(0x1234),
        };
        // GPA-direct: the device reads what the guest put in its pages.
        let pfns = g.alloc(2).unwrap();
        let list = PageList::new(100, 5000, pfns).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        list.write(g.memory(), 0, &data).unwrap();
        g.send_gpa_direct(9, std::slice::from_ref(&list), b"")
            .unwrap();
        g.run(&mut dev).unwrap();
        let p = g.recv().unwrap().unwrap();
        assert_eq!(p.header.trans_id, 9);
        assert_eq!(&p.payload()[..5000], &data[..]);
        // Transfer pages: the data is in the receive buffer, the packet names it.
        g.send_inband(10, b"recv").unwrap();
        g.run(&mut dev).unwrap();
        let p = g.recv().unwrap().unwrap();
        assert_eq!(p.header.ptype, pkt::DATA_USING_XFER_PAGES);
        assert_eq!(&p.bytes[16..18], &7u16.to_le_bytes());
        let mut frame = [0u8; 5];
        buf.read(g.memory(), 4096 + 100, &mut frame).unwrap();
        assert_eq!(&frame, b"frame");
        assert_eq!(&p.payload()[..5], b"rndis");
    }
}
