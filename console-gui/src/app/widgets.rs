//! Small drawing helpers shared by the panels.

use egui::{Color32, Rect, RichText, Sense, Ui, UiBuilder, vec2};
use proto::v1::VmState;

use super::theme::{Tone, tone};

/// What a VM state says.
pub fn state_tone(s: i32) -> Tone {
    match VmState::try_from(s) {
        Ok(VmState::Running) => Tone::Good,
        Ok(VmState::Paused | VmState::Starting | VmState::Stopping) => Tone::Busy,
        Ok(VmState::Crashed) => Tone::Bad,
        _ => Tone::Neutral,
    }
}

/// The colour of a VM state word in `ui`'s theme.
pub fn state_color(ui: &Ui, s: i32) -> Color32 {
    tone(ui.visuals(), state_tone(s))
}

/// A small filled circle in a status colour (host and task status).
pub fn status_dot(ui: &mut Ui, t: Tone) {
    let color = tone(ui.visuals(), t);
    let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
    ui.painter().circle_filled(rect.center(), 5.0, color);
}

/// Text in a status colour.
pub fn toned(ui: &mut Ui, t: Tone, text: impl Into<String>) -> egui::Response {
    let color = tone(ui.visuals(), t);
    ui.label(RichText::new(text.into()).color(color))
}

/// A "Details" section under a failure: the technical chain, selectable for copying.
pub fn details(ui: &mut Ui, id: impl egui::AsIdSalt, text: &str) {
    if text.is_empty() {
        return;
    }
    egui::CollapsingHeader::new("Technical details")
        .id_salt(id)
        .default_open(false)
        .show(ui, |ui| {
            ui.add(egui::Label::new(RichText::new(text).monospace()).wrap());
        });
}

/// `widget` at the left of a cell `width` wide (after `indent`), the cell kept whole so
/// the next column starts where the header's does.
pub fn left_cell(
    ui: &mut Ui,
    width: f32,
    row_h: f32,
    indent: impl FnOnce(&mut Ui),
    widget: impl egui::Widget,
) -> egui::Response {
    let size = vec2(width, row_h);
    ui.allocate_ui_with_layout(
        size,
        egui::Layout::left_to_right(egui::Align::Center),
        |ui| {
            ui.set_min_size(size);
            ui.set_max_width(width);
            indent(ui);
            ui.add(widget)
        },
    )
    .inner
}

/// A table row `row_h` high across the available width: the whole row reacts to clicks (its
/// response is returned with what `cells` returns), is tinted when selected or hovered, and
/// `cells` draws its widgets left to right on it, after the row, so a click on a widget is
/// the widget's. `id` must be unique among the rows.
pub fn table_row<R>(
    ui: &mut Ui,
    row_h: f32,
    id: egui::Id,
    selected: bool,
    cells: impl FnOnce(&mut Ui) -> R,
) -> (egui::Response, R, Rect) {
    let rect = Rect::from_min_size(ui.cursor().min, vec2(ui.available_width(), row_h));
    let bg = ui.interact(rect, id, Sense::click());
    if selected || bg.hovered() {
        let v = ui.visuals();
        let fill = if selected {
            v.selection.bg_fill.gamma_multiply(0.35)
        } else {
            v.widgets.hovered.weak_bg_fill.gamma_multiply(0.5)
        };
        ui.painter().rect_filled(rect, 2.0, fill);
    }
    let mut row_ui = ui.new_child(
        UiBuilder::new()
            .max_rect(rect)
            .layout(egui::Layout::left_to_right(egui::Align::Center)),
    );
    let r = cells(&mut row_ui);
    ui.allocate_rect(rect, Sense::hover());
    (bg, r, rect)
}
