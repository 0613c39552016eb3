//! The one thread pool every screen's captures share (rayon), instead of threads started
//! for each capture: encoding a full frame, reading the tiles under dirty rectangles and
//! scanning the boot framebuffer split their work over it. Work runs inline when it is too
//! small to be worth sharing out.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Most threads a capture uses.
const MAX_THREADS: usize = 4;

/// One per CPU, at most [`MAX_THREADS`]; asked once (the answer comes from reading cgroup
/// files).
fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
    })
}

/// The pool, made at first use; None if its threads cannot be started (work then runs on
/// the calling thread).
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(cpus())
            .thread_name(|i| format!("screen-{i}"))
            .build()
            .map_err(|e| tracing::warn!("cannot start the screen threads ({e}); capturing on one"))
            .ok()
    })
    .as_ref()
}

/// How many threads capturing `bytes` bytes of pixels may use: one per CPU, at most 4, and
/// just one below 1 MiB, where sharing the work out costs more than it saves.
pub(super) fn capture_threads(bytes: usize) -> usize {
    if bytes < 1 << 20 { 1 } else { cpus() }
}

/// `f` over every item, shared out among up to `threads` pool threads in order: each takes
/// the next item not yet taken, so the items are started in order and a thread that is held
/// up does not hold up a run of them. Each thread has its own state from `init`. Returns
/// when every item is done.
pub(super) fn for_each_in_order<I: Sync, S>(
    items: &[I],
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &I) + Sync,
) {
    let next = AtomicUsize::new(0);
    let work = || {
        let mut state = init();
        while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            f(&mut state, item);
        }
    };
    let threads = threads.clamp(1, items.len().max(1));
    match pool() {
        Some(p) if threads > 1 => p.scope(|s| {
            for _ in 0..threads {
                s.spawn(|_| work());
            }
        }),
        _ => work(),
    }
}

/// `f` over `items`, results in the items' order: consecutive runs of items go to up to
/// `threads` pool threads, each run with its own state from `init`.
pub(super) fn map_in_order<I: Sync, S, T: Send>(
    items: &[I],
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &I) -> T + Sync,
) -> Vec<T> {
    let threads = threads.clamp(1, items.len().max(1));
    let per = items.len().div_ceil(threads).max(1);
    let runs: Vec<&[I]> = items.chunks(per).collect();
    let mut out: Vec<Vec<T>> = Vec::new();
    out.resize_with(runs.len(), Vec::new);
    let slots: Vec<std::sync::Mutex<&mut Vec<T>>> =
        out.iter_mut().map(std::sync::Mutex::new).collect();
    let run = |k: &usize| {
        let mut state = init();
        let v: Vec<T> = runs[*k].iter().map(|i| f(&mut state, i)).collect();
        **slots[*k].lock().unwrap_or_else(|e| e.into_inner()) = v;
    };
    let ks: Vec<usize> = (0..runs.len()).collect();
    for_each_in_order(&ks, threads, || (), |_, k| run(k));
    drop(slots);
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_their_order_and_every_item_runs_once() {
        let items: Vec<u32> = (0..1000).collect();
        for threads in [1, 2, 4, 16] {
            let v = map_in_order(
                &items,
                threads,
                || 0u32,
                |seen, i| {
                    *seen += 1;
                    i * 2
                },
            );
            assert_eq!(v, items.iter().map(|i| i * 2).collect::<Vec<_>>());
            let count = AtomicUsize::new(0);
            for_each_in_order(
                &items,
                threads,
                || (),
                |_, _| {
                    count.fetch_add(1, Ordering::SeqCst);
                },
            );
            assert_eq!(count.load(Ordering::SeqCst), 1000);
        }
        assert!(map_in_order(&[] as &[u32], 4, || (), |_, i| *i).is_empty());
    }
}
