//! The inventory: hosts and their VMs as one table (name, state, CPUs, memory, uptime),
//! with search and the selection's buttons ([`super::actions`]) above it. Only the visible
//! rows are laid out, so thousands of VMs cost little.

use std::collections::HashSet;

use egui::{Color32, RichText, Ui};
use proto::v1::{Vm, VmState};

use super::command::UiCommand;
use super::dialogs::Dialog;
use super::state::{Selection, State};
use super::widgets::{state_color, status_dot};
use super::words::{duration, human, now_ms, state_word, vm_name};
use crate::backend::{HostId, HostStatus};

/// What the inventory remembers between frames.
#[derive(Default)]
pub(super) struct InventoryView {
    search: String,
    collapsed: HashSet<HostId>,
    /// Where each host's rows were drawn last frame (drop targets).
    pub host_rects: Vec<(HostId, egui::Rect)>,
}

/// One line of the table.
enum Row {
    /// `state.hosts[i]`.
    Host(usize),
    /// A VM of `state.hosts[i]`.
    Vm(usize, String),
}

pub(super) fn show(
    ui: &mut Ui,
    state: &State,
    view: &mut InventoryView,
    selection: &mut Option<Selection>,
    dialog: &mut Option<Dialog>,
    commands: &mut Vec<UiCommand>,
) {
    ui.horizontal(|ui| {
        let l = ui.label("Search:");
        ui.add(
            egui::TextEdit::singleline(&mut view.search)
                .hint_text("VM or host name")
                .desired_width(220.0),
        )
        .labelled_by(l.id);
        ui.separator();
        super::actions::show(ui, state, selection, dialog, commands);
    });
    ui.separator();

    let rows = rows(state, &view.search, &view.collapsed);
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
    view.host_rects.clear();
    let mut clicked: Option<Selection> = None;
    let mut toggle: Option<HostId> = None;
    let mut rects = Vec::new();
    egui::ScrollArea::vertical()
        .auto_shrink([false, false])
        .show_rows(ui, row_h, rows.len(), |ui, range| {
            for row in &rows[range] {
                match row {
                    Row::Host(hi) => {
                        let h = &state.hosts[*hi];
                        let r = ui.horizontal(|ui| {
                            let arrow = if view.collapsed.contains(&h.id) {
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
                            let sel = *selection == Some(Selection::Host(h.id));
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
                        let h = &state.hosts[*hi];
                        let Some(v) = h.vms.get(id) else { continue };
                        let spec = v.spec.clone().unwrap_or_default();
                        let r = ui.horizontal(|ui| {
                            ui.add_space(24.0);
                            let sel = *selection == Some(Selection::Vm(h.id, id.clone()));
                            let name = ui.add_sized(
                                [widths[0] - 24.0, row_h],
                                egui::Button::selectable(sel, &spec.name),
                            );
                            if name.clicked() {
                                clicked = Some(Selection::Vm(h.id, id.clone()));
                            }
                            if name.double_clicked() {
                                commands.push(UiCommand::OpenConsole {
                                    host: h.id,
                                    vm_id: id.clone(),
                                });
                            }
                            ui.add_sized(
                                [widths[1], row_h],
                                egui::Label::new(
                                    RichText::new(state_word(v.state)).color(state_color(v.state)),
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
    view.host_rects = rects;
    if let Some(id) = toggle
        && !view.collapsed.remove(&id)
    {
        view.collapsed.insert(id);
    }
    if let Some(s) = clicked {
        *selection = Some(s);
    }
    if state.hosts.is_empty() {
        ui.label("No hosts yet: \"Add host…\" connects to a parvis-agent (it prints its address, certificate fingerprint and token when it starts).");
    }
}

/// Hosts and their VMs that match the search, VMs by name under their host (none under a
/// collapsed host).
fn rows(state: &State, search: &str, collapsed: &HashSet<HostId>) -> Vec<Row> {
    let q = search.trim().to_lowercase();
    let mut rows = Vec::new();
    for (hi, h) in state.hosts.iter().enumerate() {
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
        if !collapsed.contains(&h.id) {
            let mut vms = vms;
            vms.sort_by(|a, b| vm_name(a).cmp(vm_name(b)));
            rows.extend(vms.into_iter().map(|v| Row::Vm(hi, v.id.clone())));
        }
    }
    rows
}
