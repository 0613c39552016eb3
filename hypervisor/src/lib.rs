//! Parvis VMM: one KVM child partition with its memory, vCPUs, boot path and devices.
//!
//! Layering: `layout` (the guest-physical map) → `memory` (memfd-backed RAM and VRAM) →
//! `boot`, `acpi`, `cpu` (what the guest finds at reset) → `devices` (buses and device
//! models) → `vcpu` (run loops) → `partition` (lifecycle and control). The `parvis-worker`
//! binary wraps a partition with a command line, a serial console and a control socket.
//!
//! Hyper-V enlightenments (`hv`) and the VMBus host (`vmbus`: control plane, rings,
//! channels) sit beside the devices; the synthetic video, keyboard and mouse are
//! `devices::synth`.
//!
//! Unsafe code is limited to what KVM and shared memory need: memfd creation and hole
//! punching (`memory`), memory slot registration (`partition`, including the synthvid VRAM
//! slot), `kvm_run` exit unions and KVM_HYPERV_EVENTFD (`vcpu`, `hv::kvm`), `poll` on channel
//! eventfds (`vmbus::channel`), and the worker's terminal handling; each block carries a
//! `// SAFETY:` comment.

#![allow(
    unsafe_code,
    reason = "KVM memory slots and memfd need unsafe; each use is documented"
)]

pub mod acpi;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod dirty;
pub mod framebuffer;
pub mod hv;
pub mod layout;
pub mod memory;
pub mod partition;
pub mod vcpu;
pub mod vmbus;

pub use partition::{
    Command, DiskAttachment, GuestExit, Partition, PartitionConfig, PartitionError,
    PartitionHandle, PartitionState, RebootAction,
};
