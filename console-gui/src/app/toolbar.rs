//! The bar at the top: "Add host…" and how many hosts are online.

use egui::Ui;

use super::dialogs::{Dialog, HostDialog};
use super::state::State;
use crate::backend::HostStatus;

pub(super) fn show(ui: &mut Ui, state: &State, dialog: &mut Option<Dialog>) {
    ui.horizontal_wrapped(|ui| {
        ui.heading("Parvis");
        ui.separator();
        if ui.button("Add host…").clicked() {
            *dialog = Some(Dialog::Host(HostDialog::add()));
        }
        let online = state
            .hosts
            .iter()
            .filter(|h| h.status == HostStatus::Online)
            .count();
        let vms: usize = state.hosts.iter().map(|h| h.vms.len()).sum();
        ui.label(format!(
            "{online} of {} hosts online, {vms} VMs",
            state.hosts.len()
        ));
    });
}
