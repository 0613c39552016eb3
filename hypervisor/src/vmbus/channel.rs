//! An open channel: its rings, doorbells and the thread that runs its device (VSP).

use std::os::fd::{AsFd, BorrowedFd};

use rustix::event::{PollFd, PollFlags};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmbus_core::memory::{Gpadl, GuestMem};
use vmbus_core::ring::{self, InRing, OutRing, RingError, pkt};
use vmbus_core::{Channel, SharedVsp, TransferRange, VspError, Wakeup, channel::lock_vsp};

use crate::hv::VMBUS_SINT;
use crate::hv::synic::Synic;

/// The GPADLs the guest created, by id, with the channel each belongs to: the control plane
/// fills it, channel threads look their devices' GPADLs up in it.
pub type GpadlTable = Arc<RwLock<HashMap<u32, (u32, Arc<Gpadl>)>>>;

/// An open channel as its device sees it (the VMM's [`Channel`]).
pub struct ChannelTx {
    out: OutRing,
    synic: Arc<Synic>,
    mem: GuestMem,
    gpadls: GpadlTable,
    relid: u32,
    target_vp: Arc<AtomicU32>,
    doorbell: Arc<Wakeup>,
    /// Interrupts raised (for the close log line).
    signals: u64,
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
    pub fn signal(&mut self) {
        self.signals += 1;
        self.synic.signal_event(
            self.target_vp.load(Ordering::SeqCst),
            VMBUS_SINT,
            self.relid,
        );
    }

    /// Write a packet (`descriptor` between header and payload); waits up to a second for
    /// ring space.
    fn write(
        &mut self,
        ptype: u16,
        flags: u16,
        trans_id: u64,
        descriptor: &[u8],
        payload: &[u8],
    ) -> Result<(), VspError> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self
                .out
                .write_with(ptype, flags, trans_id, descriptor, payload)
            {
                Ok(sig) => {
                    self.out.set_pending_send(0);
                    if sig {
                        self.signal();
                    }
                    return Ok(());
                }
                Err(RingError::Full) if Instant::now() < deadline => {
                    let need = (descriptor.len() + payload.len() + 32) as u32;
                    self.out.set_pending_send(need);
                    // The guest signals when it has consumed enough; poll either way.
                    wait_readable(&[self.doorbell.as_fd()], Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Channel for ChannelTx {
    fn send_packet(
        &mut self,
        ptype: u16,
        flags: u16,
        trans_id: u64,
        payload: &[u8],
    ) -> Result<(), VspError> {
        self.write(ptype, flags, trans_id, &[], payload)
    }

    fn send_transfer_pages(
        &mut self,
        set_id: u16,
        ranges: &[TransferRange],
        trans_id: u64,
        payload: &[u8],
    ) -> Result<(), VspError> {
        let desc = ring::transfer_page_descriptor(set_id, ranges);
        self.write(
            pkt::DATA_USING_XFER_PAGES,
            pkt::FLAG_COMPLETION_REQUESTED,
            trans_id,
            &desc,
            payload,
        )
    }

    fn memory(&self) -> &GuestMem {
        &self.mem
    }

    fn gpadl(&self, id: u32) -> Option<Arc<Gpadl>> {
        let map = self.gpadls.read().unwrap_or_else(|e| e.into_inner());
        map.get(&id)
            .filter(|(relid, _)| *relid == self.relid)
            .map(|(_, g)| g.clone())
    }
}

/// Wait until one of `fds` is readable or `timeout` passes.
pub(crate) fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) {
    let mut p: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let t = rustix::event::Timespec::try_from(timeout).ok();
    let _ = rustix::event::poll(&mut p, t.as_ref());
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
    stop_evt: Arc<Wakeup>,
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
    pub gpadls: GpadlTable,
    pub relid: u32,
    pub target_vp: u32,
    pub inbound: InRing,
    pub outbound: OutRing,
    pub doorbell: Arc<Wakeup>,
}

impl OpenChannel {
    /// Start the channel thread.
    pub fn start(s: ChannelStart) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_evt = Arc::new(Wakeup::new()?);
        let target_vp = Arc::new(AtomicU32::new(s.target_vp));
        let failed = Arc::new(AtomicBool::new(false));
        let name = lock_vsp(&s.vsp).name();
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
        self.stop_evt.signal();
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
    stop_evt: &Wakeup,
    target_vp: Arc<AtomicU32>,
) -> Result<(), VspError> {
    let ChannelStart {
        vsp,
        synic,
        gpadls,
        relid,
        mut inbound,
        outbound,
        doorbell,
        ..
    } = s;
    let wakeup = lock_vsp(&vsp).host_wakeup();
    let mut tx = ChannelTx {
        out: outbound,
        mem: GuestMem::new(synic.memory().clone()),
        synic,
        gpadls,
        relid,
        target_vp,
        doorbell: doorbell.clone(),
        signals: 0,
    };
    let (mut packets, mut wakeups) = (0u64, 0u64);
    let result = (|| {
        lock_vsp(&vsp).opened(&mut tx)?;
        let mut fds = vec![doorbell.as_fd(), stop_evt.as_fd()];
        if let Some(w) = &wakeup {
            fds.push(w.as_fd());
        }
        while !stop.load(Ordering::SeqCst) {
            doorbell.take();
            if let Some(w) = &wakeup {
                w.take();
            }
            // While this thread reads, the guest need not signal: it checks the mask before
            // every HvSignalEvent, so a busy channel costs it no exit per packet.
            inbound.set_interrupt_mask(true);
            wakeups += 1;
            loop {
                while let Some((pkt, sig)) = inbound.read()? {
                    if sig {
                        tx.signal();
                    }
                    lock_vsp(&vsp).packet(&pkt, &mut tx)?;
                    packets += 1;
                }
                lock_vsp(&vsp).poll_host(&mut tx)?;
                // Unmask, then look once more: a packet written just before the unmask
                // came without a signal.
                inbound.set_interrupt_mask(false);
                if inbound.is_empty()? {
                    break;
                }
                inbound.set_interrupt_mask(true);
            }
            // The timeout covers a doorbell the guest skipped (it signals only on an
            // empty-to-non-empty transition).
            wait_readable(&fds, Duration::from_millis(50));
        }
        Ok(())
    })();
    lock_vsp(&vsp).closed();
    // What the channel cost the guest in exits and interrupts: with `packets` per wakeup
    // high, a busy guest seldom had to signal.
    tracing::info!(
        relid,
        packets,
        wakeups,
        interrupts = tx.signals,
        "VMBus channel closed"
    );
    result
}
