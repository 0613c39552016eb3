//! "New VM": name, CPUs, memory, boot image, an optional disk from the host's library,
//! kernel command line and screen size.

use egui::Context;
use proto::v1::{DiskAttachment, VmSpec};

use super::super::command::UiCommand;
use super::super::state::State;
use super::Next;
use crate::backend::HostId;

pub(in crate::app) struct CreateDialog {
    host: HostId,
    name: String,
    cpus: u32,
    memory_mib: u32,
    boot_image: String,
    disk: Option<String>,
    cmdline: String,
    width: u32,
    height: u32,
}

impl CreateDialog {
    /// A VM on `host` with 1 CPU, 512 MiB and a 1024x768 screen.
    pub fn new(host: HostId, name: String, boot_image: String, disk: Option<String>) -> Self {
        CreateDialog {
            host,
            name,
            cpus: 1,
            memory_mib: 512,
            boot_image,
            disk,
            cmdline: String::new(),
            width: 1024,
            height: 768,
        }
    }

    fn spec(&self) -> VmSpec {
        VmSpec {
            name: self.name.trim().to_string(),
            cpus: self.cpus,
            memory_bytes: u64::from(self.memory_mib) << 20,
            disks: self
                .disk
                .iter()
                .map(|id| DiskAttachment {
                    disk_id: id.clone(),
                    read_only: false,
                })
                .collect(),
            boot_image: self.boot_image.clone(),
            cmdline: self.cmdline.trim().to_string(),
            display_width: self.width,
            display_height: self.height,
            autostart: false,
        }
    }
}

pub(super) fn show(
    ctx: &Context,
    d: &mut CreateDialog,
    state: &State,
    commands: &mut Vec<UiCommand>,
) -> Next {
    let host = state.host(d.host);
    let images: Vec<String> = host
        .and_then(|h| h.info.as_ref())
        .map(|i| i.boot_images.iter().map(|b| b.name.clone()).collect())
        .unwrap_or_default();
    let disks: Vec<(String, String)> = host
        .map(|h| {
            h.disks
                .values()
                .map(|d| (d.id.clone(), d.name.clone()))
                .collect()
        })
        .unwrap_or_default();
    let host_name = host.map(|h| h.cfg.name.clone()).unwrap_or_default();
    let mut next = Next::Keep;
    egui::Window::new(format!("New VM on {host_name}"))
        .collapsible(false)
        .show(ctx, |ui| {
            egui::Grid::new("vm-form").num_columns(2).show(ui, |ui| {
                let l = ui.label("VM name");
                ui.text_edit_singleline(&mut d.name).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("CPUs");
                ui.add(egui::DragValue::new(&mut d.cpus).range(1..=64))
                    .labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Memory (MiB)");
                ui.add(
                    egui::DragValue::new(&mut d.memory_mib)
                        .range(64..=1 << 20)
                        .speed(64),
                )
                .labelled_by(l.id);
                ui.end_row();
                ui.label("Boot image");
                egui::ComboBox::from_id_salt("boot")
                    .selected_text(d.boot_image.clone())
                    .show_ui(ui, |ui| {
                        for i in &images {
                            ui.selectable_value(&mut d.boot_image, i.clone(), i);
                        }
                    });
                ui.end_row();
                ui.label("Disk");
                let shown = d
                    .disk
                    .as_ref()
                    .and_then(|id| disks.iter().find(|(i, _)| i == id))
                    .map_or("none".to_string(), |(_, n)| n.clone());
                egui::ComboBox::from_id_salt("disk")
                    .selected_text(shown)
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut d.disk, None, "none");
                        for (id, n) in &disks {
                            ui.selectable_value(&mut d.disk, Some(id.clone()), n);
                        }
                    });
                ui.end_row();
                let l = ui.label("Kernel command line");
                ui.add(
                    egui::TextEdit::singleline(&mut d.cmdline)
                        .hint_text("the boot image's default"),
                )
                .labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Screen");
                ui.horizontal(|ui| {
                    ui.add(egui::DragValue::new(&mut d.width).range(640..=3840))
                        .labelled_by(l.id);
                    ui.label("x");
                    ui.add(egui::DragValue::new(&mut d.height).range(480..=2160));
                });
                ui.end_row();
            });
            ui.horizontal(|ui| {
                if ui
                    .add_enabled(!d.name.trim().is_empty(), egui::Button::new("Create"))
                    .clicked()
                {
                    commands.push(UiCommand::CreateVm {
                        host: d.host,
                        spec: d.spec(),
                    });
                    next = Next::Close;
                }
                if ui.button("Cancel").clicked() {
                    next = Next::Close;
                }
            });
        });
    next
}
