//! A VM's settings: the settings form ([`super::form`]) filled with the VM's spec. The agent
//! changes a VM's settings only while it is off (or crashed): otherwise every field is
//! greyed and the dialog says so. "Save" sends the whole spec (`UpdateVm`) as a job and waits
//! for it: the dialog closes when the agent took it, or shows the agent's reason when it
//! refused.

use egui::{Context, RichText};
use proto::v1::VmState;

use super::super::command::UiCommand;
use super::super::state::{JobState, State};
use super::super::theme::{Tone, tone};
use super::super::widgets::details;
use super::form::{self, VmForm};
use super::{Next, buttons, modal};
use crate::backend::{HostId, HostStatus, JobId};

pub(in crate::app) struct SettingsDialog {
    pub host: HostId,
    pub vm_id: String,
    form: VmForm,
    /// The settings as the VM has them (what "Save" compares with).
    original: VmForm,
    /// The save job, while it runs.
    pub pending: Option<JobId>,
    /// The last refusal: its sentence and technical details.
    error: Option<(String, String)>,
}

impl SettingsDialog {
    /// The settings of `vm_id` on `host` (None if the VM is gone).
    pub fn open(state: &State, host: HostId, vm_id: &str) -> Option<Self> {
        let spec = state.host(host)?.vms.get(vm_id)?.spec.clone()?;
        let form = VmForm::of(&spec);
        Some(SettingsDialog {
            host,
            vm_id: vm_id.to_string(),
            original: form.clone(),
            form,
            pending: None,
            error: None,
        })
    }
}

/// Why the settings cannot be changed now, if they cannot.
fn locked(state: &State, d: &SettingsDialog) -> Option<String> {
    let h = state.host(d.host)?;
    let name = h.vm_name(&d.vm_id);
    if h.status != HostStatus::Online {
        return Some(format!(
            "Host {} is not connected; its VMs' settings can be changed once it is.",
            h.cfg.name
        ));
    }
    let v = h.vms.get(&d.vm_id)?;
    match VmState::try_from(v.state) {
        Ok(VmState::Off | VmState::Crashed) => None,
        _ => Some(format!(
            "VM '{name}' is {}; shut it down to change its settings.",
            super::super::words::state_word(v.state).to_lowercase()
        )),
    }
}

pub(super) fn show(
    ctx: &Context,
    d: &mut SettingsDialog,
    state: &State,
    commands: &mut Vec<UiCommand>,
) -> Next {
    let Some(h) = state.host(d.host) else {
        return Next::Close;
    };
    if !h.vms.contains_key(&d.vm_id) {
        return Next::Close;
    }
    if let Some(job) = d.pending
        && let Some(j) = state.job(job)
    {
        match &j.state {
            JobState::Running => {}
            JobState::Succeeded(_) => return Next::Close,
            JobState::Failed(e) => {
                d.error = Some((e.clone(), j.details.clone()));
                d.pending = None;
            }
        }
    }
    let lock = locked(state, d);
    let problems = d.form.problems(Some(h), Some(&d.vm_id));
    let title = format!("Settings of VM '{}' on {}", h.vm_name(&d.vm_id), h.cfg.name);
    let mut next = Next::Keep;
    let closed = modal(ctx, &title, |ui| {
        if let Some(why) = &lock {
            ui.label(RichText::new(why).color(tone(ui.visuals(), Tone::Busy)));
            ui.add_space(4.0);
        }
        let editable = lock.is_none() && d.pending.is_none();
        form::show(ui, &mut d.form, Some(h), &problems, editable);
        if let Some((line, tech)) = &d.error {
            ui.add_space(4.0);
            ui.label(RichText::new(line).color(tone(ui.visuals(), Tone::Bad)));
            details(ui, ("settings-error", &d.vm_id), tech);
        }
        let changed = d.form != d.original;
        buttons(ui, |ui| {
            let why_not = match (&lock, d.pending, changed, problems.is_empty()) {
                (Some(why), ..) => why.clone(),
                (None, Some(_), ..) => "Saving…".to_string(),
                (None, None, false, _) => "Nothing has changed".to_string(),
                _ => "Correct the settings marked above first".to_string(),
            };
            let save = ui
                .add_enabled(
                    editable && changed && problems.is_empty(),
                    egui::Button::new("Save"),
                )
                .on_disabled_hover_text(why_not);
            if save.clicked() {
                d.error = None;
                commands.push(UiCommand::UpdateVm {
                    host: d.host,
                    vm_id: d.vm_id.clone(),
                    spec: d.form.spec(),
                });
            }
            if ui.button("Cancel").clicked() {
                next = Next::Close;
            }
            if d.pending.is_some() {
                ui.spinner();
                ui.label("Saving…");
            }
        });
    });
    if closed && d.pending.is_none() {
        Next::Close
    } else {
        next
    }
}
