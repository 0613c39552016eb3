//! Small drawing helpers shared by the panels.

use egui::{Color32, Ui};
use proto::v1::VmState;

/// The colour of a VM state word.
pub fn state_color(s: i32) -> Color32 {
    match VmState::try_from(s) {
        Ok(VmState::Running) => Color32::from_rgb(60, 170, 80),
        Ok(VmState::Paused | VmState::Starting | VmState::Stopping) => {
            Color32::from_rgb(210, 160, 40)
        }
        Ok(VmState::Crashed) => Color32::from_rgb(220, 60, 60),
        _ => Color32::GRAY,
    }
}

/// A small filled circle in `color` (host and task status).
pub fn status_dot(ui: &mut Ui, color: Color32) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
    ui.painter().circle_filled(rect.center(), 4.5, color);
}
