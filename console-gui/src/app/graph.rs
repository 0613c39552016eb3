//! A small area chart drawn with egui's painter: one or two series over a time window
//! ending now, a faint grid, the scale's top value, gaps where there were no samples (a VM
//! that was off), and the values under the pointer. Its title and current values are a
//! normal label above it (so they are readable text, and screen readers and tests find
//! them).

use egui::{Color32, Pos2, Sense, Shape, Stroke, Ui, pos2, vec2};

/// One series: `(time in ms, value)` oldest first.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: Color32,
    pub points: Vec<(f64, f64)>,
}

/// What to draw.
pub struct Chart<'a> {
    /// The label above the chart ("CPU 0.4 of 2 cores").
    pub title: String,
    pub series: Vec<Series<'a>>,
    /// The time at the right edge and the span shown, in ms.
    pub end_ms: f64,
    pub span_ms: f64,
    /// The top of the scale (at least the largest value shown).
    pub max: f64,
    /// A value for people ("1.5 MiB/s").
    pub fmt: &'a dyn Fn(f64) -> String,
    /// Samples further apart than this are not joined (ms).
    pub gap_ms: f64,
}

/// The top of a scale for `values`: a little above the largest, at least `floor`.
pub fn scale_max<'a>(values: impl Iterator<Item = &'a f64>, floor: f64) -> f64 {
    values.fold(floor, |m, v| m.max(*v * 1.15))
}

/// "2 min ago", "40 s ago", "now".
fn ago(ms: f64) -> String {
    let s = (ms / 1000.0).round() as i64;
    match s {
        ..=1 => "now".into(),
        2..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

/// Draw a chart the width of `ui`, `height` points high.
pub fn show(ui: &mut Ui, chart: &Chart<'_>, height: f32) {
    ui.label(&chart.title);
    let width = ui.available_width().max(120.0);
    let (rect, response) = ui.allocate_exact_size(vec2(width, height), Sense::hover());
    if !ui.is_rect_visible(rect) {
        return;
    }
    let v = ui.visuals();
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 3.0, v.extreme_bg_color);
    let grid = Stroke::new(1.0, v.widgets.noninteractive.bg_stroke.color);
    for f in [0.25, 0.5, 0.75] {
        let y = rect.bottom() - rect.height() * f;
        painter.line_segment([pos2(rect.left(), y), pos2(rect.right(), y)], grid);
    }
    painter.rect_stroke(rect, 3.0, grid, egui::StrokeKind::Inside);
    let max = chart.max.max(f64::MIN_POSITIVE);
    let start = chart.end_ms - chart.span_ms;
    let to_screen = |(t, val): (f64, f64)| -> Pos2 {
        let x = rect.left() + ((t - start) / chart.span_ms) as f32 * rect.width();
        let y = rect.bottom() - (val / max).clamp(0.0, 1.0) as f32 * rect.height();
        pos2(x, y)
    };
    for s in &chart.series {
        for run in runs(&s.points, start, chart.gap_ms) {
            let pts: Vec<Pos2> = run.iter().map(|p| to_screen(*p)).collect();
            area(&painter, &pts, rect.bottom(), s.color.gamma_multiply(0.25));
            if pts.len() > 1 {
                painter.add(Shape::line(pts, Stroke::new(1.5, s.color)));
            } else if let Some(p) = pts.first() {
                painter.circle_filled(*p, 2.0, s.color);
            }
        }
    }
    let font = egui::TextStyle::Small.resolve(ui.style());
    painter.text(
        rect.left_top() + vec2(4.0, 2.0),
        egui::Align2::LEFT_TOP,
        (chart.fmt)(max),
        font.clone(),
        v.weak_text_color(),
    );
    painter.text(
        rect.left_bottom() + vec2(4.0, -2.0),
        egui::Align2::LEFT_BOTTOM,
        ago(chart.span_ms),
        font,
        v.weak_text_color(),
    );
    if let Some(p) = response.hover_pos() {
        let t = start + f64::from((p.x - rect.left()) / rect.width()) * chart.span_ms;
        let mut lines = vec![ago(chart.end_ms - t)];
        for s in &chart.series {
            if let Some(&(at, val)) = s.points.iter().min_by(|a, b| {
                (a.0 - t)
                    .abs()
                    .partial_cmp(&(b.0 - t).abs())
                    .unwrap_or(std::cmp::Ordering::Equal)
            }) && (at - t).abs() <= chart.gap_ms
            {
                lines.push(format!("{}: {}", s.name, (chart.fmt)(val)));
            }
        }
        painter.line_segment([pos2(p.x, rect.top()), pos2(p.x, rect.bottom())], grid);
        response.on_hover_text_at_pointer(lines.join("\n"));
    }
}

/// The points inside the window, split where samples are missing.
fn runs(points: &[(f64, f64)], start: f64, gap_ms: f64) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut last: Option<f64> = None;
    for &(t, v) in points.iter().filter(|(t, _)| *t >= start) {
        if last.is_none_or(|l| t - l > gap_ms) {
            out.push(Vec::new());
        }
        if let Some(run) = out.last_mut() {
            run.push((t, v));
        }
        last = Some(t);
    }
    out
}

/// The area under a line, as one mesh of quads down to `bottom`.
fn area(painter: &egui::Painter, pts: &[Pos2], bottom: f32, color: Color32) {
    if pts.len() < 2 {
        return;
    }
    let mut mesh = egui::Mesh::default();
    for p in pts {
        mesh.colored_vertex(*p, color);
        mesh.colored_vertex(pos2(p.x, bottom), color);
    }
    for i in 0..(pts.len() as u32 - 1) {
        let (a, b, c, d) = (2 * i, 2 * i + 1, 2 * i + 2, 2 * i + 3);
        mesh.add_triangle(a, b, c);
        mesh.add_triangle(b, d, c);
    }
    painter.add(Shape::mesh(mesh));
}

/// The rectangle a chart of `height` would take (layout checks in tests).
#[cfg(test)]
fn chart_rect(ui: &Ui, height: f32) -> egui::Rect {
    egui::Rect::from_min_size(ui.cursor().min, vec2(ui.available_width(), height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_split_the_line_and_old_points_are_left_out() {
        let pts = [
            (0.0, 1.0),
            (2000.0, 1.0),
            (4000.0, 1.0),
            (60_000.0, 2.0),
            (62_000.0, 2.0),
        ];
        let r = runs(&pts, 1000.0, 10_000.0);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], vec![(2000.0, 1.0), (4000.0, 1.0)]);
        assert_eq!(r[1].len(), 2);
        assert_eq!(ago(150_000.0), "2 min ago");
        assert_eq!(scale_max([1.0, 4.0].iter(), 2.0), 4.6);
    }

    #[test]
    fn a_chart_draws_into_the_width_it_is_given() {
        let ctx = egui::Context::default();
        let mut out = ctx.run_ui(egui::RawInput::default(), |ui| {
            let before = chart_rect(ui, 60.0);
            let fmt = |v: f64| format!("{v:.1}");
            show(
                ui,
                &Chart {
                    title: "CPU".into(),
                    series: vec![Series {
                        name: "cpu",
                        color: Color32::RED,
                        points: vec![(0.0, 0.5), (2000.0, 1.0)],
                    }],
                    end_ms: 2000.0,
                    span_ms: 600_000.0,
                    max: 2.0,
                    fmt: &fmt,
                    gap_ms: 10_000.0,
                },
                60.0,
            );
            assert!(before.width() > 100.0);
        });
        out.textures_delta.clear();
    }
}
