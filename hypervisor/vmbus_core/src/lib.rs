//! VMBus for Parvis's VMM, as far as it parses what the guest writes: the ring buffers in
//! guest memory ([`ring`]), the channel-management messages ([`messages`]), guest memory
//! reached through page lists and GPADLs ([`memory`]), and the contract every VMBus device
//! (VSP) implements ([`channel`]): a device sees its open channel only as a [`Channel`], so
//! the same device runs on the VMM's channel thread and on the in-memory [`fake`] guest that
//! unit tests and fuzz targets drive.
//!
//! Everything here is hostile input from the guest: no `unsafe`, every index and length is
//! checked, nothing panics.
//!
//! May depend on: vm-memory, rustix (eventfds), thiserror, tracing. Not on KVM, the
//! hypervisor crate or any protocol crate of the agent.

#![forbid(unsafe_code)]

pub mod channel;
pub mod fake;
pub mod memory;
pub mod messages;
pub mod ring;
pub mod wakeup;

pub use channel::{Channel, OfferParams, SharedVsp, TransferRange, Vsp, VspError};
pub use memory::{GuestMem, MemError, PageList};
pub use messages::Guid;
pub use wakeup::Wakeup;
