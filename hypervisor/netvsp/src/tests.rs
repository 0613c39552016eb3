//! The device against a fake guest that speaks as Linux's hv_netvsc does: the NVSP version
//! walk, both buffers, the RNDIS probe sequence, then frames both ways.

use std::sync::{Arc, Mutex};

use vmbus_core::fake::FakeGuest;
use vmbus_core::memory::{Gpadl, PageList};
use vmbus_core::ring::{Packet, pkt};

use super::*;
use crate::protocol::{nvsp, rndis_message, words};

const RECV_GPADL: u32 = 0x100;
const SEND_GPADL: u32 = 0x101;
const MAC: [u8; 6] = [0x02, 0x50, 0x76, 0x00, 0x00, 0x07];

#[derive(Clone, Default)]
struct Sent(Arc<Mutex<Vec<Vec<u8>>>>);

impl Transmit for Sent {
    fn transmit(&mut self, frame: &[u8], _: &crate::offload::Offload) -> std::io::Result<()> {
        self.0.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

struct Guest {
    g: FakeGuest,
    dev: Netvsp,
    nic: Arc<NicHandle>,
    sent: Sent,
    recv: Option<Arc<Gpadl>>,
    send: Option<Arc<Gpadl>>,
    next_id: u64,
    req_id: u32,
}

/// A transfer-page packet as the guest sees it: its ranges' bytes and its NVSP payload.
struct Xfer {
    trans_id: u64,
    set_id: u16,
    data: Vec<u8>,
    nvsp: Vec<u8>,
}

impl Guest {
    fn new() -> Self {
        let sent = Sent::default();
        let (dev, nic) = Netvsp::new(0, MAC, Box::new(sent.clone())).unwrap();
        let mut g = FakeGuest::new();
        let mut dev = dev;
        g.open(&mut dev).unwrap();
        Guest {
            g,
            dev,
            nic,
            sent,
            recv: None,
            send: None,
            next_id: 1,
            req_id: 0,
        }
    }

    /// Send an inband NVSP message and return the device's completion payload.
    fn request(&mut self, m: &[u8]) -> Result<Vec<u8>, VspError> {
        let id = self.next_id;
        self.next_id += 1;
        self.g.send_inband(id, m).unwrap();
        self.g.run(&mut self.dev)?;
        let p = self.g.recv().unwrap().expect("a completion");
        assert_eq!(p.header.ptype, pkt::COMP);
        assert_eq!(p.header.trans_id, id);
        Ok(p.payload().to_vec())
    }

    /// What Linux's netvsc_connect_vsp and netvsc_init_buf do.
    fn connect(&mut self) {
        // Newest first; the device takes 6.1.
        let r = self.request(&nvsp(msg::INIT, &[0x60001, 0x60001])).unwrap();
        assert_eq!(u32_at(&r, 0), Some(msg::INIT_COMPLETE));
        assert_eq!(u32_at(&r, 4), Some(0x60001));
        assert_eq!(u32_at(&r, 12), Some(status::SUCCESS));
        assert_eq!(r.len(), protocol::NVSP_MESSAGE_SIZE);
        // No-response messages.
        for m in [
            nvsp(msg::SEND_NDIS_CONFIG, &[1514, 0, 0x29, 0]),
            nvsp(msg::SEND_NDIS_VERSION, &[6, 30]),
        ] {
            self.g.send_raw(pkt::DATA_INBAND, 0, 0, &[], &m).unwrap();
        }
        self.g.run(&mut self.dev).unwrap();
        assert!(
            self.g.recv().unwrap().is_none(),
            "no answer to NDIS config/version"
        );
        self.recv = Some(self.g.create_gpadl(RECV_GPADL, 64).unwrap());
        let mut m = nvsp(msg::SEND_RECV_BUF, &[RECV_GPADL]);
        m[8..10].copy_from_slice(&0xcafeu16.to_le_bytes());
        let r = self.request(&m).unwrap();
        assert_eq!(u32_at(&r, 0), Some(msg::SEND_RECV_BUF_COMPLETE));
        assert_eq!(u32_at(&r, 4), Some(status::SUCCESS));
        assert_eq!(u32_at(&r, 8), Some(1), "one section");
        assert_eq!(u32_at(&r, 12), Some(0), "at offset 0");
        let (size, count) = (u32_at(&r, 16).unwrap(), u32_at(&r, 20).unwrap());
        assert!(size >= 68 && u64::from(size) * u64::from(count) <= 64 * 4096);
        self.send = Some(self.g.create_gpadl(SEND_GPADL, 16).unwrap());
        let r = self
            .request(&nvsp(msg::SEND_SEND_BUF, &[SEND_GPADL]))
            .unwrap();
        assert_eq!(u32_at(&r, 0), Some(msg::SEND_SEND_BUF_COMPLETE));
        assert_eq!(u32_at(&r, 4), Some(status::SUCCESS));
        assert_eq!(u32_at(&r, 8), Some(SEND_SECTION));
    }

    /// Send RNDIS bytes through send-buffer section `section` (or, with None, a page
    /// buffer) and check the NVSP completion.
    fn send_rndis(&mut self, data: &[u8], section: Option<u32>) -> Result<(), VspError> {
        let id = self.next_id;
        self.next_id += 1;
        match section {
            Some(s) => {
                let send = self.send.clone().unwrap();
                send.write(self.g.memory(), (s * SEND_SECTION) as usize, data)
                    .unwrap();
                let m = nvsp(msg::SEND_RNDIS_PKT, &[1, s, data.len() as u32]);
                self.g.send_inband(id, &m).unwrap();
            }
            None => {
                let pfns = self.g.alloc(1).unwrap();
                let list = PageList::new(100, data.len() as u32, pfns).unwrap();
                list.write(self.g.memory(), 0, data).unwrap();
                let m = nvsp(msg::SEND_RNDIS_PKT, &[1, protocol::NO_SECTION, 0]);
                self.g.send_gpa_direct(id, &[list], &m).unwrap();
            }
        }
        self.g.run(&mut self.dev)?;
        Ok(())
    }

    /// Everything the device sent: completions of our sends are checked and dropped,
    /// transfer-page packets returned (not yet completed).
    fn take_xfers(&mut self) -> Vec<Xfer> {
        let mut v = Vec::new();
        for p in self.g.recv_all().unwrap() {
            match p.header.ptype {
                pkt::COMP => {
                    assert_eq!(u32_at(p.payload(), 0), Some(msg::SEND_RNDIS_PKT_COMPLETE));
                    assert_eq!(u32_at(p.payload(), 4), Some(status::SUCCESS));
                }
                pkt::DATA_USING_XFER_PAGES => v.push(self.xfer(&p)),
                t => panic!("unexpected packet type {t:#x}"),
            }
        }
        v
    }

    fn xfer(&self, p: &Packet) -> Xfer {
        let b = &p.bytes;
        let set_id = u16_at(b, 16).unwrap();
        let count = u32_at(b, 20).unwrap();
        assert_eq!(count, 1, "one range per packet");
        let len = u32_at(b, 24).unwrap() as usize;
        let off = u32_at(b, 28).unwrap() as usize;
        let mut data = vec![0u8; len];
        self.recv
            .as_ref()
            .unwrap()
            .read(self.g.memory(), off, &mut data)
            .unwrap();
        Xfer {
            trans_id: p.header.trans_id,
            set_id,
            data,
            nvsp: p.payload().to_vec(),
        }
    }

    fn complete(&mut self, x: &Xfer) -> Result<(), VspError> {
        let m = nvsp(msg::SEND_RNDIS_PKT_COMPLETE, &[status::SUCCESS]);
        self.g.send_raw(pkt::COMP, 0, x.trans_id, &[], &m).unwrap();
        self.g.run(&mut self.dev)
    }

    /// One RNDIS request and its reply (completed).
    fn control(&mut self, kind: u32, body: &[u32], extra: &[u8]) -> Vec<u8> {
        self.req_id += 1;
        let mut b = words(&[self.req_id]);
        b.extend_from_slice(&words(body));
        b.extend_from_slice(extra);
        let m = rndis_message(kind, &b);
        self.send_rndis(&m, Some(self.req_id % 4)).unwrap();
        let x = self.take_xfers();
        assert_eq!(x.len(), 1, "one reply");
        let x = &x[0];
        assert_eq!(x.set_id, 0xcafe);
        assert_eq!(u32_at(&x.nvsp, 0), Some(msg::SEND_RNDIS_PKT));
        assert_eq!(u32_at(&x.nvsp, 4), Some(1), "control channel");
        assert_eq!(u32_at(&x.data, 0), Some(kind | rndis::COMPLETION));
        assert_eq!(u32_at(&x.data, 4), Some(x.data.len() as u32));
        assert_eq!(u32_at(&x.data, 8), Some(self.req_id));
        self.complete(x).unwrap();
        x.data.clone()
    }

    fn query(&mut self, id: u32, input: &[u8]) -> Option<Vec<u8>> {
        let r = self.control(rndis::QUERY, &[id, input.len() as u32, 20, 0], input);
        let st = u32_at(&r, 12).unwrap();
        if st != rndis::STATUS_SUCCESS {
            return None;
        }
        let (len, off) = (
            u32_at(&r, 16).unwrap() as usize,
            u32_at(&r, 20).unwrap() as usize,
        );
        assert!(off >= 16);
        Some(r[8 + off..8 + off + len].to_vec())
    }

    /// The offload query a guest makes, answered with capabilities.
    fn probe_offloads(&mut self) {
        let r = self.control(rndis::INIT, &[1, 0, 0x4000], &[]);
        assert_eq!(u32_at(&r, 12), Some(rndis::STATUS_SUCCESS));
        let mut caps = vec![0u8; protocol::NDIS_OFFLOAD_SIZE];
        caps[0] = protocol::NDIS_OBJECT_TYPE_OFFLOAD;
        let o = self
            .query(oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, &caps)
            .unwrap();
        // ip4_txcsum has TCP4 and TCP4OPT, LSOv2 IPv4 is 802.3-encapsulated.
        assert_eq!(u32_at(&o, 8).unwrap() & 0x14, 0x14);
        assert_eq!(u32_at(&o, 80), Some(2));
        let r = self.control(
            rndis::SET,
            &[oid::GEN_CURRENT_PACKET_FILTER, 4, 20, 0],
            &words(&[0xb]),
        );
        assert_eq!(u32_at(&r, 12), Some(rndis::STATUS_SUCCESS));
    }

    /// The RNDIS part of rndis_filter_device_add and the open.
    fn probe(&mut self) {
        let r = self.control(rndis::INIT, &[1, 0, 0x4000], &[]);
        assert_eq!(u32_at(&r, 12), Some(rndis::STATUS_SUCCESS));
        assert_eq!(u32_at(&r, 32), Some(8), "packets per message");
        assert_eq!(
            self.query(oid::GEN_MAXIMUM_FRAME_SIZE, &[]),
            Some(words(&[1500]))
        );
        assert_eq!(
            self.query(oid::P802_3_PERMANENT_ADDRESS, &[]),
            Some(MAC.to_vec())
        );
        let mut caps = vec![0u8; protocol::NDIS_OFFLOAD_SIZE];
        caps[0] = protocol::NDIS_OBJECT_TYPE_OFFLOAD;
        caps[1] = 3;
        let o = self
            .query(oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, &caps)
            .unwrap();
        assert_eq!(o.len(), protocol::NDIS_OFFLOAD_SIZE);
        assert_eq!((o[0], o[1]), (protocol::NDIS_OBJECT_TYPE_OFFLOAD, 3));
        assert_eq!(u16_at(&o, 2), Some(protocol::NDIS_OFFLOAD_SIZE as u16));
        let params = vec![0u8; 28];
        let r = self.control(
            rndis::SET,
            &[oid::TCP_OFFLOAD_PARAMETERS, 28, 20, 0],
            &params,
        );
        assert_eq!(u32_at(&r, 12), Some(rndis::STATUS_SUCCESS));
        assert_eq!(
            self.query(oid::GEN_MEDIA_CONNECT_STATUS, &[]),
            Some(words(&[0]))
        );
        assert_eq!(
            self.query(oid::GEN_LINK_SPEED, &[]),
            Some(words(&[100_000_000]))
        );
        assert_eq!(self.query(0x0001_0203, &[]), None, "no RSS");
        let r = self.control(
            rndis::SET,
            &[oid::GEN_CURRENT_PACKET_FILTER, 4, 20, 0],
            &words(&[0xb]),
        );
        assert_eq!(u32_at(&r, 12), Some(rndis::STATUS_SUCCESS));
    }
}

fn frame(n: u8, len: usize) -> Vec<u8> {
    let mut f = vec![n; len];
    f[..6].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f
}

fn data_message(f: &[u8]) -> Vec<u8> {
    let mut b = words(&[36, f.len() as u32, 0, 0, 0, 0, 0, 0, 0]);
    b.extend_from_slice(f);
    rndis_message(rndis::PACKET, &b)
}

#[test]
fn old_versions_are_refused_until_one_fits() {
    let mut g = Guest::new();
    let r = g.request(&nvsp(msg::INIT, &[0x70000, 0x70000])).unwrap();
    assert_eq!(u32_at(&r, 12), Some(status::FAIL));
    let r = g.request(&nvsp(msg::INIT, &[0x50000, 0x50000])).unwrap();
    assert_eq!(u32_at(&r, 4), Some(0x50000));
    assert_eq!(u32_at(&r, 12), Some(status::SUCCESS));
}

#[test]
fn linux_probe_sequence_is_answered() {
    let mut g = Guest::new();
    g.connect();
    g.probe();
}

#[test]
fn guest_frames_reach_the_backend_from_sections_and_page_buffers() {
    let mut g = Guest::new();
    g.connect();
    g.probe();
    let a = frame(1, 60);
    let b = frame(2, 1514);
    // Two messages batched in one section, 8-byte aligned as Linux packs them.
    let mut batch = data_message(&a);
    batch.resize(batch.len().next_multiple_of(8), 0);
    let len = batch.len() as u32;
    batch[4..8].copy_from_slice(&len.to_le_bytes());
    batch.extend_from_slice(&data_message(&b));
    g.send_rndis(&batch, Some(3)).unwrap();
    assert!(g.take_xfers().is_empty());
    let c = frame(3, 200);
    g.send_rndis(&data_message(&c), None).unwrap();
    assert!(g.take_xfers().is_empty());
    assert_eq!(*g.sent.0.lock().unwrap(), vec![a, b, c]);
    assert_eq!(g.nic.stats.tx_frames.load(Ordering::Relaxed), 3);
}

/// Linux's partial copy: a batched frame and the last packet's RNDIS header in the section,
/// that packet's frame in a page buffer of the same VMBus packet.
#[test]
fn a_partial_copy_joins_section_and_page_buffer() {
    let mut g = Guest::new();
    g.connect();
    g.probe();
    let a = frame(4, 100);
    let b = frame(5, 1400);
    let mut section = data_message(&a);
    section.resize(section.len().next_multiple_of(8), 0);
    let len = section.len() as u32;
    section[4..8].copy_from_slice(&len.to_le_bytes());
    let header = data_message(&b);
    section.extend_from_slice(&header[..44]);
    let send = g.send.clone().unwrap();
    send.write(g.g.memory(), 2 * SEND_SECTION as usize, &section)
        .unwrap();
    let pfns = g.g.alloc(1).unwrap();
    let list = PageList::new(8, b.len() as u32, pfns).unwrap();
    list.write(g.g.memory(), 0, &b).unwrap();
    let m = nvsp(msg::SEND_RNDIS_PKT, &[0, 2, section.len() as u32]);
    g.g.send_gpa_direct(77, &[list], &m).unwrap();
    g.g.run(&mut g.dev).unwrap();
    assert!(g.take_xfers().is_empty());
    assert_eq!(*g.sent.0.lock().unwrap(), vec![a, b]);
}

#[test]
fn host_frames_reach_the_guest_and_sections_are_recycled() {
    let mut g = Guest::new();
    g.connect();
    g.probe();
    let count = (64 * 4096 / RECV_SECTION) as usize;
    // More frames than sections: the rest wait until the guest completes.
    for i in 0..count + 5 {
        assert!(g.nic.receive(&frame(i as u8, 100 + i % 1400)));
    }
    g.g.run(&mut g.dev).unwrap();
    let x = g.take_xfers();
    assert_eq!(x.len(), count);
    for (i, x) in x.iter().enumerate() {
        assert_eq!(u32_at(&x.nvsp, 4), Some(0), "data channel");
        assert_eq!(u32_at(&x.data, 0), Some(rndis::PACKET));
        let off = 8 + u32_at(&x.data, 8).unwrap() as usize;
        let len = u32_at(&x.data, 12).unwrap() as usize;
        assert_eq!(x.data[off..off + len], frame(i as u8, 100 + i % 1400)[..]);
    }
    g.complete(&x[0]).unwrap();
    g.complete(&x[1]).unwrap();
    let more = g.take_xfers();
    assert_eq!(more.len(), 2, "two sections freed, two frames delivered");
}

#[test]
fn a_section_completed_twice_closes_the_channel() {
    let mut g = Guest::new();
    g.connect();
    g.probe();
    assert!(g.nic.receive(&frame(9, 64)));
    g.g.run(&mut g.dev).unwrap();
    let x = g.take_xfers();
    assert_eq!(x.len(), 1);
    g.complete(&x[0]).unwrap();
    assert!(g.complete(&x[0]).is_err());
}

#[test]
fn link_changes_are_indicated() {
    let mut g = Guest::new();
    g.connect();
    g.probe();
    g.nic.set_link(false);
    assert!(!g.nic.receive(&frame(1, 64)), "no frames while unplugged");
    g.g.run(&mut g.dev).unwrap();
    let x = g.take_xfers();
    assert_eq!(x.len(), 1);
    assert_eq!(u32_at(&x[0].data, 0), Some(rndis::INDICATE));
    assert_eq!(u32_at(&x[0].data, 8), Some(rndis::STATUS_MEDIA_DISCONNECT));
    g.complete(&x[0]).unwrap();
    assert_eq!(
        g.query(oid::GEN_MEDIA_CONNECT_STATUS, &[]),
        Some(words(&[1]))
    );
    g.nic.set_link(true);
    g.g.run(&mut g.dev).unwrap();
    let x = g.take_xfers();
    assert_eq!(u32_at(&x[0].data, 8), Some(rndis::STATUS_MEDIA_CONNECT));
}

#[test]
fn hostile_messages_close_the_channel_without_panicking() {
    // RNDIS before any buffer.
    let mut g = Guest::new();
    assert!(
        g.send_rndis(&rndis_message(rndis::INIT, &words(&[1, 1, 0, 0])), None)
            .is_err()
    );
    // A section past the send buffer.
    let mut g = Guest::new();
    g.connect();
    let m = nvsp(msg::SEND_RNDIS_PKT, &[1, 1000, 64]);
    g.g.send_inband(9, &m).unwrap();
    assert!(g.g.run(&mut g.dev).is_err());
    // An RNDIS length past its buffer.
    let mut g = Guest::new();
    g.connect();
    let mut m = rndis_message(rndis::QUERY, &words(&[1, 2, 3, 4, 5]));
    m[4..8].copy_from_slice(&5000u32.to_le_bytes());
    assert!(g.send_rndis(&m, Some(0)).is_err());
    // A truncated NVSP message.
    let mut g = Guest::new();
    g.g.send_inband(1, &1u32.to_le_bytes()).unwrap();
    assert!(g.g.run(&mut g.dev).is_err());
    // Data offsets outside the message are dropped frames, not errors.
    let mut g = Guest::new();
    g.connect();
    g.probe();
    let m = rndis_message(
        rndis::PACKET,
        &words(&[0xffff_fff0, 100, 0, 0, 0, 0, 0, 0, 0]),
    );
    g.send_rndis(&m, Some(1)).unwrap();
    assert_eq!(g.nic.stats.tx_dropped.load(Ordering::Relaxed), 1);
    assert!(g.sent.0.lock().unwrap().is_empty());
    // A receive buffer that is not a GPADL is refused with a status, not an error.
    let mut g = Guest::new();
    g.request(&nvsp(msg::INIT, &[0x60001, 0x60001])).unwrap();
    let r = g.request(&nvsp(msg::SEND_RECV_BUF, &[0x999])).unwrap();
    assert_eq!(u32_at(&r, 4), Some(status::FAIL));
}

#[test]
fn unknown_oids_are_not_supported() {
    let mut g = Guest::new();
    g.connect();
    g.probe();
    assert_eq!(g.query(0x1234_5678, &[]), None);
    let r = g.control(rndis::SET, &[0x1234_5678, 0, 20, 0], &[]);
    assert_eq!(u32_at(&r, 12), Some(rndis::STATUS_NOT_SUPPORTED));
    let r = g.control(rndis::KEEPALIVE, &[], &[]);
    assert_eq!(u32_at(&r, 12), Some(rndis::STATUS_SUCCESS));
}

/// A frame and what the backend was left to do with it.
type Handed = (Vec<u8>, crate::offload::Offload);

#[derive(Clone, Default)]
struct Offloading(Arc<Mutex<Vec<Handed>>>);

impl Transmit for Offloading {
    fn transmit(&mut self, frame: &[u8], o: &crate::offload::Offload) -> std::io::Result<()> {
        self.0.lock().unwrap().push((frame.to_vec(), *o));
        Ok(())
    }

    fn offloads(&self) -> bool {
        true
    }
}

/// With a backend that takes the work, the guest is offered checksum and large-send
/// offload, and a large send reaches the backend as one frame with its segment size.
#[test]
fn large_sends_reach_an_offloading_backend_whole() {
    let sent = Offloading::default();
    let (mut dev, _nic) = Netvsp::new(0, MAC, Box::new(sent.clone())).unwrap();
    let mut g = Guest::new();
    g.dev = {
        g.g.open(&mut dev).unwrap();
        dev
    };
    g.connect();
    g.probe_offloads();
    // A 4000-byte TCP payload over IPv4, as netvsc_xmit leaves it for a large send.
    let mut f = frame(0, 14 + 20 + 20 + 4000);
    f[14] = 0x45;
    f[14 + 9] = 6;
    f[14 + 2..14 + 4].copy_from_slice(&[0, 0]);
    f[34 + 12] = 5 << 4;
    let ppi = words(&[16, 2, 12, 1448 | (34 << 20) | (1 << 30)]);
    let mut b = words(&[36 + 16, f.len() as u32, 0, 0, 0, 36, 16, 0, 0]);
    b.extend_from_slice(&ppi);
    b.extend_from_slice(&f);
    let m = rndis_message(rndis::PACKET, &b);
    let pfns = g.g.alloc(2).unwrap();
    let list = PageList::new(0, m.len() as u32, pfns).unwrap();
    list.write(g.g.memory(), 0, &m).unwrap();
    g.g.send_gpa_direct(
        99,
        &[list],
        &nvsp(msg::SEND_RNDIS_PKT, &[0, protocol::NO_SECTION, 0]),
    )
    .unwrap();
    g.g.run(&mut g.dev).unwrap();
    let got = sent.0.lock().unwrap();
    assert_eq!(got.len(), 1);
    let (frame, o) = &got[0];
    assert_eq!(frame.len(), f.len());
    assert_eq!(o.gso.unwrap().mss, 1448);
    assert_eq!(
        u16::from_be_bytes([frame[16], frame[17]]) as usize,
        f.len() - 14,
        "the IPv4 total length is filled in"
    );
}
