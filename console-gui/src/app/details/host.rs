//! The details of a host: whether it can run VMs (and if not, why, in one sentence), why it
//! is offline, its summary and its resource graphs (CPU, memory, the disk library's space).

use egui::{RichText, Ui};
use proto::v1::StatsSample;

use super::super::state::Host;
use super::super::theme::{Tone, series};
use super::super::widgets::{details, toned};
use super::super::words::human;
use super::{DetailsView, chart, end_ms, feed_error, graphs_header, line, summary};
use crate::backend::HostStatus;
use crate::stats::Series;

pub(super) fn show(ui: &mut Ui, h: &Host, feed: Option<&Series>, view: &mut DetailsView) {
    ui.horizontal_wrapped(|ui| {
        ui.heading(format!("Host {}", h.cfg.name));
        ui.label(RichText::new(&h.cfg.addr).weak());
    });
    match &h.status {
        HostStatus::Connecting => {
            ui.label(format!("Connecting to {}…", h.cfg.addr));
        }
        HostStatus::Offline {
            error,
            details: tech,
            retry_in_s,
        } => {
            toned(ui, Tone::Bad, format!("Offline: {error}."));
            ui.label(
                RichText::new(format!("The console tries again every {retry_in_s} s.")).weak(),
            );
            details(ui, ("host-offline", h.id), tech);
        }
        HostStatus::Online => match h.cannot_run() {
            Some(why) => {
                toned(ui, Tone::Bad, format!("This host cannot run VMs: {why}."));
            }
            None => {
                let max = h
                    .info
                    .as_ref()
                    .and_then(|i| i.kvm.as_ref())
                    .map_or(0, |k| k.max_vcpus);
                toned(
                    ui,
                    Tone::Good,
                    if max > 0 {
                        format!("This host can run VMs (up to {max} CPUs each).")
                    } else {
                        "This host can run VMs.".to_string()
                    },
                );
            }
        },
    }
    if let Some(i) = &h.info {
        let images: Vec<&str> = i.boot_images.iter().map(|b| b.name.as_str()).collect();
        summary(
            ui,
            "host-summary",
            &[
                ("Computer", format!("{} ({})", i.hostname, i.os)),
                ("Agent", format!("parvis-agent {}", i.agent_version)),
                ("CPUs", i.logical_cpus.to_string()),
                (
                    "Memory",
                    format!(
                        "{} free of {}",
                        human(i.memory_available_bytes),
                        human(i.memory_bytes)
                    ),
                ),
                (
                    "VMs",
                    format!("{} ({} running)", h.vms.len(), i.running_vm_count),
                ),
                ("Disks in the library", h.disks.len().to_string()),
                (
                    "Boot images",
                    if images.is_empty() {
                        "none".into()
                    } else {
                        images.join(", ")
                    },
                ),
            ],
        );
    }
    graphs_header(ui, view);
    let samples: Vec<&StatsSample> = feed.map(|f| f.samples.iter().collect()).unwrap_or_default();
    let Some(last) = samples.last().copied() else {
        ui.label(RichText::new("Waiting for the first samples from the host…").weak());
        feed_error(ui, feed);
        return;
    };
    let end = end_ms(feed);
    let c = series(ui.visuals());
    let cpus = h.info.as_ref().map_or(1, |i| i.logical_cpus.max(1));
    let cores = |v: f64| format!("{v:.2} cores");
    chart(
        ui,
        view,
        end,
        format!("CPU: {:.2} of {cpus} cores busy", last.cpu_cores),
        vec![line("CPU", c[0], &samples, |s| s.cpu_cores)],
        f64::from(cpus),
        &cores,
    );
    let bytes = |v: f64| human(v as u64);
    chart(
        ui,
        view,
        end,
        format!(
            "Memory: {} used of {}",
            human(last.memory_used_bytes),
            human(last.memory_total_bytes)
        ),
        vec![line("used", c[0], &samples, |s| s.memory_used_bytes as f64)],
        last.memory_total_bytes.max(1) as f64,
        &bytes,
    );
    chart(
        ui,
        view,
        end,
        format!(
            "Disk space for the library: {} free of {}",
            human(last.disk_free_bytes),
            human(last.disk_total_bytes)
        ),
        vec![line("used", c[1], &samples, |s| {
            s.disk_total_bytes.saturating_sub(s.disk_free_bytes) as f64
        })],
        last.disk_total_bytes.max(1) as f64,
        &bytes,
    );
    feed_error(ui, feed);
}
