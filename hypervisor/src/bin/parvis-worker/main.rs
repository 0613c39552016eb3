//! `parvis-worker`: runs one child partition.
//!
//! Exit status: 0 the guest powered off or was stopped by the host; 1 the worker could not
//! start or failed (the reason is one line on stderr); 2 bad command-line usage; 3 the guest
//! crashed (triple fault, kernel panic, or a vCPU KVM could not run); 4 the guest rebooted and
//! `--on-reboot exit` was given.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Parser;
use hypervisor::config::{ByteSize, DiskSpec, Resolution, WorkerSettings};
use hypervisor::devices::serial::{SerialOutput, pump_input};
use hypervisor::partition::{Command, GuestExit, PartitionHandle, PartitionState};
use hypervisor::{DiskAttachment, Partition, PartitionConfig, RebootAction};
use parvis_disk::image::{self, OpenOptions};

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
    /// Kernel command line (default "console=ttyS0").
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest RAM, e.g. 512M or 2G (default 512M).
    #[arg(long)]
    memory: Option<ByteSize>,
    /// Number of vCPUs (default 1).
    #[arg(long)]
    cpus: Option<u32>,
    /// A virtio-blk disk: PATH[,ro][,sector-size=512|4096]. Repeat for more disks.
    #[arg(long = "disk")]
    disks: Vec<DiskSpec>,
    /// Boot framebuffer size (default 1024x768).
    #[arg(long)]
    framebuffer: Option<Resolution>,
    /// No boot framebuffer.
    #[arg(long)]
    no_framebuffer: bool,
    /// What a guest reboot does: reset (boot again) or exit (status 4).
    #[arg(long, value_parser = parse_reboot)]
    on_reboot: Option<RebootAction>,
    /// Serial console: stdio, none, or unix:PATH (a socket the worker listens on).
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Also append all serial output to this file.
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Control socket (Unix): one command per line — pause, resume, reset, stop,
    /// power-button, screenshot PATH, state.
    #[arg(long)]
    control: Option<PathBuf>,
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
    if let Some(Tool::Ctl { socket, commands }) = &cli.tool {
        std::process::exit(match ctl(socket, commands) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("parvis-worker: error: {e:#}");
                1
            }
        });
    }
    let cli = cli.run;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let code = match run(cli) {
        Ok(GuestExit::PoweredOff) | Ok(GuestExit::Stopped) => 0,
        Ok(GuestExit::Crashed(why)) => {
            eprintln!("parvis-worker: guest crashed: {why}");
            3
        }
        Ok(GuestExit::Rebooted) => {
            eprintln!("parvis-worker: guest rebooted");
            4
        }
        Err(e) => {
            eprintln!("parvis-worker: error: {e:#}");
            1
        }
    };
    term::restore();
    std::process::exit(code);
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
    let flags = WorkerSettings {
        kernel: cli.kernel.clone(),
        initrd: cli.initrd.clone(),
        cmdline: cli.cmdline.clone(),
        memory: cli.memory,
        cpus: cli.cpus,
        disks: cli.disks.clone(),
        framebuffer: cli.framebuffer,
        no_framebuffer: cli.no_framebuffer,
        on_reboot: cli.on_reboot,
    };
    let s = file.merge(flags).resolve()?;

    let mut disks = Vec::new();
    for d in &s.disks {
        // Raw, VHD or VHDX, detected from the contents. A VHDX with an unreplayed log is
        // replayed only when the disk is attached writable (as Hyper-V does on attach); a
        // read-only attachment never modifies the file.
        let opts = OpenOptions {
            read_only: d.read_only,
            allow_replay: !d.read_only,
            format: None,
            raw_sector_size: d.sector_size,
        };
        let img = image::open(&d.path, &opts)
            .with_context(|| format!("cannot open disk {}", d.path.display()))?;
        disks.push(DiskAttachment {
            name: d.path.display().to_string(),
            device: Arc::new(img),
        });
    }

    let mut out = SerialOutput::default();
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
    if let Some(path) = &cli.control {
        let listener = bind(path)?;
        let h = handle.clone();
        spawn("control", move || serve_control(listener, h))?;
    }

    let shot = cli.screenshot_on_exit.clone();
    let framebuffer = partition.config().framebuffer.is_some();
    let exit = run_and_capture(partition, shot.as_deref(), framebuffer)?;
    // Sockets are per run: remove them so a stale path never looks like a live worker.
    let serial_socket = cli.serial.strip_prefix("unix:").map(PathBuf::from);
    for p in cli.control.iter().chain(serial_socket.iter()) {
        let _ = std::fs::remove_file(p);
    }
    Ok(exit)
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

fn serve_control(listener: UnixListener, handle: PartitionHandle) {
    for conn in listener.incoming().flatten() {
        let h = handle.clone();
        let _ = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || control_session(conn, h));
    }
}

fn control_session(conn: UnixStream, handle: PartitionHandle) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let reply = control_command(line.trim(), &handle);
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

fn control_command(line: &str, h: &PartitionHandle) -> String {
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    let simple = |c: Command| match h.send(c) {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error: {e}"),
    };
    match cmd {
        "pause" => simple(Command::Pause),
        "resume" => simple(Command::Resume),
        "reset" => simple(Command::Reset),
        "stop" => simple(Command::Stop),
        "power-button" => simple(Command::PowerButton),
        "state" => match h.state() {
            Ok(PartitionState::Running) => "ok running".into(),
            Ok(PartitionState::Paused) => "ok paused".into(),
            Err(e) => format!("error: {e}"),
        },
        "screenshot" if !arg.is_empty() => match h.screenshot(Path::new(arg)) {
            Ok(Ok(())) => "ok".into(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(e) => format!("error: {e}"),
        },
        _ => format!("error: unknown command '{line}'"),
    }
}

/// Client side of the control socket. Returns whether every command succeeded.
fn ctl(socket: &Path, commands: &[String]) -> Result<bool> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut out = conn.try_clone().context("cannot use the control socket")?;
    let mut replies = BufReader::new(conn).lines();
    let mut all_ok = true;
    for c in commands {
        writeln!(out, "{c}").context("cannot send to the worker")?;
        let reply = replies
            .next()
            .context("the worker closed the control socket")?
            .context("cannot read the worker's reply")?;
        all_ok &= reply.starts_with("ok");
        println!("{reply}");
    }
    Ok(all_ok)
}
