//! [`UiCommand`]: what a panel asks for while it draws. Panels never call the backend or
//! change hosts, jobs or tabs themselves; they push a command, and [`ConsoleApp`] runs the
//! queue once the frame is drawn (egui's anchor apps do the same), then asks for one more
//! frame to show the result. None of the commands blocks: network and file work goes to
//! the backend's runtime.

use std::path::PathBuf;

use proto::v1::VmSpec;

use super::dialogs::Dialog;
use super::words::now_ms;
use super::{ConsoleApp, ConsoleTab};
use crate::backend::{DiskAction, HostId, JobId, JobNames, VmAction, VmDiskChange};
use crate::config::HostConfig;
use crate::upload::UploadControl;

/// Which console tab a command is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TabRef {
    pub host: HostId,
    pub vm_id: String,
}

impl TabRef {
    pub fn of(tab: &ConsoleTab) -> Self {
        TabRef {
            host: tab.host,
            vm_id: tab.vm_id.clone(),
        }
    }
}

/// Something to do once the frame is drawn.
#[derive(Debug)]
pub enum UiCommand {
    /// Start, stop, … or delete a VM (a job).
    VmAction {
        host: HostId,
        vm_id: String,
        action: VmAction,
    },
    /// Create a VM (a job).
    CreateVm { host: HostId, spec: VmSpec },
    /// Change a VM's settings (a job the settings dialog waits for).
    UpdateVm {
        host: HostId,
        vm_id: String,
        spec: VmSpec,
    },
    /// Add a disk to a VM or take one away (a job).
    VmDisk {
        host: HostId,
        vm_id: String,
        change: VmDiskChange,
    },
    /// Delete, convert or resize a disk in a host's library (a job).
    DiskAction {
        host: HostId,
        disk_id: String,
        action: DiskAction,
    },
    /// Open (or bring to front) a VM's console.
    OpenConsole { host: HostId, vm_id: String },
    /// Close a console tab; its streams stop.
    CloseConsole(TabRef),
    /// Keys for a console: `(scan code, pressed)` in order.
    SendKeys { tab: TabRef, keys: Vec<(u32, bool)> },
    /// Bytes for a console's serial port.
    SendSerial { tab: TabRef, data: Vec<u8> },
    /// Type the clipboard's text into a console.
    TypeClipboard(TabRef),
    /// Save a console's screen as a PNG (a job): into the Pictures folder, or where the
    /// user says (`ask`).
    Screenshot { tab: TabRef, ask: bool },
    /// Ask for a disk image to import into a host (a native dialog, off the UI thread).
    PickImage { host: HostId },
    /// Import a disk image into a host (a job).
    StartUpload { host: HostId, path: PathBuf },
    /// Pause, resume or cancel an upload job.
    ControlUpload { job: JobId, control: UploadControl },
    /// Learn an agent's certificate fingerprint; the host dialog waits for the answer.
    FetchFingerprint { addr: String },
    /// Save the host dialog's host: `editing` with new settings, or a new host.
    SaveHost {
        editing: Option<HostId>,
        cfg: HostConfig,
    },
    /// Forget a host (its VMs keep running).
    RemoveHost { host: HostId },
    /// Drop ended jobs and the event log.
    ClearFinished,
    /// A line for the event log and the program's log.
    Note(String),
    /// A console's message ("typed 12 characters") for the event log only.
    ConsoleNote(String),
}

impl ConsoleApp {
    /// Run what the panels queued this frame; then one more frame shows the result.
    pub(super) fn run_commands(&mut self, ctx: &egui::Context) {
        if self.commands.is_empty() {
            return;
        }
        for c in std::mem::take(&mut self.commands) {
            self.execute(c);
        }
        ctx.request_repaint();
    }

    /// Run one command now (what the panels' commands do after the frame).
    pub fn execute(&mut self, cmd: UiCommand) {
        match cmd {
            UiCommand::VmAction {
                host,
                vm_id,
                action,
            } => self.vm_action(host, &vm_id, action),
            UiCommand::CreateVm { host, spec } => {
                let job = self
                    .state
                    .new_job(host, format!("Create VM '{}'", spec.name));
                let host_name = self.state.host_name(host);
                self.backend.create_vm(job, host, spec, host_name);
            }
            UiCommand::UpdateVm { host, vm_id, spec } => {
                let names = self.names(host, &self.state.vm_name(host, &vm_id));
                let job = self.state.new_job(
                    host,
                    format!("Change the settings of VM '{}'", names.object),
                );
                if let Some(Dialog::Settings(d)) = &mut self.dialog
                    && d.host == host
                    && d.vm_id == vm_id
                {
                    d.pending = Some(job);
                }
                self.backend.update_vm(job, host, vm_id, spec, names);
            }
            UiCommand::VmDisk {
                host,
                vm_id,
                change,
            } => {
                let names = self.names(host, &self.state.vm_name(host, &vm_id));
                let disk_id = match &change {
                    VmDiskChange::Attach(a) => a.disk_id.clone(),
                    VmDiskChange::Detach(id) => id.clone(),
                };
                let disk_name = self
                    .state
                    .host(host)
                    .and_then(|h| h.disks.get(&disk_id))
                    .map_or_else(|| disk_id.clone(), |d| d.name.clone());
                let title = match &change {
                    VmDiskChange::Attach(_) => {
                        format!("Add disk '{disk_name}' to VM '{}'", names.object)
                    }
                    VmDiskChange::Detach(_) => {
                        format!("Remove disk '{disk_name}' from VM '{}'", names.object)
                    }
                };
                let job = self.state.new_job(host, title);
                self.backend
                    .vm_disk(job, host, vm_id, change, disk_name, names);
            }
            UiCommand::DiskAction {
                host,
                disk_id,
                action,
            } => {
                let disk_name = self
                    .state
                    .host(host)
                    .and_then(|h| h.disks.get(&disk_id))
                    .map_or_else(|| disk_id.clone(), |d| d.name.clone());
                let title = match &action {
                    DiskAction::Delete => format!("Delete disk '{disk_name}'"),
                    DiskAction::Convert { format, .. } => format!(
                        "Convert disk '{disk_name}' to {}",
                        format.as_str_name().trim_start_matches("DISK_FORMAT_")
                    ),
                    DiskAction::Resize { new_size, .. } => format!(
                        "Resize disk '{disk_name}' to {}",
                        super::words::human(*new_size)
                    ),
                };
                let names = self.names(host, &disk_name);
                let job = self.state.new_job(host, title);
                self.backend.disk_action(job, host, disk_id, action, names);
            }
            UiCommand::OpenConsole { host, vm_id } => self.open_console(host, &vm_id),
            UiCommand::CloseConsole(tab) => {
                if let Some(i) = self.tab_index(&tab) {
                    self.tabs.remove(i);
                    if self.active > self.tabs.len() {
                        self.active = self.tabs.len();
                    }
                }
            }
            UiCommand::SendKeys { tab, keys } => {
                if let Some(i) = self.tab_index(&tab) {
                    self.tabs[i].handle.keys(&keys);
                }
            }
            UiCommand::SendSerial { tab, data } => {
                if let Some(i) = self.tab_index(&tab) {
                    self.tabs[i].handle.serial_send(data);
                }
            }
            UiCommand::TypeClipboard(tab) => {
                if let Some(i) = self.tab_index(&tab) {
                    self.backend.type_clipboard(&self.tabs[i].handle);
                }
            }
            UiCommand::Screenshot { tab, ask } => self.screenshot(&tab, ask),
            UiCommand::PickImage { host } => {
                let picked = self.picked.clone();
                self.backend.pick_image(move |p| {
                    *picked.lock().unwrap_or_else(|e| e.into_inner()) = Some((host, p));
                });
            }
            UiCommand::StartUpload { host, path } => self.start_upload(host, path),
            UiCommand::ControlUpload { job, control } => self.control_upload(job, control),
            UiCommand::FetchFingerprint { addr } => self.backend.fetch_fingerprint(addr),
            UiCommand::SaveHost { editing, cfg } => self.save_host(editing, cfg),
            UiCommand::RemoveHost { host } => self.remove_host(host),
            UiCommand::ClearFinished => self.state.clear_finished(),
            UiCommand::Note(line) => self.state.note(line),
            UiCommand::ConsoleNote(line) => self.state.log.push_front(line),
        }
    }

    /// Names for a job's sentences about `object` on `host`.
    pub(super) fn names(&self, host: HostId, object: &str) -> JobNames {
        let h = self.state.host(host);
        JobNames {
            object: object.to_string(),
            host: self.state.host_name(host),
            cannot_run: h.and_then(super::state::Host::cannot_run),
        }
    }

    fn tab_index(&self, tab: &TabRef) -> Option<usize> {
        self.tabs.iter().position(|t| t.is(tab.host, &tab.vm_id))
    }

    /// Save a console's screen as `Screenshot_<vm>_<time>.png`, off the UI thread.
    fn screenshot(&mut self, tab: &TabRef, ask: bool) {
        let Some(i) = self.tab_index(tab) else {
            return;
        };
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
        let title = format!("Screenshot of {}", tab.title);
        let job = self.state.new_job(host, title);
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

#[cfg(test)]
mod tests {
    use proto::v1::{Vm, VmSpec, VmState};

    use super::*;
    use crate::app::JobState;

    fn host(name: &str) -> HostConfig {
        HostConfig {
            name: name.into(),
            addr: "10.0.0.1:7443".into(),
            token: "pvs_x".into(),
            fingerprint: None,
        }
    }

    fn vm(id: &str, name: &str) -> Vm {
        Vm {
            id: id.into(),
            spec: Some(VmSpec {
                name: name.into(),
                ..Default::default()
            }),
            state: VmState::Off as i32,
            ..Default::default()
        }
    }

    #[test]
    fn commands_change_the_app_only_when_run() {
        let ctx = egui::Context::default();
        let mut app = ConsoleApp::new(&ctx, None).unwrap();
        let h = app.add_static_host(host("bench"), vec![vm("a", "alpha")]);
        app.commands.push(UiCommand::OpenConsole {
            host: h,
            vm_id: "a".into(),
        });
        app.commands.push(UiCommand::VmAction {
            host: h,
            vm_id: "a".into(),
            action: VmAction::Start,
        });
        assert!(app.consoles().is_empty() && app.jobs().is_empty());
        app.run_commands(&ctx);
        assert!(app.commands.is_empty());
        assert_eq!(app.consoles().len(), 1);
        assert_eq!(app.consoles()[0].title, "alpha on bench");
        assert_eq!(app.active, 1);
        assert_eq!(app.jobs()[0].title, "Start VM 'alpha'");
        assert_eq!(app.jobs()[0].state, JobState::Running);

        // Opening it again brings the same tab to the front; closing it goes back.
        app.execute(UiCommand::OpenConsole {
            host: h,
            vm_id: "a".into(),
        });
        assert_eq!(app.consoles().len(), 1);
        app.execute(UiCommand::CloseConsole(TabRef::of(&app.consoles()[0])));
        assert!(app.consoles().is_empty());
        assert_eq!(app.active, 0);

        app.execute(UiCommand::Note("hello".into()));
        assert_eq!(app.event_log().next(), Some("hello"));
        app.execute(UiCommand::RemoveHost { host: h });
        assert!(app.hosts().is_empty());
    }
}
