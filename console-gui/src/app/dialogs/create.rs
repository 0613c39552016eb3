//! "New VM": the settings form ([`super::form`]) for a VM on a host, optionally made from a
//! disk in the host's library (an import, or "New VM from disk…").

use std::path::Path;

use egui::{Context, RichText};
use proto::v1::{BootSource, DiskAttachment, VmSpec};

use super::super::command::UiCommand;
use super::super::state::State;
use super::form::{self, VmForm};
use super::{Next, buttons, modal};
use crate::backend::HostId;

pub(in crate::app) struct CreateDialog {
    host: HostId,
    form: VmForm,
}

impl CreateDialog {
    /// A VM on `host` with 1 CPU, 512 MiB, a 1024x768 screen and the host's first boot
    /// image; `disk` attached when given, and booted when the host found (or is still
    /// reading) its boot entries.
    pub fn new(state: &State, host: HostId, name: String, disk: Option<String>) -> Self {
        let boots_disk = disk.as_ref().is_some_and(|id| {
            state
                .host(host)
                .and_then(|h| h.disks.get(id))
                .is_some_and(|d| d.boot.as_ref().is_none_or(|b| !b.inspected || b.bootable))
        });
        let boot_image = state
            .host(host)
            .and_then(|h| h.info.as_ref())
            .and_then(|i| i.boot_images.first())
            .map(|b| b.name.clone())
            .unwrap_or_default();
        let spec = VmSpec {
            name,
            cpus: 1,
            memory_bytes: 512 << 20,
            disks: disk
                .into_iter()
                .map(|disk_id| DiskAttachment {
                    disk_id,
                    read_only: false,
                    ..Default::default()
                })
                .collect(),
            boot_image,
            boot_source: if boots_disk {
                BootSource::Disk
            } else {
                BootSource::Image
            } as i32,
            display_width: 1024,
            display_height: 768,
            ..Default::default()
        };
        CreateDialog {
            host,
            form: VmForm::of(&spec),
        }
    }

    /// A VM made from a library disk, named after it ("web.vhdx" makes "web").
    pub fn from_disk(state: &State, host: HostId, disk_id: &str) -> Option<Self> {
        let disk = state.host(host)?.disks.get(disk_id)?;
        let name = Path::new(&disk.name)
            .file_stem()
            .map_or_else(|| disk.name.clone(), |s| s.to_string_lossy().into_owned());
        Some(Self::new(state, host, name, Some(disk_id.to_string())))
    }
}

pub(super) fn show(
    ctx: &Context,
    d: &mut CreateDialog,
    state: &State,
    commands: &mut Vec<UiCommand>,
) -> Next {
    let host = state.host(d.host);
    let host_name = state.host_name(d.host);
    let problems = d.form.problems(host, None);
    let mut next = Next::Keep;
    let closed = modal(ctx, &format!("New VM on {host_name}"), |ui| {
        form::show(ui, &mut d.form, host, &problems, true);
        if let Some(why) = host.and_then(|h| h.cannot_run()) {
            ui.label(
                RichText::new(format!(
                    "Host {host_name} says it cannot run VMs ({why}); the VM can be created but \
                     will probably not start."
                ))
                .weak(),
            );
        }
        buttons(ui, |ui| {
            if ui
                .add_enabled(problems.is_empty(), egui::Button::new("Create"))
                .clicked()
            {
                commands.push(UiCommand::CreateVm {
                    host: d.host,
                    spec: d.form.spec(),
                });
                next = Next::Close;
            }
            if ui.button("Cancel").clicked() {
                next = Next::Close;
            }
        });
    });
    if closed { Next::Close } else { next }
}
