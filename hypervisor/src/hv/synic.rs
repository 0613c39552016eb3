//! The host side of the synthetic interrupt controller: per-VP SynIC registers as the guest
//! programmed them, message delivery into a VP's message page (SIMP), event flags in its
//! event page (SIEFP), and the SINT kick.
//!
//! Slot protocol (TLFS; Linux `vmbus_signal_eom`): a message slot is free when its type word
//! is 0. The host writes the body, then publishes the type last; when the slot is busy it
//! sets `msg_pending` so the guest writes EOM after freeing it, and the caller retries later.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory,
};

/// Size of one SynIC message slot.
pub const MESSAGE_SIZE: usize = 256;
/// Largest message payload.
pub const MAX_PAYLOAD: usize = 240;
/// Bytes of event flags per SINT.
pub const EVENT_FLAGS_PER_SINT: u64 = 256;
/// SINT register: masked.
pub const SINT_MASKED: u64 = 1 << 16;

/// Raises a SINT on a VP.
pub trait SintKick: Send + Sync {
    /// Interrupt `vp` with SINT `sint` (its vector is whatever the guest programmed).
    fn kick(&self, vp: u32, sint: u32);
}

/// The SynIC registers of one VP that the host needs.
#[derive(Debug, Default)]
pub struct VpSynic {
    /// SCONTROL (bit 0: enabled).
    pub scontrol: AtomicU64,
    /// SIEFP (bit 0 enable, bits 63:12 page).
    pub siefp: AtomicU64,
    /// SIMP (bit 0 enable, bits 63:12 page).
    pub simp: AtomicU64,
    /// SINT0..15 as last written (kept for the userspace backend's delivery).
    pub sint: [AtomicU64; 16],
}

impl VpSynic {
    fn page(reg: u64) -> Option<u64> {
        (reg & 1 == 1).then_some(reg & !0xfff)
    }
}

/// Outcome of a post attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostResult {
    /// Written and signalled.
    Delivered,
    /// The slot is busy (msg_pending set); retry later.
    Busy,
    /// The VP has no message page enabled (or no such VP, or the page is not RAM); the
    /// message cannot be delivered now.
    NoPage,
}

/// All VPs' SynIC state plus the means to deliver to them.
pub struct Synic {
    mem: Arc<GuestMemoryMmap>,
    vps: Vec<VpSynic>,
    kick: Box<dyn SintKick>,
}

impl std::fmt::Debug for Synic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synic").field("vps", &self.vps).finish()
    }
}

impl Synic {
    /// SynIC state for `vps` VPs.
    pub fn new(mem: Arc<GuestMemoryMmap>, vps: u32, kick: Box<dyn SintKick>) -> Self {
        Self {
            mem,
            vps: (0..vps).map(|_| VpSynic::default()).collect(),
            kick,
        }
    }

    /// A VP's registers.
    pub fn vp(&self, vp: u32) -> Option<&VpSynic> {
        self.vps.get(vp as usize)
    }

    /// Number of VPs.
    pub fn vp_count(&self) -> u32 {
        self.vps.len() as u32
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Record a SynIC MSR value reported by KVM or written by the guest (userspace path).
    pub fn set_msr(&self, vp: u32, msr: u32, value: u64) {
        let Some(s) = self.vp(vp) else { return };
        match msr {
            super::msr::SCONTROL => s.scontrol.store(value, Ordering::SeqCst),
            super::msr::SIEFP => s.siefp.store(value, Ordering::SeqCst),
            super::msr::SIMP => s.simp.store(value, Ordering::SeqCst),
            super::msr::SINT0..=super::msr::SINT15 => {
                s.sint[(msr - super::msr::SINT0) as usize].store(value, Ordering::SeqCst);
            }
            _ => {}
        }
    }

    fn enabled(s: &VpSynic) -> bool {
        s.scontrol.load(Ordering::SeqCst) & 1 == 1
    }

    /// Post a message of `msg_type` with `payload` into slot `sint` of `vp`'s message page.
    pub fn post(&self, vp: u32, sint: u32, msg_type: u32, payload: &[u8]) -> PostResult {
        let Some(s) = self.vp(vp) else {
            return PostResult::NoPage;
        };
        let Some(page) = VpSynic::page(s.simp.load(Ordering::SeqCst)) else {
            return PostResult::NoPage;
        };
        if !Self::enabled(s) || payload.len() > MAX_PAYLOAD || sint > 15 {
            return PostResult::NoPage;
        }
        let slot = GuestAddress(page + u64::from(sint) * MESSAGE_SIZE as u64);
        let Ok(vs) = self.mem.get_slice(slot, MESSAGE_SIZE) else {
            return PostResult::NoPage;
        };
        let (Ok(ty), Ok(hdr)) = (
            vs.get_atomic_ref::<AtomicU32>(0),
            vs.get_atomic_ref::<AtomicU32>(4),
        ) else {
            return PostResult::NoPage;
        };
        if ty.load(Ordering::Acquire) != 0 {
            // Ask for an EOM, then look again: the guest may have freed it meanwhile.
            hdr.fetch_or(1 << 8, Ordering::SeqCst);
            if ty.load(Ordering::SeqCst) != 0 {
                return PostResult::Busy;
            }
        }
        // Body: size, flags (msg_pending clear), reserved, sender id 0, payload.
        let mut body = [0u8; MESSAGE_SIZE - 8];
        body[8..8 + payload.len()].copy_from_slice(payload);
        if self.mem.write_slice(&body, slot.unchecked_add(8)).is_err() {
            return PostResult::NoPage;
        }
        hdr.store(payload.len() as u32, Ordering::SeqCst);
        ty.store(msg_type, Ordering::Release);
        self.kick.kick(vp, sint);
        PostResult::Delivered
    }

    /// Set event flag `flag` of `sint` on `vp` and kick it if the flag was clear.
    /// Returns false when the VP has no event page.
    pub fn signal_event(&self, vp: u32, sint: u32, flag: u32) -> bool {
        let Some(s) = self.vp(vp) else { return false };
        let Some(page) = VpSynic::page(s.siefp.load(Ordering::SeqCst)) else {
            return false;
        };
        if !Self::enabled(s) || sint > 15 || u64::from(flag) >= EVENT_FLAGS_PER_SINT * 8 {
            return false;
        }
        let word = page + u64::from(sint) * EVENT_FLAGS_PER_SINT + u64::from(flag / 64) * 8;
        let Ok(vs) = self.mem.get_slice(GuestAddress(word), 8) else {
            return false;
        };
        let Ok(w) = vs.get_atomic_ref::<AtomicU64>(0) else {
            return false;
        };
        let bit = 1u64 << (flag % 64);
        if w.fetch_or(bit, Ordering::SeqCst) & bit == 0 {
            self.kick.kick(vp, sint);
        }
        true
    }

    /// Whether the message slot `sint` of `vp` is free (for retry loops and tests).
    pub fn slot_free(&self, vp: u32, sint: u32) -> bool {
        let Some(page) = self
            .vp(vp)
            .and_then(|s| VpSynic::page(s.simp.load(Ordering::SeqCst)))
        else {
            return false;
        };
        let addr = GuestAddress(page + u64::from(sint) * MESSAGE_SIZE as u64);
        matches!(self.mem.load::<u32>(addr, Ordering::Acquire), Ok(0))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Kicks(Mutex<Vec<(u32, u32)>>);
    impl SintKick for Arc<Kicks> {
        fn kick(&self, vp: u32, sint: u32) {
            self.0.lock().unwrap().push((vp, sint));
        }
    }

    fn synic() -> (Synic, Arc<Kicks>) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let kicks = Arc::new(Kicks::default());
        let s = Synic::new(mem, 2, Box::new(kicks.clone()));
        s.set_msr(1, super::super::msr::SIMP, 0x1000 | 1);
        s.set_msr(1, super::super::msr::SIEFP, 0x2000 | 1);
        s.set_msr(1, super::super::msr::SCONTROL, 1);
        (s, kicks)
    }

    #[test]
    fn message_lands_in_slot_two_with_the_type_last() {
        let (s, kicks) = synic();
        assert_eq!(
            s.post(0, 2, 1, b"hello"),
            PostResult::NoPage,
            "VP 0 has no SIMP"
        );
        assert_eq!(s.post(1, 2, 1, b"hello"), PostResult::Delivered);
        let m = s.memory();
        let slot = 0x1000 + 512;
        assert_eq!(m.read_obj::<u32>(GuestAddress(slot)).unwrap(), 1);
        assert_eq!(m.read_obj::<u8>(GuestAddress(slot + 4)).unwrap(), 5);
        let mut p = [0u8; 5];
        m.read_slice(&mut p, GuestAddress(slot + 16)).unwrap();
        assert_eq!(&p, b"hello");
        assert_eq!(*kicks.0.lock().unwrap(), vec![(1, 2)]);
        // Busy slot: msg_pending gets set, nothing is overwritten.
        assert_eq!(s.post(1, 2, 1, b"again"), PostResult::Busy);
        assert_eq!(m.read_obj::<u8>(GuestAddress(slot + 5)).unwrap(), 1);
        m.read_slice(&mut p, GuestAddress(slot + 16)).unwrap();
        assert_eq!(&p, b"hello");
        // The guest frees it; the retry goes through and clears msg_pending.
        m.write_obj(0u32, GuestAddress(slot)).unwrap();
        assert!(s.slot_free(1, 2));
        assert_eq!(s.post(1, 2, 1, b"again"), PostResult::Delivered);
        assert_eq!(m.read_obj::<u8>(GuestAddress(slot + 5)).unwrap(), 0);
        assert_eq!(s.post(1, 2, 1, &[0u8; 241]), PostResult::NoPage);
    }

    #[test]
    fn event_flags_kick_only_on_a_rising_bit() {
        let (s, kicks) = synic();
        assert!(s.signal_event(1, 2, 5));
        assert!(s.signal_event(1, 2, 5));
        assert!(s.signal_event(1, 2, 70));
        let m = s.memory();
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(0x2000 + 512)).unwrap(),
            1 << 5
        );
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(0x2000 + 520)).unwrap(),
            1 << 6
        );
        assert_eq!(kicks.0.lock().unwrap().len(), 2);
        assert!(!s.signal_event(1, 2, 2048));
        assert!(!s.signal_event(0, 2, 1));
        assert!(!s.signal_event(7, 2, 1));
    }
}
