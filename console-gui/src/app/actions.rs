//! The buttons for the selection: a host's (new VM, import, edit, remove) or a VM's
//! (console, start, stop, …, delete).

use egui::{RichText, Ui};
use proto::v1::VmState;

use super::command::UiCommand;
use super::dialogs::{CreateDialog, Dialog, HostDialog};
use super::state::{Selection, State};
use crate::backend::{HostStatus, VmAction};

pub(super) fn show(
    ui: &mut Ui,
    state: &State,
    selection: &mut Option<Selection>,
    dialog: &mut Option<Dialog>,
    commands: &mut Vec<UiCommand>,
) {
    match selection.clone() {
        None => {
            ui.label(RichText::new("Select a host or a VM").weak());
        }
        Some(Selection::Host(id)) => {
            let Some(h) = state.host(id) else { return };
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
                *dialog = Some(Dialog::Create(CreateDialog::new(
                    id,
                    String::new(),
                    boot,
                    None,
                )));
            }
            if ui
                .add_enabled(online, egui::Button::new("Import disk…"))
                .clicked()
            {
                commands.push(UiCommand::PickImage { host: id });
            }
            if ui.button("Edit host…").clicked() {
                *dialog = Some(Dialog::Host(HostDialog::edit(id, h.cfg.clone())));
            }
            if ui.button("Remove host…").clicked() {
                *dialog = Some(Dialog::RemoveHost(id));
            }
        }
        Some(Selection::Vm(hid, vid)) => {
            let Some(v) = state.host(hid).and_then(|h| h.vms.get(&vid)) else {
                *selection = Some(Selection::Host(hid));
                return;
            };
            let online = state
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
                commands.push(UiCommand::OpenConsole {
                    host: hid,
                    vm_id: vid.clone(),
                });
            }
            for (label, action, ok) in buttons {
                if ui
                    .add_enabled(online && ok, egui::Button::new(label))
                    .clicked()
                {
                    commands.push(UiCommand::VmAction {
                        host: hid,
                        vm_id: vid.clone(),
                        action,
                    });
                }
            }
            if ui
                .add_enabled(
                    online && matches!(st, Off | Crashed),
                    egui::Button::new("Delete…"),
                )
                .clicked()
            {
                *dialog = Some(Dialog::DeleteVm {
                    host: hid,
                    vm_id: vid.clone(),
                    name,
                });
            }
        }
    }
}
