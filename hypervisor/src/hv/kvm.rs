//! KVM plumbing for the in-kernel Hyper-V backend: SynIC activation, VP index, SINT GSI
//! routes and `KVM_HYPERV_EVENTFD`.

use kvm_bindings::{
    KVM_CAP_HYPERV_SYNIC2, KVM_IRQ_ROUTING_HV_SINT, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_enable_cap,
    kvm_hyperv_eventfd, kvm_irq_routing_entry, kvm_msr_entry,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use super::msr;

/// First GSI used for SINT routes (after the 24 IOAPIC pins).
pub const SINT_FIRST_GSI: u32 = 24;

ioctl_iow_nr!(
    KVM_HYPERV_EVENTFD,
    kvm_bindings::KVMIO,
    0xbd,
    kvm_hyperv_eventfd
);

/// Turn on SynIC (version 2: KVM leaves the guest's pages alone) and set the VP index.
/// Must follow KVM_SET_CPUID2 with the Hyper-V leaves.
pub fn enable_vp(vcpu: &VcpuFd, vp: u32) -> Result<(), kvm_ioctls::Error> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_HYPERV_SYNIC2,
        ..Default::default()
    };
    vcpu.enable_cap(&cap)?;
    let msrs = kvm_bindings::Msrs::from_entries(&[kvm_msr_entry {
        index: msr::VP_INDEX,
        data: u64::from(vp),
        ..Default::default()
    }])
    .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    if vcpu.set_msrs(&msrs)? != 1 {
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }
    Ok(())
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The routing table: KVM's default PIC/IOAPIC routes plus one HV_SINT route per VP for
/// `sint` at GSI `SINT_FIRST_GSI + vp` (KVM_SET_GSI_ROUTING replaces the whole table).
/// Call after every vCPU has SynIC enabled.
pub fn set_routes(vm: &VmFd, vps: u32, sint: u32) -> Result<(), kvm_ioctls::Error> {
    let mut entries = Vec::new();
    for irq in 0..24u32 {
        entries.push(irqchip(irq, KVM_IRQCHIP_IOAPIC, irq));
        if irq < 16 {
            let chip = if irq < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(irq, chip, irq % 8));
        }
    }
    for vp in 0..vps {
        let mut e = kvm_irq_routing_entry {
            gsi: SINT_FIRST_GSI + vp,
            type_: KVM_IRQ_ROUTING_HV_SINT,
            ..Default::default()
        };
        e.u.hv_sint.vcpu = vp;
        e.u.hv_sint.sint = sint;
        entries.push(e);
    }
    let routing =
        KvmIrqRouting::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    vm.set_gsi_routing(&routing)
}

/// One irqfd per VP on its SINT GSI.
pub fn sint_irqfds(vm: &VmFd, vps: u32) -> Result<Vec<EventFd>, kvm_ioctls::Error> {
    (0..vps)
        .map(|vp| {
            let fd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)))?;
            vm.register_irqfd(&fd, SINT_FIRST_GSI + vp)?;
            Ok(fd)
        })
        .collect()
}

/// Let KVM complete HvSignalEvent for `conn_id` by signalling `fd` (no exit), or undo it.
pub fn hyperv_eventfd(
    vm: &VmFd,
    conn_id: u32,
    fd: &impl std::os::fd::AsRawFd,
    deassign: bool,
) -> Result<(), kvm_ioctls::Error> {
    let arg = kvm_hyperv_eventfd {
        conn_id,
        fd: fd.as_raw_fd(),
        flags: if deassign {
            kvm_bindings::KVM_HYPERV_EVENTFD_DEASSIGN
        } else {
            0
        },
        ..Default::default()
    };
    // SAFETY: KVM_HYPERV_EVENTFD reads one kvm_hyperv_eventfd from the pointer, which is a
    // live, correctly sized local; `vm` is a VM fd.
    let r = unsafe { ioctl_with_ref(vm, KVM_HYPERV_EVENTFD(), &arg) };
    if r < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(())
}
