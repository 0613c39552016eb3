//! `parvis-worker`: runs one child partition.
//!
//! Exit status: 0 the guest powered off or was stopped by the host; 1 the worker could not
//! start or failed (the reason is one line on stderr); 2 bad command-line usage; 3 the guest
//! crashed (triple fault, kernel panic, or a vCPU KVM could not run); 4 the guest rebooted and
//! `--on-reboot exit` was given. With `--status-file`, the same status and reason are also
//! written to a small JSON file when the worker ends.
//!
//! Subcommands: `ctl` (talk to a running worker's control socket) and `probe` (can this host
//! run partitions?).
//!
//! May depend on: `hypervisor` (the VMM library), the VMBus crates, `parvis_disk` and
//! `proto` (this binary translates the worker protocol; the library never sees it).

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use hypervisor::config::{ByteSize, DiskSpec, Resolution, WorkerSettings};
use hypervisor::devices::serial::{SerialOutput, pump_input};
use hypervisor::hv::HvMode;
use hypervisor::partition::{Command, GuestExit};
use hypervisor::{Partition, PartitionConfig, RebootAction};
use vmbus_devices::SynthDevices;

use crate::storage::Storage;

mod bootread;
mod control;
mod ctl;
mod ic;
mod net;
mod probe;
mod sandbox;
mod status;
mod storage;
mod term;

#[derive(Debug, Parser)]
#[command(
    name = "parvis-worker",
    version,
    about = "Run one Parvis child partition (VM)"
)]
struct Cli {
    #[command(subcommand)]
    tool: Option<Tool>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Tool {
    /// Send commands to a running worker's control socket and print the replies.
    Ctl {
        /// The worker's --control socket.
        socket: PathBuf,
        /// Commands: pause, resume, reset, stop, power-button, state, "screenshot PATH".
        #[arg(required = true)]
        commands: Vec<String>,
    },
    /// Check whether this host can run partitions; prints one JSON object.
    Probe,
    /// (Internal) The confined boot disk reader: the disk on stdin, the kernel, initrd and
    /// command line on stdout (see --boot-disk).
    #[command(hide = true)]
    BootDiskRead {
        /// The boot entry to read, by kernel version, title or menu index (default: the
        /// disk's own default).
        #[arg(long)]
        entry: Option<String>,
        /// Describe the disk (partitions, file systems, boot entries) instead.
        #[arg(long, conflicts_with = "entry")]
        inspect: bool,
        /// Test hook: wait this many seconds once confined, before reading.
        #[arg(long, hide = true)]
        hold: Option<u64>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML file with the same settings as the flags (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: a bzImage or an uncompressed ELF vmlinux.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initramfs image.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default "console=ttyS0"; with --boot-disk, parameters added to
    /// the disk's own).
    #[arg(long)]
    cmdline: Option<String>,
    /// Boot the first disk's own kernel, initrd and command line, as its boot loader would
    /// (grub.cfg, Boot Loader Spec entries or Debian's /vmlinuz), read by a confined process;
    /// no --kernel needed.
    #[arg(long)]
    boot_disk: bool,
    /// With --boot-disk: the boot entry to start instead of the disk's default, by its
    /// kernel version, its title or its place in the disk's menu (0 = the first).
    #[arg(long)]
    boot_entry: Option<String>,
    /// Guest RAM, e.g. 512M or 2G (default 512M).
    #[arg(long)]
    memory: Option<ByteSize>,
    /// Number of vCPUs (default 1).
    #[arg(long)]
    cpus: Option<u32>,
    /// A disk: PATH[,ro][,sector-size=512|4096][,bus=virtio|scsi][,controller=N][,lun=N][,id=ID][,discard].
    /// virtio-blk unless bus=scsi (the VMBus SCSI controller). Repeat for more disks.
    #[arg(long = "disk")]
    disks: Vec<DiskSpec>,
    /// A network adapter (the VMBus synthetic NIC): tap=NAME|fd=N[,mac=XX:XX:XX:XX:XX:XX].
    /// fd= is an open TAP descriptor the caller passed down; tap= opens or creates one by
    /// name (creating needs CAP_NET_ADMIN). Repeat for more adapters.
    #[arg(long = "nic")]
    nics: Vec<net::NicSpec>,
    /// Boot framebuffer size (default 1024x768).
    #[arg(long)]
    framebuffer: Option<Resolution>,
    /// No boot framebuffer.
    #[arg(long)]
    no_framebuffer: bool,
    /// What a guest reboot does: reset (boot again) or exit (status 4).
    #[arg(long, value_parser = parse_reboot)]
    on_reboot: Option<RebootAction>,
    /// Hyper-V enlightenments and VMBus devices: off, auto (KVM's in-kernel emulation when
    /// the host has it, else userspace), kernel, or userspace.
    #[arg(long)]
    hyperv: Option<hypervisor::hv::HvMode>,
    /// Serial console: stdio, none, or unix:PATH (a socket the worker listens on).
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Also append all serial output to this file.
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Control socket (Unix) speaking the internal agent protocol (parvis.worker.v1);
    /// `parvis-worker ctl` is a command-line client.
    #[arg(long)]
    control: Option<PathBuf>,
    /// When the worker ends, write {"code": N, "reason": "..."} to this file (atomically).
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Write the boot framebuffer to this PNG file when the guest stops.
    #[arg(long)]
    screenshot_on_exit: Option<PathBuf>,
    /// Log filter for the worker's own messages on stderr (e.g. info, debug).
    #[arg(long, default_value = "warn")]
    log: String,
}

fn parse_reboot(s: &str) -> Result<RebootAction, String> {
    match s {
        "reset" => Ok(RebootAction::Reset),
        "exit" => Ok(RebootAction::Exit),
        _ => Err(format!("'{s}' is not reset or exit")),
    }
}

fn main() {
    let cli = Cli::parse();
    match &cli.tool {
        Some(Tool::Ctl { socket, commands }) => {
            std::process::exit(match ctl::run(socket, commands) {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => {
                    eprintln!("parvis-worker: error: {e:#}");
                    1
                }
            });
        }
        Some(Tool::BootDiskRead {
            entry,
            inspect,
            hold,
        }) => {
            let ask = if *inspect {
                bootread::Ask::Inspect
            } else {
                bootread::Ask::Boot(entry.clone())
            };
            std::process::exit(bootread::child_main(ask, *hold));
        }
        Some(Tool::Probe) => {
            let p = probe::probe();
            println!(
                "{}",
                serde_json::to_string(&p).unwrap_or_else(|_| "{}".into())
            );
            std::process::exit(0);
        }
        None => {}
    }
    let cli = cli.run;
    // Colours only for a person at a terminal: the agent keeps a worker's stderr as its log
    // and shows its tail to clients.
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let status_file = cli.status_file.clone();
    if let Some(p) = &status_file
        && let Err(e) = status::clear(p)
    {
        eprintln!(
            "parvis-worker: warning: cannot remove the old status file {}: {e}",
            p.display()
        );
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli)))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow::anyhow!("internal error: {what}"))
        });
    let (code, reason) = outcome(result);
    term::restore();
    if code != 0 {
        eprintln!("parvis-worker: {reason}");
    }
    if let Some(p) = &status_file
        && let Err(e) = status::write(p, code, &reason)
    {
        eprintln!(
            "parvis-worker: warning: cannot write the status file {}: {e}",
            p.display()
        );
    }
    std::process::exit(code);
}

/// The exit status and the one-line reason (printed to stderr unless the status is 0).
fn outcome(result: Result<GuestExit>) -> (i32, String) {
    match result {
        Ok(GuestExit::PoweredOff) => (0, "guest powered off".into()),
        Ok(GuestExit::Stopped) => (0, "stopped by the host".into()),
        Ok(GuestExit::Crashed(why)) => (3, format!("guest crashed: {why}")),
        Ok(GuestExit::Rebooted) => (4, "guest rebooted".into()),
        Err(e) => (1, format!("error: {e:#}")),
    }
}

fn run(cli: RunArgs) -> Result<GuestExit> {
    let file = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            WorkerSettings::from_toml(&text)?
        }
        None => WorkerSettings::default(),
    };
    // Booting the disk's own kernel: read it in a confined process first; the memory files
    // it fills stay open (in `disk_boot`) for every reboot.
    let disk_boot = if cli.boot_disk {
        let first = cli
            .disks
            .first()
            .or(file.disks.first())
            .context("--boot-disk needs a disk (--disk PATH)")?;
        let b = bootread::resolve(&first.path, cli.boot_entry.as_deref())?;
        tracing::info!(
            entry = %b.meta.title,
            os = b.meta.os.as_deref().unwrap_or("unknown"),
            cmdline = %b.cmdline,
            "booting the disk's own kernel"
        );
        Some(b)
    } else {
        None
    };
    let flags = WorkerSettings {
        kernel: disk_boot
            .as_ref()
            .map(|b| b.kernel.clone())
            .or(cli.kernel.clone()),
        initrd: disk_boot
            .as_ref()
            .and_then(|b| b.initrd.clone())
            .or(cli.initrd.clone()),
        cmdline: match (&disk_boot, &cli.cmdline) {
            (Some(b), Some(extra)) if !extra.trim().is_empty() => {
                Some(format!("{} {}", b.cmdline, extra.trim()))
            }
            (Some(b), _) => Some(b.cmdline.clone()),
            (None, c) => c.clone(),
        },
        memory: cli.memory,
        cpus: cli.cpus,
        disks: cli.disks.clone(),
        framebuffer: cli.framebuffer,
        no_framebuffer: cli.no_framebuffer,
        on_reboot: cli.on_reboot,
        hyperv: cli.hyperv,
    };
    let s = file.merge(flags).resolve()?;

    let mut out = SerialOutput::default();
    // Serial output for control-socket subscribers.
    let hub = control::SerialHub::default();
    if cli.control.is_some() {
        out.add(Box::new(hub.clone()));
    }
    let stdio = cli.serial == "stdio";
    let socket = match cli.serial.as_str() {
        "stdio" => {
            out.add(Box::new(Unbuffered(std::io::stdout())));
            None
        }
        "none" => None,
        other => match other.strip_prefix("unix:") {
            Some(path) => {
                let sink = SocketSink::default();
                out.add(Box::new(sink.clone()));
                Some((PathBuf::from(path), sink))
            }
            None => anyhow::bail!("--serial must be stdio, none or unix:PATH, not '{other}'"),
        },
    };
    if let Some(log) = &cli.serial_log {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open serial log {}", log.display()))?;
        out.add(Box::new(f));
    }

    let vmbus = s.hyperv != HvMode::Off;
    let synth = SynthDevices::new(vmbus, hypervisor::layout::VRAM_SIZE)
        .context("cannot create the synthetic devices")?;
    let (storage, disks) = Storage::new(vmbus, &s.disks).context("cannot attach the disks")?;
    let storage = Arc::new(storage);
    let nics = net::Nics::new(vmbus, &cli.nics).context("cannot attach the network adapters")?;
    let ics = if vmbus {
        Some(Arc::new(
            ic::IntegrationServices::new().context("cannot start the integration services")?,
        ))
    } else {
        None
    };
    let partition = Partition::new(
        PartitionConfig {
            cpus: s.cpus,
            memory: s.memory,
            kernel: s.kernel,
            initrd: s.initrd,
            cmdline: s.cmdline,
            disks,
            framebuffer: s.framebuffer,
            on_reboot: s.on_reboot,
            hyperv: s.hyperv,
            vmbus_devices: synth
                .vsps()
                .into_iter()
                .chain(storage.vsps())
                .chain(nics.vsps())
                .chain(ics.iter().flat_map(|i| i.vsps()))
                .collect(),
            video: synth.video.clone(),
        },
        out,
    )?;
    let handle = partition.handle();
    let serial = partition.serial();

    if stdio {
        let escape_handle = handle.clone();
        let raw = term::enter_raw_mode();
        spawn("serial-in", move || {
            let input = std::io::stdin();
            if raw {
                pump_input(
                    &serial,
                    term::EscapeFilter::new(input, move || {
                        let _ = escape_handle.send(Command::Stop);
                    }),
                );
            } else {
                pump_input(&serial, input);
            }
        })?;
        if raw {
            eprintln!("parvis-worker: serial console attached; Ctrl-A x stops the VM\r");
        }
    } else if let Some((path, sink)) = socket {
        let listener = bind(&path)?;
        spawn("serial-socket", move || {
            serve_serial(listener, sink, serial)
        })?;
    }
    let mut vm = None;
    if let Some(path) = &cli.control {
        let listener = bind(path)?;
        let framebuffer = partition
            .config()
            .framebuffer
            .map(|format| control::SharedFramebuffer {
                file: partition.ram().file().clone(),
                offset: partition.ram().layout().vram_file_offset,
                format,
            });
        let mut v = control::Vm::new(
            Box::new(handle.clone()),
            partition.serial(),
            hub,
            framebuffer,
        )
        .with_synth(synth.clone())
        .with_storage(storage.clone());
        if let Some(i) = &ics {
            v = v.with_integration_services(i.clone());
        }
        if let (Some(log), Some(format)) =
            (partition.vram_dirty_log(), partition.config().framebuffer)
        {
            v = v.with_boot_dirty(hypervisor::dirty::DirtyRows::new(Arc::new(log), format));
        }
        let v = Arc::new(v);
        vm = Some(v.clone());
        spawn("control", move || control::serve(listener, v))?;
    }

    let shot = cli.screenshot_on_exit.clone();
    let framebuffer = partition.config().framebuffer.is_some();
    let exit = run_and_capture(partition, shot.as_deref(), framebuffer);
    // Let the replies to the last requests (stop) go out before the worker exits.
    if let Some(vm) = &vm {
        vm.drain(Duration::from_secs(1));
    }
    // Sockets are per run: remove them so a stale path never looks like a live worker.
    let serial_socket = cli.serial.strip_prefix("unix:").map(PathBuf::from);
    for p in cli.control.iter().chain(serial_socket.iter()) {
        let _ = std::fs::remove_file(p);
    }
    exit
}

/// Run the partition; when it ends, write the requested screenshot of its last frame.
fn run_and_capture(
    partition: Partition,
    shot: Option<&Path>,
    framebuffer: bool,
) -> Result<GuestExit> {
    if shot.is_some() && !framebuffer {
        anyhow::bail!("--screenshot-on-exit needs a framebuffer");
    }
    let mut shot_result = Ok(());
    let exit = partition.run_with(|p| {
        if let Some(path) = shot {
            shot_result = p
                .screenshot(path)
                .with_context(|| format!("cannot write screenshot {}", path.display()));
        }
    })?;
    shot_result?;
    Ok(exit)
}

struct Unbuffered<W>(W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf)?;
        self.0.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Serial output to whichever client is connected to the serial socket (none: dropped).
#[derive(Clone, Default)]
struct SocketSink(Arc<Mutex<Option<UnixStream>>>);

impl Write for SocketSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = guard.as_mut()
            && s.write_all(buf).is_err()
        {
            *guard = None;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn bind(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .with_context(|| format!("cannot start thread {name}"))
}

fn serve_serial(
    listener: UnixListener,
    sink: SocketSink,
    serial: Arc<Mutex<hypervisor::devices::serial::SerialDevice>>,
) {
    for conn in listener.incoming().flatten() {
        let Ok(reader) = conn.try_clone() else {
            continue;
        };
        *sink.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        pump_input(&serial, reader);
    }
}
