//! A console tab: the VM's screen (with keys to send, clipboard typing and screenshots) or
//! its serial console. A VM that is not running shows one clear state instead of a screen,
//! with its name and a Start button; the input actions wait until there is a screen.

use egui::{RichText, Ui};
use proto::v1::VmState;

use super::command::{TabRef, UiCommand};
use super::state::{ConsolePane, ConsoleTab, State};
use super::theme::{Tone, tone};
use super::widgets::{details, state_color};
use super::words::{clean_serial, state_word};
use crate::backend::{HostStatus, VmAction};
use crate::view::Scale;

pub(super) fn show(
    ui: &mut Ui,
    tab: &mut ConsoleTab,
    state: &State,
    commands: &mut Vec<UiCommand>,
) {
    let at = TabRef::of(tab);
    let vm = state.host(tab.host).and_then(|h| h.vms.get(&tab.vm_id));
    let st = vm.map_or(VmState::Unspecified, |v| {
        VmState::try_from(v.state).unwrap_or(VmState::Unspecified)
    });
    let running = matches!(st, VmState::Running | VmState::Paused | VmState::Stopping);
    let active = tab
        .handle
        .shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .active;
    // Input goes to a screen that is there: the VM runs and its frames arrive.
    let has_screen = running && active && tab.screen.size()[0] > 0;
    let no_screen = "There is no screen yet: the VM is not running or has not drawn anything";
    ui.horizontal_wrapped(|ui| {
        ui.selectable_value(&mut tab.pane, ConsolePane::Screen, "Screen");
        ui.selectable_value(&mut tab.pane, ConsolePane::Serial, "Serial console");
        ui.separator();
        if let Some(v) = vm {
            ui.label(RichText::new(state_word(v.state)).color(state_color(ui, v.state)));
        }
        if tab.pane == ConsolePane::Screen {
            ui.separator();
            ui.selectable_value(&mut tab.screen.scale, Scale::Fit, "Fit to window");
            ui.selectable_value(&mut tab.screen.scale, Scale::OneToOne, "1:1");
            ui.separator();
            ui.add_enabled_ui(has_screen, |ui| {
                ui.menu_button("Send keys", |ui| {
                    use crate::keymap::*;
                    let mut send = |keys: Vec<(u32, bool)>| {
                        commands.push(UiCommand::SendKeys {
                            tab: at.clone(),
                            keys,
                        });
                    };
                    if ui.button("Ctrl+Alt+Del").clicked() {
                        send(chord(&[LEFT_CTRL, LEFT_ALT, DELETE]));
                    }
                    if ui.button("Ctrl+Alt+Backspace").clicked() {
                        send(chord(&[LEFT_CTRL, LEFT_ALT, BACKSPACE]));
                    }
                    for n in 1..=12u8 {
                        if ui.button(format!("Ctrl+Alt+F{n}")).clicked()
                            && let Some(f) = function_key(n)
                        {
                            send(chord(&[LEFT_CTRL, LEFT_ALT, f]));
                        }
                    }
                    if ui.button("Alt+SysRq").clicked() {
                        send(chord(&[LEFT_ALT, SYSRQ]));
                    }
                    if ui.button("Print Screen").clicked() {
                        send(chord(&[0xe037]));
                    }
                })
                .response
                .on_disabled_hover_text(no_screen);
                if ui
                    .button("Type clipboard text")
                    .on_disabled_hover_text(no_screen)
                    .clicked()
                {
                    commands.push(UiCommand::TypeClipboard(at.clone()));
                }
                if ui
                    .button("Screenshot")
                    .on_disabled_hover_text(no_screen)
                    .clicked()
                {
                    commands.push(UiCommand::Screenshot {
                        tab: at.clone(),
                        ask: false,
                    });
                }
                if ui
                    .button("Screenshot as…")
                    .on_disabled_hover_text(no_screen)
                    .clicked()
                {
                    commands.push(UiCommand::Screenshot {
                        tab: at.clone(),
                        ask: true,
                    });
                }
            });
            if has_screen {
                ui.separator();
                if tab.screen.grabbed {
                    ui.label(
                        RichText::new("Keyboard captured: press Ctrl+Alt+Left to release")
                            .color(tone(ui.visuals(), Tone::Busy)),
                    );
                    if ui.button("Release").clicked() {
                        // The screen's own input handling, as Ctrl+Alt+Left on the screen.
                        tab.screen.release(&tab.handle);
                    }
                } else {
                    ui.label(RichText::new("Click the screen to capture the keyboard").weak());
                }
            }
        }
    });
    let (screen_error, input_error, note, serial_error) = {
        let mut sh = tab.handle.shared.lock().unwrap_or_else(|e| e.into_inner());
        (
            sh.screen_error.clone(),
            sh.input_error.clone(),
            sh.note.take(),
            sh.serial_error.clone(),
        )
    };
    if let Some(n) = note {
        commands.push(UiCommand::ConsoleNote(format!("{}: {n}", tab.title)));
    }
    match tab.pane {
        ConsolePane::Screen if !running => not_running(ui, tab, state, st, commands),
        ConsolePane::Screen => {
            let busy = tone(ui.visuals(), Tone::Busy);
            if let Some(e) = &input_error {
                ui.label(RichText::new(e.as_str()).color(busy));
            }
            if tab.screen.size()[0] == 0 {
                let name = state.vm_name(tab.host, &tab.vm_id);
                ui.add_space(24.0);
                ui.vertical_centered(|ui| {
                    ui.spinner();
                    ui.label(format!("Waiting for the screen of VM '{name}'…"));
                    if let Some(e) = &screen_error {
                        ui.label(RichText::new(e.as_str()).color(busy));
                    }
                });
            } else {
                if let Some(e) = &screen_error {
                    ui.label(RichText::new(e.as_str()).color(busy));
                }
                tab.screen.show(ui, &tab.handle);
            }
        }
        ConsolePane::Serial => {
            if let Some(e) = &serial_error {
                ui.label(RichText::new(e.as_str()).color(tone(ui.visuals(), Tone::Busy)));
            }
            let text = {
                let sh = tab.handle.shared.lock().unwrap_or_else(|e| e.into_inner());
                clean_serial(&sh.serial)
            };
            let bottom = 32.0;
            egui::ScrollArea::vertical()
                .max_height((ui.available_height() - bottom).max(50.0))
                .stick_to_bottom(true)
                .auto_shrink([false, false])
                .show(ui, |ui| {
                    ui.add(egui::Label::new(RichText::new(text).monospace()).wrap());
                });
            ui.horizontal(|ui| {
                let l = ui.label("Send:");
                let r = ui.add(
                    egui::TextEdit::singleline(&mut tab.serial_line)
                        .desired_width(400.0)
                        .font(egui::TextStyle::Monospace),
                );
                r.clone().labelled_by(l.id);
                let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                if ui.button("Send line").clicked() || enter {
                    let mut data = std::mem::take(&mut tab.serial_line).into_bytes();
                    data.push(b'\n');
                    commands.push(UiCommand::SendSerial {
                        tab: at.clone(),
                        data,
                    });
                    r.request_focus();
                }
            });
        }
    }
}

/// The screen pane of a VM that does not run: one sentence with its name and state, and
/// Start.
fn not_running(
    ui: &mut Ui,
    tab: &ConsoleTab,
    state: &State,
    st: VmState,
    commands: &mut Vec<UiCommand>,
) {
    let Some(h) = state.host(tab.host) else {
        return;
    };
    let name = h.vm_name(&tab.vm_id);
    let online = h.status == HostStatus::Online;
    ui.add_space(48.0);
    ui.vertical_centered(|ui| {
        let Some(v) = h.vms.get(&tab.vm_id) else {
            ui.heading(format!("VM '{name}' is no longer on host {}.", h.cfg.name));
            return;
        };
        match st {
            VmState::Starting => {
                ui.heading(format!("VM '{name}' is starting."));
                ui.spinner();
                ui.label("Its screen appears here in a moment.");
                return;
            }
            VmState::Crashed => {
                ui.heading(format!("VM '{name}' has stopped unexpectedly."));
                if let Some(why) = h.cannot_run() {
                    ui.label(
                        RichText::new(format!(
                            "Host {} cannot run VMs ({why}); run it on a host that can.",
                            h.cfg.name
                        ))
                        .color(tone(ui.visuals(), Tone::Bad)),
                    );
                }
            }
            _ => {
                ui.heading(format!("VM '{name}' is off."));
            }
        }
        ui.label(RichText::new("Start it to see its screen here.").weak());
        ui.add_space(8.0);
        let mut start = ui.add_enabled(
            online,
            egui::Button::new(RichText::new("Start").size(16.0)).min_size(egui::vec2(120.0, 32.0)),
        );
        if !online {
            start = start.on_disabled_hover_text(format!("Host {} is not connected", h.cfg.name));
        }
        if start.clicked() {
            commands.push(UiCommand::VmAction {
                host: tab.host,
                vm_id: tab.vm_id.clone(),
                action: VmAction::Start,
            });
        }
        if st == VmState::Crashed {
            let mut tech = v.state_reason.clone();
            if !v.crash_log.is_empty() {
                tech.push_str("\n\n");
                tech.push_str(&v.crash_log);
            }
            details(ui, ("console-crash", &tab.vm_id), &tech);
        }
    });
}
