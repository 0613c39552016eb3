//! Parvis agent: the management service of the parent partition (Hyper-V's VMMS).
//!
//! It will own the host's inventory, spawn one `parvis-worker` per running VM and serve the
//! `parvis.v1` gRPC API (issue 4). It depends on `proto` and the pure disk-format crates only;
//! it never links the VMM.

pub use proto::API_VERSION;
