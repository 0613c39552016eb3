//! Parvis desktop console (Windows and Linux): Hyper-V Manager and VMConnect in one app.
//!
//! - [`app`]: the application (hosts, inventory, console tabs, dialogs, tasks pane);
//! - [`backend`]: all network work, on a tokio runtime of its own, reporting to the UI
//!   through a channel and `request_repaint`;
//! - [`console`] and [`view`]: a VM's screen (tiles → texture patches), input, serial;
//! - [`upload`]: checked, resumable VHD/VHDX import streamed from the file;
//! - [`config`]: the saved hosts; [`keymap`]: keys to PC scan codes.
//!
//! Depends on `proto` and portable crates only, so that it builds for Windows. No unsafe.

#![forbid(unsafe_code)]

pub mod app;
pub mod backend;
pub mod config;
pub mod console;
pub mod keymap;
pub mod upload;
pub mod view;

pub use app::ConsoleApp;
pub use proto::API_VERSION;

/// Window options for the real app: glow renderer, drag-and-drop on.
pub fn native_options() -> eframe::NativeOptions {
    eframe::NativeOptions {
        renderer: eframe::Renderer::Glow,
        viewport: egui::ViewportBuilder::default()
            .with_title("Parvis")
            .with_inner_size([1280.0, 860.0])
            .with_min_inner_size([640.0, 400.0])
            .with_drag_and_drop(true),
        ..Default::default()
    }
}
