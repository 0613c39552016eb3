//! The UI side of a VM console: the framebuffer as a texture updated with partial patches,
//! fit-to-window or 1:1 (pixel-exact on HiDPI), keyboard capture and the absolute pointer.

use std::collections::BTreeSet;
use std::sync::Arc;

use egui::{
    Color32, ColorImage, EventFilter, Key, Rect, Sense, TextureHandle, TextureOptions, Vec2, pos2,
};

use crate::console::{ConsoleHandle, ConsoleShared, Patch};
use crate::keymap;

/// How the screen is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// As large as the window allows, keeping the aspect ratio.
    Fit,
    /// One guest pixel per screen pixel (also on HiDPI screens).
    OneToOne,
}

/// A console's screen in the UI.
pub struct ScreenView {
    name: String,
    texture: Option<TextureHandle>,
    /// The screen, for screenshots (and tests); shared with the texture upload, so a
    /// whole-screen change is handed over without a copy.
    fb: Arc<ColorImage>,
    filter: TextureOptions,
    pub scale: Scale,
    /// Keyboard goes to the guest.
    pub grabbed: bool,
    /// Keys pressed in the guest (released when the grab ends).
    pressed: BTreeSet<u32>,
    last_pointer: Option<(u32, u32, u32)>,
    /// Patches applied to the texture so far.
    pub patches_applied: u64,
    /// Frames in which the texture changed.
    pub texture_updates: u64,
}

impl ScreenView {
    pub fn new(name: &str) -> Self {
        ScreenView {
            name: name.to_string(),
            texture: None,
            fb: Arc::new(ColorImage::filled([0, 0], Color32::BLACK)),
            filter: TextureOptions::LINEAR,
            scale: Scale::Fit,
            grabbed: false,
            pressed: BTreeSet::new(),
            last_pointer: None,
            patches_applied: 0,
            texture_updates: 0,
        }
    }

    /// The current screen image.
    pub fn image(&self) -> &ColorImage {
        &self.fb
    }

    /// Screen size in pixels.
    pub fn size(&self) -> [usize; 2] {
        self.fb.size
    }

    /// Take what the network side decoded and apply it to the texture.
    pub fn sync(&mut self, ctx: &egui::Context, shared: &std::sync::Mutex<ConsoleShared>) {
        let (resized, patches) = shared.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.apply(ctx, resized, patches);
    }

    /// Apply patches (and a new size) to the screen copy and the texture: only the changed
    /// rectangles are uploaded.
    pub fn apply(&mut self, ctx: &egui::Context, resized: Option<[usize; 2]>, patches: Vec<Patch>) {
        if let Some(size) = resized {
            self.fb = Arc::new(ColorImage::filled(size, Color32::BLACK));
            self.texture = None;
        }
        if patches.is_empty() && resized.is_none() {
            return;
        }
        let [w, h] = self.fb.size;
        let count = patches.len() as u64;
        let mut patches = patches;
        if let [whole] = patches.as_slice()
            && whole.pos == [0, 0]
            && whole.image.size == [w, h]
        {
            // The whole screen: it becomes the screen as it is.
            let whole = patches.pop().map(|p| p.image);
            if let Some(img) = whole {
                self.fb = Arc::new(img);
            }
        } else {
            let fb = Arc::make_mut(&mut self.fb);
            for p in &patches {
                let [x, y] = p.pos;
                let [pw, ph] = p.image.size;
                if x + pw > w || y + ph > h {
                    continue;
                }
                for row in 0..ph {
                    let dst = (y + row) * w + x;
                    fb.pixels[dst..dst + pw]
                        .copy_from_slice(&p.image.pixels[row * pw..(row + 1) * pw]);
                }
            }
        }
        match &mut self.texture {
            None => {
                if w > 0 && h > 0 {
                    self.texture = Some(ctx.load_texture(
                        format!("screen-{}", self.name),
                        egui::ImageData::Color(self.fb.clone()),
                        self.filter,
                    ));
                }
            }
            Some(t) => {
                let changed: usize = patches.iter().map(|p| p.image.pixels.len()).sum();
                if patches.is_empty() || changed * 2 >= w * h {
                    // Most of the screen changed: one upload beats hundreds of small ones.
                    t.set(egui::ImageData::Color(self.fb.clone()), self.filter);
                } else {
                    for p in patches {
                        t.set_partial(p.pos, p.image, self.filter);
                    }
                }
            }
        }
        self.patches_applied += count;
        self.texture_updates += 1;
    }

    fn set_filter(&mut self, filter: TextureOptions) {
        if self.filter != filter {
            self.filter = filter;
            if let Some(t) = &mut self.texture {
                t.set(egui::ImageData::Color(self.fb.clone()), filter);
            }
        }
    }

    /// Release every key held in the guest and end the grab.
    pub fn release(&mut self, console: &ConsoleHandle) {
        let keys: Vec<(u32, bool)> = self.pressed.iter().rev().map(|&k| (k, false)).collect();
        console.keys(&keys);
        self.pressed.clear();
        self.grabbed = false;
    }

    /// Draw the screen into the available space and handle input.
    pub fn show(&mut self, ui: &mut egui::Ui, console: &ConsoleHandle) {
        let [w, h] = self.fb.size;
        let Some(tex) = self.texture.clone() else {
            ui.centered_and_justified(|ui| ui.label("Waiting for the VM's screen…"));
            return;
        };
        let ppp = ui.ctx().pixels_per_point();
        let px = Vec2::new(w as f32, h as f32) / ppp;
        let avail = ui.available_size();
        let size = match self.scale {
            Scale::OneToOne => px,
            Scale::Fit => {
                let s = (avail.x / px.x).min(avail.y / px.y).max(0.05);
                px * s
            }
        };
        let filter = if self.scale == Scale::OneToOne || (size.x - px.x).abs() < 0.5 {
            TextureOptions::NEAREST
        } else {
            TextureOptions::LINEAR
        };
        self.set_filter(filter);
        let body = |ui: &mut egui::Ui, this: &mut Self| {
            let (rect, response) = ui.allocate_exact_size(size, Sense::click_and_drag());
            // Pixel-exact: the image starts on a physical pixel boundary.
            let min = pos2(
                (rect.min.x * ppp).round() / ppp,
                (rect.min.y * ppp).round() / ppp,
            );
            let rect = Rect::from_min_size(min, size);
            ui.painter().image(
                tex.id(),
                rect,
                Rect::from_min_max(pos2(0.0, 0.0), pos2(1.0, 1.0)),
                Color32::WHITE,
            );
            if this.grabbed {
                ui.painter().rect_stroke(
                    rect.expand(1.0),
                    0.0,
                    egui::Stroke::new(2.0, Color32::from_rgb(230, 160, 0)),
                    egui::StrokeKind::Outside,
                );
            }
            this.input(ui, &response, rect, console);
        };
        if self.scale == Scale::OneToOne {
            egui::ScrollArea::both()
                .auto_shrink([false, false])
                .show(ui, |ui| body(ui, self));
        } else {
            ui.vertical_centered(|ui| body(ui, self));
        }
    }

    fn input(
        &mut self,
        ui: &egui::Ui,
        response: &egui::Response,
        rect: Rect,
        console: &ConsoleHandle,
    ) {
        if response.clicked() && !self.grabbed {
            self.grabbed = true;
        }
        if self.grabbed {
            response.request_focus();
            ui.memory_mut(|m| {
                m.set_focus_lock_filter(
                    response.id,
                    EventFilter {
                        tab: true,
                        horizontal_arrows: true,
                        vertical_arrows: true,
                        escape: true,
                    },
                );
            });
            let events = ui.input(|i| i.events.clone());
            for e in events {
                let egui::Event::Key {
                    key,
                    physical_key,
                    pressed,
                    repeat,
                    modifiers,
                } = e
                else {
                    continue;
                };
                let k = physical_key.unwrap_or(key);
                if pressed && k == Key::ArrowLeft && modifiers.ctrl && modifiers.alt {
                    // Ctrl+Alt+Left releases the keyboard, as in VMConnect.
                    self.release(console);
                    break;
                }
                let Some(code) = keymap::scancode(k) else {
                    continue;
                };
                if pressed {
                    if !repeat {
                        self.pressed.insert(code);
                    }
                } else if !self.pressed.remove(&code) {
                    continue;
                }
                console.keys(&[(code, pressed)]);
            }
        }
        // Absolute pointer over the screen.
        let (pos, buttons, wheel) = ui.input(|i| {
            let mut b = 0u32;
            if i.pointer.primary_down() {
                b |= 1;
            }
            if i.pointer.secondary_down() {
                b |= 2;
            }
            if i.pointer.middle_down() {
                b |= 4;
            }
            let wheel = i.smooth_scroll_delta.y;
            (i.pointer.hover_pos(), b, wheel)
        });
        let Some(pos) = pos.filter(|p| rect.contains(*p)) else {
            return;
        };
        if !response.hovered() && buttons == 0 {
            return;
        }
        let x = (((pos.x - rect.min.x) / rect.width()).clamp(0.0, 1.0) * 32767.0).round() as u32;
        let y = (((pos.y - rect.min.y) / rect.height()).clamp(0.0, 1.0) * 32767.0).round() as u32;
        let wheel_clicks = if wheel > 0.0 {
            1
        } else if wheel < 0.0 {
            -1
        } else {
            0
        };
        if self.last_pointer != Some((x, y, buttons)) || wheel_clicks != 0 {
            self.last_pointer = Some((x, y, buttons));
            console.pointer(x, y, buttons, wheel_clicks);
        }
    }
}
