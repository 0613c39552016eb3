//! An open channel: its rings, doorbells and the thread that runs its device (VSP).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::ring::{self, InRing, OutRing, Packet, RingError};
use crate::hv::VMBUS_SINT;
use crate::hv::synic::Synic;

/// A device's reason to give up on its channel.
#[derive(Debug, thiserror::Error)]
pub enum VspError {
    /// The guest broke the device protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The ring layer failed.
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// What a device puts in its offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferParams {
    /// Interface (class) GUID.
    pub class: super::proto::Guid,
    /// Instance GUID.
    pub instance: super::proto::Guid,
    /// Channel flags (0x10: named pipe).
    pub flags: u16,
    /// MMIO space the guest should carve for the device (synthvid VRAM), in MiB.
    pub mmio_megabytes: u16,
    /// Pipe mode (4 = message) for pipe channels, else 0.
    pub pipe_mode: u32,
}

/// A VMBus device server (VSP). Each device is its own module and implements this.
///
/// The channel thread calls these methods; the device's state persists across channel
/// close/open and partition resets, so a device can also hold host-side input queues.
pub trait Vsp: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// The offer.
    fn offer(&self) -> OfferParams;
    /// The channel opened: reset protocol state.
    fn opened(&mut self, _tx: &mut ChannelTx) -> Result<(), VspError> {
        Ok(())
    }
    /// A packet from the guest.
    fn packet(&mut self, pkt: &Packet, tx: &mut ChannelTx) -> Result<(), VspError>;
    /// Host-side work (input to deliver); called after every wakeup.
    fn poll_host(&mut self, _tx: &mut ChannelTx) -> Result<(), VspError> {
        Ok(())
    }
    /// The channel closed.
    fn closed(&mut self) {}
    /// An eventfd the host side writes when it has work for [`Vsp::poll_host`].
    fn host_wakeup(&self) -> Option<Arc<EventFd>> {
        None
    }
}

/// A shared, lockable VSP.
pub type SharedVsp = Arc<Mutex<dyn Vsp>>;

/// The sending half of an open channel, handed to the device.
pub struct ChannelTx {
    out: OutRing,
    synic: Arc<Synic>,
    relid: u32,
    target_vp: Arc<AtomicU32>,
    doorbell: Arc<EventFd>,
}

impl std::fmt::Debug for ChannelTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelTx")
            .field("relid", &self.relid)
            .finish()
    }
}

impl ChannelTx {
    /// Interrupt the guest for this channel.
    pub fn signal(&self) {
        self.synic.signal_event(
            self.target_vp.load(Ordering::SeqCst),
            VMBUS_SINT,
            self.relid,
        );
    }

    /// Send an inband data packet; waits up to a second for ring space.
    pub fn send(&mut self, payload: &[u8]) -> Result<(), VspError> {
        self.send_packet(ring::pkt::DATA_INBAND, 0, 0, payload)
    }

    /// Send a packet of any type.
    pub fn send_packet(
        &mut self,
        ptype: u16,
        flags: u16,
        trans_id: u64,
        payload: &[u8],
    ) -> Result<(), VspError> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self.out.write(ptype, flags, trans_id, payload) {
                Ok(sig) => {
                    self.out.set_pending_send(0);
                    if sig {
                        self.signal();
                    }
                    return Ok(());
                }
                Err(RingError::Full) if Instant::now() < deadline => {
                    let need = (payload.len() + 32) as u32;
                    self.out.set_pending_send(need);
                    // The guest signals when it has consumed enough; poll either way.
                    wait_readable(&[self.doorbell.as_raw_fd()], Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Wait until one of `fds` is readable or `timeout` passes.
pub(crate) fn wait_readable(fds: &[i32], timeout: Duration) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a live array of `p.len()` pollfd structures.
    unsafe {
        libc::poll(
            p.as_mut_ptr(),
            p.len() as libc::nfds_t,
            timeout.as_millis() as i32,
        )
    };
}

/// Rate limit for guest-triggered log lines.
#[derive(Debug, Default)]
pub(crate) struct LogLimit(pub(crate) AtomicU32);

impl LogLimit {
    pub(crate) fn allow(&self) -> bool {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        n <= 10 || n.is_power_of_two()
    }
}

static CHANNEL_ERRORS: LogLimit = LogLimit(AtomicU32::new(0));

/// A running channel thread.
#[derive(Debug)]
pub struct OpenChannel {
    stop: Arc<AtomicBool>,
    stop_evt: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// Target VP for host→guest interrupts (MODIFYCHANNEL changes it).
    pub target_vp: Arc<AtomicU32>,
    /// Set when the channel thread gave up on a misbehaving guest.
    pub failed: Arc<AtomicBool>,
}

/// Everything needed to start a channel thread.
pub struct ChannelStart {
    pub vsp: SharedVsp,
    pub synic: Arc<Synic>,
    pub relid: u32,
    pub target_vp: u32,
    pub inbound: InRing,
    pub outbound: OutRing,
    pub doorbell: Arc<EventFd>,
}

impl OpenChannel {
    /// Start the channel thread.
    pub fn start(s: ChannelStart) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let target_vp = Arc::new(AtomicU32::new(s.target_vp));
        let failed = Arc::new(AtomicBool::new(false));
        let name = s.vsp.lock().map(|v| v.name()).unwrap_or("vsp");
        let thread = {
            let (stop, stop_evt, target_vp, failed) = (
                stop.clone(),
                stop_evt.clone(),
                target_vp.clone(),
                failed.clone(),
            );
            std::thread::Builder::new()
                .name(format!("vmbus-{name}"))
                .spawn(move || {
                    if let Err(e) = run(s, &stop, &stop_evt, target_vp) {
                        failed.store(true, Ordering::SeqCst);
                        if CHANNEL_ERRORS.allow() {
                            tracing::warn!(device = name, error = %e,
                                "closing a misbehaving VMBus channel");
                        }
                    }
                })?
        };
        Ok(Self {
            stop,
            stop_evt,
            thread: Some(thread),
            target_vp,
            failed,
        })
    }

    /// Stop the thread and wait for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stop_evt.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for OpenChannel {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    s: ChannelStart,
    stop: &AtomicBool,
    stop_evt: &EventFd,
    target_vp: Arc<AtomicU32>,
) -> Result<(), VspError> {
    let ChannelStart {
        vsp,
        synic,
        relid,
        mut inbound,
        outbound,
        doorbell,
        ..
    } = s;
    let wakeup = crate::devices::bus::lock(&vsp).host_wakeup();
    let mut tx = ChannelTx {
        out: outbound,
        synic,
        relid,
        target_vp,
        doorbell: doorbell.clone(),
    };
    let result = (|| {
        crate::devices::bus::lock(&vsp).opened(&mut tx)?;
        let mut fds = vec![doorbell.as_raw_fd(), stop_evt.as_raw_fd()];
        if let Some(w) = &wakeup {
            fds.push(w.as_raw_fd());
        }
        while !stop.load(Ordering::SeqCst) {
            let _ = doorbell.read();
            if let Some(w) = &wakeup {
                let _ = w.read();
            }
            while let Some((pkt, sig)) = inbound.read()? {
                if sig {
                    tx.signal();
                }
                crate::devices::bus::lock(&vsp).packet(&pkt, &mut tx)?;
            }
            crate::devices::bus::lock(&vsp).poll_host(&mut tx)?;
            // The timeout covers a doorbell the guest skipped (it signals only on an
            // empty-to-non-empty transition).
            wait_readable(&fds, Duration::from_millis(50));
        }
        Ok(())
    })();
    crate::devices::bus::lock(&vsp).closed();
    result
}
