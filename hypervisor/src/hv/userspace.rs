//! Hyper-V enlightenments emulated in the VMM, for hosts whose KVM has no Hyper-V support
//! (or when forced with `--hyperv userspace`).
//!
//! Without "Hv#1" in CPUID, KVM refuses the synthetic MSRs and, with
//! `KVM_CAP_X86_USER_SPACE_MSR`, forwards them here as RDMSR/WRMSR exits. The hypercall page
//! gets `out HYPERCALL_PORT, al; ret`: RCX (control), RDX and R8 survive the `out`, so the
//! port exit carries the whole call. SINTs are delivered as MSIs to the VP's local APIC with
//! the vector the guest programmed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::msr;
use super::synic::{SINT_MASKED, SintKick, Synic};

/// The I/O port the userspace hypercall page writes to (decoded by no device).
pub const HYPERCALL_PORT: u8 = 0xe8;
/// KVM's local APIC bus frequency (1 ns per cycle in 6.x).
pub const APIC_FREQUENCY_HZ: u64 = 1_000_000_000;

/// The hypercall page contents: `out HYPERCALL_PORT, al` then `ret`.
pub fn hypercall_code() -> [u8; 3] {
    [0xe6, HYPERCALL_PORT, 0xc3]
}

/// Reference-TSC scale for a TSC running at `tsc_hz`: reference time (100 ns units) =
/// (tsc * scale) >> 64.
pub fn tsc_scale(tsc_hz: u64) -> u64 {
    if tsc_hz == 0 {
        return 0;
    }
    ((10_000_000u128 << 64) / u128::from(tsc_hz)).min(u128::from(u64::MAX)) as u64
}

/// Partition-wide synthetic MSRs.
#[derive(Debug)]
pub struct UserspaceHv {
    mem: Arc<GuestMemoryMmap>,
    tsc_hz: u64,
    guest_os_id: AtomicU64,
    hypercall: AtomicU64,
    reference_tsc: AtomicU64,
    vp_assist: Vec<AtomicU64>,
}

/// What the vCPU loop must do after an MSR access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrOutcome {
    /// Handled (for reads, the value).
    Ok(u64),
    /// Not ours or not allowed: the guest gets #GP.
    Fault,
    /// TIME_REF_COUNT: the vCPU loop reads the guest TSC and calls [`UserspaceHv::ref_time`].
    NeedTsc,
}

impl UserspaceHv {
    /// State for `vps` VPs whose TSC runs at `tsc_khz`.
    pub fn new(mem: Arc<GuestMemoryMmap>, vps: u32, tsc_khz: u32) -> Self {
        Self {
            mem,
            tsc_hz: u64::from(tsc_khz) * 1000,
            guest_os_id: AtomicU64::new(0),
            hypercall: AtomicU64::new(0),
            reference_tsc: AtomicU64::new(0),
            vp_assist: (0..vps).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Reference time for a guest TSC value.
    pub fn ref_time(&self, tsc: u64) -> u64 {
        ((u128::from(tsc) * u128::from(tsc_scale(self.tsc_hz))) >> 64) as u64
    }

    /// Whether `index` is one of ours.
    pub fn is_synthetic(index: u32) -> bool {
        (0x4000_0000..0x4000_1000).contains(&index)
    }

    /// RDMSR on `vp`.
    pub fn rdmsr(&self, synic: &Synic, vp: u32, index: u32) -> MsrOutcome {
        let Some(s) = synic.vp(vp) else {
            return MsrOutcome::Fault;
        };
        let v = match index {
            msr::GUEST_OS_ID => self.guest_os_id.load(Ordering::SeqCst),
            msr::HYPERCALL => self.hypercall.load(Ordering::SeqCst),
            msr::VP_INDEX => u64::from(vp),
            msr::TIME_REF_COUNT => return MsrOutcome::NeedTsc,
            msr::REFERENCE_TSC => self.reference_tsc.load(Ordering::SeqCst),
            msr::TSC_FREQUENCY => self.tsc_hz,
            msr::APIC_FREQUENCY => APIC_FREQUENCY_HZ,
            msr::VP_ASSIST_PAGE => self.vp_assist[vp as usize].load(Ordering::SeqCst),
            msr::SCONTROL => s.scontrol.load(Ordering::SeqCst),
            msr::SVERSION => 1,
            msr::SIEFP => s.siefp.load(Ordering::SeqCst),
            msr::SIMP => s.simp.load(Ordering::SeqCst),
            msr::EOM => 0,
            msr::SINT0..=msr::SINT15 => {
                let v = s.sint[(index - msr::SINT0) as usize].load(Ordering::SeqCst);
                // Never written: masked (the architectural reset value).
                if v == 0 { SINT_MASKED } else { v }
            }
            _ => return MsrOutcome::Fault,
        };
        MsrOutcome::Ok(v)
    }

    /// WRMSR on `vp`.
    pub fn wrmsr(&self, synic: &Synic, vp: u32, index: u32, value: u64) -> MsrOutcome {
        if synic.vp(vp).is_none() {
            return MsrOutcome::Fault;
        }
        match index {
            msr::GUEST_OS_ID => {
                self.guest_os_id.store(value, Ordering::SeqCst);
                if value == 0 {
                    // Clearing the OS id disables the hypercall page (TLFS).
                    self.hypercall.fetch_and(!1, Ordering::SeqCst);
                }
            }
            msr::HYPERCALL => {
                if value & 1 == 1 {
                    if self.guest_os_id.load(Ordering::SeqCst) == 0 {
                        return MsrOutcome::Fault;
                    }
                    let gpa = GuestAddress(value & !0xfff);
                    if self.mem.write_slice(&hypercall_code(), gpa).is_err() {
                        return MsrOutcome::Fault;
                    }
                }
                self.hypercall.store(value, Ordering::SeqCst);
            }
            msr::REFERENCE_TSC => {
                if value & 1 == 1 {
                    let gpa = value & !0xfff;
                    // sequence 1, scale, offset 0: reference time counts from TSC 0.
                    let mut page = [0u8; 24];
                    page[0..4].copy_from_slice(&1u32.to_le_bytes());
                    page[8..16].copy_from_slice(&tsc_scale(self.tsc_hz).to_le_bytes());
                    if self.tsc_hz == 0 || self.mem.write_slice(&page, GuestAddress(gpa)).is_err() {
                        return MsrOutcome::Fault;
                    }
                }
                self.reference_tsc.store(value, Ordering::SeqCst);
            }
            msr::VP_ASSIST_PAGE => self.vp_assist[vp as usize].store(value, Ordering::SeqCst),
            msr::SCONTROL | msr::SIEFP | msr::SIMP | msr::SINT0..=msr::SINT15 => {
                synic.set_msr(vp, index, value);
            }
            // EOM: the message pump retries busy slots on its own timer.
            msr::EOM => {}
            _ => return MsrOutcome::Fault,
        }
        MsrOutcome::Ok(0)
    }
}

/// SINT delivery as an MSI with the vector from the VP's SINT register.
pub struct MsiKick {
    vm: Arc<VmFd>,
    synic: std::sync::OnceLock<std::sync::Weak<Synic>>,
}

impl MsiKick {
    /// A kick through `vm`; [`MsiKick::bind`] must be called once the SynIC exists.
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(Self {
            vm,
            synic: std::sync::OnceLock::new(),
        })
    }

    /// Connect to the SynIC whose SINT registers give the vectors.
    pub fn bind(&self, synic: &Arc<Synic>) {
        let _ = self.synic.set(Arc::downgrade(synic));
    }
}

impl SintKick for Arc<MsiKick> {
    fn kick(&self, vp: u32, sint: u32) {
        let Some(synic) = self.synic.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let Some(s) = synic.vp(vp) else { return };
        let reg = s.sint[(sint & 15) as usize].load(Ordering::SeqCst);
        let vector = (reg & 0xff) as u32;
        if reg & SINT_MASKED != 0 || vector < 16 {
            return;
        }
        // Fixed delivery, physical destination = APIC id (= VP index), edge.
        let msi = kvm_msi {
            address_lo: 0xfee0_0000 | (vp << 12),
            address_hi: 0,
            data: vector,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            tracing::warn!(error = %e, vp, "cannot deliver a SINT");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoKick;
    impl SintKick for NoKick {
        fn kick(&self, _: u32, _: u32) {}
    }

    fn setup() -> (UserspaceHv, Synic) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        (
            UserspaceHv::new(mem.clone(), 2, 2_000_000),
            Synic::new(mem, 2, Box::new(NoKick)),
        )
    }

    #[test]
    fn hypercall_page_needs_an_os_id_and_gets_the_port_stub() {
        let (hv, s) = setup();
        assert_eq!(hv.wrmsr(&s, 0, msr::HYPERCALL, 0x5001), MsrOutcome::Fault);
        assert_eq!(
            hv.wrmsr(&s, 0, msr::GUEST_OS_ID, 0x8100 << 48),
            MsrOutcome::Ok(0)
        );
        assert_eq!(hv.wrmsr(&s, 0, msr::HYPERCALL, 0x5001), MsrOutcome::Ok(0));
        let mut code = [0u8; 3];
        hv.mem.read_slice(&mut code, GuestAddress(0x5000)).unwrap();
        assert_eq!(code, hypercall_code());
        assert_eq!(hv.rdmsr(&s, 0, msr::HYPERCALL), MsrOutcome::Ok(0x5001));
    }

    #[test]
    fn msrs_read_back_per_vp() {
        let (hv, s) = setup();
        assert_eq!(hv.rdmsr(&s, 1, msr::VP_INDEX), MsrOutcome::Ok(1));
        assert_eq!(hv.rdmsr(&s, 0, msr::SVERSION), MsrOutcome::Ok(1));
        assert_eq!(hv.rdmsr(&s, 0, msr::SINT0 + 2), MsrOutcome::Ok(SINT_MASKED));
        hv.wrmsr(&s, 1, msr::SINT0 + 2, 0xf3);
        assert_eq!(hv.rdmsr(&s, 1, msr::SINT0 + 2), MsrOutcome::Ok(0xf3));
        hv.wrmsr(&s, 0, msr::SIMP, 0x3001);
        assert_eq!(hv.rdmsr(&s, 0, msr::SIMP), MsrOutcome::Ok(0x3001));
        assert_eq!(
            hv.rdmsr(&s, 0, msr::TSC_FREQUENCY),
            MsrOutcome::Ok(2_000_000_000)
        );
        assert_eq!(hv.rdmsr(&s, 0, msr::TIME_REF_COUNT), MsrOutcome::NeedTsc);
        assert_eq!(hv.rdmsr(&s, 0, 0x4000_0118), MsrOutcome::Fault);
        assert_eq!(hv.rdmsr(&s, 5, msr::VP_INDEX), MsrOutcome::Fault);
    }

    #[test]
    fn reference_time_is_100ns_units_of_the_tsc() {
        let (hv, s) = setup();
        // 2 GHz: 2e9 ticks = 1 s = 1e7 units.
        let t = hv.ref_time(2_000_000_000);
        assert!((9_999_999..=10_000_000).contains(&t), "{t}");
        assert_eq!(
            hv.wrmsr(&s, 0, msr::REFERENCE_TSC, 0x6001),
            MsrOutcome::Ok(0)
        );
        assert_eq!(hv.mem.read_obj::<u32>(GuestAddress(0x6000)).unwrap(), 1);
        assert_eq!(
            hv.mem.read_obj::<u64>(GuestAddress(0x6008)).unwrap(),
            tsc_scale(2_000_000_000)
        );
    }
}
