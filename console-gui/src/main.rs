//! `parvis-console`: the desktop console.
//!
//! `parvis-console [--config FILE] [--open VM] [--window-screenshot FILE]`. The hosts are
//! saved in the file the `parvis` CLI uses too (`proto::hosts`; `$PARVIS_CONFIG` or
//! `--config` names another file).

use anyhow::{Context, Result, anyhow};

const USAGE: &str = "parvis-console [--config FILE] [--open VM] [--window-screenshot FILE.png]

  --config FILE             the saved hosts, shared with the parvis CLI (default:
                            hosts.json in the user's config folder, or $PARVIS_CONFIG)
  --open VM                 open the console of the VM named VM once a host lists it
  --window-screenshot FILE  once that console shows the VM's screen, save the window as a
                            PNG and quit";

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut args = std::env::args_os().skip(1);
    let mut config = None;
    let mut open = None;
    let mut shot: Option<std::path::PathBuf> = None;
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
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => return Err(anyhow!("unknown argument {}", a.to_string_lossy())),
        }
    }
    let config = match config {
        Some(c) => c,
        None => console_gui::config::default_path()?,
    };
    eframe::run_native(
        "Parvis",
        console_gui::native_options(),
        Box::new(move |cc| {
            let mut app = console_gui::ConsoleApp::new(&cc.egui_ctx, Some(config))?;
            if let Some(vm) = open {
                app.open_when_seen(vm);
            }
            if let Some(p) = shot {
                app.window_screenshot(p);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow!("the window could not be opened: {e}"))
}
