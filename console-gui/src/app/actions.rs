//! What can be done to a host, a VM or a disk, as one list per target: the toolbar shows it
//! as buttons and a row's right-click menu as menu entries, so both always agree. An entry
//! the state forbids is greyed, and its hover text says why.

use egui::Ui;
use proto::v1::VmState;

use super::command::UiCommand;
use super::dialogs::{CreateDialog, Dialog, DiskDialog, HostDialog, SettingsDialog};
use super::state::State;
use crate::backend::{HostId, HostStatus, VmAction};

/// What an action is done to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    Host(HostId),
    Vm(HostId, String),
    Disk(HostId, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    OpenConsole,
    Vm(VmAction),
    Settings,
    DeleteVm,
    NewVm,
    ImportDisk,
    EditHost,
    RemoveHost,
    DiskNewVm,
    DiskConvert,
    DiskResize,
    DiskDelete,
}

struct Item {
    label: &'static str,
    act: Act,
    /// `Err(why)`: greyed, saying why.
    allowed: Result<(), String>,
    /// Hover text of an allowed entry.
    hint: Option<String>,
}

fn item(label: &'static str, act: Act, allowed: Result<(), String>) -> Item {
    Item {
        label,
        act,
        allowed,
        hint: None,
    }
}

/// `Ok` when `ok`, else why not.
fn when(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(why()) }
}

fn items(state: &State, target: &Target) -> Vec<Item> {
    let host_id = match target {
        Target::Host(h) | Target::Vm(h, _) | Target::Disk(h, _) => *h,
    };
    let Some(h) = state.host(host_id) else {
        return Vec::new();
    };
    let online = when(h.status == HostStatus::Online, || {
        format!("host {} is not connected", h.cfg.name)
    });
    match target {
        Target::Host(_) => vec![
            item("New VM…", Act::NewVm, online.clone()),
            item("Import disk…", Act::ImportDisk, online),
            item("Edit host…", Act::EditHost, Ok(())),
            item("Remove host…", Act::RemoveHost, Ok(())),
        ],
        Target::Vm(_, id) => {
            let Some(v) = h.vms.get(id) else {
                return Vec::new();
            };
            let name = h.vm_name(id);
            let st = VmState::try_from(v.state).unwrap_or(VmState::Unspecified);
            let word = super::words::state_word(v.state).to_lowercase();
            let is = |ok: bool| {
                online
                    .clone()
                    .and_then(|()| when(ok, || format!("VM '{name}' is {word}")))
            };
            use VmState::*;
            let mut start = item(
                "Start",
                Act::Vm(VmAction::Start),
                is(matches!(st, Off | Crashed)),
            );
            if let Some(why) = h.cannot_run() {
                start.hint = Some(format!(
                    "Host {} says it cannot run VMs ({why}); the start will probably fail",
                    h.cfg.name
                ));
            }
            vec![
                Item {
                    hint: Some("Open the VM's screen and serial console".into()),
                    ..item("Open console", Act::OpenConsole, Ok(()))
                },
                start,
                item("Shut down", Act::Vm(VmAction::Shutdown), is(st == Running)),
                item(
                    "Force off",
                    Act::Vm(VmAction::ForceOff),
                    is(matches!(st, Starting | Running | Paused | Stopping)),
                ),
                item("Pause", Act::Vm(VmAction::Pause), is(st == Running)),
                item("Resume", Act::Vm(VmAction::Resume), is(st == Paused)),
                item(
                    "Reset",
                    Act::Vm(VmAction::Reset),
                    is(matches!(st, Running | Paused)),
                ),
                Item {
                    hint: Some("CPUs, memory, screen, disks, boot, autostart".into()),
                    ..item("Settings…", Act::Settings, Ok(()))
                },
                item(
                    "Delete…",
                    Act::DeleteVm,
                    is(matches!(st, Off | Crashed)).map_err(|e| format!("{e}; shut it down first")),
                ),
            ]
        }
        Target::Disk(_, id) => {
            let Some(d) = h.disks.get(id) else {
                return Vec::new();
            };
            let users: Vec<String> = h
                .disk_users(&d.id)
                .iter()
                .map(|v| format!("'{}'", h.vm_name(v)))
                .collect();
            let unused = online.clone().and_then(|()| {
                when(users.is_empty(), || {
                    format!(
                        "VM {} uses it; detach it in the VM's settings first",
                        users.join(", ")
                    )
                })
            });
            vec![
                item("New VM from disk…", Act::DiskNewVm, online.clone()),
                item("Convert…", Act::DiskConvert, online.clone()),
                item("Resize…", Act::DiskResize, online),
                item("Delete disk…", Act::DiskDelete, unused),
            ]
        }
    }
}

/// Do what an entry says: open its dialog or queue its command.
fn run(
    act: Act,
    target: &Target,
    state: &State,
    dialog: &mut Option<Dialog>,
    commands: &mut Vec<UiCommand>,
) {
    match (act, target) {
        (Act::OpenConsole, Target::Vm(h, id)) => commands.push(UiCommand::OpenConsole {
            host: *h,
            vm_id: id.clone(),
        }),
        (Act::Vm(action), Target::Vm(h, id)) => commands.push(UiCommand::VmAction {
            host: *h,
            vm_id: id.clone(),
            action,
        }),
        (Act::Settings, Target::Vm(h, id)) => {
            *dialog = SettingsDialog::open(state, *h, id).map(|d| Dialog::Settings(Box::new(d)));
        }
        (Act::DeleteVm, Target::Vm(h, id)) => {
            *dialog = Some(Dialog::DeleteVm {
                host: *h,
                vm_id: id.clone(),
                name: state.vm_name(*h, id),
            });
        }
        (Act::NewVm, Target::Host(h)) => {
            *dialog = Some(Dialog::Create(CreateDialog::new(
                state,
                *h,
                String::new(),
                None,
            )));
        }
        (Act::ImportDisk, Target::Host(h)) => commands.push(UiCommand::PickImage { host: *h }),
        (Act::EditHost, Target::Host(h)) => {
            if let Some(host) = state.host(*h) {
                *dialog = Some(Dialog::Host(HostDialog::edit(*h, host.cfg.clone())));
            }
        }
        (Act::RemoveHost, Target::Host(h)) => *dialog = Some(Dialog::RemoveHost(*h)),
        (Act::DiskNewVm, Target::Disk(h, id)) => {
            *dialog = CreateDialog::from_disk(state, *h, id).map(Dialog::Create);
        }
        (Act::DiskConvert, Target::Disk(h, id)) => {
            *dialog = DiskDialog::convert(state, *h, id).map(Dialog::Disk);
        }
        (Act::DiskResize, Target::Disk(h, id)) => {
            *dialog = DiskDialog::resize(state, *h, id).map(Dialog::Disk);
        }
        (Act::DiskDelete, Target::Disk(h, id)) => {
            *dialog = DiskDialog::delete(state, *h, id).map(Dialog::Disk);
        }
        _ => {}
    }
}

/// The target's actions as buttons (the toolbar; the caller wraps them).
pub(super) fn buttons(
    ui: &mut Ui,
    state: &State,
    target: &Target,
    dialog: &mut Option<Dialog>,
    commands: &mut Vec<UiCommand>,
) {
    for it in items(state, target) {
        let mut r = ui.add_enabled(it.allowed.is_ok(), egui::Button::new(it.label));
        if let Err(why) = &it.allowed {
            r = r.on_disabled_hover_text(why);
        }
        if let Some(h) = &it.hint {
            r = r.on_hover_text(h);
        }
        if r.clicked() {
            run(it.act, target, state, dialog, commands);
        }
    }
}

/// The target's actions as a right-click menu.
pub(super) fn menu(
    ui: &mut Ui,
    state: &State,
    target: &Target,
    dialog: &mut Option<Dialog>,
    commands: &mut Vec<UiCommand>,
) {
    for it in items(state, target) {
        let mut r = ui.add_enabled(it.allowed.is_ok(), egui::Button::new(it.label));
        if let Err(why) = &it.allowed {
            r = r.on_disabled_hover_text(why);
        }
        if r.clicked() {
            run(it.act, target, state, dialog, commands);
            ui.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::v1::{Disk, Vm, VmSpec};

    use super::*;
    use crate::config::HostConfig;

    fn state() -> State {
        let mut s = State::default();
        let vm = |id: &str, name: &str, st: VmState| Vm {
            id: id.into(),
            spec: Some(VmSpec {
                name: name.into(),
                ..Default::default()
            }),
            state: st as i32,
            ..Default::default()
        };
        s.add_host(
            HostConfig {
                name: "lab".into(),
                addr: "h:1".into(),
                token: "t".into(),
                fingerprint: None,
            },
            HostStatus::Online,
            vec![
                vm("a", "alpha", VmState::Running),
                vm("b", "beta", VmState::Off),
            ],
            true,
        );
        s.host_mut(1).unwrap().disks.insert(
            "d".into(),
            Disk {
                id: "d".into(),
                name: "web.vhdx".into(),
                attached_to: vec!["a".into()],
                ..Default::default()
            },
        );
        s
    }

    fn allowed(s: &State, t: &Target, label: &str) -> Result<(), String> {
        items(s, t)
            .into_iter()
            .find(|i| i.label == label)
            .unwrap_or_else(|| panic!("no {label}"))
            .allowed
    }

    #[test]
    fn entries_the_state_forbids_say_why() {
        let s = state();
        let running = Target::Vm(1, "a".into());
        assert_eq!(
            allowed(&s, &running, "Start"),
            Err("VM 'alpha' is running".into())
        );
        assert_eq!(allowed(&s, &running, "Shut down"), Ok(()));
        assert_eq!(
            allowed(&s, &running, "Delete…"),
            Err("VM 'alpha' is running; shut it down first".into())
        );
        assert_eq!(allowed(&s, &Target::Vm(1, "b".into()), "Start"), Ok(()));
        assert_eq!(
            allowed(&s, &Target::Disk(1, "d".into()), "Delete disk…"),
            Err("VM 'alpha' uses it; detach it in the VM's settings first".into())
        );
        let mut off = state();
        off.host_mut(1).unwrap().status = HostStatus::Connecting;
        assert_eq!(
            allowed(&off, &Target::Host(1), "New VM…"),
            Err("host lab is not connected".into())
        );
        assert_eq!(allowed(&off, &Target::Host(1), "Edit host…"), Ok(()));
    }
}
