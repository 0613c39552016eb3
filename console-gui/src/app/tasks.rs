//! The tasks pane at the bottom: this console's jobs (uploads with progress and
//! pause/resume/cancel, disk tasks with the host's progress), the hosts' other running
//! tasks, and the event log. A failure is one sentence; its technical chain is under
//! "Technical details".

use egui::{RichText, Ui};
use proto::v1::TaskState;

use super::command::UiCommand;
use super::state::{Job, JobState, State};
use super::theme::{Tone, tone};
use super::widgets::{details, status_dot};
use super::words::{duration, human};
use crate::upload::{Phase, UploadControl};

pub(super) fn show(ui: &mut Ui, state: &State, commands: &mut Vec<UiCommand>) {
    ui.horizontal(|ui| {
        ui.strong("Tasks and events");
        if ui.small_button("Clear finished").clicked() {
            commands.push(UiCommand::ClearFinished);
        }
    });
    egui::ScrollArea::vertical()
        .id_salt("tasks")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            for j in &state.jobs {
                job(ui, state, j, commands);
            }
            let followed: Vec<&str> = state
                .jobs
                .iter()
                .filter_map(|j| j.task.as_deref())
                .collect();
            for h in &state.hosts {
                for t in h.tasks.values().filter(|t| {
                    t.state == TaskState::Running as i32 && !followed.contains(&t.id.as_str())
                }) {
                    ui.horizontal_wrapped(|ui| {
                        status_dot(ui, Tone::Busy);
                        ui.label(format!("{}: {}", h.cfg.name, t.description));
                        if t.total > 0 {
                            ui.add(
                                egui::ProgressBar::new(t.done as f32 / t.total as f32)
                                    .desired_width(200.0)
                                    .show_percentage(),
                            );
                        }
                    });
                }
            }
            ui.separator();
            for l in state.log.iter().take(200) {
                ui.label(RichText::new(l).weak());
            }
        });
}

fn job(ui: &mut Ui, state: &State, j: &Job, commands: &mut Vec<UiCommand>) {
    ui.horizontal_wrapped(|ui| {
        let (word, t) = match &j.state {
            JobState::Running => ("running", Tone::Busy),
            JobState::Succeeded(_) => ("done", Tone::Good),
            JobState::Failed(_) => ("failed", Tone::Bad),
        };
        ui.label(RichText::new(word).color(tone(ui.visuals(), t)));
        ui.label(format!("{}: {}", j.host, j.title));
        if let Some((p, _)) = &j.upload
            && j.state == JobState::Running
        {
            let (phase, done, total) = p.get();
            let frac = if total > 0 {
                done as f32 / total as f32
            } else {
                0.0
            };
            ui.add(
                egui::ProgressBar::new(frac)
                    .desired_width(200.0)
                    .text(format!("{} {:.0}%", phase.label(), frac * 100.0)),
            );
            ui.label(format!("{} of {}", human(done), human(total)));
            if matches!(phase, Phase::Sending | Phase::Hashing)
                && let Some((speed, eta)) = p.speed_eta()
            {
                ui.label(format!(
                    "{}/s, {} left",
                    human(speed as u64),
                    duration(eta as u64)
                ));
            }
            let mut control = |control| {
                commands.push(UiCommand::ControlUpload { job: j.id, control });
            };
            if phase == Phase::Paused {
                if ui.button("Resume").clicked() {
                    control(UploadControl::Run);
                }
            } else if matches!(phase, Phase::Sending | Phase::Retrying)
                && ui.button("Pause").clicked()
            {
                control(UploadControl::Pause);
            }
            if !matches!(phase, Phase::Verifying | Phase::Done) && ui.button("Cancel").clicked() {
                control(UploadControl::Cancel);
            }
        }
        if j.state == JobState::Running
            && let Some(t) = j.task.as_ref().and_then(|id| {
                state
                    .hosts
                    .iter()
                    .filter(|h| h.cfg.name == j.host)
                    .find_map(|h| h.tasks.get(id))
            })
            && t.total > 0
        {
            ui.add(
                egui::ProgressBar::new(t.done as f32 / t.total as f32)
                    .desired_width(200.0)
                    .show_percentage(),
            );
        }
        match &j.state {
            JobState::Succeeded(t) => {
                ui.label(RichText::new(t).weak());
            }
            JobState::Failed(e) => {
                ui.label(RichText::new(e).color(tone(ui.visuals(), Tone::Bad)));
            }
            JobState::Running => {
                ui.label(RichText::new(duration(j.started.elapsed().as_secs())).weak());
            }
        }
    });
    if matches!(j.state, JobState::Failed(_)) {
        ui.indent(("job-details", j.id), |ui| {
            details(ui, ("job", j.id), &j.details)
        });
    }
}
