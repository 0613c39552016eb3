//! `parvis-agent`: the host's management service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use agent::security::{self, TlsIdentity};
use agent::server::{ServeOptions, is_loopback, serve};
use agent::store::Layout;
use agent::{Agent, disks, events, host, tasks, vms};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod demo;

#[derive(Debug, Parser)]
#[command(name = "parvis-agent", version, about = "Parvis host agent (gRPC API)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// State directory (VMs, disks, secrets). Default: /var/lib/parvis as root, else
    /// $XDG_DATA_HOME/parvis or ~/.local/share/parvis.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Address to listen on. Non-loopback addresses always use TLS.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Use TLS on a loopback address too.
    #[arg(long)]
    tls: bool,
    /// The parvis-worker program (default: next to this program, else on PATH).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// Directory of boot images (default: STATE/boot).
    #[arg(long)]
    boot_dir: Option<PathBuf>,
    /// Create (once) a demo VM named "demo" booting the kernel and initramfs in this
    /// directory (vmlinuz and l2-initramfs.cpio, as built by assets/guest/build-images.sh),
    /// and start it.
    #[arg(long)]
    demo: Option<PathBuf>,
    /// Log filter (e.g. info, debug).
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a new token (the old one stops working) and print it.
    ResetToken,
    /// Print the TLS certificate's SHA-256 fingerprint.
    Fingerprint,
}

fn default_state_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/parvis");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("parvis");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/share/parvis")
}

fn default_worker() -> PathBuf {
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
    {
        let p = dir.join("parvis-worker");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("parvis-worker")
}

/// glibc serves blocks over 128 KiB with fresh mmaps and hands the free top of a heap back to
/// the kernel once more than 128 KiB of it is free, so a stream of megabyte-sized network
/// buffers (the HTTP/2 frames of an upload or a screen) pays for page faults, zeroing and
/// TLB shootdowns on every buffer: a tenth of the agent's CPU per uploaded byte. glibc raises
/// both thresholds by itself the first time it frees a large mmapped block ("dynamic mmap
/// threshold", mallopt(3)); freeing one here, before any work, does that once for the whole
/// process. Other allocators ignore it.
fn settle_allocator() {
    drop(std::hint::black_box(vec![0u8; 16 << 20]));
}

fn main() {
    let cli = Cli::parse();
    settle_allocator();
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = run(cli) {
        use std::io::Write;
        // Not eprintln!: it panics when stderr is closed.
        let _ = writeln!(std::io::stderr(), "parvis-agent: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let layout = Layout::new(cli.state_dir.clone().unwrap_or_else(default_state_dir));
    layout.create().with_context(|| {
        format!(
            "cannot create the state directory {}",
            layout.root.display()
        )
    })?;
    match cli.command {
        Some(Command::ResetToken) => {
            security::NewToken::new().install(&layout, |t| {
                show_token(t, "(restart the agent for the new token to take effect)")
            })?;
            return Ok(());
        }
        Some(Command::Fingerprint) => {
            let id = identity(&layout, &cli.listen)?;
            say(&id.fingerprint).context("cannot write to standard output")?;
            return Ok(());
        }
        None => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agent")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(agent_main(cli, layout))
}

/// Print a line on stdout. A closed stdout is an error here, never a panic (`println!`
/// panics).
fn say(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Show a new token, the only time it is ever shown. If this fails the token is taken back
/// ([`security::NewToken::install`]), so a token that could not be shown never becomes the
/// agent's.
fn show_token(token: &str, note: &str) -> Result<()> {
    say(&format!("token: {token}"))
        .and_then(|()| say(note))
        .context(
            "cannot show the new token because standard output is closed; it was not kept, \
             so run the agent again with its output visible to get one",
        )
}

fn identity(layout: &Layout, listen: &SocketAddr) -> Result<TlsIdentity> {
    let mut names = vec![
        "localhost".to_string(),
        "parvis-agent".to_string(),
        "127.0.0.1".to_string(),
    ];
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    if !host.is_empty() {
        names.push(host);
    }
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    security::load_or_create_identity(layout, &names)
}

async fn agent_main(cli: Cli, layout: Layout) -> Result<()> {
    let (token, new_token) = match security::load_token(&layout)? {
        Some(check) => (check, None),
        None => {
            let new = security::NewToken::new();
            (new.check(), Some(new))
        }
    };
    let tls = if cli.tls || !is_loopback(&cli.listen) {
        Some(identity(&layout, &cli.listen)?)
    } else {
        None
    };
    let worker = cli.worker.clone().unwrap_or_else(default_worker);
    let boot_dir = cli.boot_dir.clone().unwrap_or_else(|| layout.boot());
    let facts =
        tokio::task::spawn_blocking(move || host::HostFacts::gather(worker, boot_dir)).await?;
    if !facts.kvm.usable {
        tracing::warn!("KVM is not usable here: {}", facts.kvm.reason);
    }
    let events = Arc::new(events::EventBus::default());
    let tasks = Arc::new(tasks::Tasks::new(events.clone()));
    let disks = Arc::new(disks::DiskLibrary::open(
        &layout,
        events.clone(),
        tasks.clone(),
    )?);
    disks.read_boot_entries_with(facts.worker_bin.clone());
    let vms = vms::Vms::load(layout.clone(), events.clone(), disks.clone(), facts.clone()).await?;
    // Switches come back before any VM (re)starts on them.
    match agent::network::Switches::load(&layout).await {
        Ok(s) => vms.set_network(Arc::new(s)),
        Err(e) => tracing::warn!("switches unavailable, VMs get no network: {e:#}"),
    }
    let agent = Arc::new(Agent {
        layout: layout.clone(),
        events,
        tasks,
        disks,
        vms,
        host: facts,
        stats: Arc::default(),
    });
    {
        let vms = agent.vms.clone();
        let vms2 = agent.vms.clone();
        tokio::spawn(agent::stats::run(
            agent.stats.clone(),
            layout.disks(),
            move || vms.running_vms(),
            move |id, g| vms2.set_guest(id, g),
        ));
    }
    if let Some(dir) = &cli.demo {
        demo::ensure(&agent, dir).context("cannot set up the demo VM")?;
    }
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let local = listener.local_addr()?;
    // A service may run with stdout closed: these lines are for whoever watches.
    let _ = say(&format!(
        "parvis-agent {} listening on {local} ({})",
        env!("CARGO_PKG_VERSION"),
        if tls.is_some() {
            "TLS"
        } else {
            "plain HTTP/2, loopback only"
        }
    ));
    if let Some(t) = &tls {
        let _ = say(&format!(
            "TLS certificate SHA-256 fingerprint: {}",
            t.fingerprint
        ));
    }
    if let Some(new) = &new_token {
        new.install(&layout, |t| {
            show_token(
                t,
                "(shown once; only its hash is stored. `parvis-agent reset-token` makes a new one)",
            )
        })?;
    }
    // Autostart VMs (the demo VM among them) once the server is about to accept.
    for id in agent.vms.autostart_ids() {
        let vms = agent.vms.clone();
        tokio::spawn(async move {
            if let Err(e) = vms.start(&id).await {
                tracing::warn!("autostart of VM {id} failed: {e}");
            }
        });
    }
    // On SIGTERM or Ctrl-C: stop accepting, let short calls finish, and leave after a few
    // seconds even if streams (consoles, event watchers) are still open. Workers keep
    // running and are adopted at the next start.
    let stop = Arc::new(tokio::sync::Notify::new());
    let signalled = stop.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("cannot handle SIGTERM: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down; running VMs keep running");
        signalled.notify_one();
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        std::process::exit(0);
    });
    let shutdown = async move { stop.notified().await };
    serve(
        agent,
        ServeOptions {
            listener,
            tls,
            token,
        },
        shutdown,
    )
    .await
}
