//! The details pane beside (or under) the inventory: for the selected VM its summary, crash
//! reason, resource graphs and disks (added and removed here); for the selected host whether it can run VMs (and if
//! not, why, in one sentence), its summary and resource graphs. The graphs draw the
//! [`crate::stats::Series`] the app follows for the selection.

use egui::{RichText, Ui};
use proto::v1::StatsSample;

use super::command::UiCommand;
use super::graph::{self, Chart, Series as Line};
use super::state::{Selection, State};
use super::theme::{Tone, tone};
use crate::stats::Series;

mod host;
mod vm;

/// How much history the graphs show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Span {
    #[default]
    TenMinutes,
    Hour,
    Day,
}

impl Span {
    fn ms(self) -> f64 {
        match self {
            Span::TenMinutes => 600_000.0,
            Span::Hour => 3_600_000.0,
            Span::Day => 86_400_000.0,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Span::TenMinutes => "Last 10 minutes",
            Span::Hour => "Last hour",
            Span::Day => "Last day",
        }
    }
}

/// What the pane remembers.
#[derive(Default)]
pub(super) struct DetailsView {
    pub span: Span,
}

pub(super) fn show(
    ui: &mut Ui,
    state: &State,
    selection: Option<&Selection>,
    feed: Option<&Series>,
    view: &mut DetailsView,
    commands: &mut Vec<UiCommand>,
) {
    egui::ScrollArea::vertical()
        .id_salt("details")
        .auto_shrink([false, false])
        .show(ui, |ui| match selection {
            None => {
                ui.label(RichText::new("Select a host or a VM to see its details.").weak());
            }
            Some(Selection::Host(h)) => {
                if let Some(h) = state.host(*h) {
                    host::show(ui, h, feed, view);
                }
            }
            Some(Selection::Vm(h, id)) => {
                if let Some((h, v)) = state.host(*h).and_then(|h| Some((h, h.vms.get(id)?))) {
                    vm::show(ui, h, v, feed, view, commands);
                }
            }
        });
}

/// Two columns of names and values.
pub(super) fn summary(ui: &mut Ui, id: &str, rows: &[(&str, String)]) {
    egui::Grid::new(id)
        .num_columns(2)
        .spacing([16.0, 4.0])
        .show(ui, |ui| {
            for (k, v) in rows {
                ui.label(RichText::new(*k).weak());
                ui.add(egui::Label::new(v.as_str()).wrap());
                ui.end_row();
            }
        });
}

pub(super) fn section(ui: &mut Ui, title: &str) {
    ui.add_space(8.0);
    ui.strong(title);
    ui.separator();
}

pub(super) fn graphs_header(ui: &mut Ui, view: &mut DetailsView) {
    ui.add_space(8.0);
    ui.horizontal_wrapped(|ui| {
        ui.strong("Resource use");
        egui::ComboBox::from_id_salt("span")
            .selected_text(view.span.label())
            .show_ui(ui, |ui| {
                for s in [Span::TenMinutes, Span::Hour, Span::Day] {
                    ui.selectable_value(&mut view.span, s, s.label());
                }
            });
    });
    ui.separator();
}

/// Why the samples stopped, if they did.
pub(super) fn feed_error(ui: &mut Ui, feed: Option<&Series>) {
    if let Some(e) = feed.and_then(|f| f.error.as_ref()) {
        ui.label(RichText::new(e).color(tone(ui.visuals(), Tone::Busy)));
    }
}

/// The right edge of the graphs: the newest sample's time plus how long ago it arrived here
/// (so the clocks of the host and of this computer need not agree).
pub(super) fn end_ms(feed: Option<&Series>) -> f64 {
    let Some(f) = feed else { return 0.0 };
    let last = f.last().map_or(0, |s| s.time_ms) as f64;
    let since = f
        .received
        .map_or(0.0, |r| r.elapsed().as_secs_f64() * 1000.0);
    last + since
}

pub(super) fn line<'a>(
    name: &'a str,
    color: egui::Color32,
    samples: &[&StatsSample],
    value: impl Fn(&StatsSample) -> f64,
) -> Line<'a> {
    Line {
        name,
        color,
        points: samples
            .iter()
            .map(|s| (s.time_ms as f64, value(s)))
            .collect(),
    }
}

/// The time the graphs span: the chosen span, or less while the history is short (at
/// least two minutes), so a VM that just started does not draw into a sliver.
fn span_ms(view: &DetailsView, first_ms: f64, end_ms: f64) -> f64 {
    (end_ms - first_ms).clamp(120_000.0, view.span.ms())
}

pub(super) fn chart(
    ui: &mut Ui,
    view: &DetailsView,
    end_ms: f64,
    title: String,
    series: Vec<Line<'_>>,
    max: f64,
    fmt: &dyn Fn(f64) -> String,
) {
    graph::show(
        ui,
        &Chart {
            title,
            span_ms: span_ms(
                view,
                series
                    .iter()
                    .filter_map(|l| l.points.first().map(|p| p.0))
                    .fold(end_ms, f64::min),
                end_ms,
            ),
            series,
            end_ms,
            max,
            fmt,
            // Fine samples are 2 s apart, coarse ones a minute.
            gap_ms: if view.span == Span::Day {
                180_000.0
            } else {
                10_000.0
            },
        },
        64.0,
    );
    ui.add_space(4.0);
}
