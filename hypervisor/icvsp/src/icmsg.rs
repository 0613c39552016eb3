//! The ICMSG framework every integration service shares, host side.
//!
//! Each message is one inband VMBus packet: an 8-byte pipe header (`vmbuspipe_hdr`: flags,
//! size; Linux skips it unread), the 20-byte `icmsg_hdr`, then `icmsgsize` bytes of body.
//! The host starts with `ICMSGTYPE_NEGOTIATE`, offering framework and message versions;
//! the guest answers in the same buffer with one of each (or none). After that the host
//! sends service requests and the guest answers each in place, flags
//! `TRANSACTION | RESPONSE`, echoing the packet's transaction id (Linux:
//! `vmbus_prep_negotiate_resp` in drivers/hv/channel_mgmt.c; the callbacks in
//! drivers/hv/hv_util.c and hv_kvp.c; layouts in include/linux/hyperv.h).
//!
//! [`IcCore`] is that state machine for one channel: it allows one outstanding request at a
//! time (what every IC does, and what keeps an unresponsive guest from filling the ring),
//! matches answers to it, and rejects anything else from the guest as a protocol error.

use std::time::Duration;

use vmbus_core::ring::{Packet, pkt};
use vmbus_core::{Channel, VspError};

/// Bytes of `vmbuspipe_hdr`.
pub const PIPE_HEADER: usize = 8;
/// Bytes of `icmsg_hdr`.
pub const IC_HEADER: usize = 20;
/// Where the body starts (Linux's `ICMSG_HDR`).
pub const BODY: usize = PIPE_HEADER + IC_HEADER;
/// Bytes of `icmsg_negotiate` before its version table.
pub const NEGOTIATE_HEADER: usize = 8;
/// Most versions a negotiate message may list (Linux's
/// `IC_VERSION_NEGOTIATION_MAX_VER_COUNT`).
pub const MAX_VERSIONS: usize = 100;
/// Largest IC message the host accepts back (Linux's KVP buffer is 4 pages).
pub const MAX_MESSAGE: usize = 4 * 4096;
/// Pipe packet type of a data message.
const PIPE_DATA: u32 = 1;

/// `icmsgtype` values.
pub mod msgtype {
    pub const NEGOTIATE: u16 = 0;
    pub const HEARTBEAT: u16 = 1;
    pub const KVP_EXCHANGE: u16 = 2;
    pub const SHUTDOWN: u16 = 3;
    pub const TIMESYNC: u16 = 4;
}

/// `icflags` bits.
pub mod flags {
    pub const TRANSACTION: u8 = 1;
    pub const REQUEST: u8 = 2;
    pub const RESPONSE: u8 = 4;
}

/// Status codes the guest answers with.
pub mod status {
    pub const S_OK: u32 = 0;
    pub const E_FAIL: u32 = 0x8000_4005;
    /// "No more items": the end of a KVP enumeration.
    pub const S_CONT: u32 = 0x8007_0103;
}

/// An IC version (`struct ic_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl Version {
    pub const fn new(major: u16, minor: u16) -> Self {
        Version { major, minor }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Framework versions the host offers; Linux takes 3.0 (its `UTIL_FW_VERSION`).
pub const FRAMEWORK_VERSIONS: [Version; 2] = [Version::new(1, 0), Version::new(3, 0)];

/// The versions a channel agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub framework: Version,
    pub message: Version,
}

/// A decoded `icmsg_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub framework: Version,
    pub msgtype: u16,
    pub message: Version,
    pub size: u16,
    pub status: u32,
    pub transaction: u8,
    pub flags: u8,
}

pub(crate) fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    let s = b.get(o..o.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

pub(crate) fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    let s = b.get(o..o.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

pub(crate) fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    let s = b.get(o..o.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

impl Header {
    /// Decode the header after the pipe header of `payload`.
    pub fn parse(payload: &[u8]) -> Option<Header> {
        let h = payload.get(PIPE_HEADER..BODY)?;
        Some(Header {
            framework: Version::new(u16_at(h, 0)?, u16_at(h, 2)?),
            msgtype: u16_at(h, 4)?,
            message: Version::new(u16_at(h, 6)?, u16_at(h, 8)?),
            size: u16_at(h, 10)?,
            status: u32_at(h, 12)?,
            transaction: h[16],
            flags: h[17],
        })
    }

    /// The pipe header, this header and `body`, as one packet payload.
    pub fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(BODY + body.len());
        v.extend_from_slice(&PIPE_DATA.to_le_bytes());
        v.extend_from_slice(&((IC_HEADER + body.len()) as u32).to_le_bytes());
        for w in [
            self.framework.major,
            self.framework.minor,
            self.msgtype,
            self.message.major,
            self.message.minor,
            self.size,
        ] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v.extend_from_slice(&self.status.to_le_bytes());
        v.extend_from_slice(&[self.transaction, self.flags, 0, 0]);
        v.extend_from_slice(body);
        v
    }
}

/// The body of a negotiate request offering `message` versions.
pub fn negotiate_body(message: &[Version]) -> Vec<u8> {
    let mut b =
        Vec::with_capacity(NEGOTIATE_HEADER + 4 * (FRAMEWORK_VERSIONS.len() + message.len()));
    b.extend_from_slice(&(FRAMEWORK_VERSIONS.len() as u16).to_le_bytes());
    b.extend_from_slice(&(message.len() as u16).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in FRAMEWORK_VERSIONS.iter().chain(message) {
        b.extend_from_slice(&v.major.to_le_bytes());
        b.extend_from_slice(&v.minor.to_le_bytes());
    }
    b
}

/// A guest's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The request's `icmsgtype`.
    pub msgtype: u16,
    pub status: u32,
    /// The body the guest wrote back (`icmsgsize` bytes, checked against the packet).
    pub body: Vec<u8>,
}

/// Where a channel's negotiation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegotiateState {
    /// The channel is closed.
    Closed,
    /// Sent; no answer yet.
    Waiting,
    /// Agreed.
    Ready(Negotiated),
    /// The guest supports none of the versions offered.
    Refused,
}

/// What a guest packet turned out to be.
#[derive(Debug)]
pub enum Incoming {
    /// The negotiation finished (check [`IcCore::state`]).
    Negotiated,
    /// The answer to the outstanding service request, and how long it took.
    Response(Response, Duration),
}

/// One outstanding request.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    trans_id: u64,
    msgtype: u16,
    sent_at: Duration,
}

/// The ICMSG state of one channel.
#[derive(Debug)]
pub struct IcCore {
    name: &'static str,
    versions: Vec<Version>,
    state: NegotiateState,
    outstanding: Option<Outstanding>,
    next_id: u64,
}

fn bad(name: &str, what: &str) -> VspError {
    VspError::Protocol(format!("{name}: {what}"))
}

impl IcCore {
    /// A service named `name` offering message `versions` (oldest first).
    pub fn new(name: &'static str, versions: Vec<Version>) -> Self {
        IcCore {
            name,
            versions,
            state: NegotiateState::Closed,
            outstanding: None,
            next_id: 1,
        }
    }

    pub fn state(&self) -> NegotiateState {
        self.state
    }

    /// The agreed versions, once negotiated.
    pub fn negotiated(&self) -> Option<Negotiated> {
        match self.state {
            NegotiateState::Ready(n) => Some(n),
            _ => None,
        }
    }

    /// Whether a request may be sent now: negotiated and nothing outstanding.
    pub fn idle(&self) -> bool {
        self.negotiated().is_some() && self.outstanding.is_none()
    }

    /// Since when the outstanding request (or negotiation) has waited, if one does.
    pub fn waiting_since(&self) -> Option<Duration> {
        self.outstanding.map(|o| o.sent_at)
    }

    /// Replace the message versions offered at the next open.
    pub fn set_versions(&mut self, versions: Vec<Version>) {
        self.versions = versions;
    }

    /// The channel opened: start over and offer the versions.
    pub fn open(&mut self, ch: &mut dyn Channel, now: Duration) -> Result<(), VspError> {
        self.state = NegotiateState::Waiting;
        self.outstanding = None;
        let body = negotiate_body(&self.versions);
        let header = Header {
            framework: Version::new(0, 0),
            msgtype: msgtype::NEGOTIATE,
            message: Version::new(0, 0),
            size: body.len() as u16,
            status: 0,
            transaction: 0,
            flags: flags::TRANSACTION | flags::REQUEST,
        };
        self.send(ch, header, &body, now)
    }

    /// The channel closed.
    pub fn close(&mut self) {
        self.state = NegotiateState::Closed;
        self.outstanding = None;
    }

    /// Send a service request; only when [`IcCore::idle`].
    pub fn request(
        &mut self,
        ch: &mut dyn Channel,
        msgtype: u16,
        body: &[u8],
        now: Duration,
    ) -> Result<(), VspError> {
        let Some(n) = self.negotiated().filter(|_| self.outstanding.is_none()) else {
            return Err(bad(self.name, "request while not idle"));
        };
        let header = Header {
            framework: n.framework,
            msgtype,
            message: n.message,
            size: u16::try_from(body.len()).map_err(|_| bad(self.name, "request too large"))?,
            status: 0,
            transaction: 0,
            flags: flags::TRANSACTION | flags::REQUEST,
        };
        self.send(ch, header, body, now)
    }

    fn send(
        &mut self,
        ch: &mut dyn Channel,
        header: Header,
        body: &[u8],
        now: Duration,
    ) -> Result<(), VspError> {
        let trans_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        ch.send_packet(pkt::DATA_INBAND, 0, trans_id, &header.encode(body))?;
        self.outstanding = Some(Outstanding {
            trans_id,
            msgtype: header.msgtype,
            sent_at: now,
        });
        Ok(())
    }

    /// Take a packet from the guest: it must answer the outstanding request.
    pub fn receive(&mut self, p: &Packet, now: Duration) -> Result<Incoming, VspError> {
        let name = self.name;
        if p.header.ptype != pkt::DATA_INBAND {
            return Err(bad(name, "not an inband packet"));
        }
        let m = p.payload();
        if m.len() > MAX_MESSAGE {
            return Err(bad(name, "message too large"));
        }
        let h = Header::parse(m).ok_or_else(|| bad(name, "shorter than the IC headers"))?;
        let out = self
            .outstanding
            .ok_or_else(|| bad(name, "answer without a request"))?;
        if p.header.trans_id != out.trans_id {
            return Err(bad(name, "answer to an unknown transaction"));
        }
        if h.flags & flags::RESPONSE == 0 {
            return Err(bad(name, "not a response"));
        }
        if h.msgtype != out.msgtype {
            return Err(bad(name, "response of another message type"));
        }
        let body = m
            .get(BODY..BODY + usize::from(h.size))
            .ok_or_else(|| bad(name, "message size beyond the packet"))?;
        self.outstanding = None;
        if h.msgtype != msgtype::NEGOTIATE {
            let took = now.saturating_sub(out.sent_at);
            return Ok(Incoming::Response(
                Response {
                    msgtype: h.msgtype,
                    status: h.status,
                    body: body.to_vec(),
                },
                took,
            ));
        }
        // Linux writes the counts and then two versions whatever it found; both counts 1
        // means agreement, 0 means none.
        let fw_count = u16_at(body, 0).ok_or_else(|| bad(name, "short negotiate answer"))?;
        let msg_count = u16_at(body, 2).ok_or_else(|| bad(name, "short negotiate answer"))?;
        self.state = match (fw_count, msg_count) {
            (1, 1) => {
                let v = |o: usize| -> Option<Version> {
                    Some(Version::new(u16_at(body, o)?, u16_at(body, o + 2)?))
                };
                let framework =
                    v(NEGOTIATE_HEADER).ok_or_else(|| bad(name, "short version table"))?;
                let message =
                    v(NEGOTIATE_HEADER + 4).ok_or_else(|| bad(name, "short version table"))?;
                if !FRAMEWORK_VERSIONS.contains(&framework) || !self.versions.contains(&message) {
                    return Err(bad(name, "guest chose a version never offered"));
                }
                tracing::info!(ic = name, %framework, %message, "integration service negotiated");
                NegotiateState::Ready(Negotiated { framework, message })
            }
            (0, 0) => {
                tracing::warn!(ic = name, "guest supports none of the offered versions");
                NegotiateState::Refused
            }
            _ => return Err(bad(name, "bad version counts in negotiate answer")),
        };
        Ok(Incoming::Negotiated)
    }
}
