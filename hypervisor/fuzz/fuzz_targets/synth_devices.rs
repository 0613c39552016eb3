//! The synthetic devices' message parsers (synthvid, keyboard, mouse) on arbitrary guest
//! packets. The first byte picks the device.
#![no_main]

use hypervisor::devices::synth::{keyboard, mouse, video};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(video::GuestMessage::Situation {
                mode: Some(m), ..
            }) = video::parse(payload, 16 << 20)
            {
                assert!(u64::from(m.stride) * u64::from(m.height) <= 16 << 20);
                assert!(m.stride >= m.width * 4);
            }
            if let Ok(video::GuestMessage::Dirt(rects)) = video::parse(payload, 16 << 20) {
                assert!(rects.len() <= 255);
                let mode = video::Mode {
                    width: 1024,
                    height: 768,
                    stride: 4096,
                };
                for r in rects {
                    if let Some(c) = video::clip(r, mode) {
                        assert!(c.x + c.width <= 1024 && c.y + c.height <= 768);
                    }
                }
            }
        }
        1 => {
            let _ = keyboard::parse(payload);
            if payload.len() >= 5 {
                let sc = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let _ = keyboard::event_message(keyboard::KeyEvent {
                    scancode: sc,
                    pressed: payload[4] & 1 == 1,
                });
            }
        }
        _ => {
            let _ = mouse::parse(payload);
        }
    }
});
