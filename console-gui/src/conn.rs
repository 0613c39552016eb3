//! What the network tasks share, below `backend`, `console`, `stats` and `upload`: a host's
//! connection slot, the UI's wake-up call, the unary call timeout, and failures in plain
//! words ([`Plain`]: one sentence for people, the technical chain beside it).
//!
//! This module depends on `proto`, `tonic` and `egui::Context` only, never on the modules
//! above it, so the import graph is one way: `backend` → `console`/`stats`/`upload` → `conn`.

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

/// Wait until the host is connected (the host's own task fills the slot).
pub async fn wait_clients(slot: &Slot) -> Clients {
    loop {
        if let Some(c) = slot.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A failure for people: `line` is one sentence saying what happened and what to do;
/// `details` is the technical chain (codes, transport errors, the agent's own words), shown
/// only when asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plain {
    pub line: String,
    pub details: String,
}

impl Plain {
    pub fn new(line: impl Into<String>, details: impl Into<String>) -> Self {
        Plain {
            line: line.into(),
            details: details.into(),
        }
    }

    /// The same failure as part of something bigger: `what: line`.
    pub fn during(mut self, what: &str) -> Self {
        if !what.is_empty() {
            self.line = format!("{what}: {}", self.line);
        }
        self
    }
}

impl std::fmt::Display for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

/// Every message of an error's source chain, without repeats.
pub fn chain(e: &dyn std::error::Error) -> String {
    proto::client::error_chain(e)
}

/// A connection to `addr` that failed, in plain words.
pub fn connect_error(addr: &str, e: &ConnectError) -> Plain {
    let text = chain(e);
    let lower = text.to_ascii_lowercase();
    let line = if let ConnectError::BadAddress(_) = e {
        format!("'{addr}' is not HOST:PORT; edit the host and correct its address")
    } else if let ConnectError::BadToken = e {
        "the saved token has characters no token has; edit the host and paste the token \
         parvis-agent printed"
            .to_string()
    } else if lower.contains("fingerprint") && lower.contains("pinned") {
        "the host's certificate is not the one you trusted; if its agent was reinstalled on \
         purpose, edit the host and confirm the new fingerprint"
            .to_string()
    } else if lower.contains("refused") {
        format!("nothing answers at {addr}; check that parvis-agent is running there")
    } else if lower.contains("timed out") || lower.contains("deadline") {
        format!("{addr} does not answer; check the address and that the host is up")
    } else if lower.contains("lookup") || lower.contains("resolve") || lower.contains("dns") {
        format!("the name in {addr} is not known here; check the address")
    } else if lower.contains("unreachable") || lower.contains("no route") {
        format!("{addr} cannot be reached from this computer; check the network")
    } else if lower.contains("tls")
        || lower.contains("certificate")
        || lower.contains("handshake")
        || lower.contains("corrupt message")
        || lower.contains("invalidcontenttype")
    {
        format!("{addr} does not speak TLS as parvis-agent does; check the address")
    } else {
        format!("cannot connect to {addr}; check the address and that parvis-agent runs there")
    };
    Plain::new(line, text)
}

/// A failed call in plain words: `what` says what could not be done ("cannot start the VM
/// 'web' on lab"), the rest why and what to do. An empty `what` gives only the why.
pub fn plain_status(what: &str, s: &Status) -> Plain {
    let msg = s.message().trim().trim_end_matches('.').to_string();
    let source = std::error::Error::source(s).map(chain).unwrap_or_default();
    let mut details = format!("{:?}", s.code());
    if !msg.is_empty() {
        details.push_str(": ");
        details.push_str(&msg);
    }
    if !source.is_empty() && !msg.contains(&source) {
        details.push_str(": ");
        details.push_str(&source);
    }
    let transport = !source.is_empty()
        || msg.is_empty()
        || msg.contains("transport")
        || msg.contains("connection")
        || msg.contains("error trying to connect");
    let why = match s.code() {
        Code::Unauthenticated => "the host does not accept this console's token; edit the host \
                                  and paste the token parvis-agent printed"
            .to_string(),
        Code::PermissionDenied => "the host does not allow this console to do that".to_string(),
        Code::Unavailable if transport => {
            "the host cannot be reached; check that it is up (the console reconnects by itself)"
                .to_string()
        }
        Code::Unavailable => format!("{msg}; try again in a moment"),
        Code::DeadlineExceeded => {
            "the host did not answer in time; check that it is up and not overloaded".to_string()
        }
        Code::NotFound => "it is no longer on the host (deleted meanwhile?)".to_string(),
        Code::Unimplemented => "the host's agent is older than this console and cannot do this; \
                                update parvis-agent"
            .to_string(),
        Code::Internal | Code::Unknown | Code::DataLoss => {
            "the host ran into an internal error; its agent's log has the details".to_string()
        }
        Code::Cancelled => "it was cancelled".to_string(),
        Code::InvalidArgument => field_words(&msg),
        _ if msg.is_empty() => format!("the host refused ({:?})", s.code()),
        _ => msg.clone(),
    };
    Plain::new(why, details).during(what)
}

/// The agent's "spec.cpus: must be between 1 and 8" as "CPUs must be between 1 and 8".
pub fn field_words(msg: &str) -> String {
    let Some((field, reason)) = msg.split_once(": ") else {
        return msg.to_string();
    };
    let label = match field {
        "spec.name" | "name" => "the name".to_string(),
        "spec.cpus" => "CPUs".to_string(),
        "spec.memory_bytes" => "memory".to_string(),
        "spec.display_width" | "spec.display_height" => "the screen size".to_string(),
        "spec.cmdline" => "the kernel command line".to_string(),
        "spec.boot_image" => "the boot image".to_string(),
        "spec.boot_source" => "what the VM boots".to_string(),
        "spec.boot_entry" => "the boot entry".to_string(),
        "new_size" | "size" => "the size".to_string(),
        "format" | "variant" => "the format".to_string(),
        f => match f
            .strip_prefix("spec.disks[")
            .and_then(|r| r.split_once(']'))
            .and_then(|(i, _)| i.parse::<usize>().ok())
        {
            Some(i) => format!("disk {}", i + 1),
            None => return msg.to_string(),
        },
    };
    if reason.starts_with("must") {
        format!("{label} {reason}")
    } else {
        format!("{label}: {reason}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_become_one_sentence_with_the_details_beside() {
        let p = plain_status(
            "cannot change the settings of VM 'web'",
            &Status::invalid_argument("spec.cpus: must be between 1 and 8"),
        );
        assert_eq!(
            p.line,
            "cannot change the settings of VM 'web': CPUs must be between 1 and 8"
        );
        assert_eq!(
            p.details,
            "InvalidArgument: spec.cpus: must be between 1 and 8"
        );
        let p = plain_status("", &Status::unauthenticated("invalid token"));
        assert!(p.line.starts_with("the host does not accept"), "{}", p.line);
        assert!(
            !p.line.contains("invalid token"),
            "the code's words stay in the details"
        );
        let p = plain_status(
            "x",
            &Status::internal("internal error (details are in the log)"),
        );
        assert_eq!(
            p.line,
            "x: the host ran into an internal error; its agent's log has the details"
        );
        let p = plain_status("x", &Status::unavailable("the VM's worker is gone"));
        assert_eq!(p.line, "x: the VM's worker is gone; try again in a moment");
        assert_eq!(
            field_words("spec.disks[1].disk_id: no disk 'x' in the library"),
            "disk 2: no disk 'x' in the library"
        );
        assert_eq!(
            field_words("VM 'a' is running; cannot start it"),
            "VM 'a' is running; cannot start it"
        );
    }

    #[test]
    fn connection_failures_name_the_address() {
        let p = connect_error("h:1", &ConnectError::BadAddress("h".into()));
        assert_eq!(
            p.line,
            "'h:1' is not HOST:PORT; edit the host and correct its address"
        );
        let p = connect_error(
            "10.0.0.1:7443",
            &ConnectError::Io {
                addr: "10.0.0.1:7443".into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "connection refused",
                ),
            },
        );
        assert_eq!(
            p.line,
            "nothing answers at 10.0.0.1:7443; check that parvis-agent is running there"
        );
        assert!(p.details.contains("connection refused"));
    }
}
