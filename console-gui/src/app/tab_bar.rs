//! The tabs above the central panel: the inventory, the disk library, and one per open
//! console (wrapping onto more lines when there are many).

use egui::Ui;

use super::command::{TabRef, UiCommand};
use super::state::ConsoleTab;

/// Which page the first tabs show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MainPage {
    #[default]
    Inventory,
    Library,
}

/// `active` is 0 for `main`, i + 1 for `tabs[i]`.
pub(super) fn show(
    ui: &mut Ui,
    tabs: &[ConsoleTab],
    active: &mut usize,
    main: &mut MainPage,
    commands: &mut Vec<UiCommand>,
) {
    ui.horizontal_wrapped(|ui| {
        for (page, label) in [
            (MainPage::Inventory, "Inventory"),
            (MainPage::Library, "Disk library"),
        ] {
            if ui
                .selectable_label(*active == 0 && *main == page, label)
                .clicked()
            {
                *active = 0;
                *main = page;
            }
        }
        for (i, t) in tabs.iter().enumerate() {
            ui.separator();
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
