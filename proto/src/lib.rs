//! Parvis wire API.
//!
//! May depend on: no workspace crate, and only portable crates (the console uses it on
//! Windows).
//!
//! - [`v1`]: the public gRPC API (`parvis.v1`): host, VM, console and disk services, used by
//!   the console, the `parvis` CLI and any client generated from the `.proto` files in
//!   `schema/`.
//! - [`worker`]: the internal, unstable agent↔worker protocol (`parvis.worker.v1`).
//! - [`client`]: connecting to an agent: plain HTTP/2 on loopback, TLS with a pinned
//!   certificate elsewhere, the bearer token on every call.
//! - [`hosts`]: the saved-hosts file the CLI and the console share.
//! - [`upload_wire`]: `DiskService.UploadDisk` framed on both ends without copying the data.
//! - [`worker_msg`]: worker protocol messages that more than one worker implementation sends.

pub mod client;
pub mod framing;
pub mod hosts;
pub mod tiles;
pub mod upload_source;
pub mod upload_wire;
pub mod worker_msg;

/// Version of the `parvis.v1` API family, reported by the agent and the worker.
pub const API_VERSION: &str = "parvis.v1";

/// The public API, `parvis.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("parvis.v1");
}

/// The internal agent↔worker protocol, `parvis.worker.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod worker {
    tonic::include_proto!("parvis.worker.v1");
}

/// Largest gRPC message either side accepts: a full 1920x1080 frame of raw tiles is about
/// 8 MiB, so the 4 MiB default is too small.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
