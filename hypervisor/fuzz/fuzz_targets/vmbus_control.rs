//! The VMBus control plane fed arbitrary channel messages, as if posted by the guest with
//! HvPostMessage: version negotiation, offers, GPADLs (header/body/teardown), open, close,
//! modify, unload. Input: a sequence of messages, each a length byte then its bytes. Replies
//! are consumed from the SynIC slot between messages, as the guest would.
#![no_main]

use std::sync::{Arc, Mutex};

use hypervisor::hv::msr;
use hypervisor::hv::synic::{SintKick, Synic};
use hypervisor::vmbus::control::{Control, Doorbells};
use vmbus_core::messages as proto;
use vmbus_core::ring::Packet;
use vmbus_core::{Channel, Guid, OfferParams, SharedVsp, Vsp, VspError};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

struct NoKick;
impl SintKick for NoKick {
    fn kick(&self, _: u32, _: u32) {}
}

/// Drops every packet.
struct Sink;
impl Vsp for Sink {
    fn name(&self) -> &'static str {
        "sink"
    }
    fn offer(&self) -> OfferParams {
        OfferParams {
            class: Guid([1; 16]),
            instance: Guid([2; 16]),
            flags: 0,
            mmio_megabytes: 0,
            pipe_mode: 0,
        }
    }
    fn packet(&mut self, _: &Packet, _: &mut dyn Channel) -> Result<(), VspError> {
        Ok(())
    }
}

const SIMP: u64 = 0x1000;

fuzz_target!(|data: &[u8]| {
    let mem =
        Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let synic = Arc::new(Synic::new(mem.clone(), 2, Box::new(NoKick)));
    for vp in 0..2 {
        synic.set_msr(vp, msr::SIMP, (SIMP + u64::from(vp) * 0x2000) | 1);
        synic.set_msr(vp, msr::SIEFP, (SIMP + 0x1000 + u64::from(vp) * 0x2000) | 1);
        synic.set_msr(vp, msr::SCONTROL, 1);
    }
    let vsp: SharedVsp = Arc::new(Mutex::new(Sink));
    let mut c = Control::new(synic, None, vec![vsp], Doorbells::default());
    let mut rest = data;
    let mut n = 0;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len()).min(proto::MAX_MESSAGE);
        let (msg, tail) = tail.split_at(len);
        rest = tail;
        // Also exercise the parsers on their own.
        if let Ok(proto::GuestMessage::GpadlHeader(h)) = proto::parse(msg) {
            let _ = proto::parse_ranges(&h.data, h.rangecount);
        }
        c.handle(if n % 2 == 0 { 4 } else { 1 }, msg);
        // The guest consumes replies from both VPs' slots.
        for vp in 0..2u64 {
            let _ = mem.write_obj(0u32, GuestAddress(SIMP + vp * 0x2000 + 512));
        }
        c.pump();
        n += 1;
        if n > 64 {
            break;
        }
    }
});
