//! The Hyper-V CPUID identity (leaves 0x40000000..=0x40000005), replacing KVM's signature.
//!
//! Linux picks the hypervisor whose detector scores highest; a `KVMKVMKVM` leaf anywhere in
//! 0x40000000..0x4000FF00 beats Hyper-V and `hv_vmbus` then refuses to load. So every
//! hypervisor leaf from the host's list is dropped before ours go in.

use kvm_bindings::kvm_cpuid_entry2;

use super::HvBackend;

/// Highest Hyper-V leaf we publish.
pub const MAX_LEAF: u32 = 0x4000_0005;
/// "Hv#1": KVM turns its Hyper-V emulation on only when leaf 0x40000001 says this.
pub const HV1_INTERFACE: u32 = 0x3123_7648;

/// Partition privilege flags (EAX of 0x40000003): TIME_REF_COUNT, SYNIC, APIC_ACCESS
/// (VP-assist MSR), HYPERCALL, VP_INDEX, REFERENCE_TSC, ACCESS_FREQUENCY_MSRS.
pub const FEATURES_EAX: u32 =
    (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 9) | (1 << 11);
/// EBX of 0x40000003: POST_MESSAGES, SIGNAL_EVENTS.
pub const FEATURES_EBX: u32 = (1 << 4) | (1 << 5);
/// EDX of 0x40000003: FREQUENCY_MSRS_AVAILABLE.
pub const FEATURES_EDX: u32 = 1 << 8;
/// EAX of 0x40000004: DEPRECATING_AEOI (the guest EOIs SINTs, APICv stays usable).
pub const HINTS_EAX: u32 = 1 << 9;

fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index: 0,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// The Hyper-V leaves for a partition of `cpus` vCPUs.
pub fn hyperv_leaves(backend: HvBackend, cpus: u32) -> Vec<kvm_cpuid_entry2> {
    let sig = |s: &[u8; 4]| u32::from_le_bytes(*s);
    let interface = match backend {
        HvBackend::Kernel => HV1_INTERFACE,
        // Without "Hv#1" KVM rejects the synthetic MSRs, which then exit to us.
        HvBackend::Userspace => 0,
    };
    vec![
        leaf(
            0x4000_0000,
            MAX_LEAF,
            sig(b"Micr"),
            sig(b"osof"),
            sig(b"t Hv"),
        ),
        leaf(0x4000_0001, interface, 0, 0, 0),
        // Build 14393, version 10.0 (what QEMU reports by default).
        leaf(0x4000_0002, 14393, 10 << 16, 0, 0),
        leaf(0x4000_0003, FEATURES_EAX, FEATURES_EBX, 0, FEATURES_EDX),
        leaf(0x4000_0004, HINTS_EAX, u32::MAX, 0, 0),
        leaf(0x4000_0005, cpus, cpus, 0, 0),
    ]
}

/// Replace every hypervisor leaf in `entries` with the Hyper-V ones.
pub fn apply(entries: &mut Vec<kvm_cpuid_entry2>, backend: HvBackend, cpus: u32) {
    entries.retain(|e| !(0x4000_0000..0x5000_0000).contains(&e.function));
    entries.extend(hyperv_leaves(backend, cpus));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm_leaves() -> Vec<kvm_cpuid_entry2> {
        let s = |b: &[u8; 4]| u32::from_le_bytes(*b);
        vec![
            leaf(1, 0, 0, 1 << 31, 0),
            leaf(
                0x4000_0000,
                0x4000_0001,
                s(b"KVMK"),
                s(b"VMKV"),
                s(b"M\0\0\0"),
            ),
            leaf(0x4000_0001, 0xffff, 0, 0, 0),
            leaf(0x4000_0100, 0, s(b"KVMK"), s(b"VMKV"), s(b"M\0\0\0")),
        ]
    }

    #[test]
    fn only_the_hyperv_signature_remains() {
        let mut e = kvm_leaves();
        apply(&mut e, HvBackend::Kernel, 2);
        let hv: Vec<_> = e.iter().filter(|x| x.function >= 0x4000_0000).collect();
        assert_eq!(hv.len(), 6);
        let base = hv.iter().find(|x| x.function == 0x4000_0000).unwrap();
        let mut name = Vec::new();
        for r in [base.ebx, base.ecx, base.edx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&name, b"Microsoft Hv");
        assert!((0x4000_0005..=0x4000_ffff).contains(&base.eax));
        assert!(!e.iter().any(|x| x.ebx == u32::from_le_bytes(*b"KVMK")));
        assert_eq!(e[0].function, 1, "other leaves are kept");
    }

    #[test]
    fn privilege_flags_match_the_guest_oracle() {
        // The guest prints "privilege flags low 0xa76, high 0x30, hints 0x200, misc 0x100".
        assert_eq!(FEATURES_EAX, 0xa76);
        assert_eq!(FEATURES_EBX, 0x30);
        assert_eq!(HINTS_EAX, 0x200);
        assert_eq!(FEATURES_EDX, 0x100);
        // Never: SYNTIMER (bit 3) without direct mode, ACCESS_TSC_INVARIANT (bit 15),
        // CPU_MANAGEMENT (EBX bit 12), partition id (EBX bit 1).
        assert_eq!(FEATURES_EAX & ((1 << 3) | (1 << 15)), 0);
        assert_eq!(FEATURES_EBX & ((1 << 12) | (1 << 1)), 0);
    }

    #[test]
    fn hv1_only_for_the_kernel_backend() {
        let k = hyperv_leaves(HvBackend::Kernel, 4);
        let u = hyperv_leaves(HvBackend::Userspace, 4);
        assert_eq!(k[1].eax, HV1_INTERFACE);
        assert_eq!(u[1].eax, 0);
        assert_eq!((k[5].eax, k[5].ebx), (4, 4));
    }
}
