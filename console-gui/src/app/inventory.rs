//! The inventory: search and the selection's actions (wrapping onto more lines in a narrow
//! window), hosts and their VMs as one table that fills the width (name, state, CPUs,
//! memory, uptime) with a right-click menu on every row, and the details pane
//! ([`super::details`]) beside the table in a wide window or under it in a narrow one. Only
//! the visible rows are laid out, so thousands of VMs cost little.

use std::collections::HashSet;

use egui::{RichText, Ui};
use proto::v1::{Vm, VmState};

use super::actions::{self, Target};
use super::command::UiCommand;
use super::details::{self, DetailsView};
use super::dialogs::Dialog;
use super::state::{Host, Selection, State};
use super::theme::Tone;
use super::widgets::{left_cell, state_color, status_dot, table_row};
use super::words::{duration, human, now_ms, state_word, vm_name};
use crate::backend::{HostId, HostStatus};
use crate::stats::Series;

/// Below this width the details pane goes under the table.
const SIDE_BY_SIDE: f32 = 1000.0;

/// What the inventory remembers between frames.
#[derive(Default)]
pub(super) struct InventoryView {
    search: String,
    collapsed: HashSet<HostId>,
    /// Where each host's rows were drawn last frame (drop targets).
    pub host_rects: Vec<(HostId, egui::Rect)>,
    pub details: DetailsView,
}

/// One line of the table.
enum Row {
    /// `state.hosts[i]`.
    Host(usize),
    /// A VM of `state.hosts[i]`.
    Vm(usize, String),
}

/// The selection as an action target.
pub(super) fn target(s: &Selection) -> Target {
    match s {
        Selection::Host(h) => Target::Host(*h),
        Selection::Vm(h, id) => Target::Vm(*h, id.clone()),
    }
}

/// A host's status for the table: its words, their tone, and the reason on hover.
pub(super) fn host_status(h: &Host) -> (String, Tone, Option<String>) {
    match &h.status {
        HostStatus::Online => match h.cannot_run() {
            Some(why) => (
                "online, cannot run VMs".into(),
                Tone::Busy,
                Some(format!("This host cannot run VMs: {why}.")),
            ),
            None => ("online".into(), Tone::Good, None),
        },
        HostStatus::Connecting => ("connecting…".into(), Tone::Busy, None),
        HostStatus::Offline {
            error, retry_in_s, ..
        } => (
            format!("offline: {error} (retrying every {retry_in_s} s)"),
            Tone::Bad,
            Some(error.clone()),
        ),
    }
}

pub(super) fn show(
    ui: &mut Ui,
    state: &State,
    view: &mut InventoryView,
    selection: &mut Option<Selection>,
    dialog: &mut Option<Dialog>,
    commands: &mut Vec<UiCommand>,
    feed: Option<&Series>,
) {
    ui.horizontal_wrapped(|ui| {
        let l = ui.label("Search:");
        ui.add(
            egui::TextEdit::singleline(&mut view.search)
                .hint_text("VM or host name")
                .desired_width(200.0),
        )
        .labelled_by(l.id);
        ui.separator();
        match selection.as_ref() {
            None => {
                ui.label(
                    RichText::new("Select a host or a VM; right-click a row for its actions")
                        .weak(),
                );
            }
            Some(s) => actions::buttons(ui, state, &target(s), dialog, commands),
        }
    });
    ui.separator();
    if let Some(Selection::Vm(h, id)) = selection.as_ref()
        && state.host(*h).is_some_and(|x| !x.vms.contains_key(id))
    {
        *selection = Some(Selection::Host(*h));
    }

    let avail = ui.available_rect_before_wrap();
    let mut details_view = std::mem::take(&mut view.details);
    let mut pane = |ui: &mut Ui, dv: &mut DetailsView| {
        details::show(ui, state, selection.as_ref(), feed, dv, commands);
    };
    if avail.width() >= SIDE_BY_SIDE {
        egui::Panel::right("details-side")
            .resizable(true)
            .default_size(avail.width() * 0.42)
            .size_range(320.0..=avail.width() * 0.65)
            .show(ui, |ui| pane(ui, &mut details_view));
    } else {
        egui::Panel::bottom("details-below")
            .resizable(true)
            .default_size(avail.height() * 0.5)
            .size_range(120.0..=(avail.height() - 120.0).max(120.0))
            .show(ui, |ui| pane(ui, &mut details_view));
    }
    view.details = details_view;
    table(ui, state, view, selection, dialog, commands);
}

fn table(
    ui: &mut Ui,
    state: &State,
    view: &mut InventoryView,
    selection: &mut Option<Selection>,
    dialog: &mut Option<Dialog>,
    commands: &mut Vec<UiCommand>,
) {
    let rows = rows(state, &view.search, &view.collapsed);
    let row_h = ui.text_style_height(&egui::TextStyle::Body) + 10.0;
    // Fixed columns on the right; the name takes the rest of the width.
    let fixed = [100.0, 56.0, 96.0, 96.0];
    let spacing = ui.spacing().item_spacing.x;
    let name_w = (ui.available_width() - fixed.iter().sum::<f32>() - spacing * 5.0).max(140.0);
    let widths = [name_w, fixed[0], fixed[1], fixed[2], fixed[3]];
    ui.horizontal(|ui| {
        for (i, (w, t)) in widths
            .iter()
            .zip(["Name", "State", "CPUs", "Memory", "Uptime"])
            .enumerate()
        {
            let label = egui::Label::new(RichText::new(t).strong()).selectable(false);
            if i == 0 {
                // Names are left-aligned, under the name column's title.
                left_cell(ui, *w, row_h, |ui| ui.add_space(24.0 + 7.0), label);
            } else {
                ui.add_sized([*w, row_h], label);
            }
        }
    });
    let now = now_ms();
    let mut clicked: Option<Selection> = None;
    let mut toggle: Option<HostId> = None;
    let mut rects = Vec::new();
    egui::ScrollArea::vertical()
        .id_salt("inventory-rows")
        .auto_shrink([false, false])
        .show_rows(ui, row_h, rows.len(), |ui, range| {
            for row in &rows[range] {
                let (h, sel) = match row {
                    Row::Host(hi) => (&state.hosts[*hi], Selection::Host(state.hosts[*hi].id)),
                    Row::Vm(hi, id) => {
                        let h = &state.hosts[*hi];
                        (h, Selection::Vm(h.id, id.clone()))
                    }
                };
                let selected = selection.as_ref() == Some(&sel);
                let vm = match row {
                    Row::Host(_) => None,
                    Row::Vm(_, id) => match h.vms.get(id) {
                        Some(v) => Some(v),
                        None => continue,
                    },
                };
                // The whole row reacts (select, open, menu); the widgets on it come after, so
                // a click on a button is the button's.
                let (bg, name, rect) = table_row(
                    ui,
                    row_h,
                    ui.scope_id().with(("row", &sel)),
                    selected,
                    |row_ui| match vm {
                        None => host_cells(row_ui, h, selected, &view.collapsed, &mut toggle),
                        Some(v) => vm_cells(row_ui, v, selected, &widths, row_h, now),
                    },
                );
                for r in [&bg, &name] {
                    if r.clicked() || r.secondary_clicked() {
                        clicked = Some(sel.clone());
                    }
                    if r.double_clicked()
                        && let Selection::Vm(hid, id) = &sel
                    {
                        commands.push(UiCommand::OpenConsole {
                            host: *hid,
                            vm_id: id.clone(),
                        });
                    }
                    r.context_menu(|ui| actions::menu(ui, state, &target(&sel), dialog, commands));
                }
                rects.push((h.id, rect));
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

/// A host's row: expand button, status dot, name, status and size. Returns the name's
/// response.
fn host_cells(
    ui: &mut Ui,
    h: &Host,
    selected: bool,
    collapsed: &HashSet<HostId>,
    toggle: &mut Option<HostId>,
) -> egui::Response {
    let arrow = if collapsed.contains(&h.id) { "+" } else { "-" };
    if ui
        .small_button(arrow)
        .on_hover_text("Show or hide this host's VMs")
        .clicked()
    {
        *toggle = Some(h.id);
    }
    let (status, t, why) = host_status(h);
    status_dot(ui, t);
    let name = ui.add(egui::Button::selectable(
        selected,
        RichText::new(&h.cfg.name).strong(),
    ));
    let color = super::theme::tone(ui.visuals(), t);
    let r = ui.add(
        egui::Label::new(RichText::new(status).color(color))
            .selectable(false)
            .truncate(),
    );
    if let Some(why) = why {
        r.on_hover_text(why);
    }
    if let Some(i) = &h.info {
        ui.add(
            egui::Label::new(
                RichText::new(format!(
                    "{} CPUs, {} free of {}",
                    i.logical_cpus,
                    human(i.memory_available_bytes),
                    human(i.memory_bytes)
                ))
                .weak(),
            )
            .selectable(false)
            .truncate(),
        );
    }
    name
}

/// A VM's row: name, state, CPUs, memory, uptime. Returns the name's response.
fn vm_cells(
    ui: &mut Ui,
    v: &Vm,
    selected: bool,
    widths: &[f32; 5],
    row_h: f32,
    now: i64,
) -> egui::Response {
    let spec = v.spec.clone().unwrap_or_default();
    let name = left_cell(
        ui,
        widths[0],
        row_h,
        |ui| ui.add_space(24.0),
        egui::Button::selectable(selected, &spec.name).truncate(),
    );

    let cell = |ui: &mut Ui, w: f32, text: RichText| {
        ui.add_sized([w, row_h], egui::Label::new(text).selectable(false));
    };
    cell(
        ui,
        widths[1],
        RichText::new(state_word(v.state)).color(state_color(ui, v.state)),
    );
    cell(ui, widths[2], RichText::new(spec.cpus.to_string()));
    cell(ui, widths[3], RichText::new(human(spec.memory_bytes)));
    let up = if v.state == VmState::Running as i32 || v.state == VmState::Paused as i32 {
        duration(((now - v.state_changed_ms).max(0) / 1000) as u64)
    } else {
        "-".into()
    };
    cell(ui, widths[4], RichText::new(up));
    name
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
