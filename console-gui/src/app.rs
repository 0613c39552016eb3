//! The application: hosts and their VMs, console tabs, dialogs, and the tasks pane.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use egui::{Color32, RichText, Ui};
use proto::v1::{Disk, DiskAttachment, HostInfo, Task, TaskState, Vm, VmSpec, VmState, event};

use crate::backend::{Backend, BackendError, HostId, HostStatus, JobId, Update, VmAction};
use crate::config::{Config, HostConfig};
use crate::console::ConsoleHandle;
use crate::upload::{Phase, Progress, UploadControl, UploadRequest};
use crate::view::{Scale, ScreenView};

/// One host in the UI.
#[derive(Debug)]
pub struct Host {
    pub id: HostId,
    pub cfg: HostConfig,
    pub status: HostStatus,
    pub info: Option<HostInfo>,
    pub vms: BTreeMap<String, Vm>,
    pub disks: BTreeMap<String, Disk>,
    pub tasks: BTreeMap<String, Task>,
    /// Shown but never connected (benchmarks).
    fake: bool,
}

/// How a job is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    Succeeded(String),
    Failed(String),
}

/// A long operation started from this console.
pub struct Job {
    pub id: JobId,
    pub host: String,
    pub title: String,
    pub state: JobState,
    pub upload: Option<(Arc<Progress>, tokio::sync::watch::Sender<UploadControl>)>,
    started: Instant,
}

/// What a console tab shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsolePane {
    Screen,
    Serial,
}

/// An open VM console.
pub struct ConsoleTab {
    pub host: HostId,
    pub vm_id: String,
    pub title: String,
    pub handle: ConsoleHandle,
    pub screen: ScreenView,
    pub pane: ConsolePane,
    serial_line: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostStage {
    Edit,
    Fetching,
    Confirm(String),
}

struct HostDialog {
    editing: Option<HostId>,
    name: String,
    addr: String,
    token: String,
    tls: bool,
    stage: HostStage,
    error: Option<String>,
}

struct CreateDialog {
    host: HostId,
    name: String,
    cpus: u32,
    memory_mib: u32,
    boot_image: String,
    disk: Option<String>,
    cmdline: String,
    width: u32,
    height: u32,
}

enum Dialog {
    Host(HostDialog),
    Create(CreateDialog),
    DeleteVm {
        host: HostId,
        vm_id: String,
        name: String,
    },
    RemoveHost(HostId),
    Uploaded {
        host: HostId,
        disk: Box<Disk>,
    },
}

/// What is selected in the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Host(HostId),
    Vm(HostId, String),
}

/// A host and the file chosen in the import dialog for it (`None`: nothing chosen).
type Picked = (HostId, Option<PathBuf>);

/// The Parvis console.
pub struct ConsoleApp {
    backend: Backend,
    updates: Receiver<Update>,
    config_path: Option<PathBuf>,
    hosts: Vec<Host>,
    next_id: u64,
    pub selection: Option<Selection>,
    search: String,
    collapsed: HashSet<HostId>,
    tabs: Vec<ConsoleTab>,
    /// 0: inventory; i + 1: `tabs[i]`.
    active: usize,
    jobs: Vec<Job>,
    log: VecDeque<String>,
    dialog: Option<Dialog>,
    /// Where each host's rows were drawn last frame (drop targets).
    host_rects: Vec<(HostId, egui::Rect)>,
    /// A file picked in the import dialog (filled by the dialog's thread).
    picked: Arc<std::sync::Mutex<Option<Picked>>>,
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1:02:03` or `4 d 01:02`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d} d {h:02}:{m:02}")
    } else {
        format!("{h}:{m:02}:{s:02}")
    }
}

pub fn state_word(s: i32) -> &'static str {
    match VmState::try_from(s) {
        Ok(VmState::Off) => "Off",
        Ok(VmState::Starting) => "Starting",
        Ok(VmState::Running) => "Running",
        Ok(VmState::Paused) => "Paused",
        Ok(VmState::Stopping) => "Stopping",
        Ok(VmState::Crashed) => "Crashed",
        _ => "Unknown",
    }
}

fn state_color(s: i32) -> Color32 {
    match VmState::try_from(s) {
        Ok(VmState::Running) => Color32::from_rgb(60, 170, 80),
        Ok(VmState::Paused | VmState::Starting | VmState::Stopping) => {
            Color32::from_rgb(210, 160, 40)
        }
        Ok(VmState::Crashed) => Color32::from_rgb(220, 60, 60),
        _ => Color32::GRAY,
    }
}

fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
            hosts: Vec::new(),
            next_id: 1,
            selection: None,
            search: String::new(),
            collapsed: HashSet::new(),
            tabs: Vec::new(),
            active: 0,
            jobs: Vec::new(),
            log: VecDeque::new(),
            dialog: None,
            host_rects: Vec::new(),
            picked: Arc::default(),
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
                Err(e) => app.note(format!("the saved hosts could not be read: {e}")),
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
        if let Some(name) = self.open_on_start.clone() {
            let found = self.hosts.iter().find_map(|h| {
                h.vms
                    .values()
                    .find(|v| v.spec.as_ref().is_some_and(|s| s.name == name))
                    .map(|v| (h.id, v.id.clone()))
            });
            if let Some((h, id)) = found {
                self.open_on_start = None;
                self.selection = Some(Selection::Vm(h, id.clone()));
                self.open_console(h, &id);
            }
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
        &self.hosts
    }

    pub fn host_by_name(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.cfg.name == name)
    }

    pub fn jobs(&self) -> &[Job] {
        &self.jobs
    }

    pub fn consoles(&self) -> &[ConsoleTab] {
        &self.tabs
    }

    pub fn consoles_mut(&mut self) -> &mut [ConsoleTab] {
        &mut self.tabs
    }

    pub fn event_log(&self) -> impl Iterator<Item = &str> {
        self.log.iter().map(String::as_str)
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    // ---- Changes ------------------------------------------------------------------------

    fn note(&mut self, line: String) {
        tracing::info!("{line}");
        self.log.push_front(line);
        self.log.truncate(500);
    }

    /// Add a host and connect to it.
    pub fn add_host(&mut self, cfg: HostConfig) -> HostId {
        let id = self.next_id;
        self.next_id += 1;
        self.backend.add_host(id, cfg.clone());
        self.hosts.push(Host {
            id,
            cfg,
            status: HostStatus::Connecting,
            info: None,
            vms: BTreeMap::new(),
            disks: BTreeMap::new(),
            tasks: BTreeMap::new(),
            fake: false,
        });
        id
    }

    /// A host that is shown with these VMs but never connected (benchmarks and tests).
    pub fn add_static_host(&mut self, cfg: HostConfig, vms: Vec<Vm>) -> HostId {
        let id = self.next_id;
        self.next_id += 1;
        self.hosts.push(Host {
            id,
            cfg,
            status: HostStatus::Online,
            info: None,
            vms: vms.into_iter().map(|v| (v.id.clone(), v)).collect(),
            disks: BTreeMap::new(),
            tasks: BTreeMap::new(),
            fake: true,
        });
        id
    }

    fn save_config(&mut self) {
        let Some(p) = self.config_path.clone() else {
            return;
        };
        let cfg = Config {
            hosts: self
                .hosts
                .iter()
                .filter(|h| !h.fake)
                .map(|h| h.cfg.clone())
                .collect(),
        };
        if let Err(e) = cfg.save(&p) {
            self.note(format!("the hosts could not be saved: {e}"));
        }
    }

    fn remove_host(&mut self, id: HostId) {
        self.backend.remove_host(id);
        self.hosts.retain(|h| h.id != id);
        self.tabs.retain(|t| t.host != id);
        self.active = self.active.min(self.tabs.len());
        if matches!(&self.selection, Some(Selection::Host(h) | Selection::Vm(h, _)) if *h == id) {
            self.selection = None;
        }
        self.save_config();
    }

    fn host_mut(&mut self, id: HostId) -> Option<&mut Host> {
        self.hosts.iter_mut().find(|h| h.id == id)
    }

    fn host(&self, id: HostId) -> Option<&Host> {
        self.hosts.iter().find(|h| h.id == id)
    }

    fn new_job(&mut self, host: HostId, title: String) -> JobId {
        let id = self.next_id;
        self.next_id += 1;
        let host = self
            .host(host)
            .map(|h| h.cfg.name.clone())
            .unwrap_or_default();
        self.jobs.insert(
            0,
            Job {
                id,
                host,
                title,
                state: JobState::Running,
                upload: None,
                started: Instant::now(),
            },
        );
        self.jobs.truncate(200);
        id
    }

    /// Run a VM action (the result shows in the tasks pane).
    pub fn vm_action(&mut self, host: HostId, vm_id: &str, action: VmAction) {
        let name = self
            .host(host)
            .and_then(|h| h.vms.get(vm_id))
            .and_then(|v| v.spec.as_ref())
            .map_or_else(|| vm_id.to_string(), |s| s.name.clone());
        let mut verb = action.verb().to_string();
        if let Some(c) = verb.get_mut(0..1) {
            c.make_ascii_uppercase();
        }
        let job = self.new_job(host, format!("{verb} VM '{name}'"));
        self.backend.vm_action(job, host, vm_id.to_string(), action);
    }

    /// Open (or bring to front) the console of a VM.
    pub fn open_console(&mut self, host: HostId, vm_id: &str) {
        if let Some(i) = self
            .tabs
            .iter()
            .position(|t| t.host == host && t.vm_id == vm_id)
        {
            self.active = i + 1;
            return;
        }
        let Some(h) = self.host(host) else { return };
        let name = h
            .vms
            .get(vm_id)
            .and_then(|v| v.spec.as_ref())
            .map_or_else(|| vm_id.to_string(), |s| s.name.clone());
        let title = format!("{name} on {}", h.cfg.name);
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
        let job = self.new_job(host, format!("Import {name}"));
        let (progress, ctl) = self.backend.upload(
            job,
            host,
            UploadRequest {
                path,
                name: name.clone(),
                pause_at: self.upload_pause_at,
                host_addr: self
                    .host(host)
                    .map(|h| h.cfg.addr.clone())
                    .unwrap_or_default(),
                resume_file: self
                    .config_path
                    .as_ref()
                    .map(|p| p.with_file_name("console-uploads.json")),
            },
        );
        if let Some(j) = self.jobs.iter_mut().find(|j| j.id == job) {
            j.upload = Some((progress, ctl));
        }
    }

    /// Pause, resume or cancel an upload job.
    pub fn control_upload(&mut self, job: JobId, c: UploadControl) {
        if let Some((_, ctl)) = self
            .jobs
            .iter()
            .find(|j| j.id == job)
            .and_then(|j| j.upload.as_ref())
        {
            let _ = ctl.send(c);
        }
    }

    fn apply(&mut self, u: Update) {
        match u {
            Update::Status { host, status } => {
                let Some(h) = self.host_mut(host) else { return };
                let was_online = h.status == HostStatus::Online;
                h.status = status.clone();
                let name = h.cfg.name.clone();
                match status {
                    HostStatus::Online => self.note(format!("{name}: connected")),
                    HostStatus::Offline { error, .. } if was_online => {
                        self.note(format!("{name}: offline: {error}"));
                    }
                    _ => {}
                }
            }
            Update::Info { host, info } => {
                if let Some(h) = self.host_mut(host) {
                    h.info = Some(*info);
                }
            }
            Update::Event { host, event } => self.apply_event(host, *event),
            Update::Fingerprint { addr, result } => {
                if let Some(Dialog::Host(d)) = &mut self.dialog
                    && d.addr.trim() == addr
                    && d.stage == HostStage::Fetching
                {
                    match result {
                        Ok(fp) => {
                            let pinned = d
                                .editing
                                .and_then(|id| self.hosts.iter().find(|h| h.id == id))
                                .and_then(|h| h.cfg.fingerprint.clone());
                            if pinned.is_some_and(|p| proto::client::same_fingerprint(&p, &fp)) {
                                let fp = Some(fp);
                                self.finish_host_dialog(fp);
                            } else {
                                d.stage = HostStage::Confirm(fp);
                            }
                        }
                        Err(e) => {
                            d.stage = HostStage::Edit;
                            d.error = Some(format!("cannot reach the agent: {e}"));
                        }
                    }
                }
            }
            Update::JobDone { job, result } => {
                let Some(j) = self.jobs.iter_mut().find(|j| j.id == job) else {
                    return;
                };
                let line = match &result {
                    Ok(t) => format!("{}: {}: {t}", j.host, j.title),
                    Err(e) => format!("{}: {} failed: {e}", j.host, j.title),
                };
                j.state = match result {
                    Ok(t) => JobState::Succeeded(t),
                    Err(e) => JobState::Failed(e),
                };
                self.note(line);
            }
            Update::Uploaded { host, disk, .. } => {
                if let Some(h) = self.host_mut(host) {
                    h.disks.insert(disk.id.clone(), (*disk).clone());
                }
                if self.dialog.is_none() {
                    self.dialog = Some(Dialog::Uploaded { host, disk });
                }
            }
        }
    }

    fn apply_event(&mut self, host: HostId, ev: proto::v1::Event) {
        let Some(h) = self.host_mut(host) else { return };
        let name = h.cfg.name.clone();
        let mut lines = Vec::new();
        match ev.kind {
            Some(event::Kind::Snapshot(s)) => {
                h.vms = s.vms.into_iter().map(|v| (v.id.clone(), v)).collect();
                h.disks = s.disks.into_iter().map(|d| (d.id.clone(), d)).collect();
                h.tasks = s.tasks.into_iter().map(|t| (t.id.clone(), t)).collect();
            }
            Some(event::Kind::VmChanged(v)) => {
                let vm_name = v.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                match h.vms.get(&v.id) {
                    None => lines.push(format!("{name}: VM '{vm_name}' created")),
                    Some(old) if old.state != v.state => {
                        let mut l = format!(
                            "{name}: VM '{vm_name}' is {}",
                            state_word(v.state).to_lowercase()
                        );
                        if !v.state_reason.is_empty() {
                            l.push_str(&format!(" ({})", v.state_reason));
                        }
                        lines.push(l);
                    }
                    _ => {}
                }
                h.vms.insert(v.id.clone(), v);
            }
            Some(event::Kind::VmDeleted(id)) => {
                if let Some(v) = h.vms.remove(&id) {
                    let vm_name = v.spec.map(|s| s.name).unwrap_or(id);
                    lines.push(format!("{name}: VM '{vm_name}' deleted"));
                }
            }
            Some(event::Kind::DiskChanged(d)) => {
                h.disks.insert(d.id.clone(), d);
            }
            Some(event::Kind::DiskDeleted(id)) => {
                h.disks.remove(&id);
            }
            Some(event::Kind::TaskChanged(t)) => {
                let ended = t.state != TaskState::Running as i32;
                let was_running = h
                    .tasks
                    .get(&t.id)
                    .is_none_or(|o| o.state == TaskState::Running as i32);
                if ended && was_running {
                    let how = match TaskState::try_from(t.state) {
                        Ok(TaskState::Succeeded) => "succeeded".to_string(),
                        Ok(TaskState::Cancelled) => "was cancelled".to_string(),
                        _ => format!("failed: {}", t.error),
                    };
                    lines.push(format!("{name}: {} {how}", t.description));
                }
                h.tasks.insert(t.id.clone(), t);
            }
            None => {}
        }
        for l in lines {
            self.note(l);
        }
    }

    fn drain(&mut self) {
        while let Ok(u) = self.updates.try_recv() {
            self.apply(u);
        }
    }

    fn finish_host_dialog(&mut self, fingerprint: Option<String>) {
        let Some(Dialog::Host(d)) = self.dialog.take() else {
            return;
        };
        let cfg = HostConfig {
            name: if d.name.trim().is_empty() {
                d.addr.trim().to_string()
            } else {
                d.name.trim().to_string()
            },
            addr: d.addr.trim().to_string(),
            token: d.token.trim().to_string(),
            fingerprint,
        };
        match d
            .editing
            .and_then(|id| self.hosts.iter().position(|h| h.id == id))
        {
            Some(i) => {
                let id = self.hosts[i].id;
                self.hosts[i].cfg = cfg.clone();
                self.hosts[i].status = HostStatus::Connecting;
                self.backend.add_host(id, cfg);
            }
            None => {
                let id = self.add_host(cfg);
                self.selection = Some(Selection::Host(id));
            }
        }
        self.save_config();
    }

    // ---- UI -----------------------------------------------------------------------------

    /// Draw one frame.
    pub fn show(&mut self, ui: &mut Ui) {
        self.frames += 1;
        self.drain();
        let ctx = ui.ctx().clone();
        for t in &mut self.tabs {
            t.screen.sync(&ctx, &t.handle.shared);
        }
        self.handle_drops(&ctx);
        self.startup_actions(&ctx);

        egui::Panel::top("menu").show(ui, |ui| self.toolbar(ui));
        egui::Panel::bottom("tasks")
            .resizable(true)
            .default_size(170.0)
            .show(ui, |ui| self.tasks_pane(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            self.tab_bar(ui);
            ui.separator();
            if self.active == 0 || self.active > self.tabs.len() {
                self.active = 0;
                self.inventory(ui);
            } else {
                self.console_tab(ui, self.active - 1);
            }
        });
        self.dialogs(&ctx);
        self.drop_overlay(&ctx);

        // Timers, not every frame: uptimes tick each second, upload speeds 4 times a second.
        if self
            .jobs
            .iter()
            .any(|j| j.state == JobState::Running && j.upload.is_some())
        {
            ctx.request_repaint_after(Duration::from_millis(250));
        } else if self
            .hosts
            .iter()
            .any(|h| h.vms.values().any(|v| v.state == VmState::Running as i32))
        {
            ctx.request_repaint_after(Duration::from_secs(1));
        }
    }

    fn toolbar(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            ui.heading("Parvis");
            ui.separator();
            if ui.button("Add host…").clicked() {
                self.dialog = Some(Dialog::Host(HostDialog {
                    editing: None,
                    name: String::new(),
                    addr: String::new(),
                    token: String::new(),
                    tls: true,
                    stage: HostStage::Edit,
                    error: None,
                }));
            }
            let online = self
                .hosts
                .iter()
                .filter(|h| h.status == HostStatus::Online)
                .count();
            let vms: usize = self.hosts.iter().map(|h| h.vms.len()).sum();
            ui.label(format!(
                "{online} of {} hosts online, {vms} VMs",
                self.hosts.len()
            ));
        });
    }

    fn tab_bar(&mut self, ui: &mut Ui) {
        let mut close = None;
        ui.horizontal_wrapped(|ui| {
            if ui.selectable_label(self.active == 0, "Inventory").clicked() {
                self.active = 0;
            }
            for (i, t) in self.tabs.iter().enumerate() {
                if ui
                    .selectable_label(self.active == i + 1, &t.title)
                    .clicked()
                {
                    self.active = i + 1;
                }
                if ui
                    .small_button("x")
                    .on_hover_text("Close this console")
                    .clicked()
                {
                    close = Some(i);
                }
            }
        });
        if let Some(i) = close {
            self.tabs.remove(i);
            if self.active > self.tabs.len() {
                self.active = self.tabs.len();
            }
        }
    }

    fn inventory(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            let l = ui.label("Search:");
            ui.add(
                egui::TextEdit::singleline(&mut self.search)
                    .hint_text("VM or host name")
                    .desired_width(220.0),
            )
            .labelled_by(l.id);
            ui.separator();
            self.actions(ui);
        });
        ui.separator();

        // Flatten hosts and matching VMs into rows; only the visible rows are laid out.
        enum Row {
            Host(usize),
            Vm(usize, String),
        }
        let q = self.search.trim().to_lowercase();
        let mut rows = Vec::new();
        for (hi, h) in self.hosts.iter().enumerate() {
            let host_match = q.is_empty() || h.cfg.name.to_lowercase().contains(&q);
            let vms: Vec<&Vm> = h
                .vms
                .values()
                .filter(|v| {
                    host_match
                        || v.spec
                            .as_ref()
                            .is_some_and(|s| s.name.to_lowercase().contains(&q))
                        || v.id.starts_with(&q)
                })
                .collect();
            if !host_match && vms.is_empty() {
                continue;
            }
            rows.push(Row::Host(hi));
            if !self.collapsed.contains(&h.id) {
                let mut vms = vms;
                vms.sort_by(|a, b| vm_name(a).cmp(vm_name(b)));
                rows.extend(vms.into_iter().map(|v| Row::Vm(hi, v.id.clone())));
            }
        }
        let row_h = ui.text_style_height(&egui::TextStyle::Body) + 6.0;
        let widths = [260.0, 90.0, 50.0, 90.0, 90.0];
        ui.horizontal(|ui| {
            for (w, t) in widths
                .iter()
                .zip(["Name", "State", "CPUs", "Memory", "Uptime"])
            {
                ui.add_sized([*w, row_h], egui::Label::new(RichText::new(t).strong()));
            }
        });
        let now = now_ms();
        self.host_rects.clear();
        let mut clicked: Option<Selection> = None;
        let mut toggle: Option<HostId> = None;
        let mut open: Option<(HostId, String)> = None;
        let mut rects = Vec::new();
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show_rows(ui, row_h, rows.len(), |ui, range| {
                for row in &rows[range] {
                    match row {
                        Row::Host(hi) => {
                            let h = &self.hosts[*hi];
                            let r = ui.horizontal(|ui| {
                                let arrow = if self.collapsed.contains(&h.id) {
                                    "+"
                                } else {
                                    "-"
                                };
                                if ui.small_button(arrow).clicked() {
                                    toggle = Some(h.id);
                                }
                                let (dot, status) = match &h.status {
                                    HostStatus::Online => {
                                        (Color32::from_rgb(60, 170, 80), "online".to_string())
                                    }
                                    HostStatus::Connecting => {
                                        (Color32::from_rgb(210, 160, 40), "connecting…".to_string())
                                    }
                                    HostStatus::Offline { error, retry_in_s } => (
                                        Color32::from_rgb(220, 60, 60),
                                        format!("offline: {error} (retrying every {retry_in_s} s)"),
                                    ),
                                };
                                status_dot(ui, dot);
                                let sel = self.selection == Some(Selection::Host(h.id));
                                if ui
                                    .selectable_label(sel, RichText::new(&h.cfg.name).strong())
                                    .clicked()
                                {
                                    clicked = Some(Selection::Host(h.id));
                                }
                                ui.label(RichText::new(status).small());
                                if let Some(i) = &h.info {
                                    ui.label(
                                        RichText::new(format!(
                                            "{} CPUs, {} free of {}",
                                            i.logical_cpus,
                                            human(i.memory_available_bytes),
                                            human(i.memory_bytes)
                                        ))
                                        .small()
                                        .weak(),
                                    );
                                }
                            });
                            rects.push((h.id, r.response.rect));
                        }
                        Row::Vm(hi, id) => {
                            let h = &self.hosts[*hi];
                            let Some(v) = h.vms.get(id) else { continue };
                            let spec = v.spec.clone().unwrap_or_default();
                            let r = ui.horizontal(|ui| {
                                ui.add_space(24.0);
                                let sel = self.selection == Some(Selection::Vm(h.id, id.clone()));
                                let name = ui.add_sized(
                                    [widths[0] - 24.0, row_h],
                                    egui::Button::selectable(sel, &spec.name),
                                );
                                if name.clicked() {
                                    clicked = Some(Selection::Vm(h.id, id.clone()));
                                }
                                if name.double_clicked() {
                                    open = Some((h.id, id.clone()));
                                }
                                ui.add_sized(
                                    [widths[1], row_h],
                                    egui::Label::new(
                                        RichText::new(state_word(v.state))
                                            .color(state_color(v.state)),
                                    ),
                                );
                                ui.add_sized(
                                    [widths[2], row_h],
                                    egui::Label::new(spec.cpus.to_string()),
                                );
                                ui.add_sized(
                                    [widths[3], row_h],
                                    egui::Label::new(human(spec.memory_bytes)),
                                );
                                let up = if v.state == VmState::Running as i32
                                    || v.state == VmState::Paused as i32
                                {
                                    duration(((now - v.state_changed_ms).max(0) / 1000) as u64)
                                } else {
                                    "-".into()
                                };
                                ui.add_sized([widths[4], row_h], egui::Label::new(up));
                            });
                            rects.push((h.id, r.response.rect));
                        }
                    }
                }
            });
        self.host_rects = rects;
        if let Some(id) = toggle
            && !self.collapsed.remove(&id)
        {
            self.collapsed.insert(id);
        }
        if let Some(s) = clicked {
            self.selection = Some(s);
        }
        if let Some((h, id)) = open {
            self.open_console(h, &id);
        }
        if self.hosts.is_empty() {
            ui.label("No hosts yet: \"Add host…\" connects to a parvis-agent (it prints its address, certificate fingerprint and token when it starts).");
        }
    }

    /// Buttons for the selection.
    fn actions(&mut self, ui: &mut Ui) {
        match self.selection.clone() {
            None => {
                ui.label(RichText::new("Select a host or a VM").weak());
            }
            Some(Selection::Host(id)) => {
                let Some(h) = self.host(id) else { return };
                let online = h.status == HostStatus::Online;
                if ui
                    .add_enabled(online, egui::Button::new("New VM…"))
                    .clicked()
                {
                    let boot = h
                        .info
                        .as_ref()
                        .and_then(|i| i.boot_images.first())
                        .map(|b| b.name.clone())
                        .unwrap_or_default();
                    self.dialog = Some(Dialog::Create(CreateDialog {
                        host: id,
                        name: String::new(),
                        cpus: 1,
                        memory_mib: 512,
                        boot_image: boot,
                        disk: None,
                        cmdline: String::new(),
                        width: 1024,
                        height: 768,
                    }));
                }
                if ui
                    .add_enabled(online, egui::Button::new("Import disk…"))
                    .clicked()
                {
                    let tx = self.backend_pick_sender(id);
                    self.backend.pick_image(tx);
                }
                if ui.button("Edit host…").clicked() {
                    let h = self
                        .host(id)
                        .map(|h| h.cfg.clone())
                        .unwrap_or_else(|| HostConfig {
                            name: String::new(),
                            addr: String::new(),
                            token: String::new(),
                            fingerprint: None,
                        });
                    self.dialog = Some(Dialog::Host(HostDialog {
                        editing: Some(id),
                        name: h.name,
                        addr: h.addr,
                        token: h.token,
                        tls: h.fingerprint.is_some(),
                        stage: HostStage::Edit,
                        error: None,
                    }));
                }
                if ui.button("Remove host…").clicked() {
                    self.dialog = Some(Dialog::RemoveHost(id));
                }
            }
            Some(Selection::Vm(hid, vid)) => {
                let Some(v) = self.host(hid).and_then(|h| h.vms.get(&vid)) else {
                    self.selection = Some(Selection::Host(hid));
                    return;
                };
                let online = self
                    .host(hid)
                    .is_some_and(|h| h.status == HostStatus::Online);
                let st = VmState::try_from(v.state).unwrap_or(VmState::Unspecified);
                use VmState::*;
                let buttons = [
                    ("Start", VmAction::Start, matches!(st, Off | Crashed)),
                    ("Shut down", VmAction::Shutdown, st == Running),
                    (
                        "Force off",
                        VmAction::ForceOff,
                        matches!(st, Starting | Running | Paused | Stopping),
                    ),
                    ("Pause", VmAction::Pause, st == Running),
                    ("Resume", VmAction::Resume, st == Paused),
                    ("Reset", VmAction::Reset, matches!(st, Running | Paused)),
                ];
                let name = v.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                if ui
                    .button("Open console")
                    .on_hover_text("Open the VM's screen and serial console")
                    .clicked()
                {
                    self.open_console(hid, &vid);
                }
                for (label, action, ok) in buttons {
                    if ui
                        .add_enabled(online && ok, egui::Button::new(label))
                        .clicked()
                    {
                        self.vm_action(hid, &vid, action);
                    }
                }
                if ui
                    .add_enabled(
                        online && matches!(st, Off | Crashed),
                        egui::Button::new("Delete…"),
                    )
                    .clicked()
                {
                    self.dialog = Some(Dialog::DeleteVm {
                        host: hid,
                        vm_id: vid.clone(),
                        name,
                    });
                }
            }
        }
    }

    fn backend_pick_sender(&self, host: HostId) -> impl FnOnce(Option<PathBuf>) + Send + 'static {
        let picked = self.picked.clone();
        move |p| {
            *picked.lock().unwrap_or_else(|e| e.into_inner()) = Some((host, p));
        }
    }

    fn console_tab(&mut self, ui: &mut Ui, i: usize) {
        let tab = &mut self.tabs[i];
        let vm = self
            .hosts
            .iter()
            .find(|h| h.id == tab.host)
            .and_then(|h| h.vms.get(&tab.vm_id))
            .cloned();
        let mut save_png: Option<bool> = None;
        let mut type_clipboard = false;
        ui.horizontal_wrapped(|ui| {
            ui.selectable_value(&mut tab.pane, ConsolePane::Screen, "Screen");
            ui.selectable_value(&mut tab.pane, ConsolePane::Serial, "Serial console");
            ui.separator();
            if let Some(v) = &vm {
                ui.colored_label(state_color(v.state), state_word(v.state));
            }
            if tab.pane == ConsolePane::Screen {
                ui.separator();
                ui.selectable_value(&mut tab.screen.scale, Scale::Fit, "Fit to window");
                ui.selectable_value(&mut tab.screen.scale, Scale::OneToOne, "1:1");
                ui.separator();
                ui.menu_button("Send keys", |ui| {
                    use crate::keymap::*;
                    let send = |keys: Vec<(u32, bool)>| tab.handle.keys(&keys);
                    if ui.button("Ctrl+Alt+Del").clicked() {
                        send(chord(&[LEFT_CTRL, LEFT_ALT, DELETE]));
                    }
                    if ui.button("Ctrl+Alt+Backspace").clicked() {
                        send(chord(&[LEFT_CTRL, LEFT_ALT, BACKSPACE]));
                    }
                    for n in 1..=12u8 {
                        if ui.button(format!("Ctrl+Alt+F{n}")).clicked()
                            && let Some(f) = function_key(n)
                        {
                            send(chord(&[LEFT_CTRL, LEFT_ALT, f]));
                        }
                    }
                    if ui.button("Alt+SysRq").clicked() {
                        send(chord(&[LEFT_ALT, SYSRQ]));
                    }
                    if ui.button("Print Screen").clicked() {
                        send(chord(&[0xe037]));
                    }
                });
                if ui.button("Type clipboard text").clicked() {
                    type_clipboard = true;
                }
                if ui
                    .add_enabled(tab.screen.size()[0] > 0, egui::Button::new("Screenshot"))
                    .clicked()
                {
                    save_png = Some(false);
                }
                if ui
                    .add_enabled(
                        tab.screen.size()[0] > 0,
                        egui::Button::new("Screenshot as…"),
                    )
                    .clicked()
                {
                    save_png = Some(true);
                }
                ui.separator();
                if tab.screen.grabbed {
                    ui.colored_label(
                        Color32::from_rgb(230, 160, 0),
                        "Keyboard captured: press Ctrl+Alt+Left to release",
                    );
                    if ui.button("Release").clicked() {
                        tab.screen.release(&tab.handle);
                    }
                } else {
                    ui.label(RichText::new("Click the screen to capture the keyboard").weak());
                }
            }
        });
        let (screen_error, input_error, note, serial_error) = {
            let mut sh = tab.handle.shared.lock().unwrap_or_else(|e| e.into_inner());
            (
                sh.screen_error.clone(),
                sh.input_error.clone(),
                sh.note.take(),
                sh.serial_error.clone(),
            )
        };
        if let Some(n) = note {
            self.log.push_front(format!("{}: {n}", tab.title));
        }
        match tab.pane {
            ConsolePane::Screen => {
                if let Some(e) = &input_error {
                    ui.colored_label(Color32::from_rgb(210, 160, 40), e.as_str());
                }
                if let Some(e) = &screen_error {
                    ui.colored_label(Color32::from_rgb(210, 160, 40), e.as_str());
                }
                tab.screen.show(ui, &tab.handle);
            }
            ConsolePane::Serial => {
                if let Some(e) = &serial_error {
                    ui.colored_label(Color32::from_rgb(210, 160, 40), e.as_str());
                }
                let text = {
                    let sh = tab.handle.shared.lock().unwrap_or_else(|e| e.into_inner());
                    clean_serial(&sh.serial)
                };
                let bottom = 32.0;
                egui::ScrollArea::vertical()
                    .max_height((ui.available_height() - bottom).max(50.0))
                    .stick_to_bottom(true)
                    .auto_shrink([false, false])
                    .show(ui, |ui| {
                        ui.add(egui::Label::new(RichText::new(text).monospace()).wrap());
                    });
                ui.horizontal(|ui| {
                    let l = ui.label("Send:");
                    let r = ui.add(
                        egui::TextEdit::singleline(&mut tab.serial_line)
                            .desired_width(400.0)
                            .font(egui::TextStyle::Monospace),
                    );
                    r.clone().labelled_by(l.id);
                    let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                    if ui.button("Send line").clicked() || enter {
                        let mut data = std::mem::take(&mut tab.serial_line).into_bytes();
                        data.push(b'\n');
                        tab.handle.serial_send(data);
                        r.request_focus();
                    }
                });
            }
        }
        if type_clipboard {
            self.backend.type_clipboard(&self.tabs[i].handle);
        }
        if let Some(ask) = save_png {
            let tab = &self.tabs[i];
            let image = tab.screen.image().clone();
            let stamp = now_ms() / 1000;
            let vm_name: String = tab
                .title
                .split(" on ")
                .next()
                .unwrap_or("vm")
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let file = format!("Screenshot_{vm_name}_{stamp}.png");
            let host = tab.host;
            let job = self.new_job(host, format!("Screenshot of {}", self.tabs[i].title));
            if ask {
                self.backend.save_png_as(job, file, image);
            } else {
                let dir = dirs::picture_dir()
                    .or_else(dirs::home_dir)
                    .unwrap_or_else(|| PathBuf::from("."))
                    .join("Parvis");
                self.backend.save_png(job, dir.join(file), image);
            }
        }
    }

    fn tasks_pane(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            ui.strong("Tasks and events");
            if ui.small_button("Clear finished").clicked() {
                self.jobs.retain(|j| j.state == JobState::Running);
                self.log.clear();
            }
        });
        let mut control: Option<(JobId, UploadControl)> = None;
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                for j in &self.jobs {
                    ui.horizontal(|ui| {
                        let (icon, color) = match &j.state {
                            JobState::Running => ("running", Color32::from_rgb(210, 160, 40)),
                            JobState::Succeeded(_) => ("done", Color32::from_rgb(60, 170, 80)),
                            JobState::Failed(_) => ("failed", Color32::from_rgb(220, 60, 60)),
                        };
                        ui.colored_label(color, icon);
                        ui.label(format!("{}: {}", j.host, j.title));
                        if let Some((p, _)) = &j.upload
                            && j.state == JobState::Running
                        {
                            let (phase, done, total) = p.get();
                            let frac = if total > 0 {
                                done as f32 / total as f32
                            } else {
                                0.0
                            };
                            ui.add(
                                egui::ProgressBar::new(frac)
                                    .desired_width(200.0)
                                    .text(format!("{} {:.0}%", phase.label(), frac * 100.0)),
                            );
                            ui.label(format!("{} of {}", human(done), human(total)));
                            if matches!(phase, Phase::Sending | Phase::Hashing)
                                && let Some((speed, eta)) = p.speed_eta()
                            {
                                ui.label(format!(
                                    "{}/s, {} left",
                                    human(speed as u64),
                                    duration(eta as u64)
                                ));
                            }
                            if phase == Phase::Paused {
                                if ui.button("Resume").clicked() {
                                    control = Some((j.id, UploadControl::Run));
                                }
                            } else if matches!(phase, Phase::Sending | Phase::Retrying)
                                && ui.button("Pause").clicked()
                            {
                                control = Some((j.id, UploadControl::Pause));
                            }
                            if !matches!(phase, Phase::Verifying | Phase::Done)
                                && ui.button("Cancel").clicked()
                            {
                                control = Some((j.id, UploadControl::Cancel));
                            }
                        }
                        match &j.state {
                            JobState::Succeeded(t) => {
                                ui.label(RichText::new(t).weak());
                            }
                            JobState::Failed(e) => {
                                ui.colored_label(Color32::from_rgb(220, 60, 60), e);
                            }
                            JobState::Running => {
                                ui.label(
                                    RichText::new(duration(j.started.elapsed().as_secs())).weak(),
                                );
                            }
                        }
                    });
                }
                for h in &self.hosts {
                    for t in h
                        .tasks
                        .values()
                        .filter(|t| t.state == TaskState::Running as i32)
                    {
                        ui.horizontal(|ui| {
                            status_dot(ui, Color32::from_rgb(210, 160, 40));
                            ui.label(format!("{}: {}", h.cfg.name, t.description));
                            if t.total > 0 {
                                ui.add(
                                    egui::ProgressBar::new(t.done as f32 / t.total as f32)
                                        .desired_width(200.0)
                                        .show_percentage(),
                                );
                            }
                        });
                    }
                }
                ui.separator();
                for l in self.log.iter().take(200) {
                    ui.label(RichText::new(l).small());
                }
            });
        if let Some((job, c)) = control {
            self.control_upload(job, c);
        }
    }

    fn handle_drops(&mut self, ctx: &egui::Context) {
        let picked = self.picked.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((host, path)) = picked {
            match path {
                Some(p) => self.start_upload(host, p),
                None => self.note(
                    "no file chosen (if no dialog appeared, this desktop has no file dialog service: drag the .vhdx onto the host instead)"
                        .into(),
                ),
            }
        }
        let (dropped, pos) = ctx.input(|i| {
            (
                i.raw
                    .dropped_files
                    .iter()
                    .map(|f| f.path().to_path_buf())
                    .collect::<Vec<_>>(),
                i.pointer.latest_pos(),
            )
        });
        if dropped.is_empty() {
            return;
        }
        let target = pos
            .and_then(|p| {
                self.host_rects
                    .iter()
                    .find(|(_, r)| r.contains(p))
                    .map(|(h, _)| *h)
            })
            .or(match &self.selection {
                Some(Selection::Host(h) | Selection::Vm(h, _)) => Some(*h),
                None => None,
            })
            .or_else(|| (self.hosts.len() == 1).then(|| self.hosts[0].id));
        let Some(host) = target else {
            self.note(
                "drop the disk image onto a host in the inventory (several hosts are connected)"
                    .into(),
            );
            return;
        };
        for p in dropped {
            self.start_upload(host, p);
        }
    }

    fn drop_overlay(&self, ctx: &egui::Context) {
        let hovered = ctx.input(|i| i.raw.hovered_files.clone());
        if hovered.is_empty() {
            return;
        }
        let pos = ctx.input(|i| i.pointer.latest_pos());
        let target = pos
            .and_then(|p| {
                self.host_rects
                    .iter()
                    .find(|(_, r)| r.contains(p))
                    .map(|(h, _)| *h)
            })
            .or(match &self.selection {
                Some(Selection::Host(h) | Selection::Vm(h, _)) => Some(*h),
                None => None,
            })
            .and_then(|h| self.host(h))
            .map_or("a host (point at one in the inventory)".to_string(), |h| {
                format!("host {}", h.cfg.name)
            });
        let names: Vec<String> = hovered
            .iter()
            .filter_map(|f| {
                f.path
                    .as_ref()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .collect();
        let painter = ctx.layer_painter(egui::LayerId::new(
            egui::Order::Foreground,
            egui::Id::unique("parvis-drop-overlay"),
        ));
        let rect = ctx.content_rect();
        painter.rect_filled(rect, 0.0, Color32::from_black_alpha(170));
        painter.text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            format!("Drop {} to import onto {target}", names.join(", ")),
            egui::FontId::proportional(20.0),
            Color32::WHITE,
        );
    }

    fn dialogs(&mut self, ctx: &egui::Context) {
        let Some(mut dialog) = self.dialog.take() else {
            return;
        };
        let mut keep = true;
        match &mut dialog {
            Dialog::Host(d) => {
                let title = if d.editing.is_some() {
                    "Edit host"
                } else {
                    "Add host"
                };
                egui::Window::new(title).collapsible(false).resizable(false).show(ctx, |ui| {
                    let editable = d.stage == HostStage::Edit;
                    egui::Grid::new("host-form").num_columns(2).show(ui, |ui| {
                        for (label, value, hint, password) in [
                            ("Host name", &mut d.name, "lab-1", false),
                            ("Address", &mut d.addr, "host:7443", false),
                            ("Token", &mut d.token, "pvs_…", true),
                        ] {
                            let l = ui.label(label);
                            ui.add_enabled(
                                editable,
                                egui::TextEdit::singleline(value).hint_text(hint).password(password),
                            )
                            .labelled_by(l.id);
                            ui.end_row();
                        }
                    });
                    ui.add_enabled(editable, egui::Checkbox::new(&mut d.tls, "TLS (required unless the agent is on this computer)"));
                    if let Some(e) = &d.error {
                        ui.colored_label(Color32::from_rgb(220, 60, 60), e);
                    }
                    match d.stage.clone() {
                        HostStage::Edit => {
                            ui.horizontal(|ui| {
                                if ui.button("Connect to host").clicked() {
                                    let addr = d.addr.trim().to_string();
                                    if !addr.contains(':') {
                                        d.error = Some("the address is HOST:PORT, e.g. 192.168.1.10:7443".into());
                                    } else if d.token.trim().is_empty() {
                                        d.error = Some("paste the token parvis-agent printed when it started".into());
                                    } else if !d.tls && !is_loopback(&addr) {
                                        d.error = Some("plain connections are only for an agent on this computer; turn TLS on".into());
                                    } else if d.tls {
                                        d.error = None;
                                        d.stage = HostStage::Fetching;
                                        self.backend.fetch_fingerprint(addr);
                                    } else {
                                        d.stage = HostStage::Confirm(String::new());
                                    }
                                }
                                if ui.button("Cancel").clicked() {
                                    keep = false;
                                }
                            });
                        }
                        HostStage::Fetching => {
                            ui.horizontal(|ui| {
                                ui.spinner();
                                ui.label("Contacting the agent…");
                                if ui.button("Cancel").clicked() {
                                    d.stage = HostStage::Edit;
                                }
                            });
                        }
                        HostStage::Confirm(fp) => {
                            if fp.is_empty() {
                                ui.label("Plain connection to an agent on this computer.");
                            } else {
                                ui.label("The agent's certificate fingerprint is:");
                                ui.label(RichText::new(&fp).monospace());
                                ui.label("Check that it is the one parvis-agent printed when it started (\"TLS certificate SHA-256 fingerprint\"). It is pinned: a different certificate will be refused.");
                            }
                            ui.horizontal(|ui| {
                                if ui.button("Trust and save").clicked() {
                                    d.stage = HostStage::Edit;
                                    let fp = (!fp.is_empty()).then(|| fp.clone());
                                    self.dialog = Some(Dialog::Host(HostDialog {
                                        editing: d.editing,
                                        name: std::mem::take(&mut d.name),
                                        addr: std::mem::take(&mut d.addr),
                                        token: std::mem::take(&mut d.token),
                                        tls: d.tls,
                                        stage: HostStage::Edit,
                                        error: None,
                                    }));
                                    self.finish_host_dialog(fp);
                                    keep = false;
                                }
                                if ui.button("Back").clicked() {
                                    d.stage = HostStage::Edit;
                                }
                            });
                        }
                    }
                });
            }
            Dialog::Create(d) => {
                let host = self.host(d.host);
                let images: Vec<String> = host
                    .and_then(|h| h.info.as_ref())
                    .map(|i| i.boot_images.iter().map(|b| b.name.clone()).collect())
                    .unwrap_or_default();
                let disks: Vec<(String, String)> = host
                    .map(|h| {
                        h.disks
                            .values()
                            .map(|d| (d.id.clone(), d.name.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let host_name = host.map(|h| h.cfg.name.clone()).unwrap_or_default();
                egui::Window::new(format!("New VM on {host_name}"))
                    .collapsible(false)
                    .show(ctx, |ui| {
                        egui::Grid::new("vm-form").num_columns(2).show(ui, |ui| {
                            let l = ui.label("VM name");
                            ui.text_edit_singleline(&mut d.name).labelled_by(l.id);
                            ui.end_row();
                            let l = ui.label("CPUs");
                            ui.add(egui::DragValue::new(&mut d.cpus).range(1..=64))
                                .labelled_by(l.id);
                            ui.end_row();
                            let l = ui.label("Memory (MiB)");
                            ui.add(
                                egui::DragValue::new(&mut d.memory_mib)
                                    .range(64..=1 << 20)
                                    .speed(64),
                            )
                            .labelled_by(l.id);
                            ui.end_row();
                            ui.label("Boot image");
                            egui::ComboBox::from_id_salt("boot")
                                .selected_text(d.boot_image.clone())
                                .show_ui(ui, |ui| {
                                    for i in &images {
                                        ui.selectable_value(&mut d.boot_image, i.clone(), i);
                                    }
                                });
                            ui.end_row();
                            ui.label("Disk");
                            let shown = d
                                .disk
                                .as_ref()
                                .and_then(|id| disks.iter().find(|(i, _)| i == id))
                                .map_or("none".to_string(), |(_, n)| n.clone());
                            egui::ComboBox::from_id_salt("disk")
                                .selected_text(shown)
                                .show_ui(ui, |ui| {
                                    ui.selectable_value(&mut d.disk, None, "none");
                                    for (id, n) in &disks {
                                        ui.selectable_value(&mut d.disk, Some(id.clone()), n);
                                    }
                                });
                            ui.end_row();
                            let l = ui.label("Kernel command line");
                            ui.add(
                                egui::TextEdit::singleline(&mut d.cmdline)
                                    .hint_text("the boot image's default"),
                            )
                            .labelled_by(l.id);
                            ui.end_row();
                            let l = ui.label("Screen");
                            ui.horizontal(|ui| {
                                ui.add(egui::DragValue::new(&mut d.width).range(640..=3840))
                                    .labelled_by(l.id);
                                ui.label("x");
                                ui.add(egui::DragValue::new(&mut d.height).range(480..=2160));
                            });
                            ui.end_row();
                        });
                        ui.horizontal(|ui| {
                            if ui
                                .add_enabled(!d.name.trim().is_empty(), egui::Button::new("Create"))
                                .clicked()
                            {
                                let spec = VmSpec {
                                    name: d.name.trim().to_string(),
                                    cpus: d.cpus,
                                    memory_bytes: u64::from(d.memory_mib) << 20,
                                    disks: d
                                        .disk
                                        .iter()
                                        .map(|id| DiskAttachment {
                                            disk_id: id.clone(),
                                            read_only: false,
                                        })
                                        .collect(),
                                    boot_image: d.boot_image.clone(),
                                    cmdline: d.cmdline.trim().to_string(),
                                    display_width: d.width,
                                    display_height: d.height,
                                    autostart: false,
                                };
                                let job =
                                    self.new_job(d.host, format!("Create VM '{}'", spec.name));
                                self.backend.create_vm(job, d.host, spec);
                                keep = false;
                            }
                            if ui.button("Cancel").clicked() {
                                keep = false;
                            }
                        });
                    });
            }
            Dialog::DeleteVm { host, vm_id, name } => {
                egui::Window::new("Delete VM").collapsible(false).resizable(false).show(ctx, |ui| {
                    ui.label(format!("Delete VM '{name}'? Its configuration is removed; disks stay in the host's library."));
                    ui.horizontal(|ui| {
                        if ui.button("Delete").clicked() {
                            let (h, v) = (*host, vm_id.clone());
                            self.vm_action(h, &v, VmAction::Delete);
                            keep = false;
                        }
                        if ui.button("Cancel").clicked() {
                            keep = false;
                        }
                    });
                });
            }
            Dialog::RemoveHost(id) => {
                let name = self
                    .host(*id)
                    .map(|h| h.cfg.name.clone())
                    .unwrap_or_default();
                egui::Window::new("Remove host")
                    .collapsible(false)
                    .resizable(false)
                    .show(ctx, |ui| {
                        ui.label(format!(
                            "Remove host '{name}' from this console? Its VMs keep running."
                        ));
                        ui.horizontal(|ui| {
                            if ui.button("Remove").clicked() {
                                let id = *id;
                                self.remove_host(id);
                                keep = false;
                            }
                            if ui.button("Cancel").clicked() {
                                keep = false;
                            }
                        });
                    });
            }
            Dialog::Uploaded { host, disk } => {
                let host_name = self
                    .host(*host)
                    .map(|h| h.cfg.name.clone())
                    .unwrap_or_default();
                egui::Window::new("Import finished")
                    .collapsible(false)
                    .resizable(false)
                    .show(ctx, |ui| {
                        ui.label(format!(
                            "Disk '{}' ({}) is ready on {host_name}. Create a VM from it?",
                            disk.name,
                            human(disk.virtual_size)
                        ));
                        ui.horizontal(|ui| {
                            if ui.button("Create VM…").clicked() {
                                let boot = self
                                    .host(*host)
                                    .and_then(|h| h.info.as_ref())
                                    .and_then(|i| i.boot_images.first())
                                    .map(|b| b.name.clone())
                                    .unwrap_or_default();
                                let name = Path::new(&disk.name).file_stem().map_or_else(
                                    || disk.name.clone(),
                                    |s| s.to_string_lossy().into_owned(),
                                );
                                self.dialog = Some(Dialog::Create(CreateDialog {
                                    host: *host,
                                    name,
                                    cpus: 1,
                                    memory_mib: 512,
                                    boot_image: boot,
                                    disk: Some(disk.id.clone()),
                                    cmdline: String::new(),
                                    width: 1024,
                                    height: 768,
                                }));
                                keep = false;
                            }
                            if ui.button("Not now").clicked() {
                                keep = false;
                            }
                        });
                    });
            }
        }
        if keep && self.dialog.is_none() {
            self.dialog = Some(dialog);
        }
    }
}

fn vm_name(v: &Vm) -> &str {
    v.spec.as_ref().map_or("", |s| s.name.as_str())
}

/// A small filled circle in `color` (host and task status).
fn status_dot(ui: &mut Ui, color: Color32) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
    ui.painter().circle_filled(rect.center(), 4.5, color);
}

/// Serial output for display: UTF-8 (lossy), without terminal escape sequences.
fn clean_serial(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if n.is_ascii_alphabetic() || n == '~' {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

impl eframe::App for ConsoleApp {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_for_people() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(duration(3723), "1:02:03");
        assert_eq!(duration(2 * 86_400 + 3600), "2 d 01:00");
        assert_eq!(clean_serial(b"a\x1b[1;31mred\x1b[0m\r\nb"), "ared\nb");
        assert!(is_loopback("127.0.0.1:7443"));
        assert!(is_loopback("[::1]:7443"));
        assert!(!is_loopback("10.0.0.1:7443"));
    }
}
