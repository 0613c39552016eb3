//! Which rows of the boot framebuffer the guest wrote, from KVM's dirty page log.
//!
//! A guest drawing on the boot framebuffer (firmware, early boot, efifb or simpledrm, a guest
//! without hyperv_drm) says nothing about what it drew. Without help, the agent finds
//! changes by comparing the whole surface every few milliseconds: 3 MiB at 1024x768, 8 MiB
//! at 1920x1080, hundreds of times a second while a console watches.
//!
//! KVM can do the finding: with `KVM_MEM_LOG_DIRTY_PAGES` on the VRAM's memory slot it
//! write-protects the slot's pages and records the first write to each one;
//! `KVM_GET_DIRTY_LOG` returns those pages and protects them again. [`VramDirtyLog`] reads
//! that log for the partition's current VM, [`DirtyRows`] polls any [`PageLog`] on one
//! thread and hands each reader the framebuffer rows under the written pages, merged until
//! the reader takes them (so a slow reader gets fewer, larger updates, never a backlog).
//!
//! Only the boot framebuffer's slot is logged. The synthetic video device's mapping of the
//! same memory is not: while its driver owns the screen the guest reports what it redrew
//! (DIRT messages), and when the driver lets go the agent reads the whole surface again.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::framebuffer::FbFormat;

/// The page size of KVM's dirty log.
pub const PAGE: u64 = 4096;

/// How often [`DirtyRows`] looks while the guest draws (within [`ACTIVE_FOR`] of the last
/// write), and otherwise.
pub const ACTIVE_PERIOD: Duration = Duration::from_millis(4);
pub const IDLE_PERIOD: Duration = Duration::from_millis(16);
pub const ACTIVE_FOR: Duration = Duration::from_secs(1);

/// What was written since the previous look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageDirt {
    /// Anything may have changed (a new boot, host-side writes, a log that failed).
    All,
    /// One bit per [`PAGE`] from the start of the VRAM, bit `i % 64` of word `i / 64`.
    Pages(Vec<u64>),
}

/// A source of written pages: KVM's log, or a stand-in that knows what it wrote.
pub trait PageLog: Send + Sync + 'static {
    /// The pages written since the previous call.
    fn take(&self) -> PageDirt;
}

/// KVM's dirty log of the boot framebuffer's VRAM slot, for whichever VM the partition
/// currently runs (a reset builds a new one).
#[derive(Clone, Default)]
pub struct VramDirtyLog(Arc<Mutex<KvmLog>>);

#[derive(Default)]
struct KvmLog {
    vm: Weak<VmFd>,
    slot: u32,
    size: u64,
    /// Report [`PageDirt::All`] on the next look.
    all: bool,
    /// A failure was logged (said once, not every few milliseconds).
    warned: bool,
    /// KVM refused to log the slot.
    unavailable: bool,
}

impl std::fmt::Debug for VramDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VramDirtyLog").finish_non_exhaustive()
    }
}

impl VramDirtyLog {
    /// Read `slot` (`size` bytes, created with `KVM_MEM_LOG_DIRTY_PAGES`) of `vm` from now
    /// on. Call it once the new VM's memory is fully written by the host: everything counts
    /// as changed, since the host's own writes (clearing memory for a reboot) are not logged.
    pub(crate) fn attach(&self, vm: &Arc<VmFd>, slot: u32, size: u64) {
        let mut s = lock(&self.0);
        s.vm = Arc::downgrade(vm);
        s.slot = slot;
        s.size = size;
        s.all = true;
    }

    /// KVM refused to log the slot: whoever reads must search for changes instead.
    pub(crate) fn unavailable(&self) {
        lock(&self.0).unavailable = true;
    }

    /// Whether KVM logs the slot (false after it refused to).
    pub fn is_available(&self) -> bool {
        !lock(&self.0).unavailable
    }
}

impl PageLog for VramDirtyLog {
    fn take(&self) -> PageDirt {
        let mut s = lock(&self.0);
        // Between VMs (a reset in progress) nothing can be said.
        let Some(vm) = s.vm.upgrade() else {
            return PageDirt::All;
        };
        let size = usize::try_from(s.size).unwrap_or(usize::MAX);
        // Read (and so clear) the log even when everything counts as changed, so that the
        // next look is relative to this one.
        let read = vm.get_dirty_log(s.slot, size);
        let all = std::mem::take(&mut s.all);
        match read {
            Ok(bits) if !all => PageDirt::Pages(bits),
            Ok(_) => PageDirt::All,
            Err(e) => {
                if !std::mem::replace(&mut s.warned, true) {
                    tracing::warn!(error = %e, "cannot read KVM's dirty page log of the VRAM");
                }
                PageDirt::All
            }
        }
    }
}

/// One row range `y..y + height` of the framebuffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    pub y: u32,
    pub height: u32,
}

/// A set of framebuffer rows, one bit each.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowSet {
    bits: Vec<u64>,
    height: u32,
}

impl RowSet {
    fn new(height: u32) -> Self {
        RowSet {
            bits: vec![0; (height as usize).div_ceil(64)],
            height,
        }
    }

    fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    fn set_range(&mut self, y0: u32, y1: u32) {
        for y in y0..y1.min(self.height) {
            self.bits[(y / 64) as usize] |= 1 << (y % 64);
        }
    }

    fn fill(&mut self) {
        self.set_range(0, self.height);
    }

    fn union(&mut self, other: &RowSet) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// The set as merged ranges, emptying it.
    fn drain(&mut self) -> Vec<Rows> {
        let mut out: Vec<Rows> = Vec::new();
        for y in 0..self.height {
            if self.bits[(y / 64) as usize] & (1 << (y % 64)) == 0 {
                continue;
            }
            match out.last_mut() {
                Some(r) if r.y + r.height == y => r.height += 1,
                _ => out.push(Rows { y, height: 1 }),
            }
        }
        self.bits.iter_mut().for_each(|w| *w = 0);
        out
    }
}

/// The rows of `fb` (at the start of the VRAM) that the dirty pages in `dirt` touch.
fn rows_of(dirt: &PageDirt, fb: FbFormat) -> RowSet {
    let mut set = RowSet::new(fb.height);
    let PageDirt::Pages(bits) = dirt else {
        set.fill();
        return set;
    };
    let stride = u64::from(fb.stride.max(1));
    let end = fb.byte_len();
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let page = w as u64 * 64 + u64::from(word.trailing_zeros());
            word &= word - 1;
            let start = page * PAGE;
            if start >= end {
                return set;
            }
            let last = (start + PAGE).min(end) - 1;
            let (y0, y1) = (start / stride, last / stride + 1);
            set.set_range(y0 as u32, y1 as u32);
        }
    }
    set
}

/// Polls a [`PageLog`] for as long as anybody reads, and gives every reader the written
/// rows of the framebuffer.
pub struct DirtyRows {
    inner: Arc<Hub>,
}

struct Hub {
    log: Arc<dyn PageLog>,
    fb: FbFormat,
    readers: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    readers: Vec<Weak<ReaderInner>>,
    polling: bool,
}

/// One reader's rows, merged until taken.
pub struct DirtyReader {
    inner: Arc<ReaderInner>,
}

struct ReaderInner {
    rows: Mutex<RowSet>,
    ready: Condvar,
}

impl DirtyRows {
    /// Rows of `fb`, which starts at the VRAM's first byte, from `log`.
    pub fn new(log: Arc<dyn PageLog>, fb: FbFormat) -> Self {
        DirtyRows {
            inner: Arc::new(Hub {
                log,
                fb,
                readers: Mutex::new(HubState::default()),
            }),
        }
    }

    /// The framebuffer's geometry.
    pub fn format(&self) -> FbFormat {
        self.inner.fb
    }

    /// A new reader. Its first rows are all of them: it knows nothing yet. Polling runs
    /// while any reader is alive.
    pub fn subscribe(&self) -> std::io::Result<DirtyReader> {
        let mut rows = RowSet::new(self.inner.fb.height);
        rows.fill();
        let reader = Arc::new(ReaderInner {
            rows: Mutex::new(rows),
            ready: Condvar::new(),
        });
        let mut st = lock(&self.inner.readers);
        st.readers.push(Arc::downgrade(&reader));
        if !st.polling {
            let hub = self.inner.clone();
            std::thread::Builder::new()
                .name("vram-dirty-log".into())
                .spawn(move || hub.poll())?;
            st.polling = true;
        }
        Ok(DirtyReader { inner: reader })
    }
}

impl Hub {
    fn poll(&self) {
        let mut last_write: Option<Instant> = None;
        loop {
            let period = match last_write {
                Some(t) if t.elapsed() < ACTIVE_FOR => ACTIVE_PERIOD,
                _ => IDLE_PERIOD,
            };
            std::thread::sleep(period);
            let readers: Vec<Arc<ReaderInner>> = {
                let mut st = lock(&self.readers);
                st.readers.retain(|r| r.strong_count() > 0);
                if st.readers.is_empty() {
                    st.polling = false;
                    return;
                }
                st.readers.iter().filter_map(Weak::upgrade).collect()
            };
            let rows = rows_of(&self.log.take(), self.fb);
            if rows.is_empty() {
                continue;
            }
            last_write = Some(Instant::now());
            for r in readers {
                lock(&r.rows).union(&rows);
                r.ready.notify_all();
            }
        }
    }
}

impl DirtyReader {
    /// The rows written since the previous call, merged into ranges; waits up to `timeout`
    /// for some and returns none if nothing was written.
    pub fn wait(&self, timeout: Duration) -> Vec<Rows> {
        let deadline = Instant::now() + timeout;
        let mut rows = lock(&self.inner.rows);
        while rows.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Vec::new();
            }
            rows = self
                .inner
                .ready
                .wait_timeout(rows, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        rows.drain()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log that reports what the test marked.
    #[derive(Default)]
    struct Marks(Mutex<Option<PageDirt>>);

    impl Marks {
        fn mark(&self, pages: &[u64]) {
            let mut m = lock(&self.0);
            let mut bits = match m.take() {
                Some(PageDirt::Pages(b)) => b,
                Some(PageDirt::All) => return *m = Some(PageDirt::All),
                None => vec![0; 64],
            };
            for &p in pages {
                bits[(p / 64) as usize] |= 1 << (p % 64);
            }
            *m = Some(PageDirt::Pages(bits));
        }
    }

    impl PageLog for Marks {
        fn take(&self) -> PageDirt {
            lock(&self.0).take().unwrap_or(PageDirt::Pages(vec![0; 64]))
        }
    }

    fn pages(list: &[u64]) -> PageDirt {
        let mut bits = vec![0u64; 64];
        for &p in list {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        PageDirt::Pages(bits)
    }

    #[test]
    fn pages_become_the_rows_they_overlap() {
        // 1024 pixels of 4 bytes: one page per row.
        let fb = FbFormat::xrgb(1024, 768);
        let mut r = rows_of(&pages(&[0, 5, 6, 7, 767]), fb);
        assert_eq!(
            r.drain(),
            vec![
                Rows { y: 0, height: 1 },
                Rows { y: 5, height: 3 },
                Rows { y: 767, height: 1 }
            ]
        );
        // 1920x1080: a row is 7680 bytes, so page 1 (4096..8192) touches rows 0 and 1, and
        // page 2 (8192..12288) only row 1.
        let fb = FbFormat::xrgb(1920, 1080);
        assert_eq!(
            rows_of(&pages(&[1]), fb).drain(),
            vec![Rows { y: 0, height: 2 }]
        );
        assert_eq!(
            rows_of(&pages(&[2]), fb).drain(),
            vec![Rows { y: 1, height: 1 }]
        );
        // The last page of the surface ends with it; pages after it are not rows.
        let last = (fb.byte_len() - 1) / PAGE;
        assert_eq!(
            rows_of(&pages(&[last, last + 1, 4000]), fb).drain(),
            vec![Rows { y: 1079, height: 1 }]
        );
        assert!(rows_of(&pages(&[]), fb).is_empty());
        assert_eq!(
            rows_of(&PageDirt::All, fb).drain(),
            vec![Rows { y: 0, height: 1080 }]
        );
    }

    #[test]
    fn pages_are_read_whatever_the_bitmap_length() {
        // A bitmap shorter than the surface (a stand-in that tracks fewer pages) and one
        // longer (the whole VRAM) both work.
        let fb = FbFormat::xrgb(1024, 768);
        assert_eq!(
            rows_of(&PageDirt::Pages(vec![1 << 3]), fb).drain(),
            vec![Rows { y: 3, height: 1 }]
        );
        let mut long = vec![0u64; 4096 / 64];
        long[63] = u64::MAX;
        assert!(rows_of(&PageDirt::Pages(long), fb).is_empty());
    }

    #[test]
    fn every_reader_gets_every_row_merged_until_it_reads() {
        let log = Arc::new(Marks::default());
        let hub = DirtyRows::new(log.clone(), FbFormat::xrgb(1024, 768));
        let a = hub.subscribe().unwrap();
        // A new reader starts with everything.
        assert_eq!(
            a.wait(Duration::from_secs(5)),
            vec![Rows { y: 0, height: 768 }]
        );
        let b = hub.subscribe().unwrap();
        assert_eq!(b.wait(Duration::ZERO), vec![Rows { y: 0, height: 768 }]);
        assert!(a.wait(Duration::from_millis(50)).is_empty());

        log.mark(&[10, 11]);
        assert_eq!(
            a.wait(Duration::from_secs(5)),
            vec![Rows { y: 10, height: 2 }]
        );
        log.mark(&[300]);
        assert_eq!(
            a.wait(Duration::from_secs(5)),
            vec![Rows { y: 300, height: 1 }]
        );
        // `b` did not read meanwhile: both wait for it. (The poller hands rows to one reader
        // after another, so `b` may still be getting the second set: read until both came.)
        let want = vec![Rows { y: 10, height: 2 }, Rows { y: 300, height: 1 }];
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got != want && Instant::now() < deadline {
            got.extend(b.wait(Duration::from_millis(100)));
        }
        assert_eq!(got, want);
        assert!(b.wait(Duration::ZERO).is_empty());
        // A log that cannot say what changed means everything did.
        *lock(&log.0) = Some(PageDirt::All);
        assert_eq!(
            a.wait(Duration::from_secs(5)),
            vec![Rows { y: 0, height: 768 }]
        );
    }

    #[test]
    fn polling_stops_without_readers_and_starts_again() {
        let log = Arc::new(Marks::default());
        let hub = DirtyRows::new(log.clone(), FbFormat::xrgb(1024, 768));
        let a = hub.subscribe().unwrap();
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&hub.inner.readers).polling {
            assert!(Instant::now() < deadline, "the poller outlived its readers");
            std::thread::sleep(Duration::from_millis(5));
        }
        let b = hub.subscribe().unwrap();
        assert!(lock(&hub.inner.readers).polling);
        b.wait(Duration::ZERO);
        log.mark(&[1]);
        assert_eq!(
            b.wait(Duration::from_secs(5)),
            vec![Rows { y: 1, height: 1 }]
        );
    }
}
