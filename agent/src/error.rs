//! The agent's errors, and the one place they become `tonic::Status`.
//!
//! Messages that reach clients name the API's objects (VM and disk ids, fields), never host
//! paths or internals; those go to the agent's log.

use thiserror::Error;
use tonic::Status;

/// Everything an RPC can fail with.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{kind} '{id}' not found")]
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

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        match &e {
            AgentError::NotFound { .. } => Status::not_found(e.to_string()),
            AgentError::InvalidArgument { .. } | AgentError::Image(_) => {
                Status::invalid_argument(e.to_string())
            }
            AgentError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            AgentError::AlreadyExists(_) => Status::already_exists(e.to_string()),
            AgentError::Unavailable(_) => Status::unavailable(e.to_string()),
            AgentError::ResourceExhausted(_) => Status::resource_exhausted(e.to_string()),
            AgentError::Cancelled => Status::cancelled("cancelled"),
            AgentError::Internal(inner) => {
                tracing::error!("internal error: {inner:#}");
                Status::internal("internal error (details are in the agent's log)")
            }
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
}
