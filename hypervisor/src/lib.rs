//! Parvis VMM: one KVM child partition with its memory, vCPUs, boot path and devices.
//!
//! Layering: `layout` (the guest-physical map) → `memory` (memfd-backed RAM and VRAM) →
//! `boot`, `acpi`, `cpu` (what the guest finds at reset) → `devices` (buses and device
//! models) → `vcpu` (run loops) → `partition` (lifecycle and control). The `parvis-worker`
//! binary wraps a partition with a command line, a serial console and a control socket.
//!
//! Unsafe code is limited to what KVM and shared memory need: memfd creation and hole
//! punching (`memory`), memory slot registration (`partition`), and the worker's terminal
//! handling; each block carries a `// SAFETY:` comment.

#![allow(
    unsafe_code,
    reason = "KVM memory slots and memfd need unsafe; each use is documented"
)]

pub mod acpi;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod framebuffer;
pub mod layout;
pub mod memory;
pub mod partition;
pub mod vcpu;

pub use partition::{
    Command, DiskAttachment, GuestExit, Partition, PartitionConfig, PartitionError,
    PartitionHandle, PartitionState, RebootAction,
};
