//! A disk in a host's library: convert it into a new disk of another format, change its
//! size, or delete it. The checks are the agent's (`agent::disks`): a VHD holds at most
//! 2040 GiB of 512-byte sectors, a VHD cannot shrink, shrinking needs consent, names are
//! at most 200 characters without '/'.

use egui::{Context, RichText};
use proto::v1::{Disk, DiskFormat, DiskVariant};

use super::super::command::UiCommand;
use super::super::state::State;
use super::super::theme::{Tone, tone};
use super::super::words::human;
use super::{Next, buttons, modal};
use crate::backend::{DiskAction, HostId};

const MAX_DISK: u64 = 64 << 40;
const MAX_VHD: u64 = 2040 << 30;
const MAX_NAME_CHARS: usize = 200;

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Convert {
        format: DiskFormat,
        fixed: bool,
        name: String,
    },
    Resize {
        mib: u64,
        shrink: bool,
    },
    Delete,
}

pub(in crate::app) struct DiskDialog {
    host: HostId,
    disk_id: String,
    kind: Kind,
}

fn format_word(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Vhdx => "VHDX",
        DiskFormat::Vhd => "VHD",
        DiskFormat::Raw => "raw",
        DiskFormat::Unspecified => "unknown",
    }
}

/// "web.vhd" as VHDX: "web.vhdx" (the agent's default name).
fn converted_name(name: &str, f: DiskFormat) -> String {
    let ext = match f {
        DiskFormat::Vhd => "vhd",
        DiskFormat::Raw => "raw",
        _ => "vhdx",
    };
    let stem = match name.rsplit_once('.') {
        Some((stem, e))
            if !stem.is_empty()
                && ["vhd", "vhdx", "raw", "img"].contains(&e.to_ascii_lowercase().as_str()) =>
        {
            stem
        }
        _ => name,
    };
    format!("{stem}.{ext}")
}

impl DiskDialog {
    fn new(
        state: &State,
        host: HostId,
        disk_id: &str,
        kind: impl FnOnce(&Disk) -> Kind,
    ) -> Option<Self> {
        let d = state.host(host)?.disks.get(disk_id)?;
        Some(DiskDialog {
            host,
            disk_id: disk_id.to_string(),
            kind: kind(d),
        })
    }

    pub fn convert(state: &State, host: HostId, disk_id: &str) -> Option<Self> {
        Self::new(state, host, disk_id, |d| {
            let format = if d.format == DiskFormat::Vhdx as i32 {
                DiskFormat::Vhd
            } else {
                DiskFormat::Vhdx
            };
            Kind::Convert {
                format,
                fixed: false,
                name: converted_name(&d.name, format),
            }
        })
    }

    pub fn resize(state: &State, host: HostId, disk_id: &str) -> Option<Self> {
        Self::new(state, host, disk_id, |d| Kind::Resize {
            mib: d.virtual_size.div_ceil(1 << 20),
            shrink: false,
        })
    }

    pub fn delete(state: &State, host: HostId, disk_id: &str) -> Option<Self> {
        Self::new(state, host, disk_id, |_| Kind::Delete)
    }
}

/// What is wrong with the request, as the agent would say it.
fn problem(kind: &Kind, d: &Disk) -> Option<String> {
    let sector = u64::from(d.logical_sector_size.max(512));
    match kind {
        Kind::Convert { format, name, .. } => {
            let name = name.trim();
            if name.is_empty() {
                Some("give the new disk a name".into())
            } else if name.chars().count() > MAX_NAME_CHARS || name.contains('/') {
                Some(format!(
                    "the name must be at most {MAX_NAME_CHARS} characters, without '/'"
                ))
            } else if *format == DiskFormat::Vhd && sector != 512 {
                Some("VHD has 512-byte sectors only; this disk has 4096-byte sectors".into())
            } else if *format == DiskFormat::Vhd && d.virtual_size > MAX_VHD {
                Some("the disk is larger than a VHD can be (2040 GiB)".into())
            } else {
                None
            }
        }
        Kind::Resize { mib, shrink } => {
            let size = mib << 20;
            let vhd = d.format == DiskFormat::Vhd as i32;
            if size == 0 {
                Some("the size must be more than 0".into())
            } else if size > MAX_DISK {
                Some("the size must be at most 64 TiB".into())
            } else if vhd && size > MAX_VHD {
                Some("a VHD can be at most 2040 GiB".into())
            } else if size < d.virtual_size && vhd {
                Some("shrinking a VHD is not supported (convert it to VHDX first)".into())
            } else if size < d.virtual_size && !shrink {
                Some("the new size is smaller: tick the box to shrink (the data past the new end is lost)".into())
            } else if size == d.virtual_size {
                Some("that is the disk's size now".into())
            } else {
                None
            }
        }
        Kind::Delete => None,
    }
}

pub(super) fn show(
    ctx: &Context,
    dlg: &mut DiskDialog,
    state: &State,
    commands: &mut Vec<UiCommand>,
) -> Next {
    let Some(d) = state.host(dlg.host).and_then(|h| h.disks.get(&dlg.disk_id)) else {
        return Next::Close;
    };
    let host_name = state.host_name(dlg.host);
    let (title, verb) = match dlg.kind {
        Kind::Convert { .. } => (format!("Convert disk '{}'", d.name), "Convert"),
        Kind::Resize { .. } => (format!("Resize disk '{}'", d.name), "Resize"),
        Kind::Delete => (format!("Delete disk '{}'", d.name), "Delete"),
    };
    let current = DiskFormat::try_from(d.format).unwrap_or(DiskFormat::Unspecified);
    let mut next = Next::Keep;
    let closed = modal(ctx, &title, |ui| {
        ui.label(format!(
            "{}: {} {}, {} (file {}) on {host_name}.",
            d.name,
            format_word(current),
            if d.variant == DiskVariant::Fixed as i32 {
                "fixed"
            } else {
                "dynamic"
            },
            human(d.virtual_size),
            human(d.file_size)
        ));
        match &mut dlg.kind {
            Kind::Convert {
                format,
                fixed,
                name,
            } => {
                ui.label("A new disk is made; the original stays as it is.");
                egui::Grid::new("convert").num_columns(2).show(ui, |ui| {
                    ui.label("Format");
                    ui.horizontal(|ui| {
                        for f in [DiskFormat::Vhdx, DiskFormat::Vhd, DiskFormat::Raw] {
                            if ui.selectable_value(format, f, format_word(f)).clicked() {
                                *name = converted_name(&d.name, f);
                            }
                        }
                    });
                    ui.end_row();
                    ui.label("Allocation");
                    ui.add_enabled_ui(*format != DiskFormat::Raw, |ui| {
                        ui.horizontal(|ui| {
                            ui.selectable_value(fixed, false, "dynamic (grows as written)");
                            ui.selectable_value(fixed, true, "fixed (all space now)");
                        });
                    });
                    ui.end_row();
                    let l = ui.label("New disk's name");
                    ui.text_edit_singleline(name).labelled_by(l.id);
                    ui.end_row();
                });
            }
            Kind::Resize { mib, shrink } => {
                egui::Grid::new("resize").num_columns(2).show(ui, |ui| {
                    let l = ui.label("New size (MiB)");
                    ui.add(
                        egui::DragValue::new(mib)
                            .range(1..=MAX_DISK >> 20)
                            .speed(64),
                    )
                    .labelled_by(l.id);
                    ui.end_row();
                });
                if (*mib << 20) < d.virtual_size {
                    ui.checkbox(shrink, "Shrink: the data past the new end is lost");
                }
                ui.label(
                    RichText::new("Growing a disk does not grow the guest's partitions; do that inside the guest.")
                        .weak(),
                );
            }
            Kind::Delete => {
                ui.label("The disk's file is removed from the host. This cannot be undone.");
            }
        }
        let problem = problem(&dlg.kind, d);
        if let Some(p) = &problem {
            ui.label(RichText::new(p).color(tone(ui.visuals(), Tone::Bad)));
        }
        buttons(ui, |ui| {
            if ui
                .add_enabled(problem.is_none(), egui::Button::new(verb))
                .clicked()
            {
                let action = match &dlg.kind {
                    Kind::Convert {
                        format,
                        fixed,
                        name,
                    } => DiskAction::Convert {
                        format: *format,
                        variant: if *fixed || *format == DiskFormat::Raw {
                            DiskVariant::Fixed
                        } else {
                            DiskVariant::Dynamic
                        },
                        name: name.trim().to_string(),
                    },
                    Kind::Resize { mib, shrink } => DiskAction::Resize {
                        new_size: *mib << 20,
                        allow_shrink: *shrink,
                    },
                    Kind::Delete => DiskAction::Delete,
                };
                commands.push(UiCommand::DiskAction {
                    host: dlg.host,
                    disk_id: dlg.disk_id.clone(),
                    action,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_as_the_agent_checks_them() {
        let d = Disk {
            name: "web.vhd".into(),
            format: DiskFormat::Vhd as i32,
            virtual_size: 64 << 20,
            logical_sector_size: 512,
            ..Default::default()
        };
        assert_eq!(converted_name("web.vhd", DiskFormat::Vhdx), "web.vhdx");
        assert_eq!(converted_name("web", DiskFormat::Vhd), "web.vhd");
        let shrink = Kind::Resize {
            mib: 32,
            shrink: true,
        };
        assert_eq!(
            problem(&shrink, &d).as_deref(),
            Some("shrinking a VHD is not supported (convert it to VHDX first)")
        );
        let grow = Kind::Resize {
            mib: 128,
            shrink: false,
        };
        assert_eq!(problem(&grow, &d), None);
        let vhdx = Disk {
            format: DiskFormat::Vhdx as i32,
            ..d.clone()
        };
        assert!(
            problem(
                &Kind::Resize {
                    mib: 32,
                    shrink: false
                },
                &vhdx
            )
            .is_some()
        );
        assert_eq!(
            problem(
                &Kind::Resize {
                    mib: 32,
                    shrink: true
                },
                &vhdx
            ),
            None
        );
        let bad = Kind::Convert {
            format: DiskFormat::Vhdx,
            fixed: false,
            name: "a/b".into(),
        };
        assert!(problem(&bad, &d).is_some());
    }
}
