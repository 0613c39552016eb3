//! The disk library page: every host's disks (name, format, virtual and file size, the VMs
//! that use it), with the selection's actions above and a right-click menu on each row
//! (new VM from the disk, convert, resize, delete); below each host's disks, what is on its
//! way into the library: this console's uploads as they run and the host's disk tasks
//! (verifying, converting, resizing) with their progress.

use egui::{RichText, Ui};
use proto::v1::{Disk, DiskFormat, DiskVariant, TaskState};

use super::actions::{self, Target};
use super::command::UiCommand;
use super::dialogs::Dialog;
use super::state::{Host, JobState, State};
use super::theme::{Tone, tone};
use super::widgets::{left_cell, status_dot, table_row};
use super::words::human;
use crate::backend::HostId;

/// What the page remembers.
#[derive(Default)]
pub(super) struct LibraryView {
    pub selected: Option<Target>,
}

/// "VHDX, dynamic".
pub(super) fn format_words(d: &Disk) -> String {
    let f = match DiskFormat::try_from(d.format) {
        Ok(DiskFormat::Vhdx) => "VHDX",
        Ok(DiskFormat::Vhd) => "VHD",
        Ok(DiskFormat::Raw) => "raw",
        _ => "unknown",
    };
    let v = match DiskVariant::try_from(d.variant) {
        Ok(DiskVariant::Fixed) => ", fixed",
        Ok(DiskVariant::Dynamic) => ", dynamic",
        Ok(DiskVariant::Differencing) => ", differencing",
        _ => "",
    };
    format!("{f}{v}")
}

/// The names of the VMs that use a disk ("-" for none).
pub(super) fn users(h: &Host, d: &Disk) -> String {
    let ids = h.disk_users(&d.id);
    if ids.is_empty() {
        return "-".into();
    }
    let mut names: Vec<String> = ids.iter().map(|id| h.vm_name(id)).collect();
    names.sort();
    names.join(", ")
}

pub(super) fn show(
    ui: &mut Ui,
    state: &State,
    view: &mut LibraryView,
    dialog: &mut Option<Dialog>,
    commands: &mut Vec<UiCommand>,
) {
    if let Some(Target::Disk(h, id)) = &view.selected
        && state.host(*h).is_none_or(|x| !x.disks.contains_key(id))
    {
        view.selected = None;
    }
    ui.horizontal_wrapped(|ui| {
        ui.strong("Disk library");
        ui.separator();
        match &view.selected {
            None => {
                ui.label(
                    RichText::new("Select a disk; right-click a row for its actions; drop a .vhdx onto a host to import it")
                        .weak(),
                );
            }
            Some(t) => actions::buttons(ui, state, t, dialog, commands),
        }
    });
    ui.separator();
    let row_h = ui.text_style_height(&egui::TextStyle::Body) + 10.0;
    let fixed = [130.0, 96.0, 96.0];
    let spacing = ui.spacing().item_spacing.x;
    let flex = (ui.available_width() - fixed.iter().sum::<f32>() - spacing * 5.0).max(220.0);
    let widths = [
        flex * 0.35,
        fixed[0],
        fixed[1],
        fixed[2],
        flex * 0.25,
        flex * 0.4,
    ];
    ui.horizontal(|ui| {
        for (i, (w, t)) in widths
            .iter()
            .zip(["Name", "Format", "Size", "File size", "Used by", "Boots"])
            .enumerate()
        {
            let label = egui::Label::new(RichText::new(t).strong()).selectable(false);
            match i {
                0 => left_cell(ui, *w, row_h, |ui| ui.add_space(36.0), label),
                4 | 5 => left_cell(ui, *w, row_h, |_| {}, label),
                _ => ui.add_sized([*w, row_h], label),
            };
        }
    });
    let mut clicked = None;
    egui::ScrollArea::vertical()
        .id_salt("library-rows")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            for h in &state.hosts {
                let t = Target::Host(h.id);
                let r = row(ui, row_h, view.selected.as_ref() == Some(&t), |ui| {
                    status_dot(ui, super::inventory::host_status(h).1);
                    ui.add(egui::Label::new(RichText::new(&h.cfg.name).strong()).selectable(false));
                    ui.add(
                        egui::Label::new(RichText::new(format!("{} disks", h.disks.len())).weak())
                            .selectable(false),
                    );
                });
                react(&r, &t, state, dialog, commands, &mut clicked);
                let mut disks: Vec<&Disk> = h.disks.values().collect();
                disks.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
                for d in disks {
                    let t = Target::Disk(h.id, d.id.clone());
                    let r = row(ui, row_h, view.selected.as_ref() == Some(&t), |ui| {
                        disk_cells(ui, h, d, &widths, row_h)
                    });
                    react(&r, &t, state, dialog, commands, &mut clicked);
                }
                arriving(ui, state, h.id, &widths);
            }
            if state.hosts.is_empty() {
                ui.label("No hosts yet: \"Add host…\" connects to a parvis-agent.");
            }
        });
    if let Some(t) = clicked {
        view.selected = Some(t);
    }
}

/// A table row: the whole row reacts to clicks; `cells` draws on it.
fn row(ui: &mut Ui, row_h: f32, selected: bool, cells: impl FnOnce(&mut Ui)) -> egui::Response {
    let id = ui
        .scope_id()
        .with(("library-row", ui.cursor().min.y as i32));
    table_row(ui, row_h, id, selected, cells).0
}

fn react(
    r: &egui::Response,
    t: &Target,
    state: &State,
    dialog: &mut Option<Dialog>,
    commands: &mut Vec<UiCommand>,
    clicked: &mut Option<Target>,
) {
    if r.clicked() || r.secondary_clicked() {
        *clicked = Some(t.clone());
    }
    r.context_menu(|ui| actions::menu(ui, state, t, dialog, commands));
}

fn disk_cells(ui: &mut Ui, h: &Host, d: &Disk, widths: &[f32; 6], row_h: f32) {
    let cell = |ui: &mut Ui, w: f32, text: RichText| {
        ui.add_sized(
            [w, row_h],
            egui::Label::new(text).selectable(false).truncate(),
        );
    };
    let text = |t: RichText| egui::Label::new(t).selectable(false).truncate();
    left_cell(
        ui,
        widths[0],
        row_h,
        |ui| ui.add_space(36.0),
        text(RichText::new(&d.name)),
    );
    cell(ui, widths[1], RichText::new(format_words(d)));
    cell(ui, widths[2], RichText::new(human(d.virtual_size)));
    cell(ui, widths[3], RichText::new(human(d.file_size)));
    let users = users(h, d);
    let used = if users == "-" {
        RichText::new(users).weak()
    } else {
        RichText::new(users)
    };
    left_cell(
        ui,
        widths[4],
        row_h,
        |_| {},
        egui::Label::new(used).selectable(false).truncate(),
    );
    // What the host read off the disk: the system it boots, or why it cannot.
    let (summary, ok) = super::dialogs::boot_summary(d.boot.as_ref());
    let boots = if ok {
        RichText::new(&summary)
    } else {
        RichText::new(&summary).color(tone(ui.visuals(), Tone::Bad))
    };
    let r = left_cell(
        ui,
        widths[5],
        row_h,
        |_| {},
        egui::Label::new(boots).selectable(false).truncate(),
    );
    if let Some(b) = d.boot.as_ref().filter(|b| b.bootable) {
        let lines: Vec<String> = b
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mark = if i as u32 == b.default_entry {
                    " (default)"
                } else {
                    ""
                };
                format!("{}{mark}", e.title)
            })
            .collect();
        r.on_hover_text(format!("{summary}\n{}", lines.join("\n")));
    } else {
        r.on_hover_text(summary);
    }
}

/// This console's uploads to `host` and the host's disk tasks, while they run.
fn arriving(ui: &mut Ui, state: &State, host: HostId, widths: &[f32; 6]) {
    let host_name = state.host_name(host);
    for j in state
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Running && j.host == host_name)
    {
        let Some((p, _)) = &j.upload else { continue };
        let (phase, done, total) = p.get();
        let frac = if total > 0 {
            done as f32 / total as f32
        } else {
            0.0
        };
        let name = j.title.strip_prefix("Import ").unwrap_or(&j.title);
        progress_row(
            ui,
            widths,
            name,
            &format!("importing: {}", phase.label()),
            frac,
        );
    }
    let Some(h) = state.host(host) else { return };
    for t in h
        .tasks
        .values()
        .filter(|t| t.state == TaskState::Running as i32)
    {
        let frac = if t.total > 0 {
            t.done as f32 / t.total as f32
        } else {
            0.0
        };
        progress_row(ui, widths, &t.description, "in progress", frac);
    }
}

fn progress_row(ui: &mut Ui, widths: &[f32; 6], name: &str, what: &str, frac: f32) {
    ui.horizontal(|ui| {
        ui.add_space(36.0);
        status_dot(ui, Tone::Busy);
        ui.add_sized(
            [(widths[0] - 64.0).max(60.0), 20.0],
            egui::Label::new(name).selectable(false).truncate(),
        );
        ui.add(egui::ProgressBar::new(frac).desired_width((widths[1] + widths[2]).max(120.0)));
        ui.add(
            egui::Label::new(format!("{what}, {:.0}%", frac * 100.0))
                .selectable(false)
                .truncate(),
        );
    });
}
