//! A child partition: one KVM VM with its memory, devices and vCPU threads, driven by an event
//! loop that handles guest requests (power-off, reset, panic) and host commands (pause,
//! resume, reset, stop, power button, screenshot).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use parvis_disk::BlockDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::acpi::{self, AcpiConfig, AcpiTables, MmioDeviceDesc};
use crate::boot::{self, BootFramebuffer, BootSpec};
use crate::cpu;
use crate::devices::bus::lock;
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use crate::devices::pm::{PM_BLOCK_LEN, PmDevice, ResetRegister};
use crate::devices::pvpanic::{PVPANIC_PORT, PvPanic};
use crate::devices::serial::{COM1_PORT, SerialDevice, SerialOutput};
use crate::devices::synth::video::{VideoShared, VramMapper};
use crate::devices::virtio_blk::VirtioBlk;
use crate::devices::virtio_mmio::VirtioMmio;
use crate::devices::{
    Bus, BusDevice, BusError, Irq, IrqLine, LevelIrq, PlatformRequest, PlatformSink,
};
use crate::dirty::VramDirtyLog;
use crate::framebuffer::{FbError, FbFormat};
use crate::hv::synic::{SintKick, Synic};
use crate::hv::userspace::{MsiKick, UserspaceHv};
use crate::hv::{HvBackend, HvError, HvMode};
use crate::layout::{self, MemoryLayout};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, RunState, VcpuBuses, VcpuControl, VcpuEvent};
use crate::vmbus::channel::{SharedVsp, Vsp};
use crate::vmbus::{HvPartition, VmbusServer};

/// First GSI handed to virtio-mmio devices (COM1 uses 4, the SCI 9).
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Most virtio devices (GSIs 5..=8 and 10..=15 keep clear of the SCI).
pub const MAX_DISKS: usize = 4;
/// Most vCPUs (8-bit APIC ids in the MADT, one reserved for broadcast).
pub const MAX_CPUS: u8 = 254;

/// KVM capabilities a partition cannot run without, with how errors name them.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (
        Cap::Irqchip,
        "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)",
    ),
    (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "extended CPUID (KVM_CAP_EXT_CPUID)"),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
    (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// A disk attached as virtio-blk.
#[derive(Clone)]
pub struct DiskAttachment {
    /// Shown in errors and logs.
    pub name: String,
    /// The backend.
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for dyn Vsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Debug for DiskAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskAttachment")
            .field("name", &self.name)
            .field("size", &self.device.size())
            .finish()
    }
}

/// What to do when the guest reboots itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootAction {
    /// Reset the partition and boot again (Hyper-V's behaviour).
    #[default]
    Reset,
    /// End the partition and report the reboot.
    Exit,
}

/// A partition's shape.
#[derive(Debug, Clone)]
pub struct PartitionConfig {
    /// vCPUs.
    pub cpus: u8,
    /// RAM in bytes.
    pub memory: u64,
    /// bzImage or vmlinux.
    pub kernel: PathBuf,
    /// initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// virtio-blk disks in order (vda, vdb, …).
    pub disks: Vec<DiskAttachment>,
    /// Boot framebuffer geometry, if the partition has one.
    pub framebuffer: Option<FbFormat>,
    /// Guest-initiated reboot handling.
    pub on_reboot: RebootAction,
    /// Hyper-V enlightenments (and with them VMBus).
    pub hyperv: HvMode,
    /// VMBus devices to offer (relids 1.. in this order); used only with Hyper-V on.
    pub vmbus_devices: Vec<SharedVsp>,
    /// The synthetic video device's shared state, to attach each boot's VRAM mapper.
    pub video: Option<Arc<VideoShared>>,
}

/// How a partition ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off (ACPI S5).
    PoweredOff,
    /// The host stopped it (force off).
    Stopped,
    /// The guest rebooted and the partition was configured to exit on reboot.
    Rebooted,
    /// The guest crashed: the message says how.
    Crashed(String),
}

/// Errors that stop a partition from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible on this host?)")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// KVM lacks something the partition needs.
    #[error("this host's KVM lacks {0}")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An invalid configuration value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Device wiring.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Hyper-V enlightenments.
    #[error(transparent)]
    Hyperv(#[from] HvError),
    /// Writing boot structures.
    #[error("cannot write boot structures to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// A host resource (eventfd, thread) could not be created.
    #[error("cannot create {op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PartitionError {
    move |source| PartitionError::Kvm { op, source }
}

/// Host commands.
#[derive(Debug)]
pub enum Command {
    /// Stop running vCPUs; the guest keeps its state.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Hard reset: boot again from the kernel.
    Reset,
    /// Force off.
    Stop,
    /// Press the ACPI power button (the guest decides to shut down).
    PowerButton,
    /// Write the boot framebuffer to a PNG file.
    Screenshot(PathBuf, Sender<Result<(), FbError>>),
    /// Current state.
    Query(Sender<PartitionState>),
}

/// What a partition is doing, for status queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionState {
    /// vCPUs are running.
    Running,
    /// vCPUs are parked.
    Paused,
}

enum Event {
    Command(Command),
    Platform(PlatformRequest),
    Vcpu(VcpuEvent),
}

/// A cloneable handle to control a running partition from other threads.
#[derive(Debug, Clone)]
pub struct PartitionHandle {
    tx: Sender<EventMsg>,
}

/// Wrapper so the handle's channel type is nameable without exposing `Event`.
pub struct EventMsg(Event);

impl std::fmt::Debug for EventMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventMsg")
    }
}

/// The partition has ended.
#[derive(Debug, thiserror::Error)]
#[error("the partition is no longer running")]
pub struct Gone;

impl PartitionHandle {
    /// Send a command.
    pub fn send(&self, c: Command) -> Result<(), Gone> {
        self.tx.send(EventMsg(Event::Command(c))).map_err(|_| Gone)
    }

    /// Take a screenshot and wait for it.
    pub fn screenshot(&self, path: &Path) -> Result<Result<(), FbError>, Gone> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Screenshot(path.to_owned(), tx))?;
        rx.recv().map_err(|_| Gone)
    }

    /// Query the state.
    pub fn state(&self) -> Result<PartitionState, Gone> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Query(tx))?;
        rx.recv().map_err(|_| Gone)
    }
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

/// The KVM objects of one boot; rebuilt from scratch on reset.
struct Machine {
    vm: Arc<VmFd>,
    vcpus: Vec<VcpuFd>,
    threads: Vec<JoinHandle<VcpuFd>>,
    buses: VcpuBuses,
    pm: Arc<Mutex<PmDevice>>,
    control: Arc<VcpuControl>,
}

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

/// Maps the shared VRAM where the synthvid guest driver put it, inside the VMBus window.
struct KvmVramMapper {
    vm: Arc<VmFd>,
    host: u64,
    size: u64,
    current: Mutex<Option<u64>>,
}

impl VramMapper for KvmVramMapper {
    fn map(&self, gpa: u64) -> bool {
        let window = layout::VMBUS_MMIO_BASE..layout::VMBUS_MMIO_BASE + layout::VMBUS_MMIO_SIZE;
        let Some(end) = gpa.checked_add(self.size) else {
            return false;
        };
        if !gpa.is_multiple_of(0x1000) || !window.contains(&gpa) || end > window.end {
            return false;
        }
        let mut cur = lock(&self.current);
        if *cur == Some(gpa) {
            return true;
        }
        let region = |gpa, size| kvm_bindings::kvm_userspace_memory_region {
            slot: SYNTHVID_SLOT,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.host,
        };
        if let Some(old) = cur.take() {
            // SAFETY: deleting a slot (size 0) we created; no host memory is referenced.
            if let Err(e) = unsafe { self.vm.set_user_memory_region(region(old, 0)) } {
                tracing::error!(error = %e, "cannot remove the old synthvid VRAM slot");
                return false;
            }
        }
        // SAFETY: `host..host+size` is the VRAM part of the partition's shared memory
        // mapping, which outlives every VM built from the partition; the slot lies in the
        // VMBus window, which overlaps no other slot.
        match unsafe { self.vm.set_user_memory_region(region(gpa, self.size)) } {
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

/// A child partition.
pub struct Partition {
    kvm: Kvm,
    config: PartitionConfig,
    ram: GuestRam,
    acpi: AcpiTables,
    cpuid: CpuId,
    hv: Option<HvBackend>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_irq: Arc<EventIrq>,
    tx: Sender<EventMsg>,
    rx: Receiver<EventMsg>,
    machine: Option<Machine>,
    /// KVM's log of the boot framebuffer's writes (with a framebuffer).
    dirty: Option<VramDirtyLog>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Round `bytes` up to 2 MiB.
fn round_memory(bytes: u64) -> u64 {
    bytes.div_ceil(2 << 20) * (2 << 20)
}

impl Partition {
    /// Check the configuration, open KVM, create memory and build the first boot.
    pub fn new(config: PartitionConfig, serial_out: SerialOutput) -> Result<Self, PartitionError> {
        if config.cpus == 0 || config.cpus > MAX_CPUS {
            return Err(PartitionError::Config(format!(
                "cpus must be between 1 and {MAX_CPUS}, not {}",
                config.cpus
            )));
        }
        if config.memory < layout::MIN_MEMORY {
            return Err(PartitionError::Config(format!(
                "memory must be at least {} MiB",
                layout::MIN_MEMORY >> 20
            )));
        }
        if config.disks.len() > MAX_DISKS {
            return Err(PartitionError::Config(format!(
                "at most {MAX_DISKS} disks are supported"
            )));
        }
        if let Some(fb) = config.framebuffer {
            fb.validate(layout::VRAM_SIZE)
                .map_err(|e| PartitionError::Config(e.to_string()))?;
        }
        let kvm = Kvm::new().map_err(PartitionError::KvmUnavailable)?;
        for &(cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(PartitionError::MissingCapability(name));
            }
        }
        let max_vcpus = kvm.get_max_vcpus();
        if usize::from(config.cpus) > max_vcpus {
            return Err(PartitionError::Config(format!(
                "this host's KVM supports at most {max_vcpus} vCPUs"
            )));
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu::install_kick_handler().map_err(|e| PartitionError::Kvm {
            op: "installing the vCPU kick signal handler",
            source: e,
        })?;

        let hv = crate::hv::select_backend(&kvm, config.hyperv)?;
        if let Some(b) = hv {
            tracing::info!(backend = ?b, "Hyper-V enlightenments on");
        }
        let mut config = config;
        config.memory = round_memory(config.memory);
        let config_fb = config.framebuffer.is_some();
        let ram = GuestRam::new(MemoryLayout::new(config.memory))?;
        let acpi = AcpiTables::build(&AcpiConfig {
            cpus: config.cpus,
            virtio: (0..config.disks.len())
                .map(|i| MmioDeviceDesc {
                    base: layout::virtio_mmio_base(i),
                    size: layout::VIRTIO_MMIO_SIZE,
                    irq: VIRTIO_FIRST_GSI + i as u32,
                })
                .collect(),
            vmbus: hv.map(|_| (layout::VMBUS_MMIO_BASE, layout::VMBUS_MMIO_SIZE)),
        })?;
        let serial_irq = Arc::new(EventIrq(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
            PartitionError::Io {
                op: "the serial interrupt eventfd",
                source: e,
            }
        })?));
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq.clone() as Irq,
            serial_out,
        )));
        let (tx, rx) = mpsc::channel();
        let mut p = Self {
            kvm,
            config,
            ram,
            acpi,
            cpuid,
            hv,
            serial,
            serial_irq,
            tx,
            rx,
            machine: None,
            dirty: config_fb.then(VramDirtyLog::default),
        };
        p.machine = Some(p.build_machine(false)?);
        Ok(p)
    }

    /// A handle for controlling the partition from other threads.
    pub fn handle(&self) -> PartitionHandle {
        PartitionHandle {
            tx: self.tx.clone(),
        }
    }

    /// The serial device, for feeding console input.
    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.serial.clone()
    }

    /// The guest memory (RAM then VRAM in one memfd), e.g. to share the framebuffer.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The configuration (memory rounded to 2 MiB).
    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    fn platform_sink(&self) -> PlatformSink {
        let tx = self.tx.clone();
        Arc::new(move |r| {
            let _ = tx.send(EventMsg(Event::Platform(r)));
        })
    }

    fn build_machine(&self, clear: bool) -> Result<Machine, PartitionError> {
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
        let sink = self.platform_sink();
        let mut pio = Bus::new();
        vm.register_irqfd(&self.serial_irq.0, u32::from(acpi::COM1_IRQ))
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        pio.insert(self.serial.clone(), u64::from(COM1_PORT), 8)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(sink.clone()))),
            u64::from(I8042_PORT),
            I8042_LEN,
        )?;
        let pm = Arc::new(Mutex::new(PmDevice::new(
            Arc::new(KvmLevelIrq {
                vm: vm.clone(),
                gsi: u32::from(acpi::SCI_IRQ),
            }),
            sink.clone(),
        )));
        pio.insert(pm.clone(), u64::from(acpi::PM1A_EVT_PORT), PM_BLOCK_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(ResetRegister::new(sink.clone()))),
            u64::from(acpi::RESET_PORT),
            1,
        )?;
        pio.insert(
            Arc::new(Mutex::new(PvPanic::new(sink))),
            u64::from(PVPANIC_PORT),
            1,
        )?;
        let mut mmio = Bus::new();
        for (i, disk) in self.config.disks.iter().enumerate() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| PartitionError::Io {
                op: "a virtio interrupt eventfd",
                source: e,
            })?;
            vm.register_irqfd(&evt, VIRTIO_FIRST_GSI + i as u32)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            let dev = VirtioMmio::new(
                VirtioBlk::new(disk.device.clone()),
                mem.clone(),
                Arc::new(EventIrq(evt)) as Irq,
            );
            let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(dev));
            mmio.insert(dev, layout::virtio_mmio_base(i), layout::VIRTIO_MMIO_SIZE)?;
        }

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
            pm,
            control: Arc::new(VcpuControl::default()),
        })
    }

    /// SynIC, SINT delivery and the VMBus server of one boot (after every vCPU exists: the
    /// SINT routes need SynIC active on each).
    fn build_hv(
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

    fn machine(&mut self) -> &mut Machine {
        self.machine
            .as_mut()
            .expect("a partition always has a machine outside of reset")
    }

    fn start_vcpus(&mut self) -> Result<(), PartitionError> {
        let tx = self.tx.clone();
        let m = self.machine();
        m.control.set(RunState::Running);
        for (i, vcpu) in m.vcpus.drain(..).enumerate() {
            let buses = m.buses.clone();
            let control = m.control.clone();
            let tx = tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu-{i}"))
                .spawn(move || {
                    vcpu::run_vcpu(i, vcpu, buses, control, |e| {
                        let _ = tx.send(EventMsg(Event::Vcpu(e)));
                    })
                })
                .map_err(PartitionError::Thread)?;
            m.threads.push(t);
        }
        Ok(())
    }

    fn kick_all(threads: &[JoinHandle<VcpuFd>]) {
        for t in threads {
            let _ = t.kill(vcpu::kick_signal());
        }
    }

    fn stop_vcpus(&mut self) {
        let m = self.machine();
        m.control.set(RunState::Stopping);
        let n = m.threads.len();
        if !m
            .control
            .kick_until(n, || Self::kick_all(&m.threads), Duration::from_secs(10))
        {
            tracing::error!("vCPUs did not stop within 10 s");
        }
        for t in m.threads.drain(..) {
            match t.join() {
                Ok(v) => m.vcpus.push(v),
                Err(_) => tracing::error!("a vCPU thread panicked"),
            }
        }
    }

    fn pause(&mut self) {
        let m = self.machine();
        if m.control.state() != RunState::Running {
            return;
        }
        m.control.set(RunState::Paused);
        let n = m.threads.len();
        if !m
            .control
            .kick_until(n, || Self::kick_all(&m.threads), Duration::from_secs(10))
        {
            tracing::warn!("not every vCPU acknowledged the pause within 10 s");
        }
    }

    fn resume(&mut self) {
        let m = self.machine();
        if m.control.state() == RunState::Paused {
            m.control.set(RunState::Running);
        }
    }

    fn reset(&mut self) -> Result<(), PartitionError> {
        self.stop_vcpus();
        // Drop the old VM (and its vCPUs) before building the new one.
        self.machine = None;
        self.machine = Some(self.build_machine(true)?);
        self.start_vcpus()
    }

    /// Save the boot framebuffer as PNG.
    pub fn screenshot(&self, path: &Path) -> Result<(), FbError> {
        let Some(fb) = self.config.framebuffer else {
            return Err(FbError::NoFramebuffer);
        };
        let len = fb.byte_len() as usize;
        let mut raw = vec![0u8; len];
        let slice = self.ram.vram().as_volatile_slice();
        slice
            .read_slice(&mut raw, 0)
            .map_err(|_| FbError::ShortBuffer { got: 0, need: len })?;
        fb.save_png(&raw, path)
    }

    /// Run until the guest powers off, crashes, or the host stops it.
    pub fn run(self) -> Result<GuestExit, PartitionError> {
        self.run_with(|_| {})
    }

    /// Like [`Partition::run`], calling `at_exit` after the vCPUs have stopped and before
    /// the partition's memory goes away (for a final screenshot).
    pub fn run_with(
        mut self,
        at_exit: impl FnOnce(&Partition),
    ) -> Result<GuestExit, PartitionError> {
        self.start_vcpus()?;
        tracing::info!(
            cpus = self.config.cpus,
            memory_mib = self.config.memory >> 20,
            "partition started"
        );
        let exit = loop {
            let Ok(EventMsg(event)) = self.rx.recv() else {
                break GuestExit::Stopped;
            };
            match event {
                Event::Platform(PlatformRequest::PowerOff) => break GuestExit::PoweredOff,
                Event::Platform(PlatformRequest::Panic) => {
                    break GuestExit::Crashed("the guest kernel panicked (pvpanic)".into());
                }
                Event::Platform(PlatformRequest::Reset)
                | Event::Vcpu(VcpuEvent::SystemEvent {
                    kind: kvm_bindings::KVM_SYSTEM_EVENT_RESET,
                    ..
                }) => {
                    if self.config.on_reboot == RebootAction::Exit {
                        break GuestExit::Rebooted;
                    }
                    tracing::info!("guest requested a reboot: resetting the partition");
                    self.reset()?;
                }
                Event::Vcpu(VcpuEvent::SystemEvent {
                    kind: kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN,
                    ..
                }) => break GuestExit::PoweredOff,
                Event::Vcpu(VcpuEvent::SystemEvent { vcpu, kind }) => {
                    break GuestExit::Crashed(format!("vCPU {vcpu} reported system event {kind}"));
                }
                Event::Vcpu(VcpuEvent::TripleFault { vcpu }) => {
                    break GuestExit::Crashed(format!("triple fault on vCPU {vcpu}"));
                }
                Event::Vcpu(VcpuEvent::Fault { vcpu, reason }) => {
                    break GuestExit::Crashed(format!("vCPU {vcpu}: {reason}"));
                }
                Event::Command(c) => match c {
                    Command::Pause => self.pause(),
                    Command::Resume => self.resume(),
                    Command::Reset => self.reset()?,
                    Command::Stop => break GuestExit::Stopped,
                    Command::PowerButton => lock(&self.machine().pm).press_power_button(),
                    Command::Screenshot(path, reply) => {
                        let _ = reply.send(self.screenshot(&path));
                    }
                    Command::Query(reply) => {
                        let s = match self.machine().control.state() {
                            RunState::Paused => PartitionState::Paused,
                            _ => PartitionState::Running,
                        };
                        let _ = reply.send(s);
                    }
                },
            }
        };
        self.stop_vcpus();
        at_exit(&self);
        tracing::info!(?exit, "partition ended");
        Ok(exit)
    }

    /// KVM's log of the boot framebuffer's writes, when there is a framebuffer and KVM keeps
    /// the log. It follows the partition across resets.
    pub fn vram_dirty_log(&self) -> Option<VramDirtyLog> {
        self.dirty.clone().filter(VramDirtyLog::is_available)
    }

    /// The VM fd of the current boot (for diagnostics).
    pub fn vm(&self) -> Option<&Arc<VmFd>> {
        self.machine.as_ref().map(|m| &m.vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_rounds_to_two_mib() {
        assert_eq!(round_memory(1), 2 << 20);
        assert_eq!(round_memory(512 << 20), 512 << 20);
        assert_eq!(round_memory((512 << 20) + 1), 514 << 20);
    }
}
