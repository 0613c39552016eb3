//! `parvis-console`: the desktop console.
//!
//! `parvis-console [--config FILE] [--open VM] [--window-screenshot FILE]
//! [--report-after SECONDS FILE]`. The hosts are saved in the file the `parvis` CLI uses too
//! (`proto::hosts`; `$PARVIS_CONFIG` or `--config` names another file).
//!
//! On Windows it is a GUI-subsystem program (no console window opens beside it), so it logs
//! to `console.log` in its data folder (`%APPDATA%\parvis\`); elsewhere it logs to standard
//! output. `RUST_LOG` sets the filter (default `info`).

// No console window on Windows; the log goes to a file instead.
#![cfg_attr(windows, windows_subsystem = "windows")]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use console_gui::ConsoleApp;
use console_gui::backend::HostStatus;

const USAGE: &str = "parvis-console [--config FILE] [--open VM] [--window-screenshot FILE.png]
               [--report-after SECONDS FILE.json]

  --config FILE             the saved hosts, shared with the parvis CLI (default:
                            hosts.json in the user's config folder, or $PARVIS_CONFIG)
  --open VM                 open the console of the VM named VM once a host lists it
  --window-screenshot FILE  once that console shows the VM's screen, save the window as a
                            PNG and quit
  --report-after SECONDS FILE
                            as soon as every saved host is online and has listed its VMs
                            (at the latest after SECONDS), write what the window shows as
                            JSON to FILE, save the window beside it (FILE with .png), and
                            quit; the exit status says whether both were written";

/// The log file is started afresh once it has grown past this.
const LOG_LIMIT: u64 = 4 << 20;

fn main() -> ExitCode {
    let log = init_logging();
    tracing::info!(
        "parvis-console {} starting{}",
        env!("CARGO_PKG_VERSION"),
        log.as_ref()
            .map(|p| format!(", logging to {}", p.display()))
            .unwrap_or_default()
    );
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            use std::io::Write;
            // Not eprintln!: it panics when stderr is closed (a GUI-subsystem program on
            // Windows has none).
            let _ = writeln!(std::io::stderr(), "parvis-console: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Log to standard output, or on Windows to `console.log` in the data folder (returned).
/// Panics are logged too, since a Windows GUI program has no stderr to print them on.
fn init_logging() -> Option<PathBuf> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("panic: {info}");
        default_hook(info);
    }));
    if cfg!(windows)
        && let Some(path) = dirs::data_dir().map(|d| d.join("parvis").join("console.log"))
    {
        match open_log(&path) {
            Ok(file) => {
                tracing_subscriber::fmt()
                    .with_env_filter(filter())
                    .with_ansi(false)
                    .with_writer(Mutex::new(file))
                    .init();
                return Some(path);
            }
            Err(e) => {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "parvis-console: cannot open the log file {}: {e}",
                    path.display()
                );
            }
        }
    }
    // Colours only for a person at a terminal: the demo and the agent keep stderr as a log.
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    None
}

/// Open the log for appending; one that grew past [`LOG_LIMIT`] becomes `console.log.old`.
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_LIMIT) {
        let _ = std::fs::rename(path, path.with_extension("log.old"));
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn run() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let mut config = None;
    let mut open = None;
    let mut shot: Option<PathBuf> = None;
    let mut report: Option<(Duration, PathBuf)> = None;
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--config") => config = Some(args.next().context("--config needs a file")?.into()),
            Some("--open") => {
                let vm = args.next().context("--open needs a VM name")?;
                open = Some(vm.to_string_lossy().into_owned());
            }
            Some("--window-screenshot") => {
                shot = Some(
                    args.next()
                        .context("--window-screenshot needs a file")?
                        .into(),
                );
            }
            Some("--report-after") => {
                let secs = args
                    .next()
                    .context("--report-after needs SECONDS and a file")?;
                let secs: f64 = secs
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .with_context(|| {
                        format!(
                            "--report-after: {} is not a number of seconds",
                            secs.to_string_lossy()
                        )
                    })?;
                let file = args.next().context("--report-after needs a file")?;
                report = Some((Duration::from_secs_f64(secs), file.into()));
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => bail!("unknown argument {} (see --help)", a.to_string_lossy()),
        }
    }
    let config = match config {
        Some(c) => c,
        None => console_gui::config::default_path()?,
    };
    tracing::info!("saved hosts: {}", config.display());
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let shared = outcome.clone();
    eframe::run_native(
        "Parvis",
        console_gui::native_options(),
        Box::new(move |cc| {
            let mut app = ConsoleApp::new(&cc.egui_ctx, Some(config))?;
            if let Some(vm) = open {
                app.open_when_seen(vm);
            }
            if let Some(p) = shot {
                app.window_screenshot(p);
            }
            Ok(match report {
                Some((after, json)) => Box::new(Reporting::new(app, after, json, shared)),
                None => Box::new(app),
            })
        }),
    )
    .map_err(|e| anyhow!("the window could not be opened: {e}"))?;
    if let Some(e) = lock(&outcome).error.take() {
        bail!("{e}");
    }
    Ok(())
}

/// How `--report-after` went: an error once something failed (or the window closed first).
#[derive(Default)]
struct Outcome {
    error: Option<String>,
}

fn lock(o: &Mutex<Outcome>) -> std::sync::MutexGuard<'_, Outcome> {
    o.lock().unwrap_or_else(|e| e.into_inner())
}

/// `--report-after`: the console as usual, watched until every saved host is online with
/// its VMs listed (or the time is up); then the report, the window's picture, and the end.
struct Reporting {
    app: ConsoleApp,
    json: PathBuf,
    png: PathBuf,
    started: Instant,
    limit: Duration,
    /// Since when every host has been online.
    all_online_since: Option<Instant>,
    /// Since when the report's condition has held (a few frames more, then report).
    ready_since: Option<Instant>,
    /// When the screenshot was asked for.
    asked: Option<Instant>,
    outcome: Arc<Mutex<Outcome>>,
}

/// A host that is online but lists no VM has listed them once it has been online this long
/// (its event stream sends the inventory first thing).
const LISTING_GRACE: Duration = Duration::from_secs(3);
/// Frames drawn after the condition holds, before the picture: the layout settles.
const SETTLE: Duration = Duration::from_secs(1);
/// The window's picture comes with the next frame or it will not come.
const SHOT_TIMEOUT: Duration = Duration::from_secs(15);

impl Reporting {
    fn new(app: ConsoleApp, limit: Duration, json: PathBuf, outcome: Arc<Mutex<Outcome>>) -> Self {
        let png = json.with_extension("png");
        lock(&outcome).error = Some("the window was closed before the report was written".into());
        Reporting {
            app,
            json,
            png,
            started: Instant::now(),
            limit,
            all_online_since: None,
            ready_since: None,
            asked: None,
            outcome,
        }
    }

    /// Every saved host is online and has listed its VMs.
    fn ready(&mut self) -> bool {
        let hosts = self.app.hosts();
        let online = hosts.iter().all(|h| h.status == HostStatus::Online);
        if !online {
            self.all_online_since = None;
            return false;
        }
        let since = *self.all_online_since.get_or_insert_with(Instant::now);
        hosts.iter().all(|h| !h.vms.is_empty()) || since.elapsed() >= LISTING_GRACE
    }

    fn report(&mut self, ctx: &egui::Context, why: &str) {
        self.asked = Some(Instant::now());
        let hosts: Vec<String> = self
            .app
            .hosts()
            .iter()
            .map(|h| format!("{} {:?} with {} VMs", h.cfg.name, h.status, h.vms.len()))
            .collect();
        tracing::info!("report ({why}): {}", hosts.join("; "));
        if let Err(e) = write_report(&self.app, &self.json) {
            tracing::error!("{e}");
            lock(&self.outcome).error = Some(e);
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            return;
        }
        lock(&self.outcome).error = Some(format!(
            "the window's picture ({}) never came",
            self.png.display()
        ));
        let (png, outcome, c) = (self.png.clone(), self.outcome.clone(), ctx.clone());
        ctx.request_screenshot(move |image| {
            let result = console_gui::console::save_png(&png, &image);
            match &result {
                Ok(()) => tracing::info!("saved the window to {}", png.display()),
                Err(e) => tracing::error!("{e}"),
            }
            lock(&outcome).error = result.err();
            c.send_viewport_cmd(egui::ViewportCommand::Close);
        });
    }
}

fn write_report(app: &ConsoleApp, path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    console_gui::report::write(app, path)
        .map_err(|e| format!("cannot write the report {}: {e}", path.display()))?;
    tracing::info!("wrote the report {}", path.display());
    Ok(())
}

impl eframe::App for Reporting {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.app.show(ui);
        let ctx = ui.ctx().clone();
        match self.asked {
            Some(t) => {
                if t.elapsed() >= SHOT_TIMEOUT {
                    tracing::error!("the window's picture never came; closing");
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            }
            None => {
                let ready = self.ready();
                if ready {
                    let since = *self.ready_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= SETTLE {
                        self.report(&ctx, "every host is online with its VMs listed");
                    }
                } else {
                    self.ready_since = None;
                    if self.started.elapsed() >= self.limit {
                        self.report(&ctx, "time is up");
                    }
                }
            }
        }
        // Keep looking while nothing else wakes the window up.
        ctx.request_repaint_after(Duration::from_millis(250));
    }
}
