//! The synthetic SCSI controller driven through the fake guest channel with arbitrary
//! packets, exactly as it runs on a channel thread (commands run on the channel thread so
//! every input replays the same way). The first byte: bit 0 runs Linux's initialization
//! first, bit 1 puts a read-only disk at LUN 0, bit 2 hot-adds a disk at LUN 1 halfway.
//! Then each packet is a kind byte, a little-endian u16 length and that many payload bytes.
//! Kind bit 0 sends it GPA-direct over a page list (bits 1-3: pages, bits 4-7: offset / 256;
//! the list's first page is outside guest RAM when the length's top bit is set).
//! Nothing may panic; a refused packet closes the channel, and a new one is opened.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use parvis_disk::counters::IoCounters;
use parvis_disk::{Allocation, AllocationState, BlockDevice, DiskError, check_range};
use scsi_disk::{DiskIdentity, ScsiDisk, ScsiDiskOptions};
use storvsp::{ScsiController, protocol};
use vmbus_core::fake::{FakeGuest, RAM_BYTES};
use vmbus_core::{PageList, Vsp};

struct Mem(Mutex<Vec<u8>>, bool);

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn physical_sector_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        self.1
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let d = self.0.lock().unwrap();
        check_range(offset, buf.len() as u64, d.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.1 {
            return Err(DiskError::ReadOnly);
        }
        let mut d = self.0.lock().unwrap();
        check_range(offset, buf.len() as u64, d.len() as u64)?;
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), DiskError> {
        Ok(())
    }
    fn allocation(&self, _: u64, len: u64) -> Result<Allocation, DiskError> {
        Ok(Allocation {
            state: AllocationState::Data,
            len,
        })
    }
}

fn disk(read_only: bool, id: &str) -> Arc<ScsiDisk> {
    Arc::new(
        ScsiDisk::new(
            Arc::new(Mem(Mutex::new(vec![0x5a; 256 << 10]), read_only)),
            DiskIdentity::derive(id),
            Arc::new(IoCounters::default()),
            ScsiDiskOptions {
                unmap: true,
                ..ScsiDiskOptions::default()
            },
        )
        .unwrap(),
    )
}

fn control(operation: u32, version: u16) -> [u8; protocol::PACKET_LEN] {
    let mut p = [0u8; protocol::PACKET_LEN];
    p[0..4].copy_from_slice(&operation.to_le_bytes());
    p[4] = 1;
    p[12..14].copy_from_slice(&version.to_le_bytes());
    p
}

fn init(guest: &mut FakeGuest, dev: &mut ScsiController) {
    use protocol::op;
    for (i, (o, v)) in [
        (op::BEGIN_INITIALIZATION, 0),
        (op::QUERY_PROTOCOL_VERSION, protocol::version::WIN8_1),
        (op::QUERY_PROPERTIES, 0),
        (op::END_INITIALIZATION, 0),
    ]
    .into_iter()
    .enumerate()
    {
        guest.send_inband(i as u64 + 1, &control(o, v)).unwrap();
        let _ = guest.run(dev);
        let _ = guest.recv_all();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    let (mut dev, handle) = ScsiController::new(0, 0).unwrap();
    if setup & 2 != 0 {
        handle.attach(0, disk(true, "ro")).unwrap();
    } else {
        handle.attach(0, disk(false, "rw")).unwrap();
    }
    let mut guest = FakeGuest::new();
    guest.open(&mut dev).unwrap();
    if setup & 1 != 0 {
        init(&mut guest, &mut dev);
    }
    let mut packets = 0u64;
    while rest.len() >= 3 && packets < 128 {
        packets += 1;
        if packets == 64 && setup & 4 != 0 {
            let _ = handle.attach(1, disk(false, "hot"));
        }
        let kind = rest[0];
        let word = u16::from_le_bytes([rest[1], rest[2]]);
        let len = usize::from(word & 0x7fff).min(rest.len() - 3);
        let payload = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let sent = if kind & 1 == 0 {
            guest.send_inband(packets, payload)
        } else {
            let pages = usize::from((kind >> 1) & 7) + 1;
            let offset = u32::from(kind >> 4) * 256;
            let Some(mut pfns) = guest.alloc(pages) else {
                break;
            };
            if word & 0x8000 != 0 {
                pfns[0] = RAM_BYTES / 4096 + 1;
            }
            let bytes = pages as u32 * 4096 - offset;
            let list = PageList::new(offset, bytes, pfns).unwrap();
            guest.send_gpa_direct(packets, &[list], payload)
        };
        if sent.is_err() {
            break;
        }
        if guest.run(&mut dev).is_err() {
            dev.closed();
            guest = FakeGuest::new();
            guest.open(&mut dev).unwrap();
            continue;
        }
        for p in guest.recv_all().unwrap() {
            assert!(p.header.offset <= p.bytes.len());
            // Every answer is a whole vstor_packet.
            assert!(p.payload().len() >= protocol::PACKET_LEN);
        }
    }
    let _ = handle.detach(1);
});
