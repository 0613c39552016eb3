//! Hyper-V enlightenments: the CPUID identity, the SynIC (message and event pages, SINT
//! delivery) and the hypercalls VMBus needs.
//!
//! Two implementations, chosen per partition ([`HvMode`]): KVM's in-kernel Hyper-V emulation
//! (MSRs, hypercall page, reference TSC page; the VMM only sees SynIC page changes and the
//! two VMBus hypercalls), or a userspace emulation for hosts whose KVM has none (every
//! synthetic MSR and the hypercall page are handled here, see [`userspace`]).

pub mod cpuid;
#[allow(
    unsafe_code,
    reason = "the KVM_HYPERV_EVENTFD ioctl, which kvm-ioctls does not wrap"
)]
pub mod kvm;
pub mod synic;
pub mod userspace;

use kvm_ioctls::{Cap, Kvm};

/// `KVM_CAP_HYPERV_VP_INDEX` (not in kvm-ioctls' `Cap`).
pub const KVM_CAP_HYPERV_VP_INDEX: u64 = 149;

/// Synthetic MSR indices (TLFS; Linux `hyperv-tlfs.h`).
pub mod msr {
    /// Guest OS identity.
    pub const GUEST_OS_ID: u32 = 0x4000_0000;
    /// Hypercall page.
    pub const HYPERCALL: u32 = 0x4000_0001;
    /// VP index.
    pub const VP_INDEX: u32 = 0x4000_0002;
    /// Reset (not advertised).
    pub const RESET: u32 = 0x4000_0003;
    /// Partition reference counter (100 ns).
    pub const TIME_REF_COUNT: u32 = 0x4000_0020;
    /// Reference TSC page.
    pub const REFERENCE_TSC: u32 = 0x4000_0021;
    /// TSC frequency in Hz.
    pub const TSC_FREQUENCY: u32 = 0x4000_0022;
    /// APIC timer frequency in Hz.
    pub const APIC_FREQUENCY: u32 = 0x4000_0023;
    /// VP assist page.
    pub const VP_ASSIST_PAGE: u32 = 0x4000_0073;
    /// SynIC control.
    pub const SCONTROL: u32 = 0x4000_0080;
    /// SynIC version.
    pub const SVERSION: u32 = 0x4000_0081;
    /// Event flags page.
    pub const SIEFP: u32 = 0x4000_0082;
    /// Message page.
    pub const SIMP: u32 = 0x4000_0083;
    /// End of message.
    pub const EOM: u32 = 0x4000_0084;
    /// SINT0; SINTn = SINT0 + n.
    pub const SINT0: u32 = 0x4000_0090;
    /// SINT15.
    pub const SINT15: u32 = 0x4000_009f;
}

/// Hypercall codes and statuses used by VMBus.
pub mod hcall {
    /// HvPostMessage.
    pub const POST_MESSAGE: u16 = 0x005c;
    /// HvSignalEvent.
    pub const SIGNAL_EVENT: u16 = 0x005d;
    /// Success.
    pub const STATUS_SUCCESS: u64 = 0;
    /// Unknown call code.
    pub const STATUS_INVALID_HYPERCALL_CODE: u64 = 2;
    /// Bad input.
    pub const STATUS_INVALID_HYPERCALL_INPUT: u64 = 3;
    /// Misaligned input.
    pub const STATUS_INVALID_ALIGNMENT: u64 = 4;
    /// No such port.
    pub const STATUS_INVALID_PORT_ID: u64 = 17;
    /// No such connection.
    pub const STATUS_INVALID_CONNECTION_ID: u64 = 18;
    /// Queue full, retry.
    pub const STATUS_INSUFFICIENT_BUFFERS: u64 = 19;
}

/// The SINT VMBus uses for messages and channel events.
pub const VMBUS_SINT: u32 = 2;

/// How a partition gets its Hyper-V enlightenments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HvMode {
    /// No Hyper-V identity: the guest sees a plain machine (no VMBus).
    Off,
    /// KVM's in-kernel emulation when the host has it, else userspace.
    Auto,
    /// KVM's in-kernel emulation (fails to start without it).
    Kernel,
    /// Userspace emulation even when KVM could do it.
    Userspace,
}

impl std::str::FromStr for HvMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            _ => Err(format!("{s:?}: expected off, auto, kernel or userspace")),
        }
    }
}

/// The enlightenment implementation a partition actually uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HvBackend {
    /// KVM emulates the MSRs and hypercall page; SynIC changes exit to us.
    Kernel,
    /// We emulate everything from MSR and port-I/O exits.
    Userspace,
}

/// Why a Hyper-V backend cannot be used on this host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HvError {
    /// The in-kernel emulation was asked for but the host's KVM lacks part of it.
    #[error("this host's KVM has no in-kernel Hyper-V emulation ({0} missing)")]
    NoKernelSupport(&'static str),
    /// The userspace emulation needs MSR exits.
    #[error(
        "this host's KVM cannot forward MSR accesses to userspace (KVM_CAP_X86_USER_SPACE_MSR)"
    )]
    NoUserspaceMsr,
}

/// What the in-kernel path needs, by name, if something is missing.
pub fn kernel_support_missing(kvm: &Kvm) -> Option<&'static str> {
    if !kvm.check_extension(Cap::Hyperv) {
        return Some("KVM_CAP_HYPERV");
    }
    if !kvm.check_extension(Cap::HypervSynic2) {
        return Some("KVM_CAP_HYPERV_SYNIC2");
    }
    if kvm.check_extension_raw(KVM_CAP_HYPERV_VP_INDEX as _) <= 0 {
        return Some("KVM_CAP_HYPERV_VP_INDEX");
    }
    if !kvm.check_extension(Cap::HypervTime) {
        return Some("KVM_CAP_HYPERV_TIME");
    }
    None
}

/// Pick the backend for `mode` on this host; `None` for [`HvMode::Off`].
pub fn select_backend(kvm: &Kvm, mode: HvMode) -> Result<Option<HvBackend>, HvError> {
    let kernel = kernel_support_missing(kvm);
    let user = kvm.check_extension(Cap::X86UserSpaceMsr);
    choose(mode, kernel, user)
}

fn choose(
    mode: HvMode,
    kernel_missing: Option<&'static str>,
    user_msr: bool,
) -> Result<Option<HvBackend>, HvError> {
    match (mode, kernel_missing, user_msr) {
        (HvMode::Off, _, _) => Ok(None),
        (HvMode::Kernel | HvMode::Auto, None, _) => Ok(Some(HvBackend::Kernel)),
        (HvMode::Kernel, Some(m), _) => Err(HvError::NoKernelSupport(m)),
        (HvMode::Auto | HvMode::Userspace, _, true) => Ok(Some(HvBackend::Userspace)),
        (HvMode::Auto | HvMode::Userspace, _, false) => Err(HvError::NoUserspaceMsr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_choice_follows_the_mode_and_the_host() {
        assert_eq!(choose(HvMode::Off, None, true), Ok(None));
        assert_eq!(
            choose(HvMode::Auto, None, true),
            Ok(Some(HvBackend::Kernel))
        );
        assert_eq!(
            choose(HvMode::Auto, Some("x"), true),
            Ok(Some(HvBackend::Userspace))
        );
        assert_eq!(
            choose(HvMode::Userspace, None, true),
            Ok(Some(HvBackend::Userspace))
        );
        assert_eq!(
            choose(HvMode::Kernel, Some("KVM_CAP_HYPERV"), true),
            Err(HvError::NoKernelSupport("KVM_CAP_HYPERV"))
        );
        assert_eq!(
            choose(HvMode::Auto, Some("x"), false),
            Err(HvError::NoUserspaceMsr)
        );
        assert_eq!("userspace".parse(), Ok(HvMode::Userspace));
        assert!("hyper".parse::<HvMode>().is_err());
    }
}
