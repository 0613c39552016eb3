//! Fault points for crash tests: named places where the agent kills itself with SIGKILL when
//! the environment asks for it, so a test can stop it at exactly one step of an operation
//! (a random `kill -9` would hit the narrow windows between steps only by luck).
//!
//! `PARVIS_FAULT_POINT=NAME` arms the point `NAME`; `NAME@N` arms its N-th hit (from 1). Unset,
//! every point is one relaxed load of a flag that was read once.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable that arms a point.
pub const ENV: &str = "PARVIS_FAULT_POINT";

struct Armed {
    name: String,
    hit: u32,
    seen: AtomicU32,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(ENV).ok()?;
            let (name, hit) = match v.split_once('@') {
                Some((n, k)) => (n.to_string(), k.parse().ok()?),
                None => (v, 1),
            };
            Some(Armed {
                name,
                hit,
                seen: AtomicU32::new(0),
            })
        })
        .as_ref()
}

/// A named step: the agent dies here (SIGKILL, as `kill -9` would do it) if the point is
/// armed.
pub fn point(name: &str) {
    let Some(a) = armed() else { return };
    if a.name != name || a.seen.fetch_add(1, Ordering::SeqCst) + 1 != a.hit {
        return;
    }
    eprintln!("parvis-agent: fault point {name} reached: killing myself");
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    // SIGKILL cannot be caught; this is never reached.
    std::process::abort();
}
