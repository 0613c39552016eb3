//! The shutdown IC: the host asks the guest to power off or restart; Linux answers
//! `S_OK` and then runs `orderly_poweroff`/`orderly_reboot` (`shutdown_onchannelcallback`
//! in hv_util.c). The handle says whether the service is connected, so the caller can fall
//! back to the ACPI power button when it is not, and what the guest answered.
//!
//! Body (`struct shutdown_msg_data`, 2060 bytes): reason code u32, timeout in seconds u32,
//! flags u32 (bit 0 force, bit 1 restart, bit 2 hibernate), 2048 bytes of display message
//! (UTF-16 here; Linux ignores it). Linux 6.1 accepts message versions 3.2, 3.1, 3.0, 1.0
//! and rejects a request shorter than the whole structure.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmbus_core::messages::Guid;
use vmbus_core::ring::Packet;
use vmbus_core::{Channel, OfferParams, Vsp, VspError, Wakeup};

use crate::icmsg::{IcCore, Incoming, NegotiateState, Version, msgtype, status};
use crate::{Clock, ic_offer, lock};

/// Class `0e0b6031-5213-4934-818b-38d90ced39db`.
pub const CLASS: Guid = Guid::new(
    0x0e0b_6031,
    0x5213,
    0x4934,
    [0x81, 0x8b, 0x38, 0xd9, 0x0c, 0xed, 0x39, 0xdb],
);
/// Hyper-V's instance `b6650ff7-33bc-4840-8048-e0676786f393`.
pub const INSTANCE: Guid = Guid::new(
    0xb665_0ff7,
    0x33bc,
    0x4840,
    [0x80, 0x48, 0xe0, 0x67, 0x67, 0x86, 0xf3, 0x93],
);
/// Message versions offered, oldest first.
pub const VERSIONS: [Version; 4] = [
    Version::new(1, 0),
    Version::new(3, 0),
    Version::new(3, 1),
    Version::new(3, 2),
];
/// Bytes of the body.
pub const BODY_BYTES: usize = 12 + 2048;
/// Flag: restart instead of power off.
pub const FLAG_RESTART: u32 = 2;
/// Reason code: planned (`SHTDN_REASON_FLAG_PLANNED`).
pub const REASON_PLANNED: u32 = 0x8000_0000;
/// Seconds the guest is told it has.
pub const GUEST_TIMEOUT_SECS: u32 = 60;
/// Default wait for the guest's answer before reporting a timeout.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// UTF-16 units of the message kept (the field's 1024 minus the terminator).
const MAX_REASON_UNITS: usize = 1023;

/// Where the last request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Nothing asked.
    Idle,
    /// Queued, not yet sent.
    Queued,
    /// Sent, no answer yet.
    Sent,
    /// The guest accepted and is shutting down.
    Accepted,
    /// The guest refused with this status (Linux: an unknown request, or hibernation it
    /// cannot do).
    Refused(u32),
    /// No answer within the limit; fall back to the power button.
    TimedOut,
    /// The channel closed before an answer.
    Aborted,
}

/// Why a request was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShutdownError {
    #[error("the guest's shutdown service is not connected")]
    NotConnected,
    #[error("a shutdown request is already in progress")]
    InProgress,
}

#[derive(Debug, Clone)]
struct Request {
    reboot: bool,
    reason: String,
}

#[derive(Debug)]
struct Shared {
    connected: bool,
    version: Option<Version>,
    pending: Option<Request>,
    outcome: ShutdownOutcome,
}

/// The host side of the shutdown service.
#[derive(Debug)]
pub struct ShutdownHandle {
    wakeup: Arc<Wakeup>,
    shared: Mutex<Shared>,
}

impl ShutdownHandle {
    /// Ask the guest to power off (or restart); the answer shows in
    /// [`ShutdownHandle::outcome`]. Refused when the service is not connected (use ACPI)
    /// or a request is in flight.
    pub fn request_shutdown(&self, reboot: bool, reason: &str) -> Result<(), ShutdownError> {
        let mut s = lock(&self.shared);
        if !s.connected {
            return Err(ShutdownError::NotConnected);
        }
        if matches!(s.outcome, ShutdownOutcome::Queued | ShutdownOutcome::Sent) {
            return Err(ShutdownError::InProgress);
        }
        s.pending = Some(Request {
            reboot,
            reason: reason.to_owned(),
        });
        s.outcome = ShutdownOutcome::Queued;
        drop(s);
        self.wakeup.signal();
        Ok(())
    }

    /// Whether the guest's shutdown service is negotiated.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared).connected
    }

    /// The negotiated message version.
    pub fn version(&self) -> Option<Version> {
        lock(&self.shared).version
    }

    /// Where the last request stands.
    pub fn outcome(&self) -> ShutdownOutcome {
        lock(&self.shared).outcome
    }

    /// Let the device check timeouts.
    pub fn tick(&self) {
        self.wakeup.signal();
    }

    /// The eventfd the handle writes.
    pub fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }
}

/// The shutdown device.
pub struct Shutdown {
    core: IcCore,
    handle: Arc<ShutdownHandle>,
    clock: Arc<dyn Clock>,
    answer_timeout: Duration,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

/// The request body.
pub fn body(reboot: bool, reason: &str) -> Vec<u8> {
    let mut b = vec![0u8; BODY_BYTES];
    b[0..4].copy_from_slice(&REASON_PLANNED.to_le_bytes());
    b[4..8].copy_from_slice(&GUEST_TIMEOUT_SECS.to_le_bytes());
    let flags = if reboot { FLAG_RESTART } else { 0 };
    b[8..12].copy_from_slice(&flags.to_le_bytes());
    for (i, u) in reason.encode_utf16().take(MAX_REASON_UNITS).enumerate() {
        b[12 + 2 * i..14 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    b
}

impl Shutdown {
    /// A device that reports a timeout when the guest has not answered after
    /// `answer_timeout`.
    pub fn new(
        clock: Arc<dyn Clock>,
        answer_timeout: Duration,
    ) -> std::io::Result<(Self, Arc<ShutdownHandle>)> {
        let handle = Arc::new(ShutdownHandle {
            wakeup: Arc::new(Wakeup::new()?),
            shared: Mutex::new(Shared {
                connected: false,
                version: None,
                pending: None,
                outcome: ShutdownOutcome::Idle,
            }),
        });
        Ok((
            Shutdown {
                core: IcCore::new("shutdown", VERSIONS.to_vec()),
                handle: handle.clone(),
                clock,
                answer_timeout,
            },
            handle,
        ))
    }
}

impl Vsp for Shutdown {
    fn name(&self) -> &'static str {
        "shutdown"
    }

    fn offer(&self) -> OfferParams {
        ic_offer(CLASS, INSTANCE)
    }

    fn opened(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        self.core.open(ch, self.clock.monotonic())
    }

    fn packet(&mut self, p: &Packet, ch: &mut dyn Channel) -> Result<(), VspError> {
        match self.core.receive(p, self.clock.monotonic())? {
            Incoming::Negotiated => {
                let mut s = lock(&self.handle.shared);
                if let NegotiateState::Ready(n) = self.core.state() {
                    s.connected = true;
                    s.version = Some(n.message);
                }
                drop(s);
                self.poll_host(ch)
            }
            Incoming::Response(r, took) => {
                let mut s = lock(&self.handle.shared);
                s.outcome = if r.status == status::S_OK {
                    ShutdownOutcome::Accepted
                } else {
                    ShutdownOutcome::Refused(r.status)
                };
                tracing::info!(outcome = ?s.outcome, ?took, "guest answered shutdown request");
                Ok(())
            }
        }
    }

    fn poll_host(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        let now = self.clock.monotonic();
        let mut s = lock(&self.handle.shared);
        if s.outcome == ShutdownOutcome::Sent {
            if let Some(t) = self.core.waiting_since()
                && now.saturating_sub(t) > self.answer_timeout
            {
                tracing::warn!("guest did not answer the shutdown request");
                s.outcome = ShutdownOutcome::TimedOut;
            }
            return Ok(());
        }
        if !self.core.idle() {
            return Ok(());
        }
        if let Some(r) = s.pending.take() {
            drop(s);
            self.core
                .request(ch, msgtype::SHUTDOWN, &body(r.reboot, &r.reason), now)?;
            lock(&self.handle.shared).outcome = ShutdownOutcome::Sent;
        }
        Ok(())
    }

    fn closed(&mut self) {
        self.core.close();
        let mut s = lock(&self.handle.shared);
        s.connected = false;
        if matches!(s.outcome, ShutdownOutcome::Queued | ShutdownOutcome::Sent) {
            s.outcome = ShutdownOutcome::Aborted;
        }
        s.pending = None;
    }

    fn host_wakeup(&self) -> Option<Arc<Wakeup>> {
        Some(self.handle.wakeup.clone())
    }
}
