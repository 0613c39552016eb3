//! What a guest's disk device did: bytes and requests read and written. The device (of
//! whatever bus) counts; the worker reports the totals and the agent turns them into rates.

use std::sync::atomic::{AtomicU64, Ordering};

/// Running totals for one disk, shared between its device and whoever reports them.
#[derive(Debug, Default)]
pub struct IoCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
}

/// A snapshot of [`IoCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoTotals {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

impl IoCounters {
    /// A read request of `bytes` completed.
    pub fn read(&self, bytes: u64) {
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.read_ops.fetch_add(1, Ordering::Relaxed);
    }

    /// A write request of `bytes` completed.
    pub fn write(&self, bytes: u64) {
        self.write_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.write_ops.fetch_add(1, Ordering::Relaxed);
    }

    pub fn totals(&self) -> IoTotals {
        IoTotals {
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            read_ops: self.read_ops.load(Ordering::Relaxed),
            write_ops: self.write_ops.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_add_up() {
        let c = IoCounters::default();
        c.read(4096);
        c.read(512);
        c.write(1 << 20);
        assert_eq!(
            c.totals(),
            IoTotals {
                read_bytes: 4608,
                write_bytes: 1 << 20,
                read_ops: 2,
                write_ops: 1
            }
        );
    }
}
