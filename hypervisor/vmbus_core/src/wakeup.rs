//! An eventfd to wake a channel thread: a device's host side signals it when it has work,
//! the guest's doorbell (HvSignalEvent) is one. Built on rustix, so polling it needs no
//! unsafe code.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::event::{EventfdFlags, eventfd};

/// A non-blocking eventfd.
#[derive(Debug)]
pub struct Wakeup(OwnedFd);

impl Wakeup {
    pub fn new() -> std::io::Result<Self> {
        Ok(Wakeup(eventfd(
            0,
            EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC,
        )?))
    }

    /// Wake whoever polls it.
    pub fn signal(&self) {
        // Only fails when the counter would overflow: it is readable then anyway.
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Consume the wakeups so far; whether there were any.
    pub fn take(&self) -> bool {
        let mut b = [0u8; 8];
        rustix::io::read(&self.0, &mut b).is_ok_and(|n| n == 8)
    }
}

impl AsFd for Wakeup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Wakeup {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_taken_once() {
        let w = Wakeup::new().unwrap();
        assert!(!w.take());
        w.signal();
        w.signal();
        assert!(w.take());
        assert!(!w.take());
    }
}
