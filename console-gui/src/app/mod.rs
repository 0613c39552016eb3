//! The application: hosts and their VMs, console tabs, dialogs, and the tasks pane.
//!
//! - `state`: hosts, jobs and the event log, and how backend updates change them (no
//!   drawing; tested without a window);
//! - one file per panel: `toolbar`, `tab_bar`, `inventory` (with `actions` for the
//!   selection), `console_tab`, `tasks`, `dialogs`, `drops` (dropped files and their
//!   overlay); `words` and `widgets` are the helpers they share;
//! - `command`: the [`UiCommand`]s panels queue while drawing. Panels read the state and
//!   change only their own view state (search text, which dialog is open, the selection,
//!   a tab's pane); everything that talks to the backend or changes hosts, jobs or tabs is
//!   a command, run by [`ConsoleApp`] once the frame is drawn.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egui::Ui;
use proto::v1::Vm;

use crate::backend::{Backend, BackendError, HostId, HostStatus, JobId, Update, VmAction};
use crate::config::{Config, HostConfig};
use crate::upload::{UploadControl, UploadRequest};
use crate::view::ScreenView;

mod actions;
mod command;
mod console_tab;
mod dialogs;
mod drops;
mod inventory;
mod state;
mod tab_bar;
mod tasks;
mod toolbar;
mod widgets;
mod words;

pub use command::{TabRef, UiCommand};
pub use state::{ConsolePane, ConsoleTab, Host, Job, JobState, Selection};
pub use words::{duration, human, state_word};

use dialogs::Dialog;
use drops::Picked;
use state::{Followup, State};

/// The Parvis console.
pub struct ConsoleApp {
    backend: Backend,
    updates: Receiver<Update>,
    config_path: Option<PathBuf>,
    state: State,
    pub selection: Option<Selection>,
    tabs: Vec<ConsoleTab>,
    /// 0: inventory; i + 1: `tabs[i]`.
    active: usize,
    /// The inventory's search text, collapsed hosts and where host rows were drawn.
    inventory: inventory::InventoryView,
    dialog: Option<Dialog>,
    /// A file picked in the import dialog (filled by the dialog's thread).
    picked: Arc<Mutex<Option<Picked>>>,
    /// Queued by the panels while drawing; run after the frame.
    commands: Vec<UiCommand>,
    /// Frames drawn (for tests and the benchmark).
    pub frames: u64,
    /// New uploads pause by themselves once the host has this many bytes (tests, demos).
    pub upload_pause_at: Option<u64>,
    /// Open this VM's console as soon as it is seen (`--open`).
    open_on_start: Option<String>,
    /// Save a screenshot of the window here once an opened console shows the VM's screen,
    /// then close (`--window-screenshot`).
    window_shot: Option<(PathBuf, Option<Instant>)>,
}

impl ConsoleApp {
    /// The app with the hosts saved in `config_path` (none: nothing is saved), connecting
    /// to all of them at once.
    pub fn new(ctx: &egui::Context, config_path: Option<PathBuf>) -> Result<Self, BackendError> {
        let (backend, updates) = Backend::new(ctx.clone())?;
        let mut app = ConsoleApp {
            backend,
            updates,
            config_path,
            state: State::default(),
            selection: None,
            tabs: Vec::new(),
            active: 0,
            inventory: inventory::InventoryView::default(),
            dialog: None,
            picked: Arc::default(),
            commands: Vec::new(),
            frames: 0,
            upload_pause_at: None,
            open_on_start: None,
            window_shot: None,
        };
        if let Some(p) = app.config_path.clone() {
            match Config::load(&p) {
                Ok(cfg) => {
                    for h in cfg.hosts {
                        app.add_host(h);
                    }
                }
                Err(e) => app
                    .state
                    .note(format!("the saved hosts could not be read: {e}")),
            }
        }
        Ok(app)
    }

    /// Open the console of the VM with this name (on any host) as soon as it is seen.
    pub fn open_when_seen(&mut self, vm_name: String) {
        self.open_on_start = Some(vm_name);
    }

    /// Once a console shows a screen (for 2 s), save a screenshot of the whole window as a
    /// PNG and close the app.
    pub fn window_screenshot(&mut self, path: PathBuf) {
        self.window_shot = Some((path, None));
    }

    fn startup_actions(&mut self, ctx: &egui::Context) {
        if let Some(name) = self.open_on_start.clone()
            && let Some((h, id)) = self.state.find_vm_named(&name)
        {
            self.open_on_start = None;
            self.selection = Some(Selection::Vm(h, id.clone()));
            self.open_console(h, &id);
        }
        let showing = self.active > 0
            && self
                .tabs
                .get(self.active - 1)
                .is_some_and(|t| t.screen.size()[0] > 0 && t.screen.texture_updates > 0);
        if let Some((path, since)) = &mut self.window_shot {
            match since {
                None if showing => {
                    *since = Some(Instant::now());
                    ctx.request_repaint_after(Duration::from_secs(2));
                }
                Some(t) if t.elapsed() >= Duration::from_secs(2) => {
                    let path = path.clone();
                    self.window_shot = None;
                    let c = ctx.clone();
                    ctx.request_screenshot(move |image| {
                        match crate::console::save_png(&path, &image) {
                            Ok(()) => tracing::info!("saved the window to {}", path.display()),
                            Err(e) => tracing::error!("{e}"),
                        }
                        c.send_viewport_cmd(egui::ViewportCommand::Close);
                    });
                }
                Some(_) => ctx.request_repaint_after(Duration::from_millis(500)),
                None => {}
            }
        }
    }

    // ---- Queries (tests, benchmark) -----------------------------------------------------

    pub fn hosts(&self) -> &[Host] {
        &self.state.hosts
    }

    pub fn host_by_name(&self, name: &str) -> Option<&Host> {
        self.state.host_by_name(name)
    }

    pub fn jobs(&self) -> &[Job] {
        &self.state.jobs
    }

    pub fn consoles(&self) -> &[ConsoleTab] {
        &self.tabs
    }

    pub fn consoles_mut(&mut self) -> &mut [ConsoleTab] {
        &mut self.tabs
    }

    pub fn event_log(&self) -> impl Iterator<Item = &str> {
        self.state.log.iter().map(String::as_str)
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    // ---- Changes ------------------------------------------------------------------------

    /// Add a host and connect to it.
    pub fn add_host(&mut self, cfg: HostConfig) -> HostId {
        let id = self
            .state
            .add_host(cfg.clone(), HostStatus::Connecting, Vec::new(), false);
        self.backend.add_host(id, cfg);
        id
    }

    /// A host that is shown with these VMs but never connected (benchmarks and tests).
    pub fn add_static_host(&mut self, cfg: HostConfig, vms: Vec<Vm>) -> HostId {
        self.state.add_host(cfg, HostStatus::Online, vms, true)
    }

    fn save_config(&mut self) {
        let Some(p) = self.config_path.clone() else {
            return;
        };
        if let Err(e) = self.state.config().save(&p) {
            self.state
                .note(format!("the hosts could not be saved: {e}"));
        }
    }

    /// Save a host from the host dialog: `editing` gets the new settings and reconnects
    /// (a host that is gone meanwhile is added again); otherwise it is a new host.
    fn save_host(&mut self, editing: Option<HostId>, cfg: HostConfig) {
        match editing.and_then(|id| self.state.host_mut(id)) {
            Some(h) => {
                let id = h.id;
                h.cfg = cfg.clone();
                h.status = HostStatus::Connecting;
                self.backend.add_host(id, cfg);
            }
            None => {
                let id = self.add_host(cfg);
                self.selection = Some(Selection::Host(id));
            }
        }
        self.save_config();
    }

    fn remove_host(&mut self, id: HostId) {
        self.backend.remove_host(id);
        self.state.remove_host(id);
        self.tabs.retain(|t| t.host != id);
        self.active = self.active.min(self.tabs.len());
        if self.selection.as_ref().is_some_and(|s| s.host() == id) {
            self.selection = None;
        }
        self.save_config();
    }

    /// Run a VM action (the result shows in the tasks pane).
    pub fn vm_action(&mut self, host: HostId, vm_id: &str, action: VmAction) {
        let name = self.state.vm_name(host, vm_id);
        let mut verb = action.verb().to_string();
        if let Some(c) = verb.get_mut(0..1) {
            c.make_ascii_uppercase();
        }
        let job = self.state.new_job(host, format!("{verb} VM '{name}'"));
        self.backend.vm_action(job, host, vm_id.to_string(), action);
    }

    /// Open (or bring to front) the console of a VM.
    pub fn open_console(&mut self, host: HostId, vm_id: &str) {
        if let Some(i) = self.tabs.iter().position(|t| t.is(host, vm_id)) {
            self.active = i + 1;
            return;
        }
        let Some(h) = self.state.host(host) else {
            return;
        };
        let title = format!("{} on {}", self.state.vm_name(host, vm_id), h.cfg.name);
        let handle = self.backend.open_console(host, vm_id.to_string());
        self.tabs.push(ConsoleTab {
            host,
            vm_id: vm_id.to_string(),
            screen: ScreenView::new(&format!("{host}-{vm_id}")),
            title,
            handle,
            pane: ConsolePane::Screen,
            serial_line: String::new(),
        });
        self.active = self.tabs.len();
    }

    /// Import a disk image into a host (checked, then streamed from its path).
    pub fn start_upload(&mut self, host: HostId, path: PathBuf) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        let job = self.state.new_job(host, format!("Import {name}"));
        let (progress, ctl) = self.backend.upload(
            job,
            host,
            UploadRequest {
                path,
                name: name.clone(),
                pause_at: self.upload_pause_at,
                host_addr: self
                    .state
                    .host(host)
                    .map(|h| h.cfg.addr.clone())
                    .unwrap_or_default(),
                resume_file: self
                    .config_path
                    .as_ref()
                    .map(|p| p.with_file_name("console-uploads.json")),
            },
        );
        if let Some(j) = self.state.job_mut(job) {
            j.upload = Some((progress, ctl));
        }
    }

    /// Pause, resume or cancel an upload job.
    pub fn control_upload(&mut self, job: JobId, c: UploadControl) {
        if let Some((_, ctl)) = self
            .state
            .jobs
            .iter()
            .find(|j| j.id == job)
            .and_then(|j| j.upload.as_ref())
        {
            let _ = ctl.send(c);
        }
    }

    /// Apply what the backend reported (at the start of a frame).
    fn drain(&mut self) {
        while let Ok(u) = self.updates.try_recv() {
            match self.state.apply(u) {
                Followup::None => {}
                Followup::Fingerprint { addr, result } => {
                    if let Some((editing, cfg)) =
                        dialogs::fingerprint_arrived(&mut self.dialog, &self.state, &addr, result)
                    {
                        self.save_host(editing, cfg);
                    }
                }
                Followup::OfferVm { host, disk } => {
                    if self.dialog.is_none() {
                        self.dialog = Some(Dialog::Uploaded { host, disk });
                    }
                }
            }
        }
    }

    // ---- The frame ----------------------------------------------------------------------

    /// Draw one frame, then run what the panels asked for.
    pub fn show(&mut self, ui: &mut Ui) {
        self.frames += 1;
        self.drain();
        let ctx = ui.ctx().clone();
        for t in &mut self.tabs {
            t.screen.sync(&ctx, &t.handle.shared);
        }
        drops::take(
            &ctx,
            &self.picked,
            &self.inventory.host_rects,
            self.selection.as_ref(),
            &self.state,
            &mut self.commands,
        );
        self.startup_actions(&ctx);

        egui::Panel::top("menu").show(ui, |ui| toolbar::show(ui, &self.state, &mut self.dialog));
        egui::Panel::bottom("tasks")
            .resizable(true)
            .default_size(170.0)
            .show(ui, |ui| tasks::show(ui, &self.state, &mut self.commands));
        egui::CentralPanel::default().show(ui, |ui| {
            tab_bar::show(ui, &self.tabs, &mut self.active, &mut self.commands);
            ui.separator();
            if self.active == 0 || self.active > self.tabs.len() {
                self.active = 0;
                inventory::show(
                    ui,
                    &self.state,
                    &mut self.inventory,
                    &mut self.selection,
                    &mut self.dialog,
                    &mut self.commands,
                );
            } else {
                console_tab::show(
                    ui,
                    &mut self.tabs[self.active - 1],
                    &self.state,
                    &mut self.commands,
                );
            }
        });
        dialogs::show(&ctx, &mut self.dialog, &self.state, &mut self.commands);
        drops::overlay(
            &ctx,
            &self.inventory.host_rects,
            self.selection.as_ref(),
            &self.state,
        );
        self.run_commands(&ctx);

        // Timers, not every frame: uptimes tick each second, upload speeds 4 times a second.
        if self.state.uploading() {
            ctx.request_repaint_after(Duration::from_millis(250));
        } else if self.state.any_vm_running() {
            ctx.request_repaint_after(Duration::from_secs(1));
        }
    }
}

impl eframe::App for ConsoleApp {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proto::v1::{VmSpec, VmState};

    use super::*;

    #[derive(Debug)]
    struct Dropped(PathBuf);

    impl egui::DroppedFile for Dropped {
        fn path(&self) -> &Path {
            &self.0
        }

        fn bytes(&self) -> Result<Vec<u8>, String> {
            Err("not read".into())
        }
    }

    fn frame(ctx: &egui::Context, app: &mut ConsoleApp, input: egui::RawInput) {
        let mut out = ctx.run_ui(input, |ui| app.show(ui));
        // No renderer here to take the font texture.
        out.textures_delta.clear();
    }

    fn static_app(ctx: &egui::Context) -> (ConsoleApp, HostId) {
        let mut app = ConsoleApp::new(ctx, None).unwrap();
        let host = app.add_static_host(
            HostConfig {
                name: "bench".into(),
                addr: "10.0.0.1:7443".into(),
                token: "pvs_x".into(),
                fingerprint: None,
            },
            vec![Vm {
                id: "a".into(),
                spec: Some(VmSpec {
                    name: "alpha".into(),
                    ..Default::default()
                }),
                state: VmState::Running as i32,
                ..Default::default()
            }],
        );
        (app, host)
    }

    #[test]
    fn every_panel_draws_and_dropped_files_become_uploads_after_the_frame() {
        let ctx = egui::Context::default();
        let (mut app, host) = static_app(&ctx);
        app.selection = Some(Selection::Vm(host, "a".into()));
        frame(&ctx, &mut app, egui::RawInput::default());
        app.dialog = Some(Dialog::Host(dialogs::HostDialog::add()));
        frame(&ctx, &mut app, egui::RawInput::default());
        app.open_console(host, "a");
        assert_eq!(app.active, 1);
        frame(&ctx, &mut app, egui::RawInput::default());
        app.tabs[0].pane = ConsolePane::Serial;
        frame(&ctx, &mut app, egui::RawInput::default());
        assert_eq!(app.frames, 4);

        // A dropped file goes to the selected host once the frame is drawn.
        let input = egui::RawInput {
            dropped_files: vec![Arc::new(Dropped(PathBuf::from("/nonexistent/web.vhdx")))],
            ..Default::default()
        };
        frame(&ctx, &mut app, input);
        assert!(app.commands.is_empty());
        assert_eq!(app.jobs()[0].title, "Import web.vhdx");
        assert!(app.jobs()[0].upload.is_some());
    }
}
