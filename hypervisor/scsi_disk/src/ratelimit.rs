//! Rate limiting for log lines a guest can trigger (a failing backend under a guest that
//! retries must not flood the worker's log).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `BURST` events per `WINDOW` are let through; the rest are counted and the count
/// is handed to the first event of the next window.
pub(crate) struct RateLimit {
    window: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

const WINDOW: Duration = Duration::from_secs(60);
const BURST: u32 = 10;

impl RateLimit {
    pub(crate) fn new() -> Self {
        Self {
            window: Mutex::new(Window {
                start: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` if this event may be logged, `n` being how many were dropped since the last
    /// one logged; `None` if it must be dropped.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked while counting; the counts are
        // still usable.
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let expired = w
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= WINDOW);
        if expired {
            w.start = Some(now);
            w.passed = 0;
        }
        if w.passed < BURST {
            w.passed += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_counts_what_it_dropped() {
        let r = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(r.allow_at(t0), Some(0));
        }
        assert_eq!(r.allow_at(t0), None);
        assert_eq!(r.allow_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(r.allow_at(t0 + WINDOW), Some(2));
        assert_eq!(r.allow_at(t0 + WINDOW), Some(0));
    }
}
