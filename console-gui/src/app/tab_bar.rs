//! The tabs above the central panel: the inventory and one per open console.

use egui::Ui;

use super::command::{TabRef, UiCommand};
use super::state::ConsoleTab;

/// `active` is 0 for the inventory, i + 1 for `tabs[i]`.
pub(super) fn show(
    ui: &mut Ui,
    tabs: &[ConsoleTab],
    active: &mut usize,
    commands: &mut Vec<UiCommand>,
) {
    ui.horizontal_wrapped(|ui| {
        if ui.selectable_label(*active == 0, "Inventory").clicked() {
            *active = 0;
        }
        for (i, t) in tabs.iter().enumerate() {
            if ui.selectable_label(*active == i + 1, &t.title).clicked() {
                *active = i + 1;
            }
            if ui
                .small_button("x")
                .on_hover_text("Close this console")
                .clicked()
            {
                commands.push(UiCommand::CloseConsole(TabRef::of(t)));
            }
        }
    });
}
