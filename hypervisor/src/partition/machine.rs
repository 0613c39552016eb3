//! One boot's KVM objects: the VM with its memory slots, the guest memory contents (ACPI
//! tables, boot structures, the kernel), the platform devices wired in, and the vCPUs set up
//! to start at the kernel's entry. A reset drops the machine and builds a new one.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{CpuId, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{Partition, PartitionError, kvm_err};
use crate::boot::{self, BootFramebuffer, BootSpec};
use crate::cpu;
use crate::devices::platform::{SharedBusDevice, WireError, Wiring};
use crate::devices::{Bus, GuestMemory, Irq, IrqLine, LevelIrq, PlatformSink};
use crate::hv::HvBackend;
use crate::layout;
use crate::vcpu::{VcpuBuses, VcpuControl};

/// The KVM objects of one boot; rebuilt from scratch on reset.
pub(super) struct Machine {
    pub(super) vm: Arc<VmFd>,
    pub(super) vcpus: Vec<VcpuFd>,
    pub(super) threads: Vec<JoinHandle<VcpuFd>>,
    pub(super) buses: VcpuBuses,
    pub(super) control: Arc<VcpuControl>,
}

/// An edge-triggered interrupt through an irqfd.
#[derive(Debug)]
struct EventIrq(EventFd);

impl IrqLine for EventIrq {
    fn trigger(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::error!(error = %e, "cannot signal an interrupt");
        }
    }
}

/// A level-triggered ISA interrupt through KVM_IRQ_LINE.
struct KvmLevelIrq {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl LevelIrq for KvmLevelIrq {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, high) {
            tracing::error!(error = %e, gsi = self.gsi, "cannot set an interrupt line");
        }
    }
}

/// The devices' view of one boot's VM (see [`crate::devices::platform`]).
pub(super) struct KvmWiring {
    pub(super) vm: Arc<VmFd>,
    pub(super) mem: Arc<GuestMemory>,
    pub(super) sink: PlatformSink,
    pub(super) pio: Bus,
    pub(super) mmio: Bus,
}

impl Wiring for KvmWiring {
    fn pio(&mut self, dev: SharedBusDevice, base: u16, len: u64) -> Result<(), WireError> {
        Ok(self.pio.insert(dev, u64::from(base), len)?)
    }

    fn mmio(&mut self, dev: SharedBusDevice, base: u64, len: u64) -> Result<(), WireError> {
        Ok(self.mmio.insert(dev, base, len)?)
    }

    fn edge_irq(&mut self, gsi: u32) -> Result<Irq, WireError> {
        let io = |source| WireError::Irq { gsi, source };
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        self.vm
            .register_irqfd(&evt, gsi)
            .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
        Ok(Arc::new(EventIrq(evt)))
    }

    fn level_irq(&mut self, gsi: u32) -> Arc<dyn LevelIrq> {
        Arc::new(KvmLevelIrq {
            vm: self.vm.clone(),
            gsi,
        })
    }

    fn memory(&self) -> Arc<GuestMemory> {
        self.mem.clone()
    }

    fn platform(&self) -> PlatformSink {
        self.sink.clone()
    }
}

impl Partition {
    pub(super) fn build_machine(&self, clear: bool) -> Result<Machine, PartitionError> {
        let vm = Arc::new(self.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if vm.check_extension(Cap::SetIdentityMapAddr) {
            vm.set_identity_map_address(layout::KVM_TSS_ADDR - 0x1000)
                .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        self.map_memory(&vm)?;

        // Guest memory contents: a fresh boot every time.
        if clear {
            self.ram.clear()?;
        }
        let mem = self.ram.memory();
        for (gpa, blob) in &self.acpi.blobs {
            mem.write_slice(blob, GuestAddress(*gpa))
                .map_err(PartitionError::GuestMemory)?;
        }
        cpu::write_boot_structures(mem).map_err(PartitionError::GuestMemory)?;
        let entry = boot::load(
            mem,
            self.ram.layout(),
            &BootSpec {
                kernel: &self.config.kernel,
                initrd: self.config.initrd.as_deref(),
                cmdline: &self.config.cmdline,
                framebuffer: self.config.framebuffer.map(|format| BootFramebuffer {
                    base: layout::VRAM_ADDR,
                    size: layout::VRAM_SIZE,
                    format,
                }),
            },
        )?;
        // The host is done writing this boot's memory: the log starts here.
        if let Some(d) = &self.dirty {
            d.attach(&vm, self.vram_slot(), self.ram.vram().size() as u64);
        }

        // Devices.
        let mut wiring = KvmWiring {
            vm: vm.clone(),
            mem: mem.clone(),
            sink: self.platform_sink(),
            pio: Bus::new(),
            mmio: Bus::new(),
        };
        for d in &self.devices {
            d.wire(&mut wiring)
                .map_err(|source| PartitionError::Wiring {
                    device: d.name(),
                    source,
                })?;
        }
        let KvmWiring { pio, mmio, .. } = wiring;

        // vCPUs.
        let cpus = u32::from(self.config.cpus);
        let mut vcpus = Vec::with_capacity(cpus as usize);
        for i in 0..cpus {
            let vcpu = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = self.cpuid.clone();
            cpu::patch_cpuid(cpuid.as_mut_slice(), i, cpus);
            if let Some(backend) = self.hv {
                let mut entries = cpuid.as_slice().to_vec();
                crate::hv::cpuid::apply(&mut entries, backend, cpus);
                cpuid = CpuId::from_entries(&entries)
                    .map_err(|_| PartitionError::Config("too many CPUID entries".into()))?;
            }
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            if self.hv == Some(HvBackend::Kernel) {
                crate::hv::kvm::enable_vp(&vcpu, i)
                    .map_err(kvm_err("enabling SynIC and the VP index"))?;
            }
            let entries: Vec<kvm_bindings::kvm_msr_entry> = cpu::boot_msrs()
                .into_iter()
                .map(|(index, data)| kvm_bindings::kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = kvm_bindings::Msrs::from_entries(&entries)
                .map_err(|_| PartitionError::Config("too many boot MSRs".into()))?;
            let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if set != entries.len() {
                tracing::warn!(
                    vcpu = i,
                    set,
                    wanted = entries.len(),
                    "KVM accepted only some boot MSRs"
                );
            }
            vcpu.set_fpu(&cpu::boot_fpu())
                .map_err(kvm_err("KVM_SET_FPU"))?;
            let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
            let mut regs: Vec<u8> = lapic.regs.iter().map(|b| *b as u8).collect();
            cpu::set_lint(&mut regs);
            for (d, s) in lapic.regs.iter_mut().zip(regs) {
                *d = s as _;
            }
            vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
            if i == 0 {
                let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                vcpu.set_sregs(&cpu::boot_sregs(sregs))
                    .map_err(kvm_err("KVM_SET_SREGS"))?;
                vcpu.set_regs(&cpu::boot_regs(entry.entry, entry.zero_page))
                    .map_err(kvm_err("KVM_SET_REGS"))?;
            }
            vcpus.push(vcpu);
        }
        let hv = match self.hv {
            Some(backend) => Some(Arc::new(self.build_hv(backend, &vm, &vcpus)?)),
            None => None,
        };
        Ok(Machine {
            vm,
            vcpus,
            threads: Vec::new(),
            buses: VcpuBuses {
                pio: Arc::new(pio),
                mmio: Arc::new(mmio),
                hv,
            },
            control: Arc::new(VcpuControl::default()),
        })
    }

    fn map_memory(&self, vm: &VmFd) -> Result<(), PartitionError> {
        let mut regions: Vec<(u64, u64, u64)> = self
            .ram
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
            .collect();
        let vram = self.ram.vram();
        regions.push((layout::VRAM_ADDR, vram.size() as u64, vram.as_ptr() as u64));
        let vram_slot = self.vram_slot();
        debug_assert_eq!(vram_slot as usize, regions.len() - 1);
        for (slot, (gpa, size, host)) in (0u32..).zip(regions) {
            // The boot framebuffer's writes are logged, so its changes need no searching
            // (see dirty.rs).
            let log = slot == vram_slot && self.dirty.is_some();
            let region = |flags| kvm_bindings::kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            if log {
                // SAFETY: the same live VRAM mapping as the plain slot below; logging only
                // makes KVM record the guest's writes.
                match unsafe { vm.set_user_memory_region(region(KVM_MEM_LOG_DIRTY_PAGES)) } {
                    Ok(()) => continue,
                    Err(e) => tracing::warn!(
                        error = %e,
                        "KVM cannot log the VRAM's dirty pages; the screen will be polled"
                    ),
                }
            }
            // SAFETY: `host..host+size` is a live shared mapping owned by `self.ram`, which
            // outlives every VM built from this partition (machines are dropped before the
            // partition), and the slots do not overlap (see layout.rs).
            unsafe { vm.set_user_memory_region(region(0)) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            if log && let Some(d) = &self.dirty {
                d.unavailable();
            }
        }
        Ok(())
    }

    /// The slot of the VRAM (after the RAM's).
    fn vram_slot(&self) -> u32 {
        self.ram.memory().num_regions() as u32
    }
}
