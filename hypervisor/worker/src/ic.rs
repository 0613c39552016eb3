//! The Hyper-V integration services the worker offers on VMBus (the guest's stock
//! `hv_utils` binds them): heartbeat, shutdown, time sync and KVP. One ticker thread wakes
//! their channels once a second for the periodic messages.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use icvsp::{
    HeartbeatHandle, HeartbeatHealth, Kvp, KvpHandle, Shutdown, ShutdownHandle, ShutdownOutcome,
    SystemClock, Ticker, TimeSync,
};
use vmbus_core::SharedVsp;

/// The services and their host handles.
pub struct IntegrationServices {
    vsps: Vec<SharedVsp>,
    pub heartbeat: Arc<HeartbeatHandle>,
    pub shutdown: Arc<ShutdownHandle>,
    pub kvp: Arc<KvpHandle>,
    _ticker: Ticker,
}

impl IntegrationServices {
    pub fn new() -> Result<Self> {
        let clock = SystemClock::new();
        let (hb, heartbeat) = icvsp::Heartbeat::new(
            clock.clone(),
            icvsp::heartbeat::DEFAULT_INTERVAL,
            icvsp::heartbeat::DEFAULT_LOST_AFTER,
        )
        .context("heartbeat")?;
        let (sd, shutdown) = Shutdown::new(clock.clone(), icvsp::shutdown::DEFAULT_ANSWER_TIMEOUT)
            .context("shutdown")?;
        let (ts, time) = TimeSync::new(clock.clone(), icvsp::timesync::DEFAULT_INTERVAL, None)
            .context("time sync")?;
        let (kv, kvp) = Kvp::new(
            clock,
            icvsp::kvp::DEFAULT_REFRESH,
            icvsp::kvp::DEFAULT_PATIENCE,
        )
        .context("KVP")?;
        let ticker = Ticker::spawn(
            Duration::from_secs(1),
            vec![
                heartbeat.wakeup(),
                shutdown.wakeup(),
                time.wakeup(),
                kvp.wakeup(),
            ],
        )
        .context("cannot start the integration services' timer")?;
        let vsps: Vec<SharedVsp> = vec![
            Arc::new(std::sync::Mutex::new(hb)),
            Arc::new(std::sync::Mutex::new(sd)),
            Arc::new(std::sync::Mutex::new(ts)),
            Arc::new(std::sync::Mutex::new(kv)),
        ];
        Ok(Self {
            vsps,
            heartbeat,
            shutdown,
            kvp,
            _ticker: ticker,
        })
    }

    /// The devices to offer on VMBus.
    pub fn vsps(&self) -> Vec<SharedVsp> {
        self.vsps.clone()
    }
}

/// Ask the guest to power off through its shutdown service; `press_button` is called
/// instead when the service is not there, and later when the guest does not take the
/// request (a guest without hv_utils, or one that refuses).
pub fn request_shutdown(
    shutdown: &Arc<ShutdownHandle>,
    press_button: impl FnOnce() + Send + 'static,
) -> &'static str {
    match shutdown.request_shutdown(false, "The host asked this VM to shut down") {
        Ok(()) => {
            let s = shutdown.clone();
            let waiter = std::thread::Builder::new()
                .name("ic-shutdown".into())
                .spawn(move || {
                    let deadline = std::time::Instant::now() + Duration::from_secs(20);
                    loop {
                        match s.outcome() {
                            ShutdownOutcome::Accepted => return,
                            ShutdownOutcome::Refused(_)
                            | ShutdownOutcome::TimedOut
                            | ShutdownOutcome::Aborted => break,
                            _ if std::time::Instant::now() > deadline => break,
                            _ => std::thread::sleep(Duration::from_millis(100)),
                        }
                    }
                    tracing::info!(
                        "the guest did not take the shutdown request: ACPI power button"
                    );
                    press_button();
                });
            if waiter.is_err() {
                tracing::warn!("cannot watch the shutdown request");
            }
            "shutdown service"
        }
        Err(_) => {
            press_button();
            "power button"
        }
    }
}

/// One word for the guest's heartbeat.
pub fn heartbeat_word(h: &HeartbeatHandle) -> &'static str {
    match h.health() {
        HeartbeatHealth::NotConnected => "",
        HeartbeatHealth::Ok => "ok",
        HeartbeatHealth::Lost => "lost",
    }
}
