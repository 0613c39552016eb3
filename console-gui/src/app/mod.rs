//! The application: hosts and their VMs, console tabs, dialogs, and the tasks pane.
//!
//! - `state`: hosts, jobs and the event log, and how backend updates change them (no
//!   drawing; tested without a window); `rules`: the checks a VM's settings must pass;
//! - one file per panel: `toolbar`, `tab_bar`, `inventory` (the table) with `details` (the
//!   selected host's or VM's pane, drawing `graph`s), `library` (the disk library page),
//!   `console_tab`, `tasks`, `dialogs`, `drops` (dropped files and their overlay);
//!   `actions` lists what can be done to a host, VM or disk, for toolbars and right-click
//!   menus alike; `theme`, `words` and `widgets` are the helpers they share;
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
use crate::stats::StatsFeed;
use crate::upload::{UploadControl, UploadRequest};
use crate::view::ScreenView;

mod actions;
mod command;
mod console_tab;
mod details;
mod dialogs;
mod drops;
mod graph;
mod inventory;
mod library;
mod rules;
mod state;
mod tab_bar;
mod tasks;
mod theme;
mod toolbar;
mod widgets;
mod words;

pub use command::{TabRef, UiCommand};
pub use state::{ConsolePane, ConsoleTab, Host, Job, JobState, Selection};
pub use tab_bar::MainPage;
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
    /// 0: the main page (`main`); i + 1: `tabs[i]`.
    active: usize,
    pub main: MainPage,
    /// The inventory's search text, collapsed hosts, where host rows were drawn, the
    /// details pane's settings.
    inventory: inventory::InventoryView,
    library: library::LibraryView,
    /// The resource use of the selected host or VM, while the inventory shows it.
    stats: Option<(StatsKey, StatsFeed)>,
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
        theme::apply(ctx);
        let mut app = ConsoleApp {
            backend,
            updates,
            config_path,
            state: State::default(),
            selection: None,
            tabs: Vec::new(),
            active: 0,
            main: MainPage::Inventory,
            inventory: inventory::InventoryView::default(),
            library: library::LibraryView::default(),
            stats: None,
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
    /// PNG, with what the window shows as JSON beside it (`report::write`, the PNG's path
    /// with `.json`), and close the app.
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
                    let json = path.with_extension("json");
                    match crate::report::write(self, &json) {
                        Ok(()) => {
                            tracing::info!("wrote what the window shows to {}", json.display())
                        }
                        Err(e) => tracing::error!("cannot write {}: {e}", json.display()),
                    }
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

    /// The resource use the details pane shows: how many samples, and the newest.
    pub fn watched_stats(&self) -> Option<(usize, Option<proto::v1::StatsSample>)> {
        self.stats.as_ref().map(|(_, f)| {
            let s = f.series.lock().unwrap_or_else(|e| e.into_inner());
            (s.samples.len(), s.last().cloned())
        })
    }

    /// Whether a dialog is open.
    pub fn dialog_open(&self) -> bool {
        self.dialog.is_some()
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
        let names = self.names(host, &name);
        self.backend
            .vm_action(job, host, vm_id.to_string(), action, names);
    }

    /// Follow the resource use of what the inventory shows details of (nothing while
    /// another page is shown); a feed of something no longer shown is dropped.
    fn follow_stats(&mut self) {
        let want = (self.active == 0 && self.main == MainPage::Inventory)
            .then_some(self.selection.as_ref())
            .flatten()
            .map(|s| match s {
                Selection::Host(h) => (*h, None),
                Selection::Vm(h, id) => (*h, Some(id.clone())),
            });
        if self.stats.as_ref().map(|(k, _)| k) == want.as_ref() {
            return;
        }
        self.stats = want.map(|k| {
            let feed = self.backend.watch_stats(k.0, k.1.clone());
            (k, feed)
        });
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

        self.follow_stats();
        egui::Panel::top("menu").show(ui, |ui| toolbar::show(ui, &self.state, &mut self.dialog));
        egui::Panel::bottom("tasks")
            .resizable(true)
            .default_size((ui.available_height() * 0.2).clamp(90.0, 170.0))
            .size_range(80.0..=(ui.available_height() * 0.5).max(80.0))
            .show(ui, |ui| tasks::show(ui, &self.state, &mut self.commands));
        egui::CentralPanel::default().show(ui, |ui| {
            tab_bar::show(
                ui,
                &self.tabs,
                &mut self.active,
                &mut self.main,
                &mut self.commands,
            );
            ui.separator();
            if self.active > self.tabs.len() {
                self.active = 0;
            }
            if self.active == 0 && self.main == MainPage::Library {
                library::show(
                    ui,
                    &self.state,
                    &mut self.library,
                    &mut self.dialog,
                    &mut self.commands,
                );
            } else if self.active == 0 {
                let series = self
                    .stats
                    .as_ref()
                    .map(|(_, f)| f.series.lock().unwrap_or_else(|e| e.into_inner()));
                inventory::show(
                    ui,
                    &self.state,
                    &mut self.inventory,
                    &mut self.selection,
                    &mut self.dialog,
                    &mut self.commands,
                    series.as_deref(),
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
        if self.active != 0 || self.main != MainPage::Inventory {
            // Dropped files go to the selected host while the inventory is not shown.
            self.inventory.host_rects.clear();
        }
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

/// Whose resource use is followed: a host, or a VM on it.
type StatsKey = (HostId, Option<String>);

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

    /// Draw a frame; how long until egui wants the next one.
    fn frame(ctx: &egui::Context, app: &mut ConsoleApp, input: egui::RawInput) -> Duration {
        let mut out = ctx.run_ui(input, |ui| app.show(ui));
        // No renderer here to take the font texture.
        out.textures_delta.clear();
        out.viewport_output
            .get(&egui::ViewportId::ROOT)
            .map_or(Duration::MAX, |v| v.repaint_delay)
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
        app.active = 0;
        app.main = MainPage::Library;
        frame(&ctx, &mut app, egui::RawInput::default());
        // A dialog that opens is laid out once unseen first (egui's sizing pass), so a
        // frame may be drawn twice.
        assert!((5..=7).contains(&app.frames), "{} frames", app.frames);

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

    #[test]
    fn the_dialogs_and_the_disk_library_draw() {
        let ctx = egui::Context::default();
        let (mut app, host) = static_app(&ctx);
        app.state.host_mut(host).unwrap().disks.insert(
            "d".into(),
            proto::v1::Disk {
                id: "d".into(),
                name: "web.vhdx".into(),
                virtual_size: 64 << 20,
                ..Default::default()
            },
        );
        let state = &app.state;
        let dialogs = [
            dialogs::SettingsDialog::open(state, host, "a").map(|d| Dialog::Settings(Box::new(d))),
            dialogs::DiskDialog::convert(state, host, "d").map(Dialog::Disk),
            dialogs::DiskDialog::resize(state, host, "d").map(Dialog::Disk),
            dialogs::DiskDialog::delete(state, host, "d").map(Dialog::Disk),
            dialogs::CreateDialog::from_disk(state, host, "d").map(Dialog::Create),
        ];
        for d in dialogs {
            assert!(d.is_some(), "every dialog opens for a known VM or disk");
            app.dialog = d;
            frame(&ctx, &mut app, egui::RawInput::default());
            frame(&ctx, &mut app, egui::RawInput::default());
            assert!(app.dialog.is_some(), "a dialog stays until it is answered");
        }
        app.dialog = None;
        app.main = MainPage::Library;
        frame(&ctx, &mut app, egui::RawInput::default());
        assert!(dialogs::SettingsDialog::open(&app.state, host, "gone").is_none());
    }

    #[test]
    fn an_idle_console_asks_for_no_frames() {
        let ctx = egui::Context::default();
        let (mut app, host) = static_app(&ctx);
        app.state
            .host_mut(host)
            .unwrap()
            .vms
            .get_mut("a")
            .unwrap()
            .state = VmState::Off as i32;
        // The details pane of a VM follows its resource use (a feed that waits here).
        app.selection = Some(Selection::Vm(host, "a".into()));
        for _ in 0..4 {
            frame(&ctx, &mut app, egui::RawInput::default());
        }
        assert!(
            app.stats.is_some(),
            "the selection's resource use is followed"
        );
        let wait = frame(&ctx, &mut app, egui::RawInput::default());
        assert_eq!(wait, Duration::MAX, "nothing changes, so nothing is drawn");
        // A running VM's uptime ticks once a second, no more.
        app.state
            .host_mut(host)
            .unwrap()
            .vms
            .get_mut("a")
            .unwrap()
            .state = VmState::Running as i32;
        // (The change itself is drawn at once, and a grid whose columns change width is laid
        // out again.)
        for _ in 0..2 {
            frame(&ctx, &mut app, egui::RawInput::default());
        }
        let wait = frame(&ctx, &mut app, egui::RawInput::default());
        assert!(wait >= Duration::from_millis(900), "{wait:?}");
        // Another page: the feed stops.
        app.main = MainPage::Library;
        frame(&ctx, &mut app, egui::RawInput::default());
        assert!(app.stats.is_none());
    }
}
