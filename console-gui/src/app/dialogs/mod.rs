//! The dialogs (one at a time, modal: what is behind them is dimmed and does not react):
//! add or edit a host ([`host`]), create a VM ([`create`]), a VM's settings ([`settings`]),
//! a disk's conversion, resizing or deletion ([`disk`]), and the small confirmations here
//! (delete a VM, remove a host, make a VM from an imported disk).

use egui::{Context, Ui};
use proto::v1::Disk;

use super::command::UiCommand;
use super::state::State;
use super::words::human;
use crate::backend::{HostId, VmAction};

mod create;
mod disk;
mod form;
pub(in crate::app) use form::boot_summary;
mod host;
mod settings;

pub(super) use create::CreateDialog;
pub(super) use disk::DiskDialog;
pub(super) use form::disk_place;
pub(super) use host::{HostDialog, fingerprint_arrived};
pub(super) use settings::SettingsDialog;

/// The open dialog.
pub(super) enum Dialog {
    Host(HostDialog),
    Create(CreateDialog),
    Settings(Box<SettingsDialog>),
    Disk(DiskDialog),
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
    Open(Box<Dialog>),
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
        Dialog::Settings(d) => settings::show(ctx, d, state, commands),
        Dialog::Disk(d) => disk::show(ctx, d, state, commands),
        Dialog::DeleteVm { host, vm_id, name } => delete_vm(ctx, *host, vm_id, name, commands),
        Dialog::RemoveHost(id) => remove_host(ctx, *id, state, commands),
        Dialog::Uploaded { host, disk } => uploaded(ctx, *host, disk, state),
    };
    *slot = match next {
        Next::Keep => Some(dialog),
        Next::Close => None,
        Next::Open(d) => Some(*d),
    };
}

/// A modal dialog titled `title`: what is behind it is dimmed and does not react. It has a
/// fixed width (as much as the window allows, up to 620 points) and hangs from a fixed
/// point near the top of the window, so it does not move while its content changes; a
/// long one scrolls. Returns true when the user pressed Escape or clicked beside it.
///
/// (egui's own `Modal` wraps the content in a click-sensing area that can take a button's
/// click when its content changes size, so this is the same idea in two plain areas: a
/// backdrop over everything, and the dialog kept above it.)
fn modal(ctx: &Context, title: &str, add: impl FnOnce(&mut Ui)) -> bool {
    let screen = ctx.content_rect();
    let top = (screen.height() * 0.08).min(72.0);
    let width = (screen.width() - 64.0).clamp(280.0, 620.0);
    let id = egui::Id::unique(("dialog", title));
    let backdrop = egui::Area::new(id.with("backdrop"))
        .order(egui::Order::Foreground)
        .fixed_pos(screen.min)
        .interactable(true)
        .sense(egui::Sense::hover())
        .show(ctx, |ui| {
            ui.painter()
                .rect_filled(screen, 0.0, egui::Color32::from_black_alpha(140));
            ui.allocate_rect(screen, egui::Sense::click())
        })
        .inner;
    let layer = egui::Area::new(id)
        .order(egui::Order::Foreground)
        .anchor(egui::Align2::CENTER_TOP, egui::vec2(0.0, top))
        .interactable(true)
        .sense(egui::Sense::hover())
        .show(ctx, |ui| {
            egui::Frame::window(ui.style())
                .inner_margin(16.0)
                .show(ui, |ui| {
                    ui.set_width(width);
                    ui.heading(title);
                    ui.add_space(4.0);
                    // An area offers its content only the size it had last frame; room
                    // of its own lets the scroll area grow with the content.
                    let max_h = (screen.height() - top - 110.0).max(160.0);
                    ui.allocate_ui(egui::vec2(width, max_h), |ui| {
                        egui::ScrollArea::vertical()
                            .max_height(max_h)
                            .auto_shrink([false, true])
                            .show(ui, add);
                    });
                });
        })
        .response
        .layer_id;
    ctx.move_to_top(layer);
    ctx.memory_mut(|m| m.set_modal_layer(layer));
    let escape = ctx.input_mut(|i| i.consume_key(egui::Modifiers::NONE, egui::Key::Escape));
    escape || backdrop.clicked()
}

/// "OK" and "Cancel"-style buttons at the bottom of a dialog.
fn buttons(ui: &mut Ui, add: impl FnOnce(&mut Ui)) {
    ui.add_space(6.0);
    ui.horizontal_wrapped(add);
}

fn delete_vm(
    ctx: &Context,
    host: HostId,
    vm_id: &str,
    name: &str,
    commands: &mut Vec<UiCommand>,
) -> Next {
    let mut next = Next::Keep;
    let closed = modal(ctx, "Delete VM", |ui| {
        ui.label(format!(
            "Delete VM '{name}'? Its configuration is removed; disks stay in the host's library."
        ));
        buttons(ui, |ui| {
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
    if closed { Next::Close } else { next }
}

fn remove_host(ctx: &Context, id: HostId, state: &State, commands: &mut Vec<UiCommand>) -> Next {
    let name = state.host_name(id);
    let mut next = Next::Keep;
    let closed = modal(ctx, "Remove host", |ui| {
        ui.label(format!(
            "Remove host '{name}' from this console? Its VMs keep running."
        ));
        buttons(ui, |ui| {
            if ui.button("Remove").clicked() {
                commands.push(UiCommand::RemoveHost { host: id });
                next = Next::Close;
            }
            if ui.button("Cancel").clicked() {
                next = Next::Close;
            }
        });
    });
    if closed { Next::Close } else { next }
}

/// An import finished: offer a VM made from the new disk.
fn uploaded(ctx: &Context, host: HostId, disk: &Disk, state: &State) -> Next {
    let host_name = state.host_name(host);
    let mut next = Next::Keep;
    let closed = modal(ctx, "Import finished", |ui| {
        ui.label(format!(
            "Disk '{}' ({}) is ready on {host_name}. Create a VM from it?",
            disk.name,
            human(disk.virtual_size)
        ));
        buttons(ui, |ui| {
            if ui.button("Create VM…").clicked() {
                next = match CreateDialog::from_disk(state, host, &disk.id) {
                    Some(d) => Next::Open(Box::new(Dialog::Create(d))),
                    None => Next::Close,
                };
            }
            if ui.button("Not now").clicked() {
                next = Next::Close;
            }
        });
    });
    if closed { Next::Close } else { next }
}
