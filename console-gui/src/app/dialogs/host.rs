//! "Add host" / "Edit host": name, address and token; with TLS the agent's certificate
//! fingerprint is fetched and shown for confirmation (trust on first use) before anything
//! is saved.

use egui::{Context, RichText};

use super::super::command::UiCommand;
use super::super::state::State;
use super::super::theme::{Tone, tone};
use super::super::words::is_loopback;
use super::{Next, modal};
use crate::backend::HostId;
use crate::config::HostConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostStage {
    Edit,
    /// Waiting for the agent's fingerprint.
    Fetching,
    /// The fingerprint to confirm ("" for a plain connection).
    Confirm(String),
}

pub(in crate::app) struct HostDialog {
    editing: Option<HostId>,
    name: String,
    addr: String,
    token: String,
    tls: bool,
    stage: HostStage,
    error: Option<String>,
}

impl HostDialog {
    /// A new host.
    pub fn add() -> Self {
        HostDialog {
            editing: None,
            name: String::new(),
            addr: String::new(),
            token: String::new(),
            tls: true,
            stage: HostStage::Edit,
            error: None,
        }
    }

    /// New settings for host `id`.
    pub fn edit(id: HostId, cfg: HostConfig) -> Self {
        HostDialog {
            editing: Some(id),
            name: cfg.name,
            addr: cfg.addr,
            token: cfg.token,
            tls: cfg.fingerprint.is_some(),
            stage: HostStage::Edit,
            error: None,
        }
    }

    /// The host as entered, with the confirmed fingerprint; no name means the address.
    fn host_config(&self, fingerprint: Option<String>) -> HostConfig {
        HostConfig {
            name: if self.name.trim().is_empty() {
                self.addr.trim().to_string()
            } else {
                self.name.trim().to_string()
            },
            addr: self.addr.trim().to_string(),
            token: self.token.trim().to_string(),
            fingerprint,
        }
    }
}

/// An agent's fingerprint arrived. When the dialog waits for it: a fingerprint the edited
/// host already pins closes the dialog and returns the host to save; another one is shown
/// for confirmation; a failure goes back to editing.
pub(in crate::app) fn fingerprint_arrived(
    slot: &mut Option<super::Dialog>,
    state: &State,
    addr: &str,
    result: Result<String, String>,
) -> Option<(Option<HostId>, HostConfig)> {
    let Some(super::Dialog::Host(d)) = slot else {
        return None;
    };
    if d.addr.trim() != addr || d.stage != HostStage::Fetching {
        return None;
    }
    match result {
        Ok(fp) => {
            let pinned = d
                .editing
                .and_then(|id| state.host(id))
                .and_then(|h| h.cfg.fingerprint.clone());
            if pinned.is_some_and(|p| proto::client::same_fingerprint(&p, &fp)) {
                let save = (d.editing, d.host_config(Some(fp)));
                *slot = None;
                return Some(save);
            }
            d.stage = HostStage::Confirm(fp);
        }
        Err(e) => {
            d.stage = HostStage::Edit;
            d.error = Some(e);
        }
    }
    None
}

pub(super) fn show(ctx: &Context, d: &mut HostDialog, commands: &mut Vec<UiCommand>) -> Next {
    let title = if d.editing.is_some() {
        "Edit host"
    } else {
        "Add host"
    };
    let mut next = Next::Keep;
    let closed = modal(ctx, title, |ui| {
        let editable = d.stage == HostStage::Edit;
        egui::Grid::new("host-form").num_columns(2).show(ui, |ui| {
            for (label, value, hint, password) in [
                ("Host name", &mut d.name, "lab-1", false),
                ("Address", &mut d.addr, "host:7443", false),
                ("Token", &mut d.token, "pvs_…", true),
            ] {
                let l = ui.label(label);
                ui.add_enabled(
                    editable,
                    egui::TextEdit::singleline(value)
                        .hint_text(hint)
                        .password(password),
                )
                .labelled_by(l.id);
                ui.end_row();
            }
        });
        ui.add_enabled(
            editable,
            egui::Checkbox::new(
                &mut d.tls,
                "TLS (required unless the agent is on this computer)",
            ),
        );
        if let Some(e) = &d.error {
            ui.label(RichText::new(e).color(tone(ui.visuals(), Tone::Bad)));
        }
        match d.stage.clone() {
            HostStage::Edit => {
                ui.horizontal(|ui| {
                    if ui.button("Connect to host").clicked() {
                        let addr = d.addr.trim().to_string();
                        if !addr.contains(':') {
                            d.error = Some("the address is HOST:PORT, e.g. 192.168.1.10:7443".into());
                        } else if d.token.trim().is_empty() {
                            d.error = Some("paste the token parvis-agent printed when it started".into());
                        } else if !d.tls && !is_loopback(&addr) {
                            d.error = Some("plain connections are only for an agent on this computer; turn TLS on".into());
                        } else if d.tls {
                            d.error = None;
                            d.stage = HostStage::Fetching;
                            commands.push(UiCommand::FetchFingerprint { addr });
                        } else {
                            d.stage = HostStage::Confirm(String::new());
                        }
                    }
                    if ui.button("Cancel").clicked() {
                        next = Next::Close;
                    }
                });
            }
            HostStage::Fetching => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("Contacting the agent…");
                    if ui.button("Cancel").clicked() {
                        d.stage = HostStage::Edit;
                    }
                });
            }
            HostStage::Confirm(fp) => {
                if fp.is_empty() {
                    ui.label("Plain connection to an agent on this computer.");
                } else {
                    ui.label("The agent's certificate fingerprint is:");
                    ui.label(RichText::new(&fp).monospace());
                    ui.label("Check that it is the one parvis-agent printed when it started (\"TLS certificate SHA-256 fingerprint\"). It is pinned: a different certificate will be refused.");
                }
                ui.horizontal(|ui| {
                    if ui.button("Trust and save").clicked() {
                        let fp = (!fp.is_empty()).then(|| fp.clone());
                        commands.push(UiCommand::SaveHost {
                            editing: d.editing,
                            cfg: d.host_config(fp),
                        });
                        next = Next::Close;
                    }
                    if ui.button("Back").clicked() {
                        d.stage = HostStage::Edit;
                    }
                });
            }
        }
    });
    if closed { Next::Close } else { next }
}
