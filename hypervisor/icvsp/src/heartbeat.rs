//! The heartbeat IC: every interval the host sends a sequence number and the guest answers
//! with that number plus one (`heartbeat_onchannelcallback` in Linux's hv_util.c). The
//! handle tells whether the guest still answers.
//!
//! Body (`struct heartbeat_msg_data`): sequence u64, then 32 reserved bytes. Linux 6.1
//! accepts message versions 3.0 and 1.0 and needs at least the sequence number.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmbus_core::messages::Guid;
use vmbus_core::ring::Packet;
use vmbus_core::{Channel, OfferParams, Vsp, VspError, Wakeup};

use crate::icmsg::{IcCore, Incoming, NegotiateState, Version, msgtype, status, u64_at};
use crate::{Clock, ic_offer, lock};

/// Class `57164f39-9115-4e78-ab55-382f3bd5422d`.
pub const CLASS: Guid = Guid::new(
    0x5716_4f39,
    0x9115,
    0x4e78,
    [0xab, 0x55, 0x38, 0x2f, 0x3b, 0xd5, 0x42, 0x2d],
);
/// Hyper-V's instance `fd149e91-82e0-4a7d-afa6-2a4166cbd7c0`.
pub const INSTANCE: Guid = Guid::new(
    0xfd14_9e91,
    0x82e0,
    0x4a7d,
    [0xaf, 0xa6, 0x2a, 0x41, 0x66, 0xcb, 0xd7, 0xc0],
);
/// Message versions offered, oldest first.
pub const VERSIONS: [Version; 2] = [Version::new(1, 0), Version::new(3, 0)];
/// Bytes of the body sent.
pub const BODY_BYTES: usize = 40;
/// Default time between heartbeats.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Default silence after which the guest counts as lost.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(10);

/// What the handle knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatStatus {
    /// The channel is open and the versions agreed.
    pub connected: bool,
    /// The negotiated message version.
    pub version: Option<Version>,
    /// When (on the device's clock) the guest last answered, and with what.
    pub last_answer: Option<Duration>,
    pub last_sequence: Option<u64>,
    /// When the first heartbeat of this connection went out.
    pub first_sent: Option<Duration>,
    pub sent: u64,
    pub answered: u64,
}

/// The verdict the agent shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatHealth {
    /// No negotiated channel (no hv_utils in the guest, or not yet).
    NotConnected,
    /// Answered within the limit (or the first answer is not yet overdue).
    Ok,
    /// No answer for longer than the limit.
    Lost,
}

/// The host side of the heartbeat.
pub struct HeartbeatHandle {
    wakeup: Arc<Wakeup>,
    clock: Arc<dyn Clock>,
    lost_after: Duration,
    status: Mutex<HeartbeatStatus>,
}

impl std::fmt::Debug for HeartbeatHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatHandle")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl HeartbeatHandle {
    /// A snapshot of what is known.
    pub fn status(&self) -> HeartbeatStatus {
        lock(&self.status).clone()
    }

    /// Whether the guest is alive, judged now.
    pub fn health(&self) -> HeartbeatHealth {
        let s = self.status();
        if !s.connected {
            return HeartbeatHealth::NotConnected;
        }
        let now = self.clock.monotonic();
        match s.last_answer.or(s.first_sent) {
            Some(t) if now.saturating_sub(t) > self.lost_after => HeartbeatHealth::Lost,
            _ => HeartbeatHealth::Ok,
        }
    }

    /// Time since the guest last answered.
    pub fn since_last_answer(&self) -> Option<Duration> {
        let t = self.status().last_answer?;
        Some(self.clock.monotonic().saturating_sub(t))
    }

    /// Let the device check whether a heartbeat is due.
    pub fn tick(&self) {
        self.wakeup.signal();
    }

    /// The eventfd [`HeartbeatHandle::tick`] writes (for a [`crate::Ticker`]).
    pub fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }
}

/// The heartbeat device.
pub struct Heartbeat {
    core: IcCore,
    handle: Arc<HeartbeatHandle>,
    clock: Arc<dyn Clock>,
    interval: Duration,
    last_sent: Option<Duration>,
    sequence: u64,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("core", &self.core)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Heartbeat {
    /// A heartbeat every `interval`; the guest counts as lost after `lost_after` without
    /// an answer.
    pub fn new(
        clock: Arc<dyn Clock>,
        interval: Duration,
        lost_after: Duration,
    ) -> std::io::Result<(Self, Arc<HeartbeatHandle>)> {
        let handle = Arc::new(HeartbeatHandle {
            wakeup: Arc::new(Wakeup::new()?),
            clock: clock.clone(),
            lost_after,
            status: Mutex::new(HeartbeatStatus::default()),
        });
        Ok((
            Heartbeat {
                core: IcCore::new("heartbeat", VERSIONS.to_vec()),
                handle: handle.clone(),
                clock,
                interval,
                last_sent: None,
                sequence: 0,
            },
            handle,
        ))
    }

    fn beat(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        let now = self.clock.monotonic();
        let due = self
            .last_sent
            .is_none_or(|t| now.saturating_sub(t) >= self.interval);
        if !due || !self.core.idle() {
            return Ok(());
        }
        self.sequence = self.sequence.wrapping_add(1);
        let mut body = [0u8; BODY_BYTES];
        body[..8].copy_from_slice(&self.sequence.to_le_bytes());
        self.core.request(ch, msgtype::HEARTBEAT, &body, now)?;
        self.last_sent = Some(now);
        let mut s = lock(&self.handle.status);
        s.sent += 1;
        s.first_sent.get_or_insert(now);
        Ok(())
    }
}

impl Vsp for Heartbeat {
    fn name(&self) -> &'static str {
        "heartbeat"
    }

    fn offer(&self) -> OfferParams {
        ic_offer(CLASS, INSTANCE)
    }

    fn opened(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        self.last_sent = None;
        *lock(&self.handle.status) = HeartbeatStatus::default();
        self.core.open(ch, self.clock.monotonic())
    }

    fn packet(&mut self, p: &Packet, ch: &mut dyn Channel) -> Result<(), VspError> {
        let now = self.clock.monotonic();
        match self.core.receive(p, now)? {
            Incoming::Negotiated => {
                let mut s = lock(&self.handle.status);
                if let NegotiateState::Ready(n) = self.core.state() {
                    s.connected = true;
                    s.version = Some(n.message);
                }
                drop(s);
                self.beat(ch)
            }
            Incoming::Response(r, _) => {
                if r.status != status::S_OK {
                    return Err(VspError::Protocol(format!(
                        "heartbeat: guest failed a heartbeat ({:#x})",
                        r.status
                    )));
                }
                let seq = u64_at(&r.body, 0)
                    .ok_or_else(|| VspError::Protocol("heartbeat: short answer".into()))?;
                if seq != self.sequence.wrapping_add(1) {
                    return Err(VspError::Protocol(format!(
                        "heartbeat: answered {seq} to {}",
                        self.sequence
                    )));
                }
                let mut s = lock(&self.handle.status);
                s.answered += 1;
                s.last_answer = Some(now);
                s.last_sequence = Some(seq);
                Ok(())
            }
        }
    }

    fn poll_host(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        self.beat(ch)
    }

    fn closed(&mut self) {
        self.core.close();
        lock(&self.handle.status).connected = false;
    }

    fn host_wakeup(&self) -> Option<Arc<Wakeup>> {
        Some(self.handle.wakeup.clone())
    }
}
