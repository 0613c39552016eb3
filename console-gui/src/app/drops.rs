//! Disk images dropped onto the window (or picked in the import dialog) become uploads to
//! the host under the pointer, else the selected one; while files hover, an overlay says
//! where they would go.

use std::path::PathBuf;
use std::sync::Mutex;

use egui::{Color32, Context, Pos2, Rect};

use super::command::UiCommand;
use super::state::{Selection, State};
use crate::backend::HostId;

/// A host and the file chosen in the import dialog for it (`None`: nothing chosen).
pub(super) type Picked = (HostId, Option<PathBuf>);

/// The host whose rows are under `pos`, else the selected host.
fn pointed_host(
    pos: Option<Pos2>,
    host_rects: &[(HostId, Rect)],
    selection: Option<&Selection>,
) -> Option<HostId> {
    pos.and_then(|p| {
        host_rects
            .iter()
            .find(|(_, r)| r.contains(p))
            .map(|(h, _)| *h)
    })
    .or(selection.map(Selection::host))
}

/// Turn a picked or dropped file into an upload (at the start of a frame).
pub(super) fn take(
    ctx: &Context,
    picked: &Mutex<Option<Picked>>,
    host_rects: &[(HostId, Rect)],
    selection: Option<&Selection>,
    state: &State,
    commands: &mut Vec<UiCommand>,
) {
    let picked = picked.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((host, path)) = picked {
        commands.push(match path {
            Some(path) => UiCommand::StartUpload { host, path },
            None => UiCommand::Note(
                "no file chosen (if no dialog appeared, this desktop has no file dialog service: drag the .vhdx onto the host instead)"
                    .into(),
            ),
        });
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
    let target = pointed_host(pos, host_rects, selection)
        .or_else(|| (state.hosts.len() == 1).then(|| state.hosts[0].id));
    let Some(host) = target else {
        commands.push(UiCommand::Note(
            "drop the disk image onto a host in the inventory (several hosts are connected)".into(),
        ));
        return;
    };
    for path in dropped {
        commands.push(UiCommand::StartUpload { host, path });
    }
}

/// While files hover over the window: darken it and say where they would go.
pub(super) fn overlay(
    ctx: &Context,
    host_rects: &[(HostId, Rect)],
    selection: Option<&Selection>,
    state: &State,
) {
    let hovered = ctx.input(|i| i.raw.hovered_files.clone());
    if hovered.is_empty() {
        return;
    }
    let pos = ctx.input(|i| i.pointer.latest_pos());
    let target = pointed_host(pos, host_rects, selection)
        .and_then(|h| state.host(h))
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
