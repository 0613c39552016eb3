//! The VMBus ring layer against a guest that controls every byte of the ring: header
//! indices, packet headers and data. Input: 3 pages (header + 2 data pages) of guest→host
//! ring, then bytes steering host writes into a host→guest ring whose header the guest also
//! controls. Nothing may panic, loop forever or allocate beyond the packet limit.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmbus_core::ring::{InRing, MAX_PACKET, OutRing, pkt};

const PAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap());
    // Guest→host ring at pages 1 (header), 2, 3; host→guest at 4 (header), 5.
    let (inb, rest) = data.split_at(data.len().min(3 * PAGE));
    mem.write_slice(inb, GuestAddress(PAGE as u64)).unwrap();
    let (outhdr, steer) = rest.split_at(rest.len().min(64));
    mem.write_slice(outhdr, GuestAddress(4 * PAGE as u64)).unwrap();

    let mut r = InRing::new(mem.clone(), &[1, 2, 3]).unwrap();
    for _ in 0..64 {
        match r.read() {
            Ok(Some((p, _))) => {
                assert!(p.header.len <= MAX_PACKET);
                let _ = p.payload();
                // A GPA-direct descriptor the guest made up parses or is refused.
                if let Ok(lists) = p.gpa_direct() {
                    assert!(!lists.is_empty());
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let mut w = OutRing::new(mem.clone(), &[4, 5]).unwrap();
    for chunk in steer.chunks(3).take(64) {
        let len = usize::from(u16::from_le_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)])) % 6000;
        let desc = vec![0u8; usize::from(chunk[0] & 3) * 8];
        let _ = w.write_with(pkt::DATA_INBAND, 0, u64::from(chunk[0]), &desc, &vec![0xa5; len]);
        if chunk.len() == 3 {
            // The guest moves its read index between writes.
            let _ = mem.write_obj(u32::from(chunk[2]) * 8, GuestAddress(4 * PAGE as u64 + 4));
        }
    }
});
