//! `parvis-worker probe`: can this host run partitions? One JSON object on stdout:
//! `{"usable": bool, "reason": "...", "api_version": N, "max_vcpus": N, "capabilities": [...]}`.
//! `reason` says why the host is not usable and is empty when it is.

use hypervisor::partition::REQUIRED_CAPS;
use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// Capabilities reported by name when present.
const REPORTED: &[(Cap, &str)] = &[
    (Cap::Irqchip, "irqchip"),
    (Cap::UserMemory, "user-memory"),
    (Cap::SetTssAddr, "set-tss-addr"),
    (Cap::ExtCpuid, "ext-cpuid"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::Pit2, "pit2"),
    (Cap::ImmediateExit, "immediate-exit"),
    (Cap::TscDeadlineTimer, "tsc-deadline-timer"),
    (Cap::SplitIrqchip, "split-irqchip"),
    (Cap::X2ApicApi, "x2apic-api"),
    (Cap::SignalMsi, "signal-msi"),
    (Cap::ReadonlyMem, "readonly-mem"),
    (Cap::Xsave, "xsave"),
    (Cap::Xcrs, "xcrs"),
    (Cap::TscControl, "tsc-control"),
    (Cap::Hyperv, "hyperv"),
    (Cap::HypervTime, "hyperv-time"),
    (Cap::HypervSynic, "hyperv-synic"),
    (Cap::HypervSynic2, "hyperv-synic2"),
];

/// What `probe` prints.
#[derive(Debug, Serialize)]
pub struct Probe {
    usable: bool,
    reason: String,
    api_version: i32,
    max_vcpus: usize,
    capabilities: Vec<&'static str>,
}

/// Probe /dev/kvm.
pub fn probe() -> Probe {
    match Kvm::new() {
        Ok(kvm) => probe_kvm(&kvm),
        Err(e) => Probe {
            usable: false,
            reason: open_error(e.errno()),
            api_version: 0,
            max_vcpus: 0,
            capabilities: Vec::new(),
        },
    }
}

fn probe_kvm(kvm: &Kvm) -> Probe {
    let api_version = kvm.get_api_version();
    let reason = if api_version != KVM_API_VERSION {
        format!("unsupported KVM API version {api_version} ({KVM_API_VERSION} expected)")
    } else {
        REQUIRED_CAPS
            .iter()
            .find(|(cap, _)| !kvm.check_extension(*cap))
            .map(|(_, name)| format!("this host's KVM lacks {name}"))
            .unwrap_or_default()
    };
    Probe {
        usable: reason.is_empty(),
        reason,
        api_version,
        max_vcpus: kvm.get_max_vcpus(),
        capabilities: REPORTED
            .iter()
            .filter(|(cap, _)| kvm.check_extension(*cap))
            .map(|(_, name)| *name)
            .collect(),
    }
}

/// "/dev/kvm: Permission denied", without std's " (os error 13)".
fn open_error(errno: i32) -> String {
    let e = std::io::Error::from_raw_os_error(errno).to_string();
    let e = e.split(" (os error").next().unwrap_or_default();
    format!("/dev/kvm: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_read_well() {
        assert_eq!(open_error(libc::EACCES), "/dev/kvm: Permission denied");
        assert_eq!(
            open_error(libc::ENOENT),
            "/dev/kvm: No such file or directory"
        );
    }

    #[test]
    fn probe_is_consistent_whatever_the_host() {
        let p = probe();
        let v = serde_json::to_value(&p).unwrap();
        for key in [
            "usable",
            "reason",
            "api_version",
            "max_vcpus",
            "capabilities",
        ] {
            assert!(v.get(key).is_some(), "{key} missing");
        }
        assert_eq!(p.usable, p.reason.is_empty());
        if p.usable {
            assert_eq!(p.api_version, KVM_API_VERSION);
            assert!(p.max_vcpus >= 1);
            assert!(p.capabilities.contains(&"irqchip"));
        }
    }
}
