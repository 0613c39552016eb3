//! What the network tasks share, below `backend`, `console` and `upload`: a host's
//! connection slot, the UI's wake-up call, the unary call timeout, and failed calls in
//! plain words.
//!
//! This module depends on `proto`, `tonic` and `egui::Context` only, never on the modules
//! above it, so the import graph is one way: `backend` → `console`/`upload` → `conn`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::client::{Clients, ConnectError};
use tonic::{Code, Status};

/// The connection slot of one host: the current clients while it is online.
pub type Slot = Arc<Mutex<Option<Clients>>>;

/// Longest wait for a unary call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Wakes the UI (e.g. new console tiles or upload progress in shared state). Network tasks
/// that only change shared state get this, not the update channel.
#[derive(Clone)]
pub struct UiWaker {
    ctx: egui::Context,
}

impl UiWaker {
    pub fn new(ctx: egui::Context) -> Self {
        UiWaker { ctx }
    }

    /// Ask for a new frame.
    pub fn wake(&self) {
        self.ctx.request_repaint();
    }
}

/// Every message of an error's source chain, without repeats.
pub fn chain(e: &dyn std::error::Error) -> String {
    proto::client::error_chain(e)
}

/// A connection failure in plain words.
pub fn connect_error(e: &ConnectError) -> String {
    let text = chain(e);
    let lower = text.to_ascii_lowercase();
    if lower.contains("refused") {
        format!("nothing answers at this address ({text}); is parvis-agent running?")
    } else if lower.contains("fingerprint") && lower.contains("pinned") {
        format!(
            "the host's certificate is not the one you trusted ({text}); if the agent was \
             reinstalled on purpose, edit the host and confirm the new fingerprint"
        )
    } else {
        text
    }
}

/// A failed call in plain words.
pub fn plain_status(what: &str, s: &Status) -> String {
    let msg = if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    };
    match s.code() {
        Code::Unauthenticated => format!(
            "{what}: the host does not accept the token ({msg}); edit the host and paste the \
             token parvis-agent printed"
        ),
        Code::Unavailable => {
            let detail = std::error::Error::source(s).map(chain).unwrap_or_default();
            if detail.is_empty() || msg.contains(&detail) {
                format!("{what}: the host cannot be reached ({msg})")
            } else {
                format!("{what}: the host cannot be reached ({msg}: {detail})")
            }
        }
        Code::DeadlineExceeded => format!("{what}: the host did not answer in time"),
        Code::NotFound => format!("{what}: {msg} (it may have been deleted meanwhile)"),
        Code::Unimplemented => format!(
            "{what}: the host does not support this ({msg}); is its agent older than this console?"
        ),
        _ => format!("{what}: {msg}"),
    }
}
