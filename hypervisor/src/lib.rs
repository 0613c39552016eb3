//! Parvis VMM: one KVM child partition with its memory, vCPUs, boot path and devices.
//!
//! Layering: `layout` (the guest-physical map) → `memory` (memfd-backed RAM and VRAM) →
//! `boot`, `acpi`, `cpu` (what the guest finds at reset) → `devices` (buses and device
//! models) → `vcpu` (run loops) → `partition` (lifecycle and control). The `parvis-worker`
//! binary wraps a partition with a command line, a serial console and a control socket.
//!
//! Hyper-V enlightenments (`hv`) and the VMBus host (`vmbus`: the control plane, the channel
//! threads and the hypercall glue) sit beside the devices. What parses guest VMBus data
//! lives in crates without unsafe code: `vmbus_core` (rings, channel messages, the device
//! contract, the fake guest) and `vmbus_devices` (the synthetic video, keyboard and mouse).
//!
//! May depend on: `parvis_disk`, `vmbus_core`, `vmbus_devices` and the rust-vmm crates; never
//! on `proto` (the `parvis-worker` binary translates) or the agent.
//!
//! Unsafe code is denied by the workspace and allowed module by module, only where KVM and
//! shared memory need it: memory slot registration (`partition`, including the synthvid VRAM
//! slot), the `kvm_run` exit unions (`vcpu`) and KVM_HYPERV_EVENTFD (`hv::kvm`); each block
//! carries a `// SAFETY:` comment. The memfd, hole punching and polling go through rustix.

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
#[allow(
    unsafe_code,
    reason = "KVM memory slots (guest RAM, the boot framebuffer, synthvid VRAM)"
)]
pub mod partition;
#[allow(unsafe_code, reason = "the kvm_run exit unions")]
pub mod vcpu;
pub mod vmbus;

pub use partition::{
    Command, DiskAttachment, GuestExit, Partition, PartitionConfig, PartitionError,
    PartitionHandle, PartitionState, RebootAction,
};
