//! vCPU threads: each runs KVM_RUN in a loop, dispatches port and MMIO exits to the buses,
//! and parks when the partition is paused or stopping.
//!
//! A vCPU blocked in KVM_RUN (an idle guest halts inside the kernel) is woken with a signal;
//! the controller repeats the kick until every vCPU has acknowledged, which closes the window
//! between a vCPU checking its run state and entering the guest.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::Bus;
use crate::hv::userspace::MsrOutcome;
use crate::vmbus::{HvPartition, SignalInput};

/// What the vCPUs should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Run the guest.
    Running,
    /// Park until resumed.
    Paused,
    /// Leave the thread (power-off, reset, crash).
    Stopping,
}

/// Why a vCPU asks the partition to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: usize },
    /// KVM reported a system event (reset, shutdown, crash) requested by the guest.
    SystemEvent { vcpu: usize, kind: u32 },
    /// KVM could not run the vCPU.
    Fault { vcpu: usize, reason: String },
}

/// State shared between the controller and the vCPU threads.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<RunState>,
    changed: Condvar,
    /// vCPUs currently parked (paused) or gone.
    parked: AtomicUsize,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            state: Mutex::new(RunState::Running),
            changed: Condvar::new(),
            parked: AtomicUsize::new(0),
        }
    }
}

impl VcpuControl {
    /// Current state.
    pub fn state(&self) -> RunState {
        *crate::devices::bus::lock(&self.state)
    }

    /// Set the state and wake parked vCPUs.
    pub fn set(&self, s: RunState) {
        *crate::devices::bus::lock(&self.state) = s;
        self.changed.notify_all();
    }

    /// Number of vCPUs that acknowledged a pause or left.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    /// Block a vCPU thread while paused. Returns false when it must leave.
    fn wait_runnable(&self) -> bool {
        let mut s = crate::devices::bus::lock(&self.state);
        if *s == RunState::Paused {
            self.parked.fetch_add(1, Ordering::SeqCst);
            while *s == RunState::Paused {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
        *s == RunState::Running
    }

    /// Kick until `count` vCPUs are parked or gone, or the deadline passes.
    pub fn kick_until(&self, count: usize, kick: impl Fn(), timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.parked() >= count {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            kick();
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

/// Buses a vCPU dispatches exits to.
#[derive(Debug, Clone)]
pub struct VcpuBuses {
    /// Port I/O.
    pub pio: Arc<Bus>,
    /// MMIO.
    pub mmio: Arc<Bus>,
    /// Hyper-V enlightenments and VMBus, when the partition has them.
    pub hv: Option<Arc<crate::vmbus::HvPartition>>,
}

/// Rate-limits log lines a guest can trigger.
#[derive(Debug, Default)]
struct LogLimit(u32);

impl LogLimit {
    fn allow(&mut self) -> bool {
        self.0 += 1;
        self.0 <= 10 || self.0.is_power_of_two()
    }
}

/// The vCPU thread body. Returns the vCPU so the partition can reuse or drop it.
pub fn run_vcpu(
    index: usize,
    mut vcpu: VcpuFd,
    buses: VcpuBuses,
    control: Arc<VcpuControl>,
    report: impl Fn(VcpuEvent),
) -> VcpuFd {
    let _span = tracing::debug_span!("vp", index).entered();
    let mut unhandled = LogLimit::default();
    let vp = index as u32;
    loop {
        if !control.wait_runnable() {
            break;
        }
        // Exits that need the vCPU itself (registers, kvm_run) are finished after the
        // match, once the exit's borrow of the vCPU has ended.
        let mut after = After::Nothing;
        match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, _)
                    if port == u16::from(crate::hv::userspace::HYPERCALL_PORT)
                        && buses.hv.as_ref().is_some_and(|h| h.user.is_some()) =>
                {
                    after = After::UserHypercall;
                }
                VcpuExit::Hyperv => after = After::KernelHyperv,
                VcpuExit::X86Rdmsr(m) => {
                    let outcome = match &buses.hv {
                        Some(hv) => match &hv.user {
                            Some(u) => u.rdmsr(&hv.synic, vp, m.index),
                            None => MsrOutcome::Fault,
                        },
                        None => MsrOutcome::Fault,
                    };
                    match outcome {
                        MsrOutcome::Ok(v) => {
                            *m.data = v;
                            *m.error = 0;
                        }
                        MsrOutcome::Fault => *m.error = 1,
                        MsrOutcome::NeedTsc => {
                            *m.error = 0;
                            after = After::RefTime;
                        }
                    }
                }
                VcpuExit::X86Wrmsr(m) => {
                    let outcome = match &buses.hv {
                        Some(hv) => match &hv.user {
                            Some(u) => u.wrmsr(&hv.synic, vp, m.index, m.data),
                            None => MsrOutcome::Fault,
                        },
                        None => MsrOutcome::Fault,
                    };
                    *m.error = u8::from(outcome == MsrOutcome::Fault);
                }
                VcpuExit::IoOut(port, data) => {
                    if !buses.pio.write(u64::from(port), data) && unhandled.allow() {
                        tracing::trace!(port, len = data.len(), "unclaimed port write");
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    buses.pio.read(u64::from(port), data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !buses.mmio.write(addr, data) && unhandled.allow() {
                        tracing::debug!(addr, len = data.len(), "unclaimed MMIO write");
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !buses.mmio.read(addr, data) && unhandled.allow() {
                        tracing::debug!(addr, len = data.len(), "unclaimed MMIO read");
                    }
                }
                VcpuExit::Shutdown => {
                    report(VcpuEvent::TripleFault { vcpu: index });
                    break;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    report(VcpuEvent::SystemEvent { vcpu: index, kind });
                    break;
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    report(VcpuEvent::Fault {
                        vcpu: index,
                        reason: format!(
                            "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                        ),
                    });
                    break;
                }
                VcpuExit::InternalError => {
                    report(VcpuEvent::Fault {
                        vcpu: index,
                        reason: "KVM internal error (an instruction KVM cannot emulate)".into(),
                    });
                    break;
                }
                VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
                other => {
                    if unhandled.allow() {
                        tracing::warn!(vcpu = index, exit = ?other, "unexpected vCPU exit");
                    }
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                report(VcpuEvent::Fault {
                    vcpu: index,
                    reason: format!("KVM_RUN failed: {e}"),
                });
                break;
            }
        }
        if let (Some(hv), false) = (&buses.hv, after == After::Nothing)
            && let Err(e) = finish_hv_exit(&mut vcpu, vp, hv, after)
            && unhandled.allow()
        {
            tracing::warn!(vcpu = index, error = %e, "cannot complete a Hyper-V exit");
        }
    }
    control.parked.fetch_add(1, Ordering::SeqCst);
    vcpu
}

/// Work left after a vCPU exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Nothing,
    /// KVM_EXIT_HYPERV: SynIC change or hypercall (kernel backend).
    KernelHyperv,
    /// `out` to the hypercall port (userspace backend).
    UserHypercall,
    /// RDMSR of TIME_REF_COUNT: needs the guest TSC.
    RefTime,
}

fn finish_hv_exit(
    vcpu: &mut VcpuFd,
    vp: u32,
    hv: &HvPartition,
    after: After,
) -> Result<(), kvm_ioctls::Error> {
    match after {
        After::Nothing => {}
        After::KernelHyperv => {
            let run = vcpu.get_kvm_run();
            // SAFETY: the last exit was KVM_EXIT_HYPERV, so `hyperv` is the active member of
            // the exit union; both of its variants are plain integers.
            let exit = unsafe { &mut run.__bindgen_anon_1.hyperv };
            match exit.type_ {
                kvm_bindings::KVM_EXIT_HYPERV_SYNIC => {
                    // SAFETY: type SYNIC selects the `synic` member (plain integers).
                    let s = unsafe { exit.u.synic };
                    hv.synic.set_msr(vp, crate::hv::msr::SCONTROL, s.control);
                    hv.synic.set_msr(vp, crate::hv::msr::SIEFP, s.evt_page);
                    hv.synic.set_msr(vp, crate::hv::msr::SIMP, s.msg_page);
                    tracing::debug!(
                        vp,
                        msr = s.msr,
                        control = s.control,
                        simp = s.msg_page,
                        siefp = s.evt_page,
                        "SynIC change"
                    );
                }
                kvm_bindings::KVM_EXIT_HYPERV_HCALL => {
                    // SAFETY: type HCALL selects the `hcall` member (plain integers).
                    let h = unsafe { &mut exit.u.hcall };
                    h.result = hv.hypercall(h.input, h.params[0], SignalInput::Loaded);
                }
                _ => {}
            }
        }
        After::UserHypercall => {
            let mut regs = vcpu.get_regs()?;
            regs.rax = hv.hypercall(regs.rcx, regs.rdx, SignalInput::FromGuest);
            // RIP stays on the `out`: KVM skips it on the next KVM_RUN.
            vcpu.set_regs(&regs)?;
        }
        After::RefTime => {
            let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index: IA32_TSC,
                ..Default::default()
            }])
            .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
            vcpu.get_msrs(&mut msrs)?;
            let tsc = msrs.as_slice()[0].data;
            let t = hv.user.as_ref().map_or(0, |u| u.ref_time(tsc));
            // The last exit was KVM_EXIT_X86_RDMSR: KVM returns `msr.data` to the guest.
            vcpu.get_kvm_run().__bindgen_anon_1.msr.data = t;
        }
    }
    Ok(())
}

/// IA32_TIME_STAMP_COUNTER.
const IA32_TSC: u32 = 0x10;

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) kick handler once per process; the signal only needs to interrupt
/// KVM_RUN.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    *ONCE.get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_parks_and_resume_releases() {
        let c = Arc::new(VcpuControl::default());
        c.set(RunState::Paused);
        let t = {
            let c = c.clone();
            std::thread::spawn(move || c.wait_runnable())
        };
        assert!(c.kick_until(1, || {}, Duration::from_secs(5)));
        c.set(RunState::Running);
        assert!(t.join().unwrap());
        assert_eq!(c.parked(), 0);
        c.set(RunState::Stopping);
        assert!(!c.wait_runnable());
    }

    #[test]
    fn kick_until_times_out_when_nobody_parks() {
        let c = VcpuControl::default();
        let kicks = AtomicUsize::new(0);
        let timeout = Duration::from_millis(20);
        let start = std::time::Instant::now();
        assert!(!c.kick_until(
            1,
            || {
                kicks.fetch_add(1, Ordering::SeqCst);
            },
            timeout
        ));
        // It gave up only after the deadline, having kicked at least once. How many kicks fit
        // in 20 ms depends on the scheduler, so re-kicking is tested without a clock below.
        assert!(start.elapsed() >= timeout);
        assert!(kicks.load(Ordering::SeqCst) >= 1);
    }

    #[test]
    fn kick_until_repeats_the_kick_until_the_vcpu_parks() {
        // A vCPU that misses the first two kicks (it was between checking its state and
        // entering the guest) parks on the third.
        let c = VcpuControl::default();
        let kicks = AtomicUsize::new(0);
        assert!(c.kick_until(
            1,
            || {
                if kicks.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                    c.parked.fetch_add(1, Ordering::SeqCst);
                }
            },
            Duration::from_secs(30)
        ));
        assert_eq!(kicks.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn log_limit_thins_out() {
        let mut l = LogLimit::default();
        let n = (0..10_000).filter(|_| l.allow()).count();
        assert!((10..30).contains(&n));
    }
}
