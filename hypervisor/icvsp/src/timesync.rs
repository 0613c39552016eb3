//! The time synchronization IC: the host sends its UTC time in FILETIME units (100 ns since
//! 1601), flagged SYNC right after the versions are agreed (the guest sets its clock) and
//! SAMPLE periodically after that (Linux keeps the latest for its PTP clock; it steps the
//! clock on SYNC only). `timesync_onchannelcallback` in Linux's hv_util.c.
//!
//! Bodies: version 3.0 and older (`struct ictimesync_data`): parent time u64, child time
//! u64, round trip u64, flags u8. Version 4.0 (`struct ictimesync_ref_data`): parent time
//! u64, the guest's reference counter (Hyper-V TIME_REF_COUNT, 100 ns) when the sample was
//! taken u64, flags u8, leap flags, stratum, reserved; Linux adds the counter's progress
//! since then. Version 4.0 is offered only when the device has that counter (a closure
//! reading the partition's reference time), since a wrong one would skew the guest.
//! Linux 6.1 accepts 4.0, 3.0 and 1.0.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmbus_core::messages::Guid;
use vmbus_core::ring::Packet;
use vmbus_core::{Channel, OfferParams, Vsp, VspError, Wakeup};

use crate::icmsg::{IcCore, Incoming, NegotiateState, Version, msgtype};
use crate::{Clock, ic_offer, lock};

/// Class `9527e630-d0ae-497b-adce-e80ab0175caf`.
pub const CLASS: Guid = Guid::new(
    0x9527_e630,
    0xd0ae,
    0x497b,
    [0xad, 0xce, 0xe8, 0x0a, 0xb0, 0x17, 0x5c, 0xaf],
);
/// Hyper-V's instance `2dd1ce17-079e-403c-b352-a1921ee207ee`.
pub const INSTANCE: Guid = Guid::new(
    0x2dd1_ce17,
    0x079e,
    0x403c,
    [0xb3, 0x52, 0xa1, 0x92, 0x1e, 0xe2, 0x07, 0xee],
);
/// The version with the reference time.
pub const VERSION_4: Version = Version::new(4, 0);
/// Versions offered without a reference counter, oldest first.
pub const VERSIONS: [Version; 2] = [Version::new(1, 0), Version::new(3, 0)];
/// Flag: set the clock.
pub const FLAG_SYNC: u8 = 1;
/// Flag: a sample.
pub const FLAG_SAMPLE: u8 = 2;
/// Bytes of the version 3 body (`ictimesync_data`, 25, padded).
pub const BODY_V3_BYTES: usize = 32;
/// Bytes of the version 4 body (`ictimesync_ref_data` is 22; Hyper-V's is 24).
pub const BODY_V4_BYTES: usize = 24;
/// Default time between samples (OpenVMM's period).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// The partition's reference counter (100 ns units), for version 4.0.
pub type ReferenceTime = Box<dyn Fn() -> u64 + Send>;

/// What the handle knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimeSyncStatus {
    pub connected: bool,
    pub version: Option<Version>,
    pub samples_sent: u64,
    /// The FILETIME of the last message sent.
    pub last_sent: Option<u64>,
    /// Whether the guest was sent a SYNC on this connection.
    pub synced: bool,
}

/// The host side of time sync.
#[derive(Debug)]
pub struct TimeSyncHandle {
    wakeup: Arc<Wakeup>,
    status: Mutex<TimeSyncStatus>,
    resync: Mutex<bool>,
}

impl TimeSyncHandle {
    pub fn status(&self) -> TimeSyncStatus {
        lock(&self.status).clone()
    }

    /// Send a SYNC (the guest steps its clock) at the next chance, e.g. after a resume.
    pub fn resync(&self) {
        *lock(&self.resync) = true;
        self.wakeup.signal();
    }

    /// Let the device check whether a sample is due.
    pub fn tick(&self) {
        self.wakeup.signal();
    }

    pub fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }
}

/// The time sync device.
pub struct TimeSync {
    core: IcCore,
    handle: Arc<TimeSyncHandle>,
    clock: Arc<dyn Clock>,
    reference: Option<ReferenceTime>,
    interval: Duration,
    last_sent: Option<Duration>,
}

impl std::fmt::Debug for TimeSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimeSync")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

/// The body of a time message for message version `version`.
pub fn body(version: Version, filetime: u64, reference: u64, flags: u8) -> Vec<u8> {
    let mut b;
    if version >= VERSION_4 {
        b = vec![0u8; BODY_V4_BYTES];
        b[8..16].copy_from_slice(&reference.to_le_bytes());
        b[16] = flags;
    } else {
        b = vec![0u8; BODY_V3_BYTES];
        b[24] = flags;
    }
    b[0..8].copy_from_slice(&filetime.to_le_bytes());
    b
}

impl TimeSync {
    /// A sample every `interval`; `reference` enables version 4.0.
    pub fn new(
        clock: Arc<dyn Clock>,
        interval: Duration,
        reference: Option<ReferenceTime>,
    ) -> std::io::Result<(Self, Arc<TimeSyncHandle>)> {
        let handle = Arc::new(TimeSyncHandle {
            wakeup: Arc::new(Wakeup::new()?),
            status: Mutex::new(TimeSyncStatus::default()),
            resync: Mutex::new(false),
        });
        let mut versions = VERSIONS.to_vec();
        if reference.is_some() {
            versions.push(VERSION_4);
        }
        Ok((
            TimeSync {
                core: IcCore::new("timesync", versions),
                handle: handle.clone(),
                clock,
                reference,
                interval,
                last_sent: None,
            },
            handle,
        ))
    }

    fn send_due(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        let Some(n) = self.core.negotiated() else {
            return Ok(());
        };
        if !self.core.idle() {
            return Ok(());
        }
        let now = self.clock.monotonic();
        let sync = {
            let mut r = lock(&self.handle.resync);
            let sync = *r || !lock(&self.handle.status).synced;
            *r = false;
            sync
        };
        let due = sync
            || self
                .last_sent
                .is_none_or(|t| now.saturating_sub(t) >= self.interval);
        if !due {
            return Ok(());
        }
        // Read the clocks last, right before the message goes out.
        let reference = self.reference.as_ref().map_or(0, |r| r());
        let filetime = self.clock.filetime();
        let flags = if sync { FLAG_SYNC } else { FLAG_SAMPLE };
        self.core.request(
            ch,
            msgtype::TIMESYNC,
            &body(n.message, filetime, reference, flags),
            now,
        )?;
        self.last_sent = Some(now);
        let mut s = lock(&self.handle.status);
        s.samples_sent += 1;
        s.last_sent = Some(filetime);
        s.synced = true;
        Ok(())
    }
}

impl Vsp for TimeSync {
    fn name(&self) -> &'static str {
        "timesync"
    }

    fn offer(&self) -> OfferParams {
        ic_offer(CLASS, INSTANCE)
    }

    fn opened(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        self.last_sent = None;
        *lock(&self.handle.status) = TimeSyncStatus::default();
        self.core.open(ch, self.clock.monotonic())
    }

    fn packet(&mut self, p: &Packet, ch: &mut dyn Channel) -> Result<(), VspError> {
        match self.core.receive(p, self.clock.monotonic())? {
            Incoming::Negotiated => {
                if let NegotiateState::Ready(n) = self.core.state() {
                    let mut s = lock(&self.handle.status);
                    s.connected = true;
                    s.version = Some(n.message);
                }
                self.send_due(ch)
            }
            // Linux answers every sample; a failure status only means it did not like
            // the message type, which is ours.
            Incoming::Response(r, _) => {
                if r.status != 0 {
                    tracing::debug!(status = r.status, "guest failed a time sample");
                }
                Ok(())
            }
        }
    }

    fn poll_host(&mut self, ch: &mut dyn Channel) -> Result<(), VspError> {
        self.send_due(ch)
    }

    fn closed(&mut self) {
        self.core.close();
        lock(&self.handle.status).connected = false;
    }

    fn host_wakeup(&self) -> Option<Arc<Wakeup>> {
        Some(self.handle.wakeup.clone())
    }
}
