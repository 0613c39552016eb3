//! The VMBus control plane: version negotiation, offers, GPADLs, open/close, unload,
//! rescind and modify (VMBUS-ON-KVM.md §2). One thread runs it, strictly in message order.
//!
//! Every guest message is hostile input. Problems the guest can cause are answered with a
//! failure status where the protocol has one (open, GPADL), otherwise dropped and logged with
//! a rate limit; nothing a guest sends can panic the VMM or grow memory without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use vmbus_core::memory::{Gpadl as GpadlPages, PageList};
use vmbus_core::messages::{self as proto, GuestMessage, msgtype, version};
use vmbus_core::ring::{self, InRing, OutRing};
use vmbus_core::{SharedVsp, Wakeup};

use super::channel::{ChannelStart, GpadlTable, LogLimit, OpenChannel};
use crate::hv::VMBUS_SINT;
use crate::hv::synic::{PostResult, Synic};

/// Protocol versions we accept (Linux 6.1 asks for them in this order).
pub const SUPPORTED_VERSIONS: &[u32] = &[
    version::WIN10_V5_3,
    version::WIN10_V5_2,
    version::WIN10_V5_1,
    version::WIN10_V5,
    version::WIN10_RS3,
    version::WIN10,
    version::WIN8_1,
    version::WIN8,
];

/// Most GPADLs alive at once (each at most 64 KiB of PFNs).
pub const MAX_GPADLS: usize = 256;
/// Most host→guest messages waiting for a free slot.
pub const MAX_OUTGOING: usize = 1024;
/// First channel connection id (QEMU uses 16 + relid too).
pub const CONNECTION_ID_BASE: u32 = 0x10;

/// Doorbells by connection id, shared with the vCPUs (HvSignalEvent exits).
pub type Doorbells = Arc<RwLock<HashMap<u32, Arc<Wakeup>>>>;

static GUEST_ERRORS: LogLimit = LogLimit(std::sync::atomic::AtomicU32::new(0));

#[derive(Debug)]
enum ChannelState {
    Offered,
    Open(OpenChannel),
    /// Rescinded by the host; waiting for RELID_RELEASED.
    Rescinded,
}

struct Channel {
    relid: u32,
    conn_id: u32,
    vsp: SharedVsp,
    state: ChannelState,
    /// The GPADL holding the open channel's rings.
    ring_gpadl: Option<u32>,
}

/// A GPADL being described (header, then bodies) or complete.
#[derive(Debug)]
struct Gpadl {
    relid: u32,
    rangecount: u16,
    expected: usize,
    data: Vec<u8>,
    /// Set once complete (also in the shared table the channels look GPADLs up in).
    done: Option<Arc<GpadlPages>>,
}

/// The bus's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// No INITIATE_CONTACT accepted yet (or unloaded).
    Disconnected,
    /// Connected at `version`, messages go to `target_vp`.
    Connected { version: u32, target_vp: u32 },
}

/// The control plane.
pub struct Control {
    synic: Arc<Synic>,
    vm: Option<Arc<VmFd>>,
    channels: Vec<Channel>,
    gpadls: HashMap<u32, Gpadl>,
    /// The complete GPADLs, for the channel threads.
    table: GpadlTable,
    outgoing: VecDeque<Vec<u8>>,
    connection: Connection,
    doorbells: Doorbells,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("connection", &self.connection)
            .field("channels", &self.channels.len())
            .finish()
    }
}

fn guest_error(what: &str) {
    if GUEST_ERRORS.allow() {
        tracing::warn!("VMBus: ignoring a bad guest message: {what}");
    }
}

impl Control {
    /// A control plane offering `vsps` (relids 1..). With `vm`, channel doorbells are
    /// registered with KVM_HYPERV_EVENTFD so HvSignalEvent does not exit.
    pub fn new(
        synic: Arc<Synic>,
        vm: Option<Arc<VmFd>>,
        vsps: Vec<SharedVsp>,
        doorbells: Doorbells,
    ) -> Self {
        let channels = vsps
            .into_iter()
            .zip(1u32..)
            .map(|(vsp, relid)| Channel {
                relid,
                conn_id: CONNECTION_ID_BASE + relid,
                vsp,
                state: ChannelState::Offered,
                ring_gpadl: None,
            })
            .collect();
        Self {
            synic,
            vm,
            channels,
            gpadls: HashMap::new(),
            table: GpadlTable::default(),
            outgoing: VecDeque::new(),
            connection: Connection::Disconnected,
            doorbells,
        }
    }

    /// Current connection.
    pub fn connection(&self) -> Connection {
        self.connection
    }

    /// Whether any message waits for a free slot.
    pub fn has_outgoing(&self) -> bool {
        !self.outgoing.is_empty()
    }

    fn send(&mut self, msg: Vec<u8>) {
        if self.outgoing.len() >= MAX_OUTGOING {
            guest_error("host message queue full (the guest does not consume messages)");
            self.outgoing.pop_front();
        }
        self.outgoing.push_back(msg);
        self.pump();
    }

    /// Deliver queued messages while the target slot is free.
    pub fn pump(&mut self) {
        let Connection::Connected { target_vp, .. } = self.connection else {
            self.outgoing.clear();
            return;
        };
        while let Some(m) = self.outgoing.front() {
            match self.synic.post(target_vp, VMBUS_SINT, 1, m) {
                PostResult::Delivered => {
                    self.outgoing.pop_front();
                }
                PostResult::Busy | PostResult::NoPage => break,
            }
        }
    }

    /// Close every channel and forget every GPADL (INITIATE_CONTACT, UNLOAD, reset).
    pub fn reset(&mut self) {
        for i in 0..self.channels.len() {
            self.close(i);
            if matches!(self.channels[i].state, ChannelState::Rescinded) {
                continue;
            }
        }
        self.gpadls.clear();
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.outgoing.clear();
        self.connection = Connection::Disconnected;
    }

    fn close(&mut self, i: usize) {
        let ch = &mut self.channels[i];
        if let ChannelState::Open(mut open) =
            std::mem::replace(&mut ch.state, ChannelState::Offered)
        {
            open.stop();
            let db = self
                .doorbells
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ch.conn_id);
            if let (Some(vm), Some(db)) = (&self.vm, db) {
                let _ = crate::hv::kvm::hyperv_eventfd(vm, ch.conn_id, &db, true);
            }
        } else if matches!(ch.state, ChannelState::Offered) {
            // Already closed.
        }
    }

    fn channel(&self, relid: u32) -> Option<usize> {
        self.channels.iter().position(|c| c.relid == relid)
    }

    /// Handle one message the guest posted on `conn_id`.
    pub fn handle(&mut self, conn_id: u32, bytes: &[u8]) {
        let msg = match proto::parse(bytes) {
            Ok(m) => m,
            Err(e) => return guest_error(&e.to_string()),
        };
        tracing::debug!(?msg, conn_id, "VMBus message");
        if let GuestMessage::InitiateContact(c) = &msg {
            self.initiate_contact(conn_id, c);
            return;
        }
        let Connection::Connected { version, .. } = self.connection else {
            return guest_error("message before INITIATE_CONTACT");
        };
        match msg {
            GuestMessage::InitiateContact(_) => {}
            GuestMessage::RequestOffers => {
                for i in 0..self.channels.len() {
                    if matches!(self.channels[i].state, ChannelState::Rescinded) {
                        continue;
                    }
                    let o = crate::devices::bus::lock(&self.channels[i].vsp).offer();
                    let m = proto::offer(&proto::Offer {
                        class: o.class,
                        instance: o.instance,
                        flags: o.flags,
                        mmio_megabytes: o.mmio_megabytes,
                        pipe_mode: o.pipe_mode,
                        relid: self.channels[i].relid,
                        connection_id: self.channels[i].conn_id,
                    });
                    self.send(m);
                }
                self.send(proto::bare(msgtype::ALLOFFERS_DELIVERED));
            }
            GuestMessage::GpadlHeader(h) => self.gpadl_header(h),
            GuestMessage::GpadlBody(b) => self.gpadl_body(b),
            GuestMessage::GpadlTeardown { relid, gpadl } => {
                if self.gpadls.remove(&gpadl).is_none() {
                    return guest_error("teardown of an unknown GPADL");
                }
                self.table
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&gpadl);
                // A ring GPADL torn down under an open channel: stop using it first. (A
                // device's buffer GPADL may go while its channel stays open.)
                if let Some(i) = self.channel(relid)
                    && matches!(self.channels[i].state, ChannelState::Open(_))
                    && self.channels[i].ring_gpadl == Some(gpadl)
                {
                    self.close(i);
                }
                self.send(proto::gpadl_torndown(gpadl));
            }
            GuestMessage::OpenChannel(o) => {
                let status = match self.open(&o) {
                    Ok(()) => 0,
                    Err(e) => {
                        guest_error(&format!("open of relid {} refused: {e}", o.relid));
                        1
                    }
                };
                self.send(proto::open_result(o.relid, o.openid, status));
            }
            GuestMessage::CloseChannel { relid } => match self.channel(relid) {
                Some(i) => self.close(i),
                None => guest_error("close of an unknown channel"),
            },
            GuestMessage::RelidReleased { relid } => {
                if let Some(i) = self.channel(relid)
                    && matches!(self.channels[i].state, ChannelState::Rescinded)
                {
                    self.channels.remove(i);
                }
            }
            GuestMessage::Unload => {
                self.reset();
                // reset() disconnected: answer on the VP we were talking to.
                self.connection = Connection::Connected {
                    version,
                    target_vp: self.target_vp(),
                };
                self.send(proto::bare(msgtype::UNLOAD_RESPONSE));
                self.connection = Connection::Disconnected;
            }
            GuestMessage::ModifyChannel { relid, target_vp } => {
                let status = match self.channel(relid) {
                    Some(i) if target_vp < self.synic.vp_count() => {
                        if let ChannelState::Open(o) = &self.channels[i].state {
                            o.target_vp.store(target_vp, Ordering::SeqCst);
                        }
                        0
                    }
                    _ => 1,
                };
                if version >= version::WIN10_V5_3 {
                    self.send(proto::modify_response(relid, status));
                }
            }
        }
    }

    fn target_vp(&self) -> u32 {
        match self.connection {
            Connection::Connected { target_vp, .. } => target_vp,
            Connection::Disconnected => 0,
        }
    }

    fn initiate_contact(&mut self, conn_id: u32, c: &proto::InitiateContact) {
        // Every INITIATE_CONTACT starts over (kexec and crash kernels reconnect without
        // UNLOAD).
        self.reset();
        let target_vp = if c.target_vcpu < self.synic.vp_count() {
            c.target_vcpu
        } else {
            guest_error("INITIATE_CONTACT names a VP that does not exist");
            return;
        };
        let v5 = c.version >= version::WIN10_V5;
        let sint_ok = !v5 || (c.interrupt_page_or_sint & 0xff) as u32 == VMBUS_SINT;
        let supported = SUPPORTED_VERSIONS.contains(&c.version) && sint_ok;
        let expected_conn = if v5 {
            proto::MESSAGE_CONNECTION_ID_4
        } else {
            proto::MESSAGE_CONNECTION_ID
        };
        if conn_id != expected_conn {
            tracing::debug!(
                conn_id,
                version = c.version,
                "INITIATE_CONTACT on an unexpected id"
            );
        }
        // Answer on the requested VP whether or not we accept, so the guest moves on.
        self.connection = Connection::Connected {
            version: c.version,
            target_vp,
        };
        self.send(proto::version_response(
            supported,
            proto::MESSAGE_CONNECTION_ID,
        ));
        if supported {
            tracing::info!(
                version = format_args!("{}.{}", c.version >> 16, c.version & 0xffff),
                "VMBus connected"
            );
        } else {
            self.connection = Connection::Disconnected;
        }
    }

    fn gpadl_header(&mut self, h: proto::GpadlHeader) {
        let status = (|| {
            self.channel(h.relid).ok_or("unknown channel")?;
            if self.gpadls.contains_key(&h.gpadl) {
                return Err("GPADL id already in use");
            }
            if self.gpadls.len() >= MAX_GPADLS {
                return Err("too many GPADLs");
            }
            Ok(())
        })();
        if let Err(e) = status {
            guest_error(e);
            self.send(proto::gpadl_created(h.relid, h.gpadl, 1));
            return;
        }
        let g = Gpadl {
            relid: h.relid,
            rangecount: h.rangecount,
            expected: usize::from(h.range_buflen),
            data: h.data,
            done: None,
        };
        let id = h.gpadl;
        self.gpadls.insert(id, g);
        self.maybe_complete(id);
    }

    fn gpadl_body(&mut self, b: proto::GpadlBody) {
        let Some(g) = self.gpadls.get_mut(&b.gpadl) else {
            return guest_error("GPADL body for an unknown GPADL");
        };
        if g.done.is_some() {
            return guest_error("GPADL body after the GPADL was complete");
        }
        let room = g.expected - g.data.len();
        g.data.extend_from_slice(&b.data[..b.data.len().min(room)]);
        self.maybe_complete(b.gpadl);
    }

    fn maybe_complete(&mut self, id: u32) {
        let Some(g) = self.gpadls.get_mut(&id) else {
            return;
        };
        if g.data.len() < g.expected {
            return;
        }
        let relid = g.relid;
        let result = proto::parse_ranges(&g.data, g.rangecount)
            .map_err(|e| e.to_string())
            .and_then(|ranges| {
                let mem = self.synic.memory();
                if let Some(p) = ranges.iter().flat_map(|r| &r.pfns).find(|&&p| {
                    p.checked_mul(ring::PAGE)
                        .is_none_or(|a| !mem.check_range(GuestAddress(a), ring::PAGE as usize))
                }) {
                    return Err(format!("PFN {p:#x} is not guest RAM"));
                }
                ranges
                    .into_iter()
                    .map(|r| PageList::new(r.byte_offset, r.byte_count, r.pfns))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|lists| Arc::new(GpadlPages::new(lists)))
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(done) => {
                g.data = Vec::new();
                g.done = Some(done.clone());
                self.table
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, (relid, done));
                self.send(proto::gpadl_created(relid, id, 0));
            }
            Err(e) => {
                self.gpadls.remove(&id);
                self.table
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                guest_error(&e);
                self.send(proto::gpadl_created(relid, id, 1));
            }
        }
    }

    fn open(&mut self, o: &proto::OpenChannel) -> Result<(), String> {
        let i = self.channel(o.relid).ok_or("unknown channel")?;
        if !matches!(self.channels[i].state, ChannelState::Offered) {
            return Err("channel is not closed".into());
        }
        if o.target_vp >= self.synic.vp_count() {
            return Err("target VP out of range".into());
        }
        let g = self.gpadls.get(&o.gpadl).ok_or("unknown ring GPADL")?;
        if g.relid != o.relid {
            return Err("ring GPADL belongs to another channel".into());
        }
        let pfns = g.done.as_ref().ok_or("ring GPADL incomplete")?.pfns();
        let (up, down) = ring::split_rings(&pfns, o.downstream_page_offset)
            .ok_or("bad downstream ring offset")?;
        let mem = self.synic.memory().clone();
        let inbound = InRing::new(mem.clone(), up).map_err(|e| e.to_string())?;
        let outbound = OutRing::new(mem, down).map_err(|e| e.to_string())?;
        let doorbell = Arc::new(Wakeup::new().map_err(|e| e.to_string())?);
        let ch = &mut self.channels[i];
        if let Some(vm) = &self.vm
            && let Err(e) = crate::hv::kvm::hyperv_eventfd(vm, ch.conn_id, &doorbell, false)
        {
            // Not fatal: HvSignalEvent then exits and the vCPU rings the doorbell.
            tracing::debug!(error = %e, "KVM_HYPERV_EVENTFD failed");
        }
        self.doorbells
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ch.conn_id, doorbell.clone());
        let open = OpenChannel::start(ChannelStart {
            vsp: ch.vsp.clone(),
            synic: self.synic.clone(),
            gpadls: self.table.clone(),
            relid: ch.relid,
            target_vp: o.target_vp,
            inbound,
            outbound,
            doorbell,
        })
        .map_err(|e| e.to_string())?;
        ch.state = ChannelState::Open(open);
        ch.ring_gpadl = Some(o.gpadl);
        Ok(())
    }

    /// Host-initiated hot-unplug of `relid`.
    pub fn rescind(&mut self, relid: u32) {
        if let Some(i) = self.channel(relid) {
            self.close(i);
            self.channels[i].state = ChannelState::Rescinded;
            self.send(proto::rescind(relid));
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{Address, Bytes, GuestMemoryMmap};

    use super::*;
    use crate::hv::synic::SintKick;
    use vmbus_core::ring::Packet;
    use vmbus_core::{Channel, Guid, OfferParams, Vsp, VspError};

    struct NoKick;
    impl SintKick for NoKick {
        fn kick(&self, _: u32, _: u32) {}
    }

    /// Echoes every packet back.
    struct Echo;
    impl Vsp for Echo {
        fn name(&self) -> &'static str {
            "echo"
        }
        fn offer(&self) -> OfferParams {
            OfferParams {
                class: Guid([1; 16]),
                instance: Guid([2; 16]),
                flags: 0,
                mmio_megabytes: 0,
                pipe_mode: 0,
            }
        }
        fn packet(&mut self, p: &Packet, tx: &mut dyn Channel) -> Result<(), VspError> {
            tx.send(p.payload())
        }
    }

    const SIMP: u64 = 0x1000;

    fn setup() -> (Control, Arc<GuestMemoryMmap>) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
        let synic = Arc::new(Synic::new(mem.clone(), 2, Box::new(NoKick)));
        for vp in 0..2 {
            synic.set_msr(
                vp,
                crate::hv::msr::SIMP,
                (SIMP + u64::from(vp) * 0x2000) | 1,
            );
            synic.set_msr(
                vp,
                crate::hv::msr::SIEFP,
                (SIMP + 0x1000 + u64::from(vp) * 0x2000) | 1,
            );
            synic.set_msr(vp, crate::hv::msr::SCONTROL, 1);
        }
        let vsp: SharedVsp = Arc::new(Mutex::new(Echo));
        let c = Control::new(synic, None, vec![vsp], Doorbells::default());
        (c, mem)
    }

    /// Take the message in VP 0's slot 2 (as the guest would) and free the slot.
    fn take(mem: &GuestMemoryMmap) -> Option<Vec<u8>> {
        let slot = GuestAddress(SIMP + 512);
        let t: u32 = mem.read_obj(slot).unwrap();
        if t == 0 {
            return None;
        }
        let len: u8 = mem.read_obj(slot.unchecked_add(4)).unwrap();
        let mut v = vec![0u8; usize::from(len)];
        mem.read_slice(&mut v, slot.unchecked_add(16)).unwrap();
        mem.write_obj(0u32, slot).unwrap();
        Some(v)
    }

    fn take_all(c: &mut Control, mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            c.pump();
            match take(mem) {
                Some(m) => out.push(m),
                None => return out,
            }
        }
    }

    fn msg(t: u32, len: usize, fields: &[(usize, u32)]) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[0..4].copy_from_slice(&t.to_le_bytes());
        for &(o, x) in fields {
            v[o..o + 4].copy_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn ty(m: &[u8]) -> u32 {
        u32::from_le_bytes(m[0..4].try_into().unwrap())
    }

    fn connect(c: &mut Control, mem: &GuestMemoryMmap, ver: u32) -> Vec<u8> {
        let mut m = msg(msgtype::INITIATE_CONTACT, 40, &[(8, ver), (12, 0)]);
        m[16] = 2;
        c.handle(4, &m);
        let r = take_all(c, mem);
        assert_eq!(r.len(), 1);
        r[0].clone()
    }

    #[test]
    fn negotiates_every_linux_version_and_refuses_others() {
        let (mut c, mem) = setup();
        for v in SUPPORTED_VERSIONS {
            let r = connect(&mut c, &mem, *v);
            assert_eq!((ty(&r), r[8], r[9]), (msgtype::VERSION_RESPONSE, 1, 0));
            assert_eq!(u32::from_le_bytes(r[12..16].try_into().unwrap()), 1);
            assert!(matches!(c.connection(), Connection::Connected { .. }));
        }
        let r = connect(&mut c, &mem, 0x0006_0000);
        assert_eq!(r[8], 0, "6.0 refused");
        assert_eq!(c.connection(), Connection::Disconnected);
        // Messages before a connection are dropped.
        c.handle(1, &msg(msgtype::REQUESTOFFERS, 8, &[]));
        assert!(take_all(&mut c, &mem).is_empty());
    }

    #[test]
    fn full_channel_lifecycle_with_an_echo_device() {
        let (mut c, mem) = setup();
        connect(&mut c, &mem, version::WIN10_V5_3);
        c.handle(1, &msg(msgtype::REQUESTOFFERS, 8, &[]));
        let r = take_all(&mut c, &mem);
        assert_eq!(r.len(), 2);
        assert_eq!((ty(&r[0]), r[0].len()), (msgtype::OFFERCHANNEL, 196));
        assert_eq!(ty(&r[1]), msgtype::ALLOFFERS_DELIVERED);
        let relid = u32::from_le_bytes(r[0][184..188].try_into().unwrap());
        assert_eq!(relid, 1);

        // Ring GPADL: 4 pages (2 per direction) at pfns 0x100.. in a header + one body.
        let pfns: Vec<u64> = vec![0x100, 0x101, 0x102, 0x103];
        let mut h = msg(
            msgtype::GPADL_HEADER,
            20 + 8 + 8,
            &[(8, relid), (12, 0xe1e10)],
        );
        h[16..18].copy_from_slice(&(8u16 + 32).to_le_bytes());
        h[18..20].copy_from_slice(&1u16.to_le_bytes());
        h[20..24].copy_from_slice(&(4u32 * 4096).to_le_bytes());
        h[28..36].copy_from_slice(&pfns[0].to_le_bytes());
        c.handle(1, &h);
        assert!(take_all(&mut c, &mem).is_empty(), "incomplete GPADL");
        let mut b = msg(msgtype::GPADL_BODY, 16 + 24, &[(12, 0xe1e10)]);
        for (i, p) in pfns[1..].iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&p.to_le_bytes());
        }
        c.handle(1, &b);
        let r = take_all(&mut c, &mem);
        assert_eq!(ty(&r[0]), msgtype::GPADL_CREATED);
        assert_eq!(u32::from_le_bytes(r[0][16..20].try_into().unwrap()), 0);

        // Open with the host→guest ring at page 2.
        let open = msg(
            msgtype::OPENCHANNEL,
            148,
            &[(8, relid), (12, relid), (16, 0xe1e10), (20, 1), (24, 2)],
        );
        c.handle(1, &open);
        let r = take_all(&mut c, &mem);
        assert_eq!(ty(&r[0]), msgtype::OPENCHANNEL_RESULT);
        assert_eq!(u32::from_le_bytes(r[0][16..20].try_into().unwrap()), 0);
        // Opening twice fails with a status, not a hang.
        c.handle(1, &open);
        let r = take_all(&mut c, &mem);
        assert_ne!(u32::from_le_bytes(r[0][16..20].try_into().unwrap()), 0);

        // Guest writes a packet into the guest→host ring (header page 0x100, data 0x101).
        let mut p = vec![0u8; 24];
        p[0..2].copy_from_slice(&6u16.to_le_bytes());
        p[2..4].copy_from_slice(&2u16.to_le_bytes());
        p[4..6].copy_from_slice(&3u16.to_le_bytes());
        p[16..24].copy_from_slice(b"pingpong");
        mem.write_slice(&p, GuestAddress(0x101000)).unwrap();
        mem.write_obj(32u32, GuestAddress(0x100000)).unwrap();
        c.doorbells.read().unwrap()[&(CONNECTION_ID_BASE + 1)].signal();
        // The echo lands in the host→guest ring (header 0x102, data 0x103).
        let t0 = std::time::Instant::now();
        while mem.read_obj::<u32>(GuestAddress(0x102000)).unwrap() == 0 {
            assert!(t0.elapsed().as_secs() < 5, "no echo");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut echo = [0u8; 8];
        mem.read_slice(&mut echo, GuestAddress(0x103000 + 16))
            .unwrap();
        assert_eq!(&echo, b"pingpong");
        // The relid's event flag is set on the target VP (1).
        let flags: u64 = mem
            .read_obj(GuestAddress(SIMP + 0x1000 + 0x2000 + 512))
            .unwrap();
        assert_eq!(flags, 1 << relid);

        // Close, teardown, unload.
        c.handle(1, &msg(msgtype::CLOSECHANNEL, 12, &[(8, relid)]));
        c.handle(
            1,
            &msg(msgtype::GPADL_TEARDOWN, 16, &[(8, relid), (12, 0xe1e10)]),
        );
        let r = take_all(&mut c, &mem);
        assert_eq!(ty(&r[0]), msgtype::GPADL_TORNDOWN);
        assert!(c.doorbells.read().unwrap().is_empty());
        c.handle(1, &msg(msgtype::UNLOAD, 8, &[]));
        let r = take_all(&mut c, &mem);
        assert_eq!(ty(&r[0]), msgtype::UNLOAD_RESPONSE);
        assert_eq!(c.connection(), Connection::Disconnected);
    }

    #[test]
    fn bad_gpadls_and_opens_get_failure_statuses() {
        let (mut c, mem) = setup();
        connect(&mut c, &mem, version::WIN10_V5_3);
        // PFN outside RAM.
        let mut h = msg(msgtype::GPADL_HEADER, 20 + 16, &[(8, 1), (12, 5)]);
        h[16..18].copy_from_slice(&16u16.to_le_bytes());
        h[18..20].copy_from_slice(&1u16.to_le_bytes());
        h[20..24].copy_from_slice(&4096u32.to_le_bytes());
        h[28..36].copy_from_slice(&(1u64 << 40).to_le_bytes());
        c.handle(1, &h);
        let r = take_all(&mut c, &mem);
        assert_eq!(u32::from_le_bytes(r[0][16..20].try_into().unwrap()), 1);
        // Unknown channel.
        let mut h2 = h.clone();
        h2[8..12].copy_from_slice(&9u32.to_le_bytes());
        c.handle(1, &h2);
        assert_eq!(take_all(&mut c, &mem).len(), 1);
        // Open without a GPADL.
        c.handle(
            1,
            &msg(
                msgtype::OPENCHANNEL,
                148,
                &[(8, 1), (12, 1), (16, 77), (24, 2)],
            ),
        );
        let r = take_all(&mut c, &mem);
        assert_eq!(u32::from_le_bytes(r[0][16..20].try_into().unwrap()), 1);
        // Garbage does nothing.
        c.handle(1, &[0xff; 3]);
        c.handle(1, &msg(99, 16, &[]));
        assert!(take_all(&mut c, &mem).is_empty());
    }

    #[test]
    fn busy_slot_is_retried_in_order() {
        let (mut c, mem) = setup();
        connect(&mut c, &mem, version::WIN10_V5_3);
        c.handle(1, &msg(msgtype::REQUESTOFFERS, 8, &[]));
        // Nothing freed yet: only the first message is in the slot.
        assert!(c.has_outgoing());
        let first = take(&mem).unwrap();
        assert_eq!(ty(&first), msgtype::OFFERCHANNEL);
        c.pump();
        assert_eq!(ty(&take(&mem).unwrap()), msgtype::ALLOFFERS_DELIVERED);
        assert!(!c.has_outgoing());
    }
}
