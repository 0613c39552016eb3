//! What a screen's capture does next, decided without threads, clocks or files: the capture
//! thread ([`super::Screen`]) feeds [`CaptureState::step`] what the worker reported and how
//! many consoles watch, and carries out the [`Action`]s it returns. Unit tests drive it
//! with made-up events and instants.
//!
//! The rules: while the synthetic video device owns the screen, capture what its dirty
//! rectangles name; when the worker logs the boot framebuffer's writes, capture the written
//! rows once somebody watches (and tell the worker to stop logging after a second with
//! nobody watching); otherwise poll the boot framebuffer while somebody watches, often
//! while it changes and less often after a second without change.

use std::time::{Duration, Instant};

use super::DisplayEvent;
use super::tiles::{Geometry, Rect, bounding};

/// Capture period while the screen is changing, and after a second without change.
pub(super) const ACTIVE_PERIOD: Duration = Duration::from_millis(5);
pub(super) const IDLE_PERIOD: Duration = Duration::from_millis(16);
/// With nobody watching for this long, the worker stops reading the boot framebuffer's
/// dirty page log (a guest drawing unwatched then pays nothing for it).
pub(super) const UNWATCHED_GRACE: Duration = Duration::from_secs(1);
/// Written boot framebuffer rectangles kept while nobody watches are merged into one
/// beyond this many.
pub(super) const MAX_PENDING: usize = 256;

/// What the worker's display connection delivered since the last step.
#[derive(Debug)]
pub(super) enum Input {
    Events(Vec<DisplayEvent>),
    /// The connection ended: nothing reports changes any more.
    Disconnected,
}

/// What the capture thread does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Capture the whole frame at this geometry, as a new epoch.
    Switch(Geometry),
    /// Capture the tiles under these rectangles of this geometry.
    Capture(Geometry, Vec<Rect>),
    /// Tell the worker whether the boot framebuffer's rows are wanted; then report with
    /// [`CaptureState::told`].
    WatchRows(bool),
    /// Nobody watches a polled screen: wait this long or until somebody subscribes.
    Idle(Duration),
    /// Read the boot framebuffer and compare, not before this instant; then report with
    /// [`CaptureState::polled`].
    Poll(Instant),
}

/// The capture's state between steps.
#[derive(Debug)]
pub(super) struct CaptureState {
    boot: Geometry,
    /// A display connection delivers events.
    display: bool,
    /// The worker reports the boot framebuffer's written rows (no polling).
    boot_log: bool,
    /// Whether the worker sends those rows (it does from subscribing), and since when they
    /// have been of no use.
    rows_wanted: bool,
    unwatched_since: Option<Instant>,
    /// Some(geometry) while the synthetic video device owns the screen.
    synthetic: Option<Geometry>,
    /// Written boot framebuffer rectangles not captured yet (nobody watched, or another
    /// device owned the screen).
    pending: Vec<Rect>,
    last_change: Instant,
    next_poll: Instant,
}

impl CaptureState {
    /// A capture of `boot`, with a display connection (`display`) that may log the boot
    /// framebuffer's writes (`boot_log`).
    pub(super) fn new(boot: Geometry, display: bool, boot_log: bool, now: Instant) -> Self {
        CaptureState {
            boot,
            display,
            boot_log: display && boot_log,
            rows_wanted: true,
            unwatched_since: None,
            synthetic: None,
            pending: Vec::new(),
            last_change: now,
            next_poll: now,
        }
    }

    /// Whether the boot framebuffer is never searched for changes.
    pub(super) fn boot_logged(&self) -> bool {
        self.boot_log
    }

    /// How long to wait for display events before the next step.
    pub(super) fn event_wait(&self) -> Duration {
        if self.synthetic.is_none() && self.boot_log && !self.pending.is_empty() {
            // Rows wait for a subscriber: look for one soon.
            Duration::from_millis(20)
        } else if self.boot_log {
            // Also how soon a new subscriber has the rows wanted again.
            Duration::from_millis(50)
        } else if self.synthetic.is_some() {
            Duration::from_millis(100)
        } else {
            Duration::ZERO
        }
    }

    /// One step: what `input` and `subscribers` (consoles watching) call for at `now`.
    /// `file_len` bounds the geometries the worker may report.
    pub(super) fn step(
        &mut self,
        input: Input,
        subscribers: usize,
        now: Instant,
        file_len: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let events = match input {
            Input::Events(e) => e,
            Input::Disconnected => {
                self.display = false;
                self.boot_log = false;
                self.pending.clear();
                if self.synthetic.take().is_some() {
                    actions.push(Action::Switch(self.boot));
                }
                Vec::new()
            }
        };
        let mut dirty = Vec::new();
        for e in events {
            match e {
                DisplayEvent::Mode(fb) => match Geometry::validate(&fb, file_len) {
                    Some(g) => {
                        self.synthetic = Some(g);
                        dirty.clear();
                        actions.push(Action::Switch(g));
                    }
                    None => tracing::warn!(?fb, "worker reported a bad display geometry"),
                },
                DisplayEvent::Inactive => {
                    if self.synthetic.take().is_some() {
                        dirty.clear();
                        // The switch reads all of it.
                        self.pending.clear();
                        actions.push(Action::Switch(self.boot));
                    }
                }
                DisplayEvent::Dirty(r) => dirty.extend(r),
                DisplayEvent::BootDirty(r) => {
                    self.pending.extend(r);
                    if self.pending.len() > MAX_PENDING {
                        self.pending = vec![bounding(&self.pending)];
                    }
                }
            }
        }
        if self.boot_log {
            let useful = self.synthetic.is_none() && subscribers > 0;
            let want = if useful {
                self.unwatched_since = None;
                true
            } else {
                let since = *self.unwatched_since.get_or_insert(now);
                now.saturating_duration_since(since) < UNWATCHED_GRACE
            };
            if want != self.rows_wanted {
                self.rows_wanted = want;
                actions.push(Action::WatchRows(want));
            }
        }
        if let Some(g) = self.synthetic {
            if !dirty.is_empty() {
                actions.push(Action::Capture(g, dirty));
            }
            if self.display {
                return actions;
            }
        }
        if self.boot_log {
            // The boot framebuffer's written rows, once somebody watches.
            if !self.pending.is_empty() && subscribers > 0 {
                actions.push(Action::Capture(
                    self.boot,
                    std::mem::take(&mut self.pending),
                ));
            }
            return actions;
        }
        if subscribers == 0 {
            actions.push(Action::Idle(if self.display {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(500)
            }));
            return actions;
        }
        actions.push(Action::Poll(self.next_poll));
        actions
    }

    /// The worker was told (or could not be: it is going away) that the rows are wanted or
    /// not. Once they are not, the rows kept are not needed: wanted again, every row comes.
    pub(super) fn told(&mut self, want: bool, told: bool) {
        if told && !want {
            self.pending.clear();
        }
    }

    /// A poll started at `started` and found changes or not.
    pub(super) fn polled(&mut self, started: Instant, changed: bool) {
        let period = if started.saturating_duration_since(self.last_change) < Duration::from_secs(1)
        {
            ACTIVE_PERIOD
        } else {
            IDLE_PERIOD
        };
        self.next_poll = started + period;
        if changed {
            self.last_change = started;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot() -> Geometry {
        Geometry {
            offset: 0,
            width: 640,
            height: 480,
            stride: 2560,
        }
    }

    fn fb(width: u32, height: u32) -> proto::worker::Framebuffer {
        proto::worker::Framebuffer {
            offset: 8 << 20,
            width,
            height,
            stride: width * 4,
            bytes_per_pixel: 4,
        }
    }

    fn rect(y: u32, height: u32) -> Rect {
        Rect {
            x: 0,
            y,
            width: 640,
            height,
        }
    }

    const FILE: u64 = 32 << 20;

    #[test]
    fn the_synthetic_device_owns_the_screen_while_active() {
        let t0 = Instant::now();
        let mut s = CaptureState::new(boot(), true, false, t0);
        let g = Geometry::validate(&fb(1024, 768), FILE).unwrap();
        let dirty = vec![Rect {
            x: 10,
            y: 20,
            width: 30,
            height: 40,
        }];
        let a = s.step(
            Input::Events(vec![
                DisplayEvent::Dirty(dirty.clone()),
                DisplayEvent::Mode(fb(1024, 768)),
                DisplayEvent::Dirty(dirty.clone()),
            ]),
            1,
            t0,
            FILE,
        );
        // Rectangles before the mode change are of the old mode: the switch reads it all.
        assert_eq!(
            a,
            vec![Action::Switch(g), Action::Capture(g, dirty.clone())]
        );
        assert_eq!(s.event_wait(), Duration::from_millis(100));
        // Nothing new: nothing to do, and no polling while the device reports changes.
        assert!(s.step(Input::Events(vec![]), 1, t0, FILE).is_empty());
        // A geometry beyond the file is ignored.
        assert!(
            s.step(
                Input::Events(vec![DisplayEvent::Mode(fb(8192, 8192))]),
                1,
                t0,
                FILE
            )
            .is_empty()
        );
        // The driver lets go: back to the boot framebuffer, polled.
        let a = s.step(Input::Events(vec![DisplayEvent::Inactive]), 1, t0, FILE);
        assert_eq!(a, vec![Action::Switch(boot()), Action::Poll(t0)]);
        // The connection ends while the device owns the screen: back to polling too.
        s.step(
            Input::Events(vec![DisplayEvent::Mode(fb(800, 600))]),
            1,
            t0,
            FILE,
        );
        let a = s.step(Input::Disconnected, 1, t0, FILE);
        assert_eq!(a, vec![Action::Switch(boot()), Action::Poll(t0)]);
    }

    #[test]
    fn logged_rows_wait_for_a_watcher_and_the_log_stops_when_nobody_watches() {
        let t0 = Instant::now();
        let mut s = CaptureState::new(boot(), true, true, t0);
        assert!(s.boot_logged());
        // Rows written with nobody watching are kept, not captured.
        let a = s.step(
            Input::Events(vec![DisplayEvent::BootDirty(vec![rect(0, 10)])]),
            0,
            t0,
            FILE,
        );
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(s.event_wait(), Duration::from_millis(20));
        // A watcher comes: they are captured, and never polled for.
        let a = s.step(Input::Events(vec![]), 1, t0, FILE);
        assert_eq!(a, vec![Action::Capture(boot(), vec![rect(0, 10)])]);
        // Nobody watches for a second: the worker is told to stop, and what was kept goes.
        s.step(
            Input::Events(vec![DisplayEvent::BootDirty(vec![rect(5, 1)])]),
            0,
            t0,
            FILE,
        );
        let a = s.step(
            Input::Events(vec![]),
            0,
            t0 + Duration::from_millis(999),
            FILE,
        );
        assert!(a.is_empty());
        let a = s.step(Input::Events(vec![]), 0, t0 + UNWATCHED_GRACE, FILE);
        assert_eq!(a, vec![Action::WatchRows(false)]);
        s.told(false, true);
        assert_eq!(s.event_wait(), Duration::from_millis(50));
        // Watched again: the rows are wanted again (every row follows from the worker).
        let a = s.step(Input::Events(vec![]), 1, t0 + UNWATCHED_GRACE, FILE);
        assert_eq!(a, vec![Action::WatchRows(true)]);
        // Many written rectangles merge into one.
        let many: Vec<Rect> = (0..MAX_PENDING as u32 + 1).map(|y| rect(y, 1)).collect();
        let a = s.step(
            Input::Events(vec![DisplayEvent::BootDirty(many)]),
            1,
            t0,
            FILE,
        );
        assert_eq!(
            a,
            vec![Action::Capture(
                boot(),
                vec![rect(0, MAX_PENDING as u32 + 1)]
            )]
        );
    }

    #[test]
    fn polling_is_fast_while_the_screen_changes_and_stops_with_nobody_watching() {
        let t0 = Instant::now();
        let mut s = CaptureState::new(boot(), false, true, t0);
        assert!(
            !s.boot_logged(),
            "without a display connection nothing logs"
        );
        assert_eq!(
            s.step(Input::Events(vec![]), 0, t0, FILE),
            vec![Action::Idle(Duration::from_millis(500))]
        );
        assert_eq!(
            s.step(Input::Events(vec![]), 1, t0, FILE),
            vec![Action::Poll(t0)]
        );
        s.polled(t0, true);
        let t1 = t0 + Duration::from_millis(3);
        assert_eq!(
            s.step(Input::Events(vec![]), 1, t1, FILE),
            vec![Action::Poll(t0 + ACTIVE_PERIOD)]
        );
        // A second without change: the slower period.
        let t2 = t0 + Duration::from_millis(1500);
        s.polled(t2, false);
        assert_eq!(
            s.step(Input::Events(vec![]), 1, t2, FILE),
            vec![Action::Poll(t2 + IDLE_PERIOD)]
        );
    }
}
