//! Parvis wire API (`parvis.v1`).
//!
//! The gRPC services (host, VM, console, disk) and the internal agent↔worker API are
//! defined here as `.proto` files and generated code. The public API lands with the agent
//! (issue 4); until then this crate only carries the API version shared by every process.

/// Version of the `parvis.v1` API family, reported by the agent and the worker.
pub const API_VERSION: &str = "parvis.v1";
