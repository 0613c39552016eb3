//! The synthetic network adapter (netvsp) that Linux's `hv_netvsc` drives over VMBus.
//!
//! The guest negotiates an NVSP version, hands over a receive buffer and a send buffer (two
//! GPADLs), and then speaks RNDIS inside NVSP `SEND_RNDIS_PKT` messages: control requests
//! (initialize, query, set) and Ethernet frames. Frames and control replies to the guest are
//! written into sections of its receive buffer and announced with transfer-page packets;
//! the guest completes each one, which frees the section.
//!
//! Every byte from the guest is hostile: lengths and offsets are checked, buffers the guest
//! offers are capped, and a packet the device cannot accept is a [`VspError`] that closes
//! the channel (the VM goes on). Each NVSP and RNDIS request the guest sends waits without a
//! timeout in Linux, so every request that expects an answer gets one.
//!
//! Frames leave through a [`Transmit`] (a TAP in the worker) and arrive through the
//! [`NicHandle`]'s queue, which wakes the channel thread.

#![forbid(unsafe_code)]

pub mod offload;
pub mod protocol;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmbus_core::memory::{Gpadl, PageList};
use vmbus_core::messages::Guid;
use vmbus_core::ring::{Packet, pkt};
use vmbus_core::{Channel, OfferParams, TransferRange, Vsp, VspError, Wakeup};

use protocol::{msg, oid, rndis, status, u16_at, u32_at};

/// The netvsc device class `f8615163-df3e-46c5-913f-f2d2f965ed0e`.
pub const NET_CLASS: Guid = Guid::new(
    0xf861_5163,
    0xdf3e,
    0x46c5,
    [0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65, 0xed, 0x0e],
);

/// The instance GUID of NIC `index`: stable, so the guest keeps its interface name.
pub fn instance_guid(index: u8) -> Guid {
    Guid::new(
        0x5061_7276,
        0x6973,
        0x4e49,
        [0x43, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, index],
    )
}

/// Bytes of one receive-buffer section: a 1514-byte frame, the 44-byte RNDIS header and
/// room to spare (Linux's own default, `NETVSC_RECV_SECTION_SIZE`).
pub const RECV_SECTION: u32 = 1728;
/// Bytes of one send-buffer section (Linux's `NETVSC_SEND_SECTION_SIZE`).
pub const SEND_SECTION: u32 = 6144;
/// Largest receive buffer used (Linux allows 31 MiB; more only wastes sections).
pub const MAX_RECV_BUFFER: usize = 32 << 20;
/// Largest send buffer accepted (Linux's `NETVSC_SEND_BUFFER_SIZE`).
pub const MAX_SEND_BUFFER: usize = 15 << 20;
/// Largest Ethernet frame either way (no offloads are offered, so MTU 1500 plus a VLAN
/// tag; the guest may raise its MTU to 9000).
pub const MAX_FRAME: usize = 9018;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Largest RNDIS data a guest sends in one NVSP message (a batch of packets).
pub const MAX_RNDIS_BYTES: usize = 64 << 10;
/// Frames waiting for the guest before new ones are dropped (as a NIC's ring would).
pub const MAX_RX_QUEUE: usize = 1024;
/// MTU the device reports.
pub const MTU: u32 = 1500;
/// Link speed reported, in units of 100 bit/s: 10 Gbit/s.
const LINK_SPEED: u32 = 100_000_000;

/// Where the guest's frames go.
pub trait Transmit: Send {
    /// Send one Ethernet frame, with the checksum and segmentation work `offload` leaves
    /// to the backend (always none unless [`Transmit::offloads`]). A failure drops the
    /// frame (it is logged by the caller).
    fn transmit(&mut self, frame: &[u8], offload: &offload::Offload) -> std::io::Result<()>;

    /// Whether the backend completes checksums and cuts large sends into segments (a TAP
    /// with virtio-net headers): the guest is then offered both.
    fn offloads(&self) -> bool {
        false
    }
}

/// Counters for tests, logs and the agent.
#[derive(Debug, Default)]
pub struct NicStats {
    pub rx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
}

/// The host side of one NIC: frames for the guest, the link state, counters.
#[derive(Debug)]
pub struct NicHandle {
    rx: Mutex<VecDeque<Vec<u8>>>,
    link_up: AtomicBool,
    wakeup: Arc<Wakeup>,
    pub stats: NicStats,
}

impl NicHandle {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            rx: Mutex::new(VecDeque::new()),
            link_up: AtomicBool::new(true),
            wakeup: Arc::new(Wakeup::new()?),
            stats: NicStats::default(),
        })
    }

    /// Queue a frame for the guest; false (and the frame dropped) when it is not an
    /// Ethernet frame, the link is down or the queue is full.
    pub fn receive(&self, frame: &[u8]) -> bool {
        let ok = (MIN_FRAME..=MAX_FRAME).contains(&frame.len())
            && self.link_up.load(Ordering::Relaxed)
            && {
                let mut q = lock(&self.rx);
                if q.len() < MAX_RX_QUEUE {
                    q.push_back(frame.to_vec());
                    true
                } else {
                    false
                }
            };
        if ok {
            self.wakeup.signal();
        } else {
            self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Connect or disconnect the cable; the guest hears of it at once.
    pub fn set_link(&self, up: bool) {
        self.link_up.store(up, Ordering::Relaxed);
        self.wakeup.signal();
    }

    /// Whether the cable is connected.
    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Relaxed)
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest's receive buffer, cut into sections.
struct RecvBuffer {
    gpadl: Arc<Gpadl>,
    set_id: u16,
    free: Vec<u32>,
    count: u32,
}

/// The guest's send buffer.
struct SendBuffer {
    gpadl: Arc<Gpadl>,
    sections: u32,
}

/// Tag in the transaction id of the transfer-page packets the device sends: the section
/// index is in the low bits.
const XFER_TAG: u64 = 0x6e76_7370 << 32;

/// One synthetic NIC.
pub struct Netvsp {
    index: u8,
    mac: [u8; 6],
    tx: Box<dyn Transmit>,
    handle: Arc<NicHandle>,
    version: Option<u32>,
    recv: Option<RecvBuffer>,
    send: Option<SendBuffer>,
    /// RNDIS initialized and a packet filter set: frames may flow to the guest.
    filter: u32,
    rndis_initialized: bool,
    /// Control replies waiting for a free section.
    pending: VecDeque<Vec<u8>>,
    /// The link state the guest last heard.
    reported_link: bool,
}

impl std::fmt::Debug for Netvsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netvsp")
            .field("index", &self.index)
            .field("mac", &self.mac)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Netvsp {
    /// NIC `index` with address `mac`, sending the guest's frames to `tx`.
    pub fn new(
        index: u8,
        mac: [u8; 6],
        tx: Box<dyn Transmit>,
    ) -> std::io::Result<(Self, Arc<NicHandle>)> {
        let handle = Arc::new(NicHandle::new()?);
        Ok((
            Self {
                index,
                mac,
                tx,
                handle: handle.clone(),
                version: None,
                recv: None,
                send: None,
                filter: 0,
                rndis_initialized: false,
                pending: VecDeque::new(),
                reported_link: true,
            },
            handle,
        ))
    }

    fn reset(&mut self) {
        self.version = None;
        self.recv = None;
        self.send = None;
        self.filter = 0;
        self.rndis_initialized = false;
        self.pending.clear();
        self.reported_link = true;
    }

    /// Answer a request packet with a completion carrying an NVSP message, when the guest
    /// asked for one.
    fn reply(
        &self,
        p: &Packet,
        ch: &mut dyn Channel,
        kind: u32,
        words: &[u32],
    ) -> Result<(), VspError> {
        if p.header.flags & pkt::FLAG_COMPLETION_REQUESTED != 0 {
            ch.complete(p.header.trans_id, &protocol::nvsp(kind, words))?;
        }
        Ok(())
    }

    fn nvsp(&mut self, p: &Packet, ch: &mut dyn Channel) -> Result<(), VspError> {
        let m = p.payload();
        let kind = u32_at(m, 0).ok_or_else(|| bad("NVSP message shorter than its type"))?;
        let word = |at: usize| u32_at(m, at).ok_or_else(|| bad("NVSP message too short"));
        match kind {
            msg::INIT => {
                let (min, max) = (word(4)?, word(8)?);
                let chosen = protocol::NVSP_VERSIONS
                    .iter()
                    .rev()
                    .find(|v| (min..=max).contains(v))
                    .copied();
                self.version = chosen;
                tracing::debug!(nic = self.index, min, max, ?chosen, "NVSP init");
                let (ver, st) = match chosen {
                    Some(v) => (v, status::SUCCESS),
                    None => (0, status::FAIL),
                };
                self.reply(p, ch, msg::INIT_COMPLETE, &[ver, 0, st])
            }
            msg::SEND_NDIS_CONFIG | msg::SEND_NDIS_VERSION => self.reply(p, ch, kind, &[]),
            msg::SEND_RECV_BUF => {
                let gpadl_id = word(4)?;
                let set_id = u16_at(m, 8).ok_or_else(|| bad("NVSP message too short"))?;
                let words = match self.take_recv_buffer(gpadl_id, set_id, ch) {
                    Ok(count) => vec![
                        status::SUCCESS,
                        1,
                        0,
                        RECV_SECTION,
                        count,
                        RECV_SECTION * count,
                    ],
                    Err(why) => {
                        tracing::warn!(nic = self.index, "receive buffer refused: {why}");
                        vec![status::FAIL, 0]
                    }
                };
                self.reply(p, ch, msg::SEND_RECV_BUF_COMPLETE, &words)
            }
            msg::SEND_SEND_BUF => {
                let gpadl_id = word(4)?;
                let words = match ch.gpadl(gpadl_id) {
                    Some(g) if g.len() >= SEND_SECTION as usize && g.len() <= MAX_SEND_BUFFER => {
                        self.send = Some(SendBuffer {
                            sections: (g.len() / SEND_SECTION as usize) as u32,
                            gpadl: g,
                        });
                        vec![status::SUCCESS, SEND_SECTION]
                    }
                    _ => {
                        tracing::warn!(nic = self.index, gpadl_id, "send buffer refused");
                        vec![status::FAIL, 0]
                    }
                };
                self.reply(p, ch, msg::SEND_SEND_BUF_COMPLETE, &words)
            }
            msg::REVOKE_RECV_BUF => {
                self.recv = None;
                self.pending.clear();
                self.reply(p, ch, kind, &[])
            }
            msg::REVOKE_SEND_BUF => {
                self.send = None;
                self.reply(p, ch, kind, &[])
            }
            msg::SEND_RNDIS_PKT => {
                let section = word(8)?;
                let size = word(12)?;
                let mut data = self.rndis_bytes(p, ch, section, size)?;
                self.rndis(&mut data, ch)?;
                if p.header.flags & pkt::FLAG_COMPLETION_REQUESTED != 0 {
                    ch.complete(
                        p.header.trans_id,
                        &protocol::nvsp(msg::SEND_RNDIS_PKT_COMPLETE, &[status::SUCCESS]),
                    )?;
                }
                Ok(())
            }
            msg::SUBCHANNEL => self.reply(p, ch, msg::SUBCHANNEL, &[status::FAIL, 0]),
            msg::SWITCH_DATA_PATH => {
                if p.header.flags & pkt::FLAG_COMPLETION_REQUESTED != 0 {
                    ch.complete(p.header.trans_id, &[])?;
                }
                Ok(())
            }
            other => {
                tracing::debug!(nic = self.index, other, "NVSP message ignored");
                self.reply(p, ch, other, &[status::FAIL])
            }
        }
    }

    fn take_recv_buffer(
        &mut self,
        gpadl_id: u32,
        set_id: u16,
        ch: &mut dyn Channel,
    ) -> Result<u32, String> {
        let g = ch
            .gpadl(gpadl_id)
            .ok_or_else(|| format!("GPADL {gpadl_id} does not exist"))?;
        let usable = g.len().min(MAX_RECV_BUFFER);
        let count = (usable / RECV_SECTION as usize) as u32;
        if count < 2 {
            return Err(format!("{} bytes is too small", g.len()));
        }
        self.recv = Some(RecvBuffer {
            gpadl: g,
            set_id,
            // Popped from the end: section 0 goes first.
            free: (0..count).rev().collect(),
            count,
        });
        Ok(count)
    }

    /// The RNDIS bytes of a `SEND_RNDIS_PKT`: a send-buffer section, the packet's page
    /// buffers, or both (Linux copies a batch and the last packet's RNDIS header into the
    /// section and leaves that packet's frame in page buffers: a "partial copy").
    fn rndis_bytes(
        &self,
        p: &Packet,
        ch: &mut dyn Channel,
        section: u32,
        size: u32,
    ) -> Result<Vec<u8>, VspError> {
        let mut data = Vec::new();
        if section != protocol::NO_SECTION {
            let send = self
                .send
                .as_ref()
                .ok_or_else(|| bad("send-buffer section named before any send buffer"))?;
            if section >= send.sections || size > SEND_SECTION {
                return Err(bad("send-buffer section out of range"));
            }
            data.resize(size as usize, 0);
            send.gpadl.read(
                ch.memory(),
                section as usize * SEND_SECTION as usize,
                &mut data,
            )?;
        }
        if p.header.ptype == pkt::DATA_USING_GPA_DIRECT {
            let lists: Vec<PageList> = p.gpa_direct()?;
            let total: usize = lists.iter().map(|l| l.len()).sum();
            if data.len() + total > MAX_RNDIS_BYTES {
                return Err(bad("RNDIS packet larger than 64 KiB"));
            }
            let mut at = data.len();
            data.resize(at + total, 0);
            for l in &lists {
                l.read(ch.memory(), 0, &mut data[at..at + l.len()])?;
                at += l.len();
            }
        } else if section == protocol::NO_SECTION {
            return Err(bad("RNDIS packet with neither a section nor page buffers"));
        }
        Ok(data)
    }

    /// One or more RNDIS messages, back to back.
    fn rndis(&mut self, mut data: &mut [u8], ch: &mut dyn Channel) -> Result<(), VspError> {
        while data.len() >= 8 {
            let kind = u32_at(data, 0).unwrap_or(0);
            let len = u32_at(data, 4).unwrap_or(0) as usize;
            if len < 8 || len > data.len() {
                return Err(bad("RNDIS message length outside its buffer"));
            }
            let (m, rest) = std::mem::take(&mut data).split_at_mut(len);
            self.rndis_message(kind, m, ch)?;
            data = rest;
        }
        Ok(())
    }

    fn rndis_message(
        &mut self,
        kind: u32,
        m: &mut [u8],
        ch: &mut dyn Channel,
    ) -> Result<(), VspError> {
        let req_id = u32_at(m, 8);
        match kind {
            rndis::PACKET => {
                self.transmit(m);
                Ok(())
            }
            rndis::INIT => {
                let req_id = req_id.ok_or_else(|| bad("RNDIS initialize too short"))?;
                self.rndis_initialized = true;
                // Up to 8 packets per message, aligned to 8 bytes (2^3).
                let body = protocol::words(&[
                    req_id,
                    rndis::STATUS_SUCCESS,
                    1,
                    0,
                    1,
                    0,
                    8,
                    MAX_RNDIS_BYTES as u32,
                    3,
                    0,
                    0,
                ]);
                self.control(rndis::INIT | rndis::COMPLETION, &body, ch)
            }
            rndis::QUERY => {
                let (Some(req_id), Some(id)) = (req_id, u32_at(m, 12)) else {
                    return Err(bad("RNDIS query too short"));
                };
                let input = info_buffer(m);
                let answer = self.query(id, input);
                let mut body = match &answer {
                    Some(data) => {
                        protocol::words(&[req_id, rndis::STATUS_SUCCESS, data.len() as u32, 16])
                    }
                    None => protocol::words(&[req_id, rndis::STATUS_NOT_SUPPORTED, 0, 0]),
                };
                if let Some(data) = answer {
                    body.extend_from_slice(&data);
                }
                self.control(rndis::QUERY | rndis::COMPLETION, &body, ch)
            }
            rndis::SET => {
                let (Some(req_id), Some(id)) = (req_id, u32_at(m, 12)) else {
                    return Err(bad("RNDIS set too short"));
                };
                let st = self.set(id, info_buffer(m));
                let body = protocol::words(&[req_id, st]);
                self.control(rndis::SET | rndis::COMPLETION, &body, ch)
            }
            rndis::KEEPALIVE => {
                let req_id = req_id.ok_or_else(|| bad("RNDIS keepalive too short"))?;
                let body = protocol::words(&[req_id, rndis::STATUS_SUCCESS]);
                self.control(rndis::KEEPALIVE | rndis::COMPLETION, &body, ch)
            }
            rndis::RESET => {
                self.filter = 0;
                let body = protocol::words(&[rndis::STATUS_SUCCESS, 0]);
                self.control(rndis::RESET | rndis::COMPLETION, &body, ch)
            }
            rndis::HALT => {
                self.rndis_initialized = false;
                self.filter = 0;
                Ok(())
            }
            other => {
                tracing::debug!(nic = self.index, other, "RNDIS message ignored");
                Ok(())
            }
        }
    }

    fn query(&self, id: u32, input: &[u8]) -> Option<Vec<u8>> {
        let word = |v: u32| Some(v.to_le_bytes().to_vec());
        match id {
            oid::GEN_MAXIMUM_FRAME_SIZE => word(MTU),
            oid::GEN_MAXIMUM_TOTAL_SIZE => word(MTU + 14),
            oid::GEN_LINK_SPEED => word(LINK_SPEED),
            // NdisMediaStateConnected is 0.
            oid::GEN_MEDIA_CONNECT_STATUS => word(u32::from(!self.handle.link_up())),
            oid::GEN_CURRENT_PACKET_FILTER => word(self.filter),
            oid::P802_3_PERMANENT_ADDRESS | oid::P802_3_CURRENT_ADDRESS => Some(self.mac.to_vec()),
            oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES => {
                // No offloads: an NDIS_OFFLOAD object of the revision the guest asked for
                // (its size says which), all capabilities zero.
                let size = match input.len() {
                    n if n >= protocol::NDIS_OFFLOAD_SIZE => protocol::NDIS_OFFLOAD_SIZE,
                    n if n >= protocol::NDIS_OFFLOAD_SIZE_6_1 => protocol::NDIS_OFFLOAD_SIZE_6_1,
                    _ => protocol::NDIS_OFFLOAD_SIZE_6_0,
                };
                let revision = match size {
                    protocol::NDIS_OFFLOAD_SIZE => 3,
                    protocol::NDIS_OFFLOAD_SIZE_6_1 => 2,
                    _ => 1,
                };
                let mut o = vec![0u8; size];
                o[0] = protocol::NDIS_OBJECT_TYPE_OFFLOAD;
                o[1] = revision;
                o[2..4].copy_from_slice(&(size as u16).to_le_bytes());
                if self.tx.offloads() {
                    offload::advertise(&mut o);
                }
                Some(o)
            }
            _ => None,
        }
    }

    fn set(&mut self, id: u32, input: &[u8]) -> u32 {
        match id {
            oid::GEN_CURRENT_PACKET_FILTER => match u32_at(input, 0) {
                Some(f) => {
                    self.filter = f;
                    tracing::debug!(nic = self.index, filter = f, "packet filter");
                    rndis::STATUS_SUCCESS
                }
                None => rndis::STATUS_INVALID_DATA,
            },
            // Offloads stay off whatever the guest asks (none were offered).
            oid::TCP_OFFLOAD_PARAMETERS
            | oid::OFFLOAD_ENCAPSULATION
            | oid::P802_3_MULTICAST_LIST => rndis::STATUS_SUCCESS,
            _ => rndis::STATUS_NOT_SUPPORTED,
        }
    }

    /// An RNDIS data message from the guest: its frame goes out, with what the guest left
    /// to the backend (checksums, segmentation) when the backend offered to do it.
    fn transmit(&mut self, m: &mut [u8]) {
        let stats = &self.handle.stats;
        let range = (|| {
            let offset = u32_at(m, 8)? as usize;
            let len = u32_at(m, 12)? as usize;
            let start = 8usize.checked_add(offset)?;
            let end = start.checked_add(len)?;
            (end <= m.len() && start >= 8 + rndis::PACKET_HEADER).then_some(start..end)
        })();
        let Some(range) = range else {
            stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (head, rest) = m.split_at_mut(range.start);
        let frame = &mut rest[..range.len()];
        let o = if self.tx.offloads() {
            offload::take(head, frame)
        } else {
            Some(offload::Offload::default())
        };
        let max = if o.is_some_and(|o| o.gso.is_some()) {
            offload::LSO_MAX as usize + 14 + 60 + 60
        } else {
            MAX_FRAME
        };
        match o {
            Some(o) if (MIN_FRAME..=max).contains(&frame.len()) && self.handle.link_up() => {
                match self.tx.transmit(frame, &o) {
                    Ok(()) => stats.tx_frames.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::debug!(nic = self.index, "frame not sent: {e}");
                        stats.tx_dropped.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            _ => {
                stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Send a control reply (or queue it until a section is free).
    fn control(&mut self, kind: u32, body: &[u8], ch: &mut dyn Channel) -> Result<(), VspError> {
        let m = protocol::rndis_message(kind, body);
        if self.pending.is_empty() && self.deliver(&m, 1, ch)? {
            return Ok(());
        }
        if self.pending.len() >= 64 {
            return Err(bad("the guest stopped completing control replies"));
        }
        self.pending.push_back(m);
        Ok(())
    }

    /// Write `m` into a free receive section and announce it; false when none is free.
    fn deliver(
        &mut self,
        m: &[u8],
        channel_type: u32,
        ch: &mut dyn Channel,
    ) -> Result<bool, VspError> {
        let recv = self
            .recv
            .as_mut()
            .ok_or_else(|| bad("RNDIS traffic before a receive buffer"))?;
        if m.len() > RECV_SECTION as usize {
            return Err(bad("reply larger than a receive section"));
        }
        let Some(section) = recv.free.pop() else {
            return Ok(false);
        };
        let offset = section * RECV_SECTION;
        recv.gpadl.write(ch.memory(), offset as usize, m)?;
        let ranges = [TransferRange {
            byte_count: m.len() as u32,
            byte_offset: offset,
        }];
        let payload = protocol::nvsp(
            msg::SEND_RNDIS_PKT,
            &[channel_type, protocol::NO_SECTION, 0],
        );
        let set_id = recv.set_id;
        if let Err(e) =
            ch.send_transfer_pages(set_id, &ranges, XFER_TAG | u64::from(section), &payload)
        {
            if let Some(r) = self.recv.as_mut() {
                r.free.push(section);
            }
            return Err(e);
        }
        Ok(true)
    }

    /// The guest completed a transfer-page packet: its section is free again.
    fn completion(&mut self, p: &Packet) -> Result<(), VspError> {
        let id = p.header.trans_id;
        if id & !0xffff_ffff != XFER_TAG {
            // A completion of nothing we sent (Linux completes only ours).
            return Err(bad("completion of a packet the device never sent"));
        }
        let section = (id & 0xffff_ffff) as u32;
        let Some(recv) = self.recv.as_mut() else {
            return Ok(());
        };
        if section >= recv.count || recv.free.contains(&section) {
            return Err(bad("completion of a free receive section"));
        }
        recv.free.push(section);
        Ok(())
    }

    /// Flush queued control replies, report a link change, then hand the guest frames
    /// while sections are free.
    fn flush(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        if self.recv.is_none() {
            return Ok(());
        }
        while let Some(m) = self.pending.pop_front() {
            if !self.deliver(&m, 1, ch)? {
                self.pending.push_front(m);
                return Ok(());
            }
        }
        let link = self.handle.link_up();
        if self.rndis_initialized && link != self.reported_link {
            let st = if link {
                rndis::STATUS_MEDIA_CONNECT
            } else {
                rndis::STATUS_MEDIA_DISCONNECT
            };
            let m = protocol::rndis_message(rndis::INDICATE, &protocol::words(&[st, 0, 0]));
            if !self.deliver(&m, 1, ch)? {
                return Ok(());
            }
            self.reported_link = link;
        }
        if self.filter == 0 || !self.rndis_initialized {
            // Not open: frames for it are dropped, as a closed NIC's are.
            let n = lock(&self.handle.rx).drain(..).count();
            self.handle
                .stats
                .rx_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
            return Ok(());
        }
        loop {
            let Some(frame) = lock(&self.handle.rx).pop_front() else {
                return Ok(());
            };
            let mut m = Vec::with_capacity(8 + rndis::PACKET_HEADER + frame.len());
            m.extend_from_slice(&rndis::PACKET.to_le_bytes());
            m.extend_from_slice(&((8 + rndis::PACKET_HEADER + frame.len()) as u32).to_le_bytes());
            m.extend_from_slice(&protocol::words(&[
                rndis::PACKET_HEADER as u32,
                frame.len() as u32,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ]));
            m.extend_from_slice(&frame);
            if m.len() > RECV_SECTION as usize {
                // A jumbo frame cannot fit a section: dropped.
                self.handle.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !self.deliver(&m, 0, ch)? {
                lock(&self.handle.rx).push_front(frame);
                return Ok(());
            }
            self.handle.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The information buffer of a query or set: `info_buflen` bytes at `info_buf_offset`
/// from the request id (empty when they point outside the message).
fn info_buffer(m: &[u8]) -> &[u8] {
    let (Some(len), Some(offset)) = (u32_at(m, 16), u32_at(m, 20)) else {
        return &[];
    };
    let start = 8usize.saturating_add(offset as usize);
    start
        .checked_add(len as usize)
        .and_then(|end| m.get(start..end))
        .unwrap_or(&[])
}

fn bad(what: &str) -> VspError {
    VspError::Protocol(what.into())
}

impl Vsp for Netvsp {
    fn name(&self) -> &'static str {
        "netvsp"
    }

    fn offer(&self) -> OfferParams {
        OfferParams {
            class: NET_CLASS,
            instance: instance_guid(self.index),
            flags: 0,
            mmio_megabytes: 0,
            pipe_mode: 0,
        }
    }

    fn opened(&mut self, _ch: &mut dyn Channel) -> Result<(), VspError> {
        self.reset();
        Ok(())
    }

    fn packet(&mut self, p: &Packet, ch: &mut dyn Channel) -> Result<(), VspError> {
        match p.header.ptype {
            pkt::COMP => self.completion(p)?,
            pkt::DATA_INBAND | pkt::DATA_USING_GPA_DIRECT => self.nvsp(p, ch)?,
            _ => return Err(bad("unexpected VMBus packet type")),
        }
        self.flush(ch)
    }

    fn poll_host(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        self.flush(ch)
    }

    fn closed(&mut self) {
        self.reset();
    }

    fn host_wakeup(&self) -> Option<Arc<Wakeup>> {
        Some(self.handle.wakeup.clone())
    }
}
