//! The agent's errors, and the one place they become `tonic::Status`.
//!
//! Messages that reach clients name the API's objects (VM and disk ids, fields), never host
//! paths or internals; those go to the agent's log. Whatever a message quotes from a request
//! goes through [`quote`], and no message is longer than [`MAX_MESSAGE`], so a client never
//! gets a status its own library refuses (grpcio takes at most 16 KiB of metadata).
//!
//! Codes follow gRPC's conventions: a request that can never succeed is INVALID_ARGUMENT, an
//! unknown object NOT_FOUND, an object in the wrong state FAILED_PRECONDITION, a limit
//! RESOURCE_EXHAUSTED, a feature the agent lacks (compressed messages) UNIMPLEMENTED, and
//! UNAVAILABLE only for what is worth retrying unchanged (a broken stream, a worker that is
//! restarting).

use thiserror::Error;
use tonic::Status;

/// Everything an RPC can fail with.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{kind} '{}' not found", quote(id))]
    NotFound { kind: &'static str, id: String },
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("cancelled")]
    Cancelled,
    /// Something the agent does not do (a compressed request message).
    #[error("{0}")]
    Unimplemented(String),
    /// A disk image problem that is the client's (a corrupt or unsupported upload).
    #[error("disk image: {0}")]
    Image(String),
    /// Anything else: logged in full, reported to the client only as "internal error".
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

/// Result of agent operations.
pub type AgentResult<T> = Result<T, AgentError>;

impl AgentError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        AgentError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        AgentError::NotFound {
            kind,
            id: id.into(),
        }
    }

    pub fn precondition(msg: impl Into<String>) -> Self {
        AgentError::FailedPrecondition(msg.into())
    }

    /// Wrap an I/O or other host-side failure with what was being done.
    pub fn internal(what: impl std::fmt::Display, e: impl Into<anyhow::Error>) -> Self {
        AgentError::Internal(e.into().context(what.to_string()))
    }
}

impl From<parvis_disk::DiskError> for AgentError {
    fn from(e: parvis_disk::DiskError) -> Self {
        use parvis_disk::DiskError as D;
        match e {
            e @ D::Io { .. } => AgentError::internal("disk I/O", e),
            // Parent paths are host paths: say what is wrong without them.
            D::Parent { .. } | D::ParentChain { .. } => AgentError::Image(
                "differencing images need their parent; upload a merged image instead".into(),
            ),
            other => AgentError::Image(other.to_string()),
        }
    }
}

/// The longest message a status carries, in bytes.
pub const MAX_MESSAGE: usize = 1024;

/// The longest piece of a request a message quotes whole, in characters.
const QUOTE_CHARS: usize = 64;

/// `s` as an error message quotes it: whole when short; else its first characters and its
/// length ("0123…" (10485760 bytes)). Control characters are shown escaped.
pub fn quote(s: &str) -> String {
    let escape = |s: &str| s.chars().flat_map(char::escape_debug).collect::<String>();
    if s.chars().count() <= QUOTE_CHARS {
        return escape(s);
    }
    let head: String = s.chars().take(QUOTE_CHARS / 2).collect();
    format!("{}… ({} bytes)", escape(&head), s.len())
}

/// `msg` cut to [`MAX_MESSAGE`] bytes (on a character boundary), saying so.
fn capped(msg: String) -> String {
    if msg.len() <= MAX_MESSAGE {
        return msg;
    }
    let mut end = MAX_MESSAGE - 16;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut)", &msg[..end])
}

impl AgentError {
    /// The message a client sees (what the status carries): capped, and for an internal error
    /// only that there was one, its details going to the log here.
    pub fn client_message(&self) -> String {
        match self {
            AgentError::Internal(inner) => {
                tracing::error!("internal error: {inner:#}");
                "internal error (details are in the agent's log)".into()
            }
            e => capped(e.to_string()),
        }
    }
}

/// A worker's answer that a request failed: its code says what the client is told; its words
/// are shown only where the worker promises they are fit for a person.
impl From<proto::worker::Error> for AgentError {
    fn from(e: proto::worker::Error) -> Self {
        use proto::worker::ErrorCode as C;
        let words = capped(e.message.clone());
        match e.code() {
            C::NotSupported => AgentError::FailedPrecondition(words),
            C::NotReady => AgentError::Unavailable(words),
            C::Gone => AgentError::Unavailable("the VM's worker is gone".into()),
            // A request the agent should never have sent, or a host-side failure: the
            // client learns only that there was one.
            C::BadRequest | C::Internal | C::Unspecified => AgentError::Internal(anyhow::anyhow!(
                "the worker answered {:?}: {}",
                e.code(),
                e.message
            )),
        }
    }
}

/// A request stream's failure as tonic reports it (a gRPC client stream that broke or could
/// not be decoded).
impl From<Status> for AgentError {
    fn from(s: Status) -> Self {
        match s.code() {
            tonic::Code::ResourceExhausted => {
                AgentError::ResourceExhausted(capped(s.message().into()))
            }
            tonic::Code::Unimplemented => AgentError::Unimplemented(capped(s.message().into())),
            // tonic's codec reports a message it cannot decode as INTERNAL.
            tonic::Code::Internal => AgentError::invalid("request", capped(s.message().into())),
            _ => {
                AgentError::Unavailable(format!("the request stream broke: {}", quote(s.message())))
            }
        }
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let msg = || e.client_message();
        match &e {
            AgentError::NotFound { .. } => Status::not_found(msg()),
            AgentError::InvalidArgument { .. } | AgentError::Image(_) => {
                Status::invalid_argument(msg())
            }
            AgentError::FailedPrecondition(_) => Status::failed_precondition(msg()),
            AgentError::AlreadyExists(_) => Status::already_exists(msg()),
            AgentError::Unavailable(_) => Status::unavailable(msg()),
            AgentError::ResourceExhausted(_) => Status::resource_exhausted(msg()),
            AgentError::Unimplemented(_) => Status::unimplemented(msg()),
            AgentError::Cancelled => Status::cancelled(msg()),
            AgentError::Internal(_) => Status::internal(msg()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_details() {
        let e = AgentError::internal(
            "writing /var/lib/parvis/vms/x/vm.json",
            std::io::Error::other("disk full"),
        );
        let s = Status::from(e);
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(!s.message().contains("/var/lib"), "{}", s.message());
        assert!(!s.message().contains("disk full"));
    }

    #[test]
    fn codes_follow_the_kind() {
        let s = Status::from(AgentError::invalid("spec.cpus", "must be at least 1"));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "spec.cpus: must be at least 1");
        assert_eq!(
            Status::from(AgentError::not_found("VM", "abc")).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            Status::from(AgentError::precondition("VM is off")).code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[test]
    fn worker_errors_become_statuses_by_their_code() {
        use proto::worker::{Error, ErrorCode};
        let s = Status::from(AgentError::from(Error::new(
            ErrorCode::NotSupported,
            "this VM has no input device yet",
        )));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.message(), "this VM has no input device yet");
        let s = Status::from(AgentError::from(Error::new(
            ErrorCode::NotReady,
            "input is backed up",
        )));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        // Whatever an internal failure's words say stays in the log.
        for code in [
            ErrorCode::Internal,
            ErrorCode::BadRequest,
            ErrorCode::Unspecified,
        ] {
            let s = Status::from(AgentError::from(Error::new(
                code,
                "cannot open /var/lib/parvis/vms/x/shot.png: Permission denied (os error 13)",
            )));
            assert_eq!(s.code(), tonic::Code::Internal);
            assert!(!s.message().contains("/var/lib"), "{}", s.message());
            assert!(!s.message().contains("os error"), "{}", s.message());
        }
    }

    #[test]
    fn quoted_request_text_is_bounded() {
        assert_eq!(quote("abc"), "abc");
        assert_eq!(quote("a\nb"), "a\\nb");
        let huge = "x".repeat(10 << 20);
        let q = quote(&huge);
        assert!(q.len() < 80, "{q}");
        assert!(q.ends_with("(10485760 bytes)"), "{q}");
        let s = Status::from(AgentError::not_found("VM", huge.clone()));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(s.message().len() < 100, "{}", s.message());
        assert!(s.message().starts_with("VM 'xxxx"), "{}", s.message());
        // A quote cut inside a multi-byte character stays valid UTF-8.
        let q = quote(&"é".repeat(100));
        assert!(q.starts_with(&"é".repeat(32)), "{q}");
        // Whatever a message says, the status carries at most MAX_MESSAGE bytes.
        let s = Status::from(AgentError::precondition("ü".repeat(5000)));
        assert!(s.message().len() <= MAX_MESSAGE, "{}", s.message().len());
        assert!(s.message().ends_with("(cut)"));
    }
}
