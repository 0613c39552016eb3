//! The contract between a VMBus device (a VSP, the host end of a synthetic device) and its
//! open channel.
//!
//! A device implements [`Vsp`]. While its channel is open it is called on one thread with a
//! [`Channel`]: the packets the guest sent, one by one, and host-side work when its wakeup
//! fires. Through the `Channel` it answers (inband packets, completions echoing the
//! guest's transaction id, transfer-page packets from a receive buffer the guest shared),
//! reads and writes guest memory by page list, and finds the GPADLs the guest created for
//! it. The VMM's channel thread and the [`fake`](crate::fake) guest both implement
//! `Channel`, so a device is tested and fuzzed exactly as it runs.
//!
//! A device never panics on guest input: a packet it cannot accept is a [`VspError`], and
//! the channel is closed (the VM goes on).

use std::sync::{Arc, Mutex};

use crate::memory::{Gpadl, GuestMem, MemError};
use crate::messages::Guid;
use crate::ring::{Packet, RingError, pkt};
use crate::wakeup::Wakeup;

/// A device's reason to give up on its channel.
#[derive(Debug, thiserror::Error)]
pub enum VspError {
    /// The guest broke the device protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The ring layer failed.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// Guest memory the guest named cannot be used.
    #[error(transparent)]
    Memory(#[from] MemError),
}

/// What a device puts in its offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferParams {
    /// Interface (class) GUID.
    pub class: Guid,
    /// Instance GUID.
    pub instance: Guid,
    /// Channel flags (0x10: named pipe).
    pub flags: u16,
    /// MMIO space the guest should carve for the device (synthvid VRAM), in MiB.
    pub mmio_megabytes: u16,
    /// Pipe mode (4 = message) for pipe channels, else 0.
    pub pipe_mode: u32,
}

/// One range of a transfer-page packet: `byte_count` bytes at `byte_offset` in the
/// receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferRange {
    pub byte_count: u32,
    pub byte_offset: u32,
}

/// What a device can do with its open channel.
pub trait Channel {
    /// Send a packet of type `ptype` (a [`pkt`] constant) with `payload`; waits (bounded)
    /// for ring space and interrupts the guest when it should.
    fn send_packet(
        &mut self,
        ptype: u16,
        flags: u16,
        trans_id: u64,
        payload: &[u8],
    ) -> Result<(), VspError>;

    /// Send a transfer-page packet: `ranges` of the receive buffer the guest registered as
    /// transfer page set `set_id` (which the device has filled already), then `payload`.
    fn send_transfer_pages(
        &mut self,
        set_id: u16,
        ranges: &[TransferRange],
        trans_id: u64,
        payload: &[u8],
    ) -> Result<(), VspError>;

    /// The guest's RAM.
    fn memory(&self) -> &GuestMem;

    /// The GPADL `id`, if the guest created it for this channel.
    fn gpadl(&self, id: u32) -> Option<Arc<Gpadl>>;

    /// Send an inband data packet.
    fn send(&mut self, payload: &[u8]) -> Result<(), VspError> {
        self.send_packet(pkt::DATA_INBAND, 0, 0, payload)
    }

    /// Answer the packet whose transaction id was `trans_id` with a completion.
    fn complete(&mut self, trans_id: u64, payload: &[u8]) -> Result<(), VspError> {
        self.send_packet(pkt::COMP, 0, trans_id, payload)
    }
}

/// A VMBus device server (VSP). Each device is its own module and implements this.
///
/// The device's state persists across channel close/open and partition resets, so a device
/// can also hold host-side input queues.
pub trait Vsp: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// The offer.
    fn offer(&self) -> OfferParams;
    /// The channel opened: reset protocol state.
    fn opened(&mut self, _ch: &mut dyn Channel) -> Result<(), VspError> {
        Ok(())
    }
    /// A packet from the guest.
    fn packet(&mut self, pkt: &Packet, ch: &mut dyn Channel) -> Result<(), VspError>;
    /// Host-side work (input to deliver); called after every wakeup.
    fn poll_host(&mut self, _ch: &mut dyn Channel) -> Result<(), VspError> {
        Ok(())
    }
    /// The channel closed.
    fn closed(&mut self) {}
    /// What the host side signals when it has work for [`Vsp::poll_host`].
    fn host_wakeup(&self) -> Option<Arc<Wakeup>> {
        None
    }
}

impl std::fmt::Debug for dyn Vsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A shared, lockable VSP.
pub type SharedVsp = Arc<Mutex<dyn Vsp>>;

/// Lock a device, whatever a panicking holder left.
pub fn lock_vsp(v: &SharedVsp) -> std::sync::MutexGuard<'_, dyn Vsp + 'static> {
    v.lock().unwrap_or_else(|e| e.into_inner())
}
