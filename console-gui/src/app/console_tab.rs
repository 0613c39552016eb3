//! A console tab: the VM's screen (with keys to send, clipboard typing and screenshots) or
//! its serial console.

use egui::{Color32, RichText, Ui};

use super::command::{TabRef, UiCommand};
use super::state::{ConsolePane, ConsoleTab, State};
use super::widgets::state_color;
use super::words::{clean_serial, state_word};
use crate::view::Scale;

pub(super) fn show(
    ui: &mut Ui,
    tab: &mut ConsoleTab,
    state: &State,
    commands: &mut Vec<UiCommand>,
) {
    let at = TabRef::of(tab);
    let vm = state.host(tab.host).and_then(|h| h.vms.get(&tab.vm_id));
    ui.horizontal_wrapped(|ui| {
        ui.selectable_value(&mut tab.pane, ConsolePane::Screen, "Screen");
        ui.selectable_value(&mut tab.pane, ConsolePane::Serial, "Serial console");
        ui.separator();
        if let Some(v) = vm {
            ui.colored_label(state_color(v.state), state_word(v.state));
        }
        if tab.pane == ConsolePane::Screen {
            ui.separator();
            ui.selectable_value(&mut tab.screen.scale, Scale::Fit, "Fit to window");
            ui.selectable_value(&mut tab.screen.scale, Scale::OneToOne, "1:1");
            ui.separator();
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
            });
            if ui.button("Type clipboard text").clicked() {
                commands.push(UiCommand::TypeClipboard(at.clone()));
            }
            if ui
                .add_enabled(tab.screen.size()[0] > 0, egui::Button::new("Screenshot"))
                .clicked()
            {
                commands.push(UiCommand::Screenshot {
                    tab: at.clone(),
                    ask: false,
                });
            }
            if ui
                .add_enabled(
                    tab.screen.size()[0] > 0,
                    egui::Button::new("Screenshot as…"),
                )
                .clicked()
            {
                commands.push(UiCommand::Screenshot {
                    tab: at.clone(),
                    ask: true,
                });
            }
            ui.separator();
            if tab.screen.grabbed {
                ui.colored_label(
                    Color32::from_rgb(230, 160, 0),
                    "Keyboard captured: press Ctrl+Alt+Left to release",
                );
                if ui.button("Release").clicked() {
                    // The screen's own input handling, as Ctrl+Alt+Left on the screen.
                    tab.screen.release(&tab.handle);
                }
            } else {
                ui.label(RichText::new("Click the screen to capture the keyboard").weak());
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
        ConsolePane::Screen => {
            if let Some(e) = &input_error {
                ui.colored_label(Color32::from_rgb(210, 160, 40), e.as_str());
            }
            if let Some(e) = &screen_error {
                ui.colored_label(Color32::from_rgb(210, 160, 40), e.as_str());
            }
            tab.screen.show(ui, &tab.handle);
        }
        ConsolePane::Serial => {
            if let Some(e) = &serial_error {
                ui.colored_label(Color32::from_rgb(210, 160, 40), e.as_str());
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
