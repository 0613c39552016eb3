//! The details of a VM: summary, why it crashed, its resource graphs (CPU, memory, disk
//! bytes and operations) and its disks.

use egui::{RichText, Ui};
use proto::v1::{DiskAttachment, DiskBus, StatsSample, Vm, VmState};

use super::super::command::UiCommand;
use super::super::dialogs::disk_place;
use super::super::graph;
use super::super::state::Host;
use super::super::theme::{Tone, series};
use super::super::widgets::{details, state_color, toned};
use super::super::words::{duration, human, now_ms, state_word};
use super::{DetailsView, chart, end_ms, feed_error, graphs_header, line, section, summary};
use crate::backend::{HostStatus, VmDiskChange};
use crate::stats::Series;

pub(super) fn show(
    ui: &mut Ui,
    h: &Host,
    v: &Vm,
    feed: Option<&Series>,
    view: &mut DetailsView,
    commands: &mut Vec<UiCommand>,
) {
    let spec = v.spec.clone().unwrap_or_default();
    ui.horizontal_wrapped(|ui| {
        ui.heading(format!("VM '{}'", spec.name));
        ui.label(RichText::new(state_word(v.state)).color(state_color(ui, v.state)));
        ui.label(RichText::new(format!("on {}", h.cfg.name)).weak());
    });
    if v.state == VmState::Crashed as i32 {
        let line = match h.cannot_run() {
            Some(why) => format!(
                "It could not run: host {} cannot run VMs ({why}); run it on a host that can.",
                h.cfg.name
            ),
            None => "It stopped unexpectedly; start it again, and if it keeps stopping, read the \
                     technical details."
                .to_string(),
        };
        toned(ui, Tone::Bad, line);
        let mut tech = v.state_reason.clone();
        if !v.crash_log.is_empty() {
            tech.push_str("\n\n");
            tech.push_str(&v.crash_log);
        }
        details(ui, ("crash", &v.id), &tech);
    }
    let running = matches!(
        VmState::try_from(v.state),
        Ok(VmState::Running | VmState::Paused)
    );
    let uptime = if running {
        duration(((now_ms() - v.state_changed_ms).max(0) / 1000) as u64)
    } else {
        "-".into()
    };
    let (w, hgt) = match (spec.display_width, spec.display_height) {
        (0, 0) => (1024, 768),
        s => s,
    };
    let mut rows = vec![
        ("Running for", uptime),
        ("CPUs", spec.cpus.to_string()),
        ("Memory", human(spec.memory_bytes)),
        ("Screen", format!("{w} x {hgt}")),
        ("Boots", boot_words(&spec)),
        (
            "Autostart",
            if spec.autostart { "yes" } else { "no" }.to_string(),
        ),
    ];
    if !spec.cmdline.is_empty() {
        rows.push(("Kernel command line", spec.cmdline.clone()));
    }
    if !v.state_reason.is_empty() && v.state != VmState::Crashed as i32 {
        rows.push(("Last change", v.state_reason.clone()));
    }
    rows.push(("ID", v.id.clone()));
    summary(ui, "vm-summary", &rows);

    graphs_header(ui, view);
    let samples: Vec<&StatsSample> = feed.map(|f| f.samples.iter().collect()).unwrap_or_default();
    if samples.is_empty() {
        let why = if running {
            "Waiting for the first samples from the host…".to_string()
        } else {
            format!(
                "No resource use: VM '{}' is {}; the graphs fill while it runs.",
                spec.name,
                state_word(v.state).to_lowercase()
            )
        };
        ui.label(RichText::new(why).weak());
    } else {
        let end = end_ms(feed);
        let last = samples[samples.len() - 1];
        let cpus = f64::from(spec.cpus.max(1));
        let c = series(ui.visuals());
        let cores = |v: f64| format!("{v:.2} cores");
        chart(
            ui,
            view,
            end,
            format!("CPU: {:.2} of {} cores", last.cpu_cores, spec.cpus),
            vec![line("CPU", c[0], &samples, |s| s.cpu_cores)],
            cpus,
            &cores,
        );
        let bytes = |v: f64| human(v as u64);
        chart(
            ui,
            view,
            end,
            format!(
                "Memory: the VM's process uses {}; guest RAM {}",
                human(last.memory_used_bytes),
                human(last.memory_total_bytes)
            ),
            vec![line("in use", c[0], &samples, |s| {
                s.memory_used_bytes as f64
            })],
            samples
                .iter()
                .map(|s| s.memory_total_bytes.max(s.memory_used_bytes))
                .max()
                .unwrap_or(1) as f64,
            &bytes,
        );
        let rate = |v: f64| format!("{}/s", human(v as u64));
        let io = [
            line("read", c[0], &samples, |s| s.disk_read_bytes_per_s as f64),
            line("write", c[1], &samples, |s| s.disk_write_bytes_per_s as f64),
        ];
        let top = graph::scale_max(
            io.iter().flat_map(|l| l.points.iter().map(|p| &p.1)),
            1024.0,
        );
        chart(
            ui,
            view,
            end,
            format!(
                "Disk: read {}/s, write {}/s",
                human(last.disk_read_bytes_per_s),
                human(last.disk_write_bytes_per_s)
            ),
            io.into(),
            top,
            &rate,
        );
        let ops = |v: f64| format!("{v:.0}/s");
        let io = [
            line("reads", c[0], &samples, |s| s.disk_read_ops_per_s as f64),
            line("writes", c[1], &samples, |s| s.disk_write_ops_per_s as f64),
        ];
        let top = graph::scale_max(io.iter().flat_map(|l| l.points.iter().map(|p| &p.1)), 10.0);
        chart(
            ui,
            view,
            end,
            format!(
                "Disk operations: {} reads/s, {} writes/s",
                last.disk_read_ops_per_s, last.disk_write_ops_per_s
            ),
            io.into(),
            top,
            &ops,
        );
    }
    feed_error(ui, feed);

    section(ui, "Disks");
    disks(ui, h, v, &spec.disks, commands);
}

/// Why a disk cannot be added or removed now (None: it can).
fn disk_change_refused(h: &Host, v: &Vm, bus: Option<DiskBus>) -> Option<String> {
    if h.status != HostStatus::Online {
        return Some(format!("host {} is offline", h.cfg.name));
    }
    match VmState::try_from(v.state) {
        Ok(VmState::Off | VmState::Crashed) => None,
        Ok(VmState::Running | VmState::Paused) => match bus {
            Some(DiskBus::Scsi) | None => None,
            _ => Some("virtio-blk disks can be added or removed only while the VM is off".into()),
        },
        _ => Some(format!("the VM is {}", state_word(v.state))),
    }
}

/// The VM's disks with where each sits and Remove, then "Add disk" with the library's
/// other disks. A running VM takes and gives up SCSI disks at once (the guest sees a new
/// /dev/sdX); new disks on it go on SCSI.
fn disks(
    ui: &mut Ui,
    h: &Host,
    v: &Vm,
    attached: &[DiskAttachment],
    commands: &mut Vec<UiCommand>,
) {
    if attached.is_empty() {
        ui.label(RichText::new("No disks: the VM boots from its boot image only.").weak());
    }
    egui::Grid::new("vm-disks")
        .num_columns(5)
        .spacing([16.0, 4.0])
        .show(ui, |ui| {
            if !attached.is_empty() {
                for t in ["Where", "Disk", "Size", "Access", ""] {
                    ui.label(RichText::new(t).weak());
                }
                ui.end_row();
            }
            for (i, a) in attached.iter().enumerate() {
                ui.label(disk_place(attached, i));
                match h.disks.get(&a.disk_id) {
                    Some(d) => {
                        ui.label(&d.name);
                        ui.label(format!(
                            "{} (file {})",
                            human(d.virtual_size),
                            human(d.file_size)
                        ));
                    }
                    None => {
                        ui.label(format!("{} (not in the library)", a.disk_id));
                        ui.label("-");
                    }
                }
                ui.label(if a.read_only {
                    "read-only"
                } else {
                    "read-write"
                });
                let refused =
                    disk_change_refused(h, v, Some(DiskBus::try_from(a.bus).unwrap_or_default()));
                let b = ui
                    .add_enabled(refused.is_none(), egui::Button::new("Remove"))
                    .on_disabled_hover_text(refused.unwrap_or_default());
                if b.clicked() {
                    commands.push(UiCommand::VmDisk {
                        host: h.id,
                        vm_id: v.id.clone(),
                        change: VmDiskChange::Detach(a.disk_id.clone()),
                    });
                }
                ui.end_row();
            }
        });
    let free: Vec<(&String, String)> = h
        .disks
        .values()
        .filter(|d| !attached.iter().any(|a| a.disk_id == d.id))
        .map(|d| (&d.id, format!("{} ({})", d.name, human(d.virtual_size))))
        .collect();
    let running = matches!(
        VmState::try_from(v.state),
        Ok(VmState::Running | VmState::Paused)
    );
    let refused = disk_change_refused(h, v, None).or_else(|| {
        free.is_empty()
            .then(|| "every disk in the host's library is attached already".to_string())
    });
    let mut add = None;
    ui.add_space(4.0);
    ui.add_enabled_ui(refused.is_none(), |ui| {
        let title = if running {
            "Add disk (SCSI)…"
        } else {
            "Add disk…"
        };
        ui.menu_button(title, |ui| {
            for (id, label) in &free {
                if ui.button(label).clicked() {
                    add = Some((*id).clone());
                    ui.close();
                }
            }
        })
        .response
        .on_disabled_hover_text(refused.clone().unwrap_or_default());
    });
    if let Some(disk_id) = add {
        commands.push(UiCommand::VmDisk {
            host: h.id,
            vm_id: v.id.clone(),
            change: VmDiskChange::Attach(DiskAttachment {
                disk_id,
                // A running VM takes SCSI disks only; otherwise the host picks by format.
                bus: if running {
                    DiskBus::Scsi as i32
                } else {
                    DiskBus::Unspecified as i32
                },
                ..Default::default()
            }),
        });
    }
}

/// What the VM starts, in words.
fn boot_words(spec: &proto::v1::VmSpec) -> String {
    if spec.boot_source == proto::v1::BootSource::Disk as i32 {
        if spec.boot_entry.is_empty() {
            "its disk's default boot entry".into()
        } else {
            format!("its disk's boot entry {}", spec.boot_entry)
        }
    } else {
        format!("boot image {}", spec.boot_image)
    }
}
