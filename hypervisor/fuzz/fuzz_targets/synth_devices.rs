//! The synthetic devices (synthvid, keyboard, mouse) driven through the fake guest channel
//! with arbitrary guest packets, exactly as they run on a channel thread. The first byte
//! picks the device; then each packet is a little-endian u16 length and that many bytes
//! (a length with the top bit set also feeds the device one host input event first).
//! Nothing may panic; a refused packet closes the channel, and the fuzzer opens a new one.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vmbus_core::Vsp;
use vmbus_core::fake::FakeGuest;
use vmbus_devices::{InputQueue, keyboard, mouse, video};

fuzz_target!(|data: &[u8]| {
    let Some((&which, mut rest)) = data.split_first() else {
        return;
    };
    let keys = Arc::new(InputQueue::new().unwrap());
    let pointer = Arc::new(InputQueue::new().unwrap());
    let shared = video::VideoShared::new(16 << 20);
    let dev: Arc<Mutex<dyn Vsp>> = match which % 3 {
        0 => Arc::new(Mutex::new(video::Video::new(shared.clone()))),
        1 => Arc::new(Mutex::new(keyboard::Keyboard::new(keys.clone()))),
        _ => Arc::new(Mutex::new(mouse::Mouse::new(pointer.clone()))),
    };
    let mut dev = dev.lock().unwrap();
    let mut guest = FakeGuest::new();
    guest.open(&mut *dev).unwrap();
    let mut packets = 0;
    while rest.len() >= 2 && packets < 256 {
        packets += 1;
        let word = u16::from_le_bytes([rest[0], rest[1]]);
        let len = usize::from(word & 0x7fff).min(rest.len() - 2);
        let payload = &rest[2..2 + len];
        rest = &rest[2 + len..];
        if word & 0x8000 != 0 {
            let b = payload.first().copied().unwrap_or(0);
            keys.push(keyboard::KeyEvent {
                scancode: u32::from(b) | if b & 1 == 1 { 0xe000 } else { 0 },
                pressed: b & 2 == 2,
            });
            pointer.push(mouse::PointerEvent {
                x: u32::from(b) * 128,
                y: 32767 - u32::from(b) * 128,
                buttons: u32::from(b & 7),
                wheel: i32::from(b as i8),
            });
        }
        if guest.send_inband(packets, payload).is_err() {
            break;
        }
        if guest.run(&mut *dev).is_err() {
            // The channel is closed and opened again, as a guest driver reloading does.
            dev.closed();
            guest = FakeGuest::new();
            guest.open(&mut *dev).unwrap();
            continue;
        }
        // Whatever the device answered is a well-formed packet the guest can read.
        for p in guest.recv_all().unwrap() {
            assert!(p.header.offset <= p.bytes.len());
        }
    }
    // Any dirty rectangle the device reports lies inside its mode.
    if let Some(m) = shared.mode() {
        assert!(u64::from(m.stride) * u64::from(m.height) <= 16 << 20);
    }
});
