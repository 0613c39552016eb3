//! The Hyper-V integration services ("ICs") that Linux's stock `hv_utils` module drives over
//! VMBus: [`heartbeat`], [`shutdown`], [`timesync`] and [`kvp`] (key-value pairs: the
//! guest's host name, OS and addresses).
//!
//! All four share the ICMSG framework ([`icmsg`]): the host negotiates versions as soon as
//! the channel opens, then sends requests one at a time and the guest answers each in place.
//! Each device implements [`vmbus_core::Vsp`] and comes with a host-side handle the worker
//! and agent read (is the guest alive, what is its name) or drive (shut down, refresh).
//!
//! The host initiates everything, and some of it periodically. The channel thread only runs
//! a device on the guest's doorbell or on the device's host wakeup, so periodic work is
//! driven by that wakeup: a [`Ticker`] thread signals the handles' wakeups every period (or
//! the worker calls each handle's `tick()` from its own timer), and each device decides from
//! its [`Clock`] whether something is due. Tests use a [`ManualClock`] and explicit runs.
//!
//! Every byte from the guest is hostile: no `unsafe`, lengths checked, strings capped and
//! sanitized, and a packet a device cannot accept is a [`VspError`](vmbus_core::VspError)
//! that closes that channel (the VM goes on). A guest that does not answer (no `hv_utils`,
//! no KVP daemon, a hung guest) is reported through the handles, never waited for: at most
//! one request per channel is outstanding, so the ring never fills.
//!
//! May depend on `vmbus_core`, thiserror and tracing; not on KVM, the hypervisor crate or
//! the agent's protocol.

#![forbid(unsafe_code)]

pub mod heartbeat;
pub mod icmsg;
pub mod kvp;
pub mod shutdown;
#[cfg(test)]
mod tests;
pub mod timesync;

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmbus_core::messages::Guid;
use vmbus_core::{OfferParams, Wakeup};

pub use heartbeat::{Heartbeat, HeartbeatHandle, HeartbeatHealth, HeartbeatStatus};
pub use kvp::{GuestInfo, Kvp, KvpHandle, KvpState};
pub use shutdown::{Shutdown, ShutdownError, ShutdownHandle, ShutdownOutcome};
pub use timesync::{TimeSync, TimeSyncHandle, TimeSyncStatus};

/// 100 ns intervals from 1601-01-01 to 1970-01-01 (Linux's `WLTIMEDELTA`).
pub const FILETIME_UNIX_EPOCH: u64 = 116_444_736_000_000_000;

/// Time as a device sees it.
pub trait Clock: Send + Sync {
    /// Monotonic time since an arbitrary origin.
    fn monotonic(&self) -> Duration;
    /// Wall-clock time in Windows FILETIME units (100 ns since 1601-01-01 UTC).
    fn filetime(&self) -> u64;
}

/// The host's clocks.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn new() -> Arc<Self> {
        Arc::new(SystemClock {
            origin: Instant::now(),
        })
    }
}

impl Clock for SystemClock {
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }

    fn filetime(&self) -> u64 {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let ticks = u64::try_from(since.as_nanos() / 100).unwrap_or(u64::MAX);
        FILETIME_UNIX_EPOCH.saturating_add(ticks)
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: Mutex<(Duration, u64)>,
}

impl ManualClock {
    /// Monotonic time 0 at wall-clock `filetime`.
    pub fn new(filetime: u64) -> Arc<Self> {
        Arc::new(ManualClock {
            now: Mutex::new((Duration::ZERO, filetime)),
        })
    }

    /// Move both clocks forward.
    pub fn advance(&self, d: Duration) {
        let mut n = lock(&self.now);
        n.0 += d;
        let ticks = u64::try_from(d.as_nanos() / 100).unwrap_or(u64::MAX);
        n.1 = n.1.saturating_add(ticks);
    }
}

impl Clock for ManualClock {
    fn monotonic(&self) -> Duration {
        lock(&self.now).0
    }

    fn filetime(&self) -> u64 {
        lock(&self.now).1
    }
}

/// A thread that signals wakeups every period until dropped, so devices get to their
/// periodic work even when the guest is silent.
#[derive(Debug)]
pub struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Signal every one of `wakeups` each `period`.
    pub fn spawn(period: Duration, wakeups: Vec<Arc<Wakeup>>) -> std::io::Result<Ticker> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ic-ticker".into())
            .spawn(move || {
                let (m, cv) = &*s;
                let mut stopped = lock(m);
                while !*stopped {
                    let (g, timeout) = cv
                        .wait_timeout(stopped, period)
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = g;
                    if timeout.timed_out() && !*stopped {
                        for w in &wakeups {
                            w.signal();
                        }
                    }
                }
            })?;
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (m, cv) = &*self.stop;
        *lock(m) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lock a mutex, whatever a panicking holder left.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The offer of an IC: a pipe channel in message mode, as Hyper-V and OpenVMM offer them
/// (Linux's `hv_utils` binds by class alone and skips the pipe header unread).
pub(crate) fn ic_offer(class: Guid, instance: Guid) -> OfferParams {
    OfferParams {
        class,
        instance,
        flags: 0x10,
        mmio_megabytes: 0,
        pipe_mode: 4,
    }
}
