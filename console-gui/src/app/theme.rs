//! Readable text and colours with enough contrast, in the light and the dark theme: larger
//! type than egui's defaults (no 9 px lines), normal and weak text that stand out from the
//! panels, and status colours (good, busy, bad) chosen per theme so that they pass the
//! WCAG AA contrast ratio for text (4.5:1) on the panel colour.

use egui::{Color32, FontFamily, FontId, TextStyle, Theme, Visuals};

/// Text sizes in points.
const SMALL: f32 = 12.0;
const BODY: f32 = 14.0;
const HEADING: f32 = 19.0;
const MONO: f32 = 13.0;

/// The console's look, for both themes (set once at start).
pub fn apply(ctx: &egui::Context) {
    ctx.all_styles_mut(|style| {
        let p = FontFamily::Proportional;
        style.text_styles = [
            (TextStyle::Small, FontId::new(SMALL, p.clone())),
            (TextStyle::Body, FontId::new(BODY, p.clone())),
            (TextStyle::Button, FontId::new(BODY, p.clone())),
            (TextStyle::Heading, FontId::new(HEADING, p)),
            (
                TextStyle::Monospace,
                FontId::new(MONO, FontFamily::Monospace),
            ),
        ]
        .into();
        style.spacing.item_spacing = egui::vec2(8.0, 5.0);
        style.spacing.button_padding = egui::vec2(7.0, 3.0);
    });
    for theme in [Theme::Dark, Theme::Light] {
        ctx.style_mut_of(theme, |style| {
            let v = &mut style.visuals;
            let (text, weak) = text_colors(v.dark_mode);
            v.widgets.noninteractive.fg_stroke.color = text;
            v.weak_text_color = Some(weak);
        });
    }
}

/// Normal and weak text for a theme.
fn text_colors(dark: bool) -> (Color32, Color32) {
    if dark {
        (Color32::from_gray(205), Color32::from_gray(160))
    } else {
        (Color32::from_gray(40), Color32::from_gray(88))
    }
}

/// What a status colour says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Running, online, done.
    Good,
    /// Starting, paused, connecting, in progress, "cannot run VMs".
    Busy,
    /// Crashed, offline, failed.
    Bad,
    /// Off, unknown.
    Neutral,
}

/// The colour of a status in the current theme.
pub fn tone(v: &Visuals, t: Tone) -> Color32 {
    match (t, v.dark_mode) {
        (Tone::Good, true) => Color32::from_rgb(95, 205, 115),
        (Tone::Busy, true) => Color32::from_rgb(235, 185, 70),
        (Tone::Bad, true) => Color32::from_rgb(250, 120, 110),
        (Tone::Good, false) => Color32::from_rgb(20, 115, 40),
        (Tone::Busy, false) => Color32::from_rgb(145, 90, 0),
        (Tone::Bad, false) => Color32::from_rgb(185, 30, 30),
        (Tone::Neutral, _) => v.weak_text_color(),
    }
}

/// The two series colours of a graph (e.g. read and write).
pub fn series(v: &Visuals) -> [Color32; 2] {
    if v.dark_mode {
        [
            Color32::from_rgb(90, 170, 250),
            Color32::from_rgb(235, 150, 70),
        ]
    } else {
        [
            Color32::from_rgb(20, 95, 185),
            Color32::from_rgb(170, 80, 0),
        ]
    }
}

/// WCAG relative luminance of an opaque colour.
#[cfg(test)]
fn luminance(c: Color32) -> f32 {
    let lin = |u: u8| {
        let s = f32::from(u) / 255.0;
        if s <= 0.03928 {
            s / 12.92
        } else {
            ((s + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * lin(c.r()) + 0.7152 * lin(c.g()) + 0.0722 * lin(c.b())
}

/// WCAG contrast ratio of two opaque colours.
#[cfg(test)]
pub fn contrast(a: Color32, b: Color32) -> f32 {
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_status_colours_pass_wcag_aa_in_both_themes() {
        let ctx = egui::Context::default();
        apply(&ctx);
        for theme in [Theme::Dark, Theme::Light] {
            let style = ctx.style_of(theme);
            let v = &style.visuals;
            for bg in [v.panel_fill, v.window_fill] {
                for (what, c) in [
                    ("text", v.text_color()),
                    ("weak text", v.weak_text_color()),
                    ("good", tone(v, Tone::Good)),
                    ("busy", tone(v, Tone::Busy)),
                    ("bad", tone(v, Tone::Bad)),
                    ("neutral", tone(v, Tone::Neutral)),
                    ("series 0", series(v)[0]),
                    ("series 1", series(v)[1]),
                ] {
                    let r = contrast(c, bg);
                    assert!(r >= 4.5, "{theme:?} {what}: contrast {r:.2} on {bg:?}");
                }
            }
            for (ts, font) in &style.text_styles {
                assert!(font.size >= 12.0, "{theme:?} {ts:?} is {} pt", font.size);
            }
        }
    }
}
