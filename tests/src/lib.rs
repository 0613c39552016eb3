//! Test-host harness: builds what the guests need, then runs scenarios either inside the
//! emulated test host (an L1 QEMU/TCG machine with nested KVM, see `shared/TEST-HOST.md`)
//! or directly on this machine when its KVM can run unmodified guests.
//!
//! A scenario is a POSIX shell script. It finds the worker in `$BIN`, the guest images in
//! `$IMAGES` and a writable folder shared with the host in `$SHARE`; whatever it writes to
//! `$SHARE` is visible to the test afterwards.
//!
//! May depend on: every workspace crate (tests and benchmarks only; nothing ships from
//! here).

pub mod agent_proc;
pub mod bench_support;
pub mod boot_disks;
pub mod build;
pub mod checks;
pub mod client;
pub mod console_bench;
pub mod disk_bench;
pub mod diskboot_bench;
pub mod fb_bench;
pub mod fbstamp;
pub mod live;
pub mod markers;
pub mod net_bench;
pub mod stats_bench;
pub mod storage_bench;
pub mod testhost;
pub mod upload_bench;
pub mod vmbus_bench;

pub use build::{Artifacts, artifacts};
pub use markers::{marker, marker_all};
pub use testhost::{Mode, Outcome, Scenario};

/// `len` deterministic pseudo-random bytes (xorshift64 from `seed`): test disk contents
/// that are reproducible on both sides of the test host.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
