//! The tasks pane at the bottom: this console's jobs (uploads with progress and
//! pause/resume/cancel), the hosts' running tasks, and the event log.

use egui::{Color32, RichText, Ui};
use proto::v1::TaskState;

use super::command::UiCommand;
use super::state::{JobState, State};
use super::widgets::status_dot;
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
        .auto_shrink([false, false])
        .show(ui, |ui| {
            for j in &state.jobs {
                ui.horizontal(|ui| {
                    let (icon, color) = match &j.state {
                        JobState::Running => ("running", Color32::from_rgb(210, 160, 40)),
                        JobState::Succeeded(_) => ("done", Color32::from_rgb(60, 170, 80)),
                        JobState::Failed(_) => ("failed", Color32::from_rgb(220, 60, 60)),
                    };
                    ui.colored_label(color, icon);
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
                        if !matches!(phase, Phase::Verifying | Phase::Done)
                            && ui.button("Cancel").clicked()
                        {
                            control(UploadControl::Cancel);
                        }
                    }
                    match &j.state {
                        JobState::Succeeded(t) => {
                            ui.label(RichText::new(t).weak());
                        }
                        JobState::Failed(e) => {
                            ui.colored_label(Color32::from_rgb(220, 60, 60), e);
                        }
                        JobState::Running => {
                            ui.label(RichText::new(duration(j.started.elapsed().as_secs())).weak());
                        }
                    }
                });
            }
            for h in &state.hosts {
                for t in h
                    .tasks
                    .values()
                    .filter(|t| t.state == TaskState::Running as i32)
                {
                    ui.horizontal(|ui| {
                        status_dot(ui, Color32::from_rgb(210, 160, 40));
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
                ui.label(RichText::new(l).small());
            }
        });
}
