//! What the window shows, as JSON: the hosts (name, status, VMs and their states) and the
//! open consoles (VM, screen size, how much of the screen is not black). Written beside a
//! `--window-screenshot` PNG so that a test (the demo's, the Windows build's under Wine) can
//! check what the picture is of without reading pixels of text.

use serde_json::{Value, json};

use crate::ConsoleApp;
use crate::backend::HostStatus;

/// The report of what `app` shows now.
pub fn describe(app: &ConsoleApp) -> Value {
    let hosts: Vec<Value> = app
        .hosts()
        .iter()
        .map(|h| {
            let status = match &h.status {
                HostStatus::Connecting => "connecting".to_string(),
                HostStatus::Online => "online".to_string(),
                HostStatus::Offline { .. } => "offline".to_string(),
            };
            let vms: Vec<Value> = h
                .vms
                .values()
                .map(|v| {
                    json!({
                        "name": v.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
                        "state": crate::app::state_word(v.state),
                    })
                })
                .collect();
            json!({ "name": h.cfg.name, "status": status, "vms": vms })
        })
        .collect();
    let consoles: Vec<Value> = app
        .consoles()
        .iter()
        .map(|t| {
            let img = t.screen.image();
            let lit = img
                .pixels
                .iter()
                .filter(|p| p.r() > 16 || p.g() > 16 || p.b() > 16)
                .count();
            json!({
                "vm": t.title,
                "width": img.size[0],
                "height": img.size[1],
                "lit_fraction": if img.pixels.is_empty() { 0.0 } else { lit as f64 / img.pixels.len() as f64 },
            })
        })
        .collect();
    json!({ "hosts": hosts, "consoles": consoles })
}

/// Write the report for `app` to `path` (pretty JSON).
pub fn write(app: &ConsoleApp, path: &std::path::Path) -> std::io::Result<()> {
    let mut text = serde_json::to_vec_pretty(&describe(app)).map_err(std::io::Error::other)?;
    text.push(b'\n');
    std::fs::write(path, text)
}
