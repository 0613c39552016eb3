//! Parvis desktop console (Windows and Linux): Hyper-V Manager and VMConnect in one app.
//!
//! The rooms, top to bottom; a module uses only the ones below it:
//!
//! - [`app`]: the application. [`ConsoleApp`] owns the backend, the state and the panels;
//!   `app/state.rs` holds hosts, jobs and the event log and applies backend updates to them
//!   (no drawing, unit-tested); one file per panel (toolbar, tab bar, inventory, actions,
//!   console tab, tasks pane, dialogs, dropped files). Panels read the state and queue
//!   [`app::UiCommand`]s; the app runs them after the frame, so nothing that talks to the
//!   network or changes hosts, jobs or tabs happens while drawing;
//! - [`view`]: a console's screen in the UI (texture patches, scaling, keyboard capture,
//!   pointer); uses [`console`] and [`keymap`];
//! - [`backend`]: all network work, on a tokio runtime of its own, reporting to the UI
//!   through a channel and `request_repaint`; the UI thread never waits for it. It starts
//!   the host connections and spawns [`console`] streams and [`upload`]s;
//! - [`console`]: a VM's framebuffer, input and serial streams (tiles decoded off the UI
//!   thread into texture patches); [`stats`]: a host's or VM's resource use as the agent
//!   streams it; [`upload`]: checked, resumable VHD/VHDX import streamed from the file.
//!   They use [`conn`] only, never [`backend`];
//! - [`conn`]: what the network tasks share: a host's connection slot, the UI wake-up,
//!   the call timeout, failures in plain words (one sentence, the technical chain beside);
//! - [`config`]: the saved hosts; [`keymap`]: keys to PC scan codes (leaves).
//!
//! So the imports run one way: `app` → `view`, `backend` → `console`, `stats`, `upload` →
//! `conn`.
//!
//! Depends on `proto` and portable crates only, so that it builds for Windows. No unsafe.

#![forbid(unsafe_code)]

pub mod app;
pub mod backend;
pub mod config;
pub mod conn;
pub mod console;
pub mod keymap;
pub mod report;
pub mod stats;
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
            .with_min_inner_size([720.0, 480.0])
            .with_drag_and_drop(true),
        ..Default::default()
    }
}
