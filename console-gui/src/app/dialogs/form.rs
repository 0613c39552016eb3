//! The VM settings form the New VM and Settings dialogs share: name, CPUs, memory, screen,
//! what the VM boots (its disk's own boot entry, picked from the entries the host read off
//! the disk, or a boot image) and the kernel command line, disks (attach and detach),
//! autostart; each field's problem ([`crate::app::rules`]) is said beside it.

use egui::{RichText, Ui};
use proto::v1::{BootSource, DiskAttachment, DiskBootInfo, DiskBus, VmSpec};

use super::super::rules::{self, Field, HEIGHTS, Limits, MIN_MEMORY_MIB, WIDTHS};
use super::super::state::Host;
use super::super::theme::{Tone, tone};
use super::super::words::human;

/// What the form edits.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct VmForm {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub width: u32,
    pub height: u32,
    /// A `BootSource`.
    pub boot_source: i32,
    pub boot_image: String,
    /// With the disk: the entry (kernel version or title); empty = the disk's default.
    pub boot_entry: String,
    pub cmdline: String,
    pub disks: Vec<DiskAttachment>,
    pub autostart: bool,
    /// Network adapters: kept as they are (the console does not edit them yet).
    pub nics: Vec<proto::v1::NetworkAdapter>,
}

impl VmForm {
    pub fn of(spec: &VmSpec) -> Self {
        let (width, height) = match (spec.display_width, spec.display_height) {
            (0, 0) => (1024, 768),
            s => s,
        };
        VmForm {
            name: spec.name.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_bytes >> 20,
            width,
            height,
            boot_source: spec.boot_source,
            boot_image: spec.boot_image.clone(),
            boot_entry: spec.boot_entry.clone(),
            cmdline: spec.cmdline.clone(),
            disks: spec.disks.clone(),
            autostart: spec.autostart,
            nics: spec.nics.clone(),
        }
    }

    pub fn spec(&self) -> VmSpec {
        VmSpec {
            name: self.name.trim().to_string(),
            cpus: self.cpus,
            memory_bytes: self.memory_mib << 20,
            disks: self.disks.clone(),
            boot_image: self.boot_image.clone(),
            cmdline: self.cmdline.trim().to_string(),
            display_width: self.width,
            display_height: self.height,
            autostart: self.autostart,
            boot_source: self.boot_source,
            boot_entry: if self.boots_disk() {
                self.boot_entry.trim().to_string()
            } else {
                String::new()
            },
            nics: self.nics.clone(),
        }
    }

    pub fn boots_disk(&self) -> bool {
        self.boot_source == BootSource::Disk as i32
    }

    /// The form's problems on `host`; `vm_id` is the VM being edited (its own name is not
    /// taken).
    pub fn problems(&self, host: Option<&Host>, vm_id: Option<&str>) -> Vec<(Field, String)> {
        let name = self.name.trim();
        let taken = host.is_some_and(|h| {
            h.vms.values().any(|v| {
                Some(v.id.as_str()) != vm_id && v.spec.as_ref().is_some_and(|s| s.name == name)
            })
        });
        rules::check(&self.spec(), Limits::of(host), taken)
    }
}

/// `add` in a scope whose id depends only on `salt`, so its widgets keep their ids when
/// rows above them come and go (an assistive technology's action still reaches them).
fn stable<R>(ui: &mut Ui, salt: &str, add: impl FnOnce(&mut Ui) -> R) -> R {
    let id = ui.make_persistent_id(salt);
    ui.scope_builder(egui::UiBuilder::new().scope_id(id), add)
        .inner
}

/// A field's problem under it, in the "bad" colour.
fn problem(ui: &mut Ui, problems: &[(Field, String)], field: Field) {
    if let Some(p) = rules::problem(problems, field) {
        ui.label(""); // the label column
        ui.label(RichText::new(p).color(tone(ui.visuals(), Tone::Bad)));
        ui.end_row();
    }
}

/// Draw the form; `enabled` false greys every field. Each field has an id of its own
/// ([`stable`]), so a problem line appearing above it does not change it.
pub(super) fn show(
    ui: &mut Ui,
    f: &mut VmForm,
    host: Option<&Host>,
    problems: &[(Field, String)],
    enabled: bool,
) {
    let limits = Limits::of(host);
    let images: Vec<String> = host
        .and_then(|h| h.info.as_ref())
        .map(|i| i.boot_images.iter().map(|b| b.name.clone()).collect())
        .unwrap_or_default();
    ui.add_enabled_ui(enabled, |ui| {
        egui::Grid::new("vm-form")
            .num_columns(2)
            .spacing([12.0, 6.0])
            .show(ui, |ui| {
                let l = ui.label("VM name");
                stable(ui, "name", |ui| {
                    ui.text_edit_singleline(&mut f.name).labelled_by(l.id)
                });
                ui.end_row();
                problem(ui, problems, Field::Name);

                let l = ui.label("CPUs");
                stable(ui, "cpus", |ui| {
                    ui.add(egui::DragValue::new(&mut f.cpus).range(1..=limits.max_cpus))
                        .labelled_by(l.id)
                });
                ui.end_row();
                problem(ui, problems, Field::Cpus);

                let l = ui.label("Memory (MiB)");
                let max = if limits.memory_bytes > 0 {
                    (limits.memory_bytes >> 20).max(MIN_MEMORY_MIB)
                } else {
                    1 << 22
                };
                stable(ui, "memory", |ui| {
                    ui.horizontal(|ui| {
                        ui.add(
                            egui::DragValue::new(&mut f.memory_mib)
                                .range(MIN_MEMORY_MIB..=max)
                                .speed(64),
                        )
                        .labelled_by(l.id);
                        if limits.memory_bytes > 0 {
                            ui.label(
                                RichText::new(format!(
                                    "the host has {}",
                                    human(limits.memory_bytes)
                                ))
                                .weak(),
                            );
                        }
                    })
                });
                ui.end_row();
                problem(ui, problems, Field::Memory);

                let l = ui.label("Screen");
                stable(ui, "screen", |ui| {
                    ui.horizontal(|ui| {
                        ui.add(egui::DragValue::new(&mut f.width).range(WIDTHS))
                            .labelled_by(l.id);
                        ui.label("x");
                        ui.add(egui::DragValue::new(&mut f.height).range(HEIGHTS));
                    })
                });
                ui.end_row();
                problem(ui, problems, Field::Screen);

                let l = ui.label("Boots");
                stable(ui, "boot", |ui| {
                    ui.vertical(|ui| boot(ui, f, host, &images))
                        .response
                        .labelled_by(l.id)
                });
                ui.end_row();
                problem(ui, problems, Field::Boot);

                let l = ui.label("Kernel command line");
                let hint = if f.boots_disk() {
                    "parameters added to the boot entry's own"
                } else {
                    "the boot image's default"
                };
                stable(ui, "cmdline", |ui| {
                    ui.add(egui::TextEdit::singleline(&mut f.cmdline).hint_text(hint))
                        .labelled_by(l.id)
                });
                ui.end_row();
                problem(ui, problems, Field::Cmdline);

                ui.label("Disks");
                stable(ui, "disks", |ui| ui.vertical(|ui| disks(ui, f, host)));
                ui.end_row();
                problem(ui, problems, Field::Disks);

                ui.label("Autostart");
                stable(ui, "autostart", |ui| {
                    ui.checkbox(
                        &mut f.autostart,
                        "Start the VM when the host's agent starts",
                    )
                });
                ui.end_row();
            });
    });
}

/// What the host read off a disk: what it boots, or why it cannot, in a line.
pub(in crate::app) fn boot_summary(b: Option<&DiskBootInfo>) -> (String, bool) {
    match b.filter(|b| b.inspected) {
        None => ("not read yet".into(), true),
        Some(b) if b.bootable => {
            let os = if b.os.is_empty() { "Linux" } else { &b.os };
            let n = b.entries.len();
            (
                format!("{os}, {n} boot entr{}", if n == 1 { "y" } else { "ies" }),
                true,
            )
        }
        Some(b) => (format!("cannot boot: {}", b.reason), false),
    }
}

/// How the VM names an entry: its kernel version when no other entry has it (it survives a
/// retitled menu), else its title (Debian lists each kernel two or three times).
fn entry_word<'a>(entries: &'a [proto::v1::BootEntry], e: &'a proto::v1::BootEntry) -> &'a str {
    let unique = entries.iter().filter(|x| x.version == e.version).count() == 1;
    if e.version.is_empty() || !unique {
        &e.title
    } else {
        &e.version
    }
}

/// "Boots": the first disk's own boot entry (the disk's default or one picked from the
/// entries the host read) or a boot image.
fn boot(ui: &mut Ui, f: &mut VmForm, host: Option<&Host>, images: &[String]) {
    ui.horizontal(|ui| {
        ui.radio_value(
            &mut f.boot_source,
            BootSource::Disk as i32,
            "Its disk's own system",
        )
        .on_hover_text(
            "The kernel, initrd and command line the first disk's boot loader would start \
             (grub.cfg, Boot Loader Spec entries or Debian's /vmlinuz), read off the disk",
        );
        ui.radio_value(&mut f.boot_source, BootSource::Image as i32, "A boot image");
    });
    if f.boot_source == BootSource::Unspecified as i32 {
        ui.label(RichText::new("the host decides from the first disk").weak());
        return;
    }
    if !f.boots_disk() {
        egui::ComboBox::from_id_salt("boot-image")
            .selected_text(f.boot_image.clone())
            .show_ui(ui, |ui| {
                for i in images {
                    ui.selectable_value(&mut f.boot_image, i.clone(), i);
                }
            });
        return;
    }
    let info = f
        .disks
        .first()
        .and_then(|d| host.and_then(|h| h.disks.get(&d.disk_id)))
        .and_then(|d| d.boot.as_ref());
    let (summary, ok) = boot_summary(info);
    let text = RichText::new(summary);
    ui.label(if ok {
        text.weak()
    } else {
        text.color(tone(ui.visuals(), Tone::Bad))
    });
    let Some(b) = info.filter(|b| b.bootable) else {
        return;
    };
    let default = b
        .entries
        .get(b.default_entry as usize)
        .map_or("", |e| e.title.as_str());
    let shown = if f.boot_entry.is_empty() {
        format!("the disk's default ({default})")
    } else {
        f.boot_entry.clone()
    };
    egui::ComboBox::from_id_salt("boot-entry")
        .selected_text(shown)
        .width(320.0)
        .show_ui(ui, |ui| {
            ui.selectable_value(
                &mut f.boot_entry,
                String::new(),
                format!("the disk's default ({default})"),
            );
            for e in &b.entries {
                let word = entry_word(&b.entries, e).to_string();
                ui.selectable_value(&mut f.boot_entry, word, &e.title)
                    .on_hover_text(format!("{}\n{}", e.kernel, e.cmdline));
            }
        })
        .response
        .on_hover_text(
            "The entry the next start boots, kept until changed: pick an older kernel here \
             instead of racing a boot menu",
        );
}

/// The attached disks in boot order, each with its bus, read-only and Detach, and "Attach
/// disk" with the library's other disks.
fn disks(ui: &mut Ui, f: &mut VmForm, host: Option<&Host>) {
    let name_of = |id: &str| {
        host.and_then(|h| h.disks.get(id)).map_or_else(
            || format!("{id} (no longer in the library)"),
            |d| format!("{} ({})", d.name, human(d.virtual_size)),
        )
    };
    let mut detach = None;
    let places: Vec<String> = (0..f.disks.len())
        .map(|i| disk_place(&f.disks, i))
        .collect();
    for (i, d) in f.disks.iter_mut().enumerate() {
        ui.push_id(("disk", i), |ui| {
            ui.horizontal_wrapped(|ui| {
                ui.label(format!("{}: {}", places[i], name_of(&d.disk_id)));
                let before = d.bus;
                egui::ComboBox::from_id_salt("bus")
                    .selected_text(format!("bus: {}", bus_word(d.bus)))
                    .show_ui(ui, |ui| {
                        for b in [DiskBus::Unspecified, DiskBus::Scsi, DiskBus::Virtio] {
                            ui.selectable_value(&mut d.bus, b as i32, bus_word(b as i32));
                        }
                    })
                    .response
                    .on_hover_text(
                        "SCSI is what a guest made on Hyper-V or Azure looks for, and can be \
                         added or removed while the VM runs; virtio-blk suits Linux images \
                         made elsewhere",
                    );
                if d.bus != before {
                    // A new bus: the host picks the place.
                    d.lun = None;
                    d.controller = 0;
                }
                ui.checkbox(&mut d.read_only, "read-only");
                if ui.button("Detach").clicked() {
                    detach = Some(i);
                }
            });
        });
    }
    if let Some(i) = detach {
        f.disks.remove(i);
    }
    if f.disks.is_empty() {
        ui.label(RichText::new("none").weak());
    }
    let free: Vec<(String, String)> = host
        .map(|h| {
            h.disks
                .values()
                .filter(|d| !f.disks.iter().any(|a| a.disk_id == d.id))
                .map(|d| {
                    (
                        d.id.clone(),
                        format!("{} ({})", d.name, human(d.virtual_size)),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut attach = None;
    ui.add_enabled_ui(!free.is_empty(), |ui| {
        egui::ComboBox::from_id_salt("attach")
            .selected_text("Attach disk…")
            .show_ui(ui, |ui| {
                for (id, label) in &free {
                    if ui.selectable_label(false, label).clicked() {
                        attach = Some(id.clone());
                    }
                }
            });
    });
    if let Some(disk_id) = attach {
        f.disks.push(DiskAttachment {
            disk_id,
            read_only: false,
            ..Default::default()
        });
    }
}

/// Where the `i`th of `disks` sits, in words: "SCSI 0:1" (controller:LUN; the guest names it
/// sdX), "vdb (virtio-blk)" (virtio-blk disks are vda, vdb, … in attachment order), or, not
/// yet saved, what the host will pick.
pub(in crate::app) fn disk_place(disks: &[DiskAttachment], i: usize) -> String {
    match DiskBus::try_from(disks[i].bus) {
        Ok(DiskBus::Scsi) => match disks[i].lun {
            Some(l) => format!("SCSI {}:{l}", disks[i].controller),
            None => "SCSI".into(),
        },
        Ok(DiskBus::Virtio) => {
            let n = disks[..i]
                .iter()
                .filter(|d| d.bus == DiskBus::Virtio as i32)
                .count();
            let letter = char::from(b'a' + (n % 26) as u8);
            format!("vd{letter} (virtio-blk)")
        }
        _ => "SCSI for VHD/VHDX, virtio-blk for raw".into(),
    }
}

/// The bus choices of the form, in words.
fn bus_word(bus: i32) -> &'static str {
    match DiskBus::try_from(bus) {
        Ok(DiskBus::Scsi) => "SCSI",
        Ok(DiskBus::Virtio) => "virtio-blk",
        _ => "by format",
    }
}
