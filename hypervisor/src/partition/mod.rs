//! A child partition: one KVM VM with its memory, devices and vCPU threads, driven by an event
//! loop that handles guest requests (power-off, reset, panic) and host commands (pause,
//! resume, reset, stop, power button, screenshot).
//!
//! Rooms: this file is the partition's lifecycle; [`machine`] builds one boot's VM (memory
//! slots, guest memory contents, devices, vCPUs); [`hv`] its Hyper-V side and VMBus server;
//! [`devices`] lists the platform's devices.

mod devices;
mod hv;
mod machine;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use parvis_disk::BlockDevice;
use parvis_disk::counters::IoCounters;
use vm_memory::{Bytes, VolatileMemory};
use vmbus_core::SharedVsp;
use vmbus_devices::video::VideoShared;
use vmm_sys_util::signal::Killable;

use self::machine::Machine;
use crate::acpi::{self, AcpiConfig, AcpiTables};
use crate::boot;
use crate::devices::platform::{PlatformDevice, WireError};
use crate::devices::pm::AcpiPm;
use crate::devices::serial::{Com1, SerialDevice, SerialOutput};
use crate::devices::{PlatformRequest, PlatformSink};
use crate::dirty::VramDirtyLog;
use crate::framebuffer::{FbError, FbFormat};
use crate::hv::{HvBackend, HvError, HvMode};
use crate::layout::{self, MemoryLayout};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, RunState, VcpuEvent};

/// Most virtio disks (GSIs 5..=8 keep clear of the SCI).
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
    /// What the guest reads and writes, counted by its device.
    pub counters: Arc<IoCounters>,
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
    /// A device could not be wired.
    #[error("cannot wire {device}")]
    Wiring {
        device: String,
        #[source]
        source: WireError,
    },
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

/// A child partition.
pub struct Partition {
    kvm: Kvm,
    config: PartitionConfig,
    ram: GuestRam,
    acpi: AcpiTables,
    cpuid: CpuId,
    hv: Option<HvBackend>,
    /// The platform's devices, wired into every boot (see [`devices`]).
    devices: Vec<Arc<dyn PlatformDevice>>,
    com1: Arc<Com1>,
    pm: Arc<AcpiPm>,
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
        let com1 = Arc::new(Com1::new(serial_out));
        // With VMBus comes PCI bus 0 (Hyper-V's legacy video device), whose configuration
        // ports span the reset register's.
        let pm = Arc::new(AcpiPm::new(hv.is_none()));
        let devices = devices::platform(&config, hv.is_some(), &com1, &pm);
        let acpi = AcpiTables::build(&AcpiConfig {
            cpus: config.cpus,
            devices: devices.iter().filter_map(|d| d.aml()).collect(),
        })?;
        let (tx, rx) = mpsc::channel();
        let mut p = Self {
            kvm,
            config,
            ram,
            acpi,
            cpuid,
            hv,
            devices,
            com1,
            pm,
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
        self.com1.device()
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
                    Command::PowerButton => self.pm.press_power_button(),
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
