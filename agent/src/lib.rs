//! Parvis agent: the management service of the parent partition (Hyper-V's VMMS).
//!
//! It owns the host's inventory (VMs, the disk library, boot images), spawns one
//! `parvis-worker` per running VM and serves the `parvis.v1` gRPC API.
//!
//! May depend on: `proto` and the pure disk-format crate (`parvis_disk`) only; it never
//! links the VMM (it spawns `parvis-worker`).
//!
//! Module map:
//! - [`store`]: state directory layout, atomic writes, ids.
//! - [`events`], [`tasks`]: the event bus and long-running operations.
//! - [`disks`]: the disk library and resumable uploads.
//! - [`vms`]: VM inventory, state machine and worker supervision.
//! - [`worker`]: the agent's whole client of the worker protocol (control, input and display
//!   connections, the guest memory file).
//! - [`screen`], [`serial`]: framebuffer tiles and serial console fan-out.
//! - [`stats`]: resource use of the host and its VMs over time.
//! - [`security`]: bearer tokens and the TLS certificate.
//! - [`fault`]: named fault points that crash tests arm.
//! - [`service`]: the thin gRPC handlers; [`error`] maps every failure to a status.

pub mod disks;
pub mod error;
pub mod events;
pub mod fault;
pub mod host;
pub mod network;
pub mod screen;
pub mod security;
pub mod serial;
pub mod server;
pub mod service;
pub mod stats;
pub mod store;
pub mod tasks;
pub mod vms;
pub mod worker;

#[cfg(test)]
mod testutil {
    /// `len` reproducible pseudo-random bytes (xorshift64 from `seed`).
    pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

use std::sync::Arc;

pub use proto::API_VERSION;

/// Everything the services share.
#[derive(Debug)]
pub struct Agent {
    pub layout: store::Layout,
    pub events: Arc<events::EventBus>,
    pub tasks: Arc<tasks::Tasks>,
    pub disks: Arc<disks::DiskLibrary>,
    pub vms: Arc<vms::Vms>,
    pub host: host::HostFacts,
    /// Resource use over time.
    pub stats: Arc<stats::Stats>,
}
