//! One boot's Hyper-V side: SynIC with its SINT delivery (irqfds on KVM's HV_SINT routes,
//! or MSIs for the userspace backend), the synthvid VRAM slot, and the VMBus server.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuFd, VmFd};
use vmbus_devices::video::VramMapper;
use vmm_sys_util::eventfd::EventFd;

use super::{Partition, PartitionError, kvm_err};
use crate::devices::bus::lock;
use crate::hv::HvBackend;
use crate::hv::synic::{SintKick, Synic};
use crate::hv::userspace::{MsiKick, UserspaceHv};
use crate::layout;
use crate::vmbus::{HvPartition, VmbusServer};

/// SINT delivery through one irqfd per VP on its HV_SINT route (kernel backend).
struct IrqfdKick(Vec<EventFd>);

impl SintKick for IrqfdKick {
    fn kick(&self, vp: u32, _sint: u32) {
        if let Some(fd) = self.0.get(vp as usize)
            && let Err(e) = fd.write(1)
        {
            tracing::error!(error = %e, vp, "cannot raise a SINT");
        }
    }
}

/// KVM memory slot for synthvid VRAM (after RAM and the boot framebuffer).
const SYNTHVID_SLOT: u32 = 8;

/// Maps the shared VRAM where the synthvid guest driver put it: inside the VMBus window, or
/// where it always is (the boot framebuffer's place, the legacy video device's BAR 0), which
/// needs no slot of its own.
struct KvmVramMapper {
    vm: Arc<VmFd>,
    host: u64,
    size: u64,
    current: Mutex<Option<u64>>,
}

impl KvmVramMapper {
    fn region(&self, gpa: u64, size: u64) -> kvm_bindings::kvm_userspace_memory_region {
        kvm_bindings::kvm_userspace_memory_region {
            slot: SYNTHVID_SLOT,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.host,
        }
    }

    /// Remove the slot of the previous placement, if any.
    fn unmap(&self, cur: &mut Option<u64>) -> bool {
        let Some(old) = cur.take() else {
            return true;
        };
        // SAFETY: deleting a slot (size 0) we created; no host memory is referenced.
        match unsafe { self.vm.set_user_memory_region(self.region(old, 0)) } {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot remove the old synthvid VRAM slot");
                false
            }
        }
    }
}

impl VramMapper for KvmVramMapper {
    fn map(&self, gpa: u64) -> bool {
        let mut cur = lock(&self.current);
        if gpa == layout::VRAM_ADDR {
            // The VRAM's own slot (the boot framebuffer's place) is always there.
            if !self.unmap(&mut cur) {
                return false;
            }
            tracing::info!("synthvid VRAM at the boot framebuffer's place");
            return true;
        }
        let window = layout::VMBUS_MMIO_BASE..layout::VMBUS_MMIO_BASE + layout::VMBUS_MMIO_SIZE;
        let Some(end) = gpa.checked_add(self.size) else {
            return false;
        };
        if !gpa.is_multiple_of(0x1000) || !window.contains(&gpa) || end > window.end {
            return false;
        }
        if *cur == Some(gpa) {
            return true;
        }
        if !self.unmap(&mut cur) {
            return false;
        }
        // SAFETY: `host..host+size` is the VRAM part of the partition's shared memory
        // mapping, which outlives every VM built from the partition; the slot lies in the
        // VMBus window, which overlaps no other slot.
        match unsafe { self.vm.set_user_memory_region(self.region(gpa, self.size)) } {
            Ok(()) => {
                *cur = Some(gpa);
                tracing::info!(gpa = format_args!("{gpa:#x}"), "synthvid VRAM mapped");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot map synthvid VRAM");
                false
            }
        }
    }
}

impl Partition {
    /// SynIC, SINT delivery and the VMBus server of one boot (after every vCPU exists: the
    /// SINT routes need SynIC active on each).
    pub(super) fn build_hv(
        &self,
        backend: HvBackend,
        vm: &Arc<VmFd>,
        vcpus: &[VcpuFd],
    ) -> Result<HvPartition, PartitionError> {
        let cpus = u32::from(self.config.cpus);
        let mem = self.ram.memory().clone();
        let (synic, user, eventfd_vm) = match backend {
            HvBackend::Kernel => {
                crate::hv::kvm::set_routes(vm, cpus, crate::hv::VMBUS_SINT)
                    .map_err(kvm_err("KVM_SET_GSI_ROUTING (SINT routes)"))?;
                let fds =
                    crate::hv::kvm::sint_irqfds(vm, cpus).map_err(kvm_err("KVM_IRQFD (SINT)"))?;
                let synic = Arc::new(Synic::new(mem, cpus, Box::new(IrqfdKick(fds))));
                (synic, None, Some(vm.clone()))
            }
            HvBackend::Userspace => {
                let cap = kvm_bindings::kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
                    args: [
                        u64::from(
                            kvm_bindings::KVM_MSR_EXIT_REASON_INVAL
                                | kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN,
                        ),
                        0,
                        0,
                        0,
                    ],
                    ..Default::default()
                };
                vm.enable_cap(&cap)
                    .map_err(kvm_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
                let tsc_khz = vcpus
                    .first()
                    .map(|v| v.get_tsc_khz())
                    .transpose()
                    .map_err(kvm_err("KVM_GET_TSC_KHZ"))?
                    .unwrap_or(0);
                let kick = MsiKick::new(vm.clone());
                let synic = Arc::new(Synic::new(mem.clone(), cpus, Box::new(kick.clone())));
                kick.bind(&synic);
                (synic, Some(UserspaceHv::new(mem, cpus, tsc_khz)), None)
            }
        };
        if let Some(video) = &self.config.video {
            let vram = self.ram.vram();
            video.attach(Arc::new(KvmVramMapper {
                vm: vm.clone(),
                host: vram.as_ptr() as u64,
                size: vram.size() as u64,
                current: Mutex::new(None),
            }));
        }
        let vmbus =
            VmbusServer::start(synic.clone(), eventfd_vm, self.config.vmbus_devices.clone())
                .map_err(PartitionError::Thread)?;
        Ok(HvPartition {
            backend,
            synic,
            user,
            vmbus,
        })
    }
}
