//! VMBus host (the parent partition's side): the control plane, ring buffers, channels and
//! the glue to the vCPUs' Hyper-V exits.
//!
//! Threads: vCPU threads turn HvPostMessage into a bounded queue entry (16 deep, like Hyper-V
//! and QEMU; a full queue answers INSUFFICIENT_BUFFERS so the guest retries) and HvSignalEvent
//! into a doorbell write; one control thread runs [`control::Control`] in message order; each
//! open channel has its own thread running its device ([`channel::Vsp`]).

pub mod channel;
pub mod control;

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use self::control::{Control, Doorbells};
use crate::devices::platform::{PlatformDevice, WireError, Wiring};
use crate::hv::HvBackend;
use crate::hv::hcall;
use crate::hv::synic::{MAX_PAYLOAD, Synic};
use crate::hv::userspace::UserspaceHv;
use vmbus_core::SharedVsp;
use vmbus_core::messages as proto;

/// VMBus on the platform, as Hyper-V Generation 1 shows it: PCI bus 0 (`\_SB.PCI0`, whose
/// windows, the VRAM and the VMBus MMIO window, are where `hyperv_drm` and `hyperv_fb` carve
/// their VRAM) with `VMBS` inside, which is how Linux finds VMBus, and on the bus the legacy
/// video device whose BAR 0 (the VRAM, where the boot framebuffer is) `hyperv_fb` needs on a
/// guest not booted through EFI (see [`crate::devices::pci`]). The server itself starts with the boot's Hyper-V state (see
/// `partition::hv`).
#[derive(Debug, Default)]
pub struct VmbusWindow;

impl PlatformDevice for VmbusWindow {
    fn name(&self) -> String {
        "VMBus".into()
    }

    fn aml(&self) -> Option<Vec<u8>> {
        Some(crate::acpi::vmbus_aml(
            (crate::layout::VRAM_ADDR, crate::layout::VRAM_SIZE),
            (
                crate::layout::VMBUS_MMIO_BASE,
                crate::layout::VMBUS_MMIO_SIZE,
            ),
        ))
    }

    fn wire(&self, w: &mut dyn Wiring) -> Result<(), WireError> {
        use crate::devices::pci::{CONFIG_LEN, CONFIG_PORT, PciConfig};
        use crate::devices::pm::ResetRegister;
        // The video BAR is the VRAM, where the boot framebuffer already is: a guest driver
        // that takes the screen over removes the boot framebuffer it overlaps.
        let pci = PciConfig::new(
            crate::layout::VRAM_ADDR as u32,
            crate::layout::VRAM_SIZE as u32,
            ResetRegister::new(w.platform()),
        );
        w.pio(
            Arc::new(std::sync::Mutex::new(pci)),
            CONFIG_PORT,
            CONFIG_LEN,
        )
    }
}

/// Depth of the HvPostMessage queue.
pub const POST_QUEUE: usize = 16;

enum Incoming {
    Message { conn_id: u32, payload: Vec<u8> },
    Stop,
}

/// The running VMBus server of one boot.
pub struct VmbusServer {
    tx: SyncSender<Incoming>,
    doorbells: Doorbells,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VmbusServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmbusServer").finish_non_exhaustive()
    }
}

impl VmbusServer {
    /// Start the control thread offering `vsps`.
    pub fn start(
        synic: Arc<Synic>,
        vm: Option<Arc<VmFd>>,
        vsps: Vec<SharedVsp>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(POST_QUEUE);
        let doorbells = Doorbells::default();
        let control = Control::new(synic, vm, vsps, doorbells.clone());
        let thread = std::thread::Builder::new()
            .name("vmbus".into())
            .spawn(move || control_loop(control, rx))?;
        Ok(Self {
            tx,
            doorbells,
            thread: Some(thread),
        })
    }

    /// A message the guest posted (payload ≤ 240 bytes). Returns the hypercall status.
    pub fn post_message(&self, conn_id: u32, payload: &[u8]) -> u64 {
        if conn_id != proto::MESSAGE_CONNECTION_ID && conn_id != proto::MESSAGE_CONNECTION_ID_4 {
            return hcall::STATUS_INVALID_CONNECTION_ID;
        }
        match self.tx.try_send(Incoming::Message {
            conn_id,
            payload: payload.to_vec(),
        }) {
            Ok(()) => hcall::STATUS_SUCCESS,
            Err(TrySendError::Full(_)) => hcall::STATUS_INSUFFICIENT_BUFFERS,
            Err(TrySendError::Disconnected(_)) => hcall::STATUS_INVALID_CONNECTION_ID,
        }
    }

    /// HvSignalEvent that KVM did not complete itself.
    pub fn signal_event(&self, conn_id: u32, flag: u16) -> u64 {
        if flag != 0 {
            return hcall::STATUS_INVALID_HYPERCALL_INPUT;
        }
        let map = self.doorbells.read().unwrap_or_else(|e| e.into_inner());
        match map.get(&conn_id) {
            Some(db) => {
                db.signal();
                hcall::STATUS_SUCCESS
            }
            None => hcall::STATUS_INVALID_CONNECTION_ID,
        }
    }
}

impl Drop for VmbusServer {
    fn drop(&mut self) {
        // The queue may be full: keep trying until the thread takes the stop.
        while let Err(TrySendError::Full(_)) = self.tx.try_send(Incoming::Stop) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn control_loop(mut control: Control, rx: Receiver<Incoming>) {
    loop {
        // Busy slots are retried every millisecond (EOM is not intercepted).
        let wait = if control.has_outgoing() {
            Duration::from_millis(1)
        } else {
            Duration::from_secs(3600)
        };
        match rx.recv_timeout(wait) {
            Ok(Incoming::Message { conn_id, payload }) => control.handle(conn_id, &payload),
            Ok(Incoming::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        control.pump();
    }
}

/// Hyper-V state of one boot, shared by the vCPU threads.
pub struct HvPartition {
    /// Which implementation handles the enlightenments.
    pub backend: HvBackend,
    /// SynIC registers and delivery.
    pub synic: Arc<Synic>,
    /// Userspace MSR emulation (userspace backend only).
    pub user: Option<UserspaceHv>,
    /// The VMBus server.
    pub vmbus: VmbusServer,
}

impl std::fmt::Debug for HvPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HvPartition")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Where a hypercall's 8-byte HvSignalEvent input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalInput {
    /// KVM already loaded it into the first parameter (kernel backend).
    Loaded,
    /// Read from the input GPA unless the call is fast (userspace backend).
    FromGuest,
}

impl HvPartition {
    /// Perform hypercall `control` with input `input` (GPA, or the value for fast calls).
    /// Returns the value for RAX.
    pub fn hypercall(&self, control: u64, input: u64, signal: SignalInput) -> u64 {
        let code = (control & 0xffff) as u16;
        let fast = control & (1 << 16) != 0;
        let reps = (control >> 32) & 0xfff;
        if reps != 0 {
            return hcall::STATUS_INVALID_HYPERCALL_INPUT;
        }
        match code {
            hcall::POST_MESSAGE => {
                if fast {
                    return hcall::STATUS_INVALID_HYPERCALL_INPUT;
                }
                if !input.is_multiple_of(8) || (input & 0xfff) + 256 > 4096 {
                    return hcall::STATUS_INVALID_ALIGNMENT;
                }
                let mut buf = [0u8; 256];
                if self
                    .synic
                    .memory()
                    .read_slice(&mut buf, GuestAddress(input))
                    .is_err()
                {
                    return hcall::STATUS_INVALID_HYPERCALL_INPUT;
                }
                let word =
                    |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
                let conn_id = word(0) & 0xff_ffff;
                let msg_type = word(8);
                let size = word(12) as usize;
                if msg_type == 0 || msg_type & 0x8000_0000 != 0 || size > MAX_PAYLOAD {
                    return hcall::STATUS_INVALID_HYPERCALL_INPUT;
                }
                self.vmbus.post_message(conn_id, &buf[16..16 + size])
            }
            hcall::SIGNAL_EVENT => {
                let v = match (signal, fast) {
                    (SignalInput::Loaded, _) | (SignalInput::FromGuest, true) => input,
                    (SignalInput::FromGuest, false) => {
                        if !input.is_multiple_of(8) {
                            return hcall::STATUS_INVALID_ALIGNMENT;
                        }
                        match self.synic.memory().read_obj::<u64>(GuestAddress(input)) {
                            Ok(v) => v,
                            Err(_) => return hcall::STATUS_INVALID_HYPERCALL_INPUT,
                        }
                    }
                };
                self.vmbus
                    .signal_event((v & 0xff_ffff) as u32, ((v >> 32) & 0xffff) as u16)
            }
            _ => hcall::STATUS_INVALID_HYPERCALL_CODE,
        }
    }
}
