//! Parvis's VMBus devices (VSPs), one module each: the synthetic video, keyboard and mouse
//! that Linux's `hyperv_drm`/`hyperv_fb`, `hyperv_keyboard` and `hid_hyperv` drive. Each
//! implements [`vmbus_core::Vsp`] and has a host-side handle the worker feeds (input) or
//! reads (frames). Devices see their channel only through [`vmbus_core::Channel`], so each
//! is tested here against [`vmbus_core::fake::FakeGuest`], exactly as it runs.
//!
//! Every message is the guest's and hostile: no `unsafe`, every length checked, nothing
//! panics. May depend on `vmbus_core` and the crates it uses; not on KVM or the hypervisor
//! crate (the VRAM mapping reaches KVM through the [`video::VramMapper`] trait).

#![forbid(unsafe_code)]

pub mod keyboard;
pub mod mouse;
pub mod video;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vmbus_core::{SharedVsp, Wakeup};

/// Lock a mutex, whatever a panicking holder left.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most host input events queued for a device whose guest driver is not reading.
pub const MAX_QUEUED_INPUT: usize = 4096;

/// A bounded queue of host events plus the eventfd that wakes the channel thread.
#[derive(Debug)]
pub struct InputQueue<T> {
    queue: Mutex<VecDeque<T>>,
    wakeup: Arc<Wakeup>,
}

impl<T> InputQueue<T> {
    /// An empty queue.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(VecDeque::new()),
            wakeup: Arc::new(Wakeup::new()?),
        })
    }

    /// Queue an event; false (and the event dropped) when the queue is full.
    pub fn push(&self, e: T) -> bool {
        let mut q = lock(&self.queue);
        if q.len() >= MAX_QUEUED_INPUT {
            return false;
        }
        q.push_back(e);
        drop(q);
        self.wakeup.signal();
        true
    }

    /// Take everything queued.
    pub fn drain(&self) -> Vec<T> {
        lock(&self.queue).drain(..).collect()
    }

    /// Drop everything queued.
    pub fn clear(&self) {
        lock(&self.queue).clear();
    }

    /// The eventfd written on every push.
    pub fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }
}

/// Read a little-endian u32 at `o`, if in bounds.
pub(crate) fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    let s = b.get(o..o.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Read a little-endian i32 at `o`, if in bounds.
pub(crate) fn i32_at(b: &[u8], o: usize) -> Option<i32> {
    u32_at(b, o).map(|v| v as i32)
}

/// Read a little-endian u64 at `o`, if in bounds.
pub(crate) fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    let s = b.get(o..o.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// The synthetic devices of one partition with their host-side handles; they live as long
/// as the partition (across resets).
#[derive(Clone, Default)]
pub struct SynthDevices {
    /// Keyboard input.
    pub keyboard: Option<Arc<InputQueue<keyboard::KeyEvent>>>,
    /// Mouse input.
    pub mouse: Option<Arc<InputQueue<mouse::PointerEvent>>>,
    /// Video state (mode, dirty rectangles).
    pub video: Option<Arc<video::VideoShared>>,
    vsps: Vec<SharedVsp>,
}

impl std::fmt::Debug for SynthDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynthDevices")
            .field("count", &self.vsps.len())
            .finish()
    }
}

impl SynthDevices {
    /// Video (with `vram_size` bytes of VRAM), keyboard and mouse when `enabled` (a
    /// partition with VMBus), else nothing.
    pub fn new(enabled: bool, vram_size: u64) -> std::io::Result<Self> {
        if !enabled {
            return Ok(Self::default());
        }
        let keyboard = Arc::new(InputQueue::new()?);
        let mouse = Arc::new(InputQueue::new()?);
        let video = video::VideoShared::new(vram_size);
        let vsps: Vec<SharedVsp> = vec![
            Arc::new(Mutex::new(video::Video::new(video.clone()))),
            Arc::new(Mutex::new(keyboard::Keyboard::new(keyboard.clone()))),
            Arc::new(Mutex::new(mouse::Mouse::new(mouse.clone()))),
        ];
        Ok(Self {
            keyboard: Some(keyboard),
            mouse: Some(mouse),
            video: Some(video),
            vsps,
        })
    }

    /// The devices to offer, in relid order.
    pub fn vsps(&self) -> Vec<SharedVsp> {
        self.vsps.clone()
    }
}
