//! The dialog windows (one at a time): add or edit a host ([`host`]), create a VM
//! ([`create`]), and the small confirmations here (delete a VM, remove a host, make a VM
//! from an imported disk).

use std::path::Path;

use egui::Context;
use proto::v1::Disk;

use super::command::UiCommand;
use super::state::State;
use super::words::human;
use crate::backend::{HostId, VmAction};

mod create;
mod host;

pub(super) use create::CreateDialog;
pub(super) use host::{HostDialog, fingerprint_arrived};

/// The open dialog.
pub(super) enum Dialog {
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

/// What a dialog wants after this frame.
enum Next {
    Keep,
    Close,
    /// Another dialog in its place.
    Open(Dialog),
}

/// Draw the open dialog, if any.
pub(super) fn show(
    ctx: &Context,
    slot: &mut Option<Dialog>,
    state: &State,
    commands: &mut Vec<UiCommand>,
) {
    let Some(mut dialog) = slot.take() else {
        return;
    };
    let next = match &mut dialog {
        Dialog::Host(d) => host::show(ctx, d, commands),
        Dialog::Create(d) => create::show(ctx, d, state, commands),
        Dialog::DeleteVm { host, vm_id, name } => delete_vm(ctx, *host, vm_id, name, commands),
        Dialog::RemoveHost(id) => remove_host(ctx, *id, state, commands),
        Dialog::Uploaded { host, disk } => uploaded(ctx, *host, disk, state),
    };
    *slot = match next {
        Next::Keep => Some(dialog),
        Next::Close => None,
        Next::Open(d) => Some(d),
    };
}

fn delete_vm(
    ctx: &Context,
    host: HostId,
    vm_id: &str,
    name: &str,
    commands: &mut Vec<UiCommand>,
) -> Next {
    let mut next = Next::Keep;
    egui::Window::new("Delete VM").collapsible(false).resizable(false).show(ctx, |ui| {
        ui.label(format!("Delete VM '{name}'? Its configuration is removed; disks stay in the host's library."));
        ui.horizontal(|ui| {
            if ui.button("Delete").clicked() {
                commands.push(UiCommand::VmAction {
                    host,
                    vm_id: vm_id.to_string(),
                    action: VmAction::Delete,
                });
                next = Next::Close;
            }
            if ui.button("Cancel").clicked() {
                next = Next::Close;
            }
        });
    });
    next
}

fn remove_host(ctx: &Context, id: HostId, state: &State, commands: &mut Vec<UiCommand>) -> Next {
    let name = state
        .host(id)
        .map(|h| h.cfg.name.clone())
        .unwrap_or_default();
    let mut next = Next::Keep;
    egui::Window::new("Remove host")
        .collapsible(false)
        .resizable(false)
        .show(ctx, |ui| {
            ui.label(format!(
                "Remove host '{name}' from this console? Its VMs keep running."
            ));
            ui.horizontal(|ui| {
                if ui.button("Remove").clicked() {
                    commands.push(UiCommand::RemoveHost { host: id });
                    next = Next::Close;
                }
                if ui.button("Cancel").clicked() {
                    next = Next::Close;
                }
            });
        });
    next
}

/// An import finished: offer a VM made from the new disk.
fn uploaded(ctx: &Context, host: HostId, disk: &Disk, state: &State) -> Next {
    let host_name = state
        .host(host)
        .map(|h| h.cfg.name.clone())
        .unwrap_or_default();
    let mut next = Next::Keep;
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
                    let boot = state
                        .host(host)
                        .and_then(|h| h.info.as_ref())
                        .and_then(|i| i.boot_images.first())
                        .map(|b| b.name.clone())
                        .unwrap_or_default();
                    let name = Path::new(&disk.name)
                        .file_stem()
                        .map_or_else(|| disk.name.clone(), |s| s.to_string_lossy().into_owned());
                    next = Next::Open(Dialog::Create(CreateDialog::new(
                        host,
                        name,
                        boot,
                        Some(disk.id.clone()),
                    )));
                }
                if ui.button("Not now").clicked() {
                    next = Next::Close;
                }
            });
        });
    next
}
