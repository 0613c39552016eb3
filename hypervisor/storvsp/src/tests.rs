//! The controller against the fake guest: the init sequence Linux runs, I/O through
//! GPA-direct page lists (on the channel thread and on the I/O threads), the bus scan, hot
//! add and remove, and hostile packets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parvis_disk::counters::IoCounters;
use parvis_disk::{Allocation, AllocationState, BlockDevice, DiskError, check_range};
use scsi_disk::{DiskIdentity, ScsiDisk, ScsiDiskOptions};
use vmbus_core::fake::FakeGuest;
use vmbus_core::memory::PAGE;
use vmbus_core::ring::{Packet, pkt};
use vmbus_core::{PageList, Vsp};

use super::*;
use crate::protocol::{PACKET_LEN, op, srb_packet, srb_status, status, version};

/// A disk in a vector.
struct VecDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    flushes: AtomicU64,
}

impl VecDisk {
    fn new(size: usize, read_only: bool) -> Arc<Self> {
        let data = (0..size).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        Arc::new(VecDisk {
            data: Mutex::new(data),
            read_only,
            flushes: AtomicU64::new(0),
        })
    }
}

impl BlockDevice for VecDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn physical_sector_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let d = self.data.lock().unwrap();
        check_range(offset, buf.len() as u64, d.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let mut d = self.data.lock().unwrap();
        check_range(offset, buf.len() as u64, d.len() as u64)?;
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), DiskError> {
        Ok(())
    }
    fn allocation(&self, _offset: u64, len: u64) -> Result<Allocation, DiskError> {
        Ok(Allocation {
            state: AllocationState::Data,
            len,
        })
    }
}

fn scsi(backend: Arc<VecDisk>, id: &str) -> Arc<ScsiDisk> {
    Arc::new(
        ScsiDisk::new(
            backend,
            DiskIdentity::derive(id),
            Arc::new(IoCounters::default()),
            ScsiDiskOptions::default(),
        )
        .unwrap(),
    )
}

struct Rig {
    guest: FakeGuest,
    dev: ScsiController,
    handle: ControllerHandle,
    next_id: u64,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn control(operation: u32, extra: &[(usize, u8)]) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0..4].copy_from_slice(&operation.to_le_bytes());
    p[4] = 1;
    for &(o, v) in extra {
        p[o] = v;
    }
    p
}

/// A completed SRB as the guest reads it.
#[derive(Debug)]
struct Reply {
    srb_status: u8,
    scsi_status: u8,
    transferred: u32,
    sense: Vec<u8>,
}

impl Rig {
    fn new(threads: usize) -> Self {
        let (dev, handle) = ScsiController::new(0, threads).unwrap();
        let mut r = Rig {
            guest: FakeGuest::new(),
            dev,
            handle,
            next_id: 1,
        };
        r.guest.open(&mut r.dev).unwrap();
        r
    }

    /// Send `payload` inband and return the device's answers (waiting for I/O threads).
    fn call(&mut self, payload: &[u8]) -> Packet {
        let id = self.id();
        self.guest.send_inband(id, payload).unwrap();
        self.answer(id)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn answer(&mut self, id: u64) -> Packet {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.guest.run(&mut self.dev).unwrap();
            if let Some(p) = self.guest.recv().unwrap() {
                assert_eq!(p.header.trans_id, id, "completions echo the transaction id");
                assert_eq!(p.header.ptype, pkt::COMP);
                return p;
            }
            assert!(Instant::now() < deadline, "no completion for {id}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Linux's storvsc_channel_init.
    fn init(&mut self) {
        let p = self.call(&control(op::BEGIN_INITIALIZATION, &[]));
        assert_eq!(status_of(&p), (op::COMPLETE_IO, status::SUCCESS));
        for (v, want) in [
            (version::WIN10, status::REVISION_MISMATCH),
            (version::WIN8_1, status::SUCCESS),
        ] {
            let b = v.to_le_bytes();
            let p = self.call(&control(
                op::QUERY_PROTOCOL_VERSION,
                &[(12, b[0]), (13, b[1])],
            ));
            assert_eq!(status_of(&p), (op::COMPLETE_IO, want), "version {v:#x}");
        }
        let p = self.call(&control(op::QUERY_PROPERTIES, &[]));
        assert_eq!(status_of(&p), (op::COMPLETE_IO, status::SUCCESS));
        let props = &p.payload()[12..];
        assert_eq!(u16::from_le_bytes([props[4], props[5]]), 0, "one channel");
        assert_eq!(u32_at(props, 4 + 4), 0, "no multi-channel flag");
        assert_eq!(u32_at(props, 12), MAX_TRANSFER);
        let p = self.call(&control(op::END_INITIALIZATION, &[]));
        assert_eq!(status_of(&p), (op::COMPLETE_IO, status::SUCCESS));
    }

    /// Run `cdb` at `lun` with a `len`-byte buffer starting `offset` bytes into fresh
    /// guest pages; `dir` 0 out, 1 in, 2 none. Returns the reply and the buffer after.
    fn srb(&mut self, lun: u8, cdb: &[u8], dir: u8, data: &[u8], len: usize) -> (Reply, Vec<u8>) {
        self.srb_at(lun, cdb, dir, data, len, 100)
    }

    fn srb_at(
        &mut self,
        lun: u8,
        cdb: &[u8],
        dir: u8,
        data: &[u8],
        len: usize,
        offset: u32,
    ) -> (Reply, Vec<u8>) {
        let p = srb_packet(lun, cdb, dir, len as u32);
        let id = self.id();
        let list = if len > 0 {
            let pages = (offset as u64 + len as u64).div_ceil(PAGE) as usize;
            let pfns = self.guest.alloc(pages).unwrap();
            let l = PageList::new(offset, len as u32, pfns).unwrap();
            l.write(self.guest.memory(), 0, data).unwrap();
            self.guest
                .send_gpa_direct(id, std::slice::from_ref(&l), &p)
                .unwrap();
            Some(l)
        } else {
            self.guest.send_inband(id, &p).unwrap();
            None
        };
        let answer = self.answer(id);
        let b = &answer.payload()[12..];
        assert_eq!(u32_at(answer.payload(), 0), op::COMPLETE_IO);
        let reply = Reply {
            srb_status: b[2],
            scsi_status: b[3],
            transferred: u32_at(b, 12),
            sense: b[16..16 + usize::from(b[9])].to_vec(),
        };
        let mut out = vec![0; len];
        if let Some(l) = list {
            l.read(self.guest.memory(), 0, &mut out).unwrap();
        }
        (reply, out)
    }
}

fn status_of(p: &Packet) -> (u32, u32) {
    (u32_at(p.payload(), 0), u32_at(p.payload(), 8))
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [0x28, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2A;
    c
}

const INQUIRY: [u8; 6] = [0x12, 0, 0, 0, 96, 0];
const TUR: [u8; 6] = [0; 6];
const REPORT_LUNS: [u8; 12] = [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];

#[test]
fn linux_init_then_inquiry_read_and_write_through_page_lists() {
    for threads in [0, 3] {
        let mut r = Rig::new(threads);
        let backend = VecDisk::new(4 << 20, false);
        r.handle.attach(0, scsi(backend.clone(), "disk-a")).unwrap();
        r.init();

        let (rep, data) = r.srb(0, &INQUIRY, 1, &[], 96);
        assert_eq!((rep.srb_status, rep.scsi_status), (srb_status::SUCCESS, 0));
        assert_eq!(&data[8..12], b"Msft");
        assert_eq!(&data[16..28], b"Virtual Disk");
        assert!(rep.transferred >= 36 && rep.transferred <= 96);

        // 64 KiB read at an odd offset into the first page: 17 pages.
        let (rep, data) = r.srb(0, &read10(100, 128), 1, &[], 64 << 10);
        assert_eq!(
            (rep.srb_status, rep.transferred),
            (srb_status::SUCCESS, 64 << 10)
        );
        assert_eq!(
            data,
            backend.data.lock().unwrap()[100 * 512..100 * 512 + (64 << 10)]
        );

        // A write lands on the disk, and reads back.
        let pattern: Vec<u8> = (0..(12 << 10)).map(|i| (i * 7 + threads) as u8).collect();
        let (rep, _) = r.srb_at(0, &write10(8, 24), 0, &pattern, 12 << 10, 4000);
        assert_eq!(
            (rep.srb_status, rep.transferred),
            (srb_status::SUCCESS, 12 << 10)
        );
        assert_eq!(
            backend.data.lock().unwrap()[8 * 512..8 * 512 + (12 << 10)],
            pattern[..]
        );
        let (_, back) = r.srb(0, &read10(8, 24), 1, &[], 12 << 10);
        assert_eq!(back, pattern);

        // SYNCHRONIZE CACHE reaches the backend.
        let (rep, _) = r.srb(0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 2, &[], 0);
        assert_eq!(rep.srb_status, srb_status::SUCCESS);
        assert!(backend.flushes.load(Ordering::Relaxed) >= 1);
    }
}

#[test]
fn scsi_errors_come_back_with_autosense() {
    let mut r = Rig::new(0);
    r.handle
        .attach(0, scsi(VecDisk::new(1 << 20, true), "ro"))
        .unwrap();
    r.init();
    // Past the end: ILLEGAL REQUEST / LBA OUT OF RANGE.
    let (rep, _) = r.srb(0, &read10(2048, 1), 1, &[], 512);
    assert_eq!(
        rep.srb_status,
        srb_status::ERROR | srb_status::AUTOSENSE_VALID
    );
    assert_eq!((rep.scsi_status, rep.transferred), (2, 0));
    assert_eq!((rep.sense[2] & 0xF, rep.sense[12]), (0x5, 0x21));
    // A read-only disk: DATA PROTECT / WRITE PROTECTED.
    let (rep, _) = r.srb(0, &write10(0, 1), 0, &[1; 512], 512);
    assert_eq!((rep.sense[2] & 0xF, rep.sense[12]), (0x7, 0x27));
    // Unknown opcode: INVALID COMMAND OPERATION CODE.
    let (rep, _) = r.srb(0, &[0xC0, 0, 0, 0, 0, 0], 2, &[], 0);
    assert_eq!((rep.sense[2] & 0xF, rep.sense[12]), (0x5, 0x20));
    // The guest's sense buffer limit is honoured (18 bytes of fixed sense).
    assert_eq!(rep.sense.len(), 18);
}

#[test]
fn the_bus_scan_sees_disks_only_where_they_are() {
    let mut r = Rig::new(0);
    r.handle
        .attach(0, scsi(VecDisk::new(1 << 20, false), "a"))
        .unwrap();
    r.handle
        .attach(5, scsi(VecDisk::new(1 << 20, false), "b"))
        .unwrap();
    r.init();
    // REPORT LUNS at target 0 lists both.
    let (rep, data) = r.srb(0, &REPORT_LUNS, 1, &[], 256);
    assert_eq!(rep.srb_status, srb_status::SUCCESS);
    assert_eq!(u32::from_be_bytes(data[0..4].try_into().unwrap()), 16);
    assert_eq!((data[9], data[17]), (0, 5));
    // An empty LUN answers INQUIRY with "nothing here" and everything else at the transport.
    let (rep, data) = r.srb(3, &INQUIRY, 1, &[], 96);
    assert_eq!((rep.srb_status, data[0]), (srb_status::SUCCESS, 0x7F));
    let (rep, _) = r.srb(3, &TUR, 2, &[], 0);
    assert_eq!(rep.srb_status, srb_status::INVALID_LUN);
    // Other targets and paths hold nothing, and list nothing.
    let mut p = srb_packet(0, &TUR, 2, 0);
    p[12 + 6] = 1;
    let id = r.id();
    r.guest.send_inband(id, &p).unwrap();
    let a = r.answer(id);
    assert_eq!(a.payload()[12 + 2], srb_status::INVALID_LUN);
    let mut p = srb_packet(0, &REPORT_LUNS, 1, 64);
    p[12 + 5] = 2;
    let pfns = r.guest.alloc(1).unwrap();
    let l = PageList::new(0, 64, pfns).unwrap();
    let id = r.id();
    r.guest
        .send_gpa_direct(id, std::slice::from_ref(&l), &p)
        .unwrap();
    let a = r.answer(id);
    assert_eq!(a.payload()[12 + 2], srb_status::SUCCESS);
    let mut d = [0u8; 8];
    l.read(r.guest.memory(), 0, &mut d).unwrap();
    assert_eq!(d, [0; 8]);
}

#[test]
fn hot_add_and_remove_ask_the_guest_to_scan_again() {
    let mut r = Rig::new(2);
    r.init();
    // Nothing yet.
    r.guest.run(&mut r.dev).unwrap();
    assert!(r.guest.recv().unwrap().is_none());
    let (rep, _) = r.srb(0, &TUR, 2, &[], 0);
    assert_eq!(rep.srb_status, srb_status::INVALID_LUN);

    let backend = VecDisk::new(1 << 20, false);
    let lun = r.handle.free_lun().unwrap();
    assert_eq!(lun, 0);
    r.handle.attach(lun, scsi(backend.clone(), "hot")).unwrap();
    assert_eq!(
        r.handle.attach(lun, scsi(backend.clone(), "again")),
        Err(LunError::Busy(0))
    );
    r.guest.run(&mut r.dev).unwrap();
    let scan = r.guest.recv().unwrap().expect("ENUMERATE_BUS");
    assert_eq!(
        (scan.header.ptype, scan.header.trans_id),
        (pkt::DATA_INBAND, 0)
    );
    assert_eq!(u32_at(scan.payload(), 0), op::ENUMERATE_BUS);
    let (rep, _) = r.srb(0, &TUR, 2, &[], 0);
    assert_eq!(rep.srb_status, srb_status::SUCCESS);

    // Removal waits for nothing here, flushes, and the LUN goes away.
    let flushes = backend.flushes.load(Ordering::Relaxed);
    r.handle.detach(0).unwrap();
    assert_eq!(backend.flushes.load(Ordering::Relaxed), flushes + 1);
    assert_eq!(r.handle.detach(0).unwrap_err(), LunError::Empty(0));
    r.guest.run(&mut r.dev).unwrap();
    let scan = r.guest.recv().unwrap().expect("ENUMERATE_BUS");
    assert_eq!(u32_at(scan.payload(), 0), op::ENUMERATE_BUS);
    let (rep, _) = r.srb(0, &TUR, 2, &[], 0);
    assert_eq!(rep.srb_status, srb_status::INVALID_LUN);
    // The cache flush Linux sends while dropping the disk succeeds (the removal flushed
    // it); other commands to the LUN do not, and a LUN never used does not either.
    let sync = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let (rep, _) = r.srb(0, &sync, 2, &[], 0);
    assert_eq!((rep.srb_status, rep.scsi_status), (srb_status::SUCCESS, 0));
    let (rep, _) = r.srb(0, &read10(0, 1), 1, &[], 512);
    assert_eq!(rep.srb_status, srb_status::INVALID_LUN);
    let (rep, _) = r.srb(9, &sync, 2, &[], 0);
    assert_eq!(rep.srb_status, srb_status::INVALID_LUN);
    assert_eq!(
        r.handle.attach(64, scsi(backend, "x")),
        Err(LunError::OutOfRange(64))
    );
}

#[test]
fn many_commands_in_flight_all_complete_once() {
    let mut r = Rig::new(4);
    let backend = VecDisk::new(8 << 20, false);
    r.handle.attach(0, scsi(backend.clone(), "qd")).unwrap();
    r.init();
    let mut lists = Vec::new();
    for i in 0..32u32 {
        let id = 1000 + u64::from(i);
        let pfns = r.guest.alloc(1).unwrap();
        let l = PageList::new(0, 4096, pfns).unwrap();
        let p = srb_packet(0, &read10(i * 8, 8), 1, 4096);
        r.guest
            .send_gpa_direct(id, std::slice::from_ref(&l), &p)
            .unwrap();
        lists.push((id, l, i));
    }
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 32 {
        r.guest.run(&mut r.dev).unwrap();
        for p in r.guest.recv_all().unwrap() {
            assert_eq!(p.payload()[12 + 2], srb_status::SUCCESS);
            assert!(seen.insert(p.header.trans_id), "one completion per command");
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 32 completed",
            seen.len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let disk = backend.data.lock().unwrap();
    for (_, l, i) in lists {
        let mut got = vec![0; 4096];
        l.read(r.guest.memory(), 0, &mut got).unwrap();
        let at = i as usize * 4096;
        assert_eq!(got, disk[at..at + 4096]);
    }
}

#[test]
fn out_of_order_and_unknown_operations_are_refused_not_fatal() {
    let mut r = Rig::new(0);
    r.handle
        .attach(0, scsi(VecDisk::new(1 << 20, false), "a"))
        .unwrap();
    // SRB and properties before initialization.
    let p = r.call(&srb_packet(0, &TUR, 2, 0));
    assert_eq!(status_of(&p).1, status::INVALID_DEVICE_STATE);
    let p = r.call(&control(op::QUERY_PROTOCOL_VERSION, &[(12, 0), (13, 6)]));
    assert_eq!(status_of(&p).1, status::INVALID_DEVICE_STATE);
    r.call(&control(op::BEGIN_INITIALIZATION, &[]));
    let p = r.call(&control(op::QUERY_PROPERTIES, &[]));
    assert_eq!(status_of(&p).1, status::INVALID_DEVICE_STATE);
    let p = r.call(&control(
        op::QUERY_PROTOCOL_VERSION,
        &[(12, 0x01), (13, 0x04)],
    ));
    assert_eq!(
        status_of(&p).1,
        status::REVISION_MISMATCH,
        "Windows 7's 4.1"
    );
    r.init();
    let p = r.call(&control(99, &[]));
    assert_eq!(status_of(&p).1, status::INVALID_PARAMETER);
    let p = r.call(&control(op::CREATE_SUB_CHANNELS, &[(12, 2)]));
    assert_eq!(status_of(&p).1, status::NOT_SUPPORTED);
    // A bad CDB length is refused; the channel stays.
    let mut bad = srb_packet(0, &TUR, 2, 0);
    bad[12 + 8] = 0;
    let p = r.call(&bad);
    assert_eq!(status_of(&p).1, status::INVALID_PARAMETER);
    // A transfer longer than its buffer.
    let p = srb_packet(0, &read10(0, 8), 1, 4096);
    let pfns = r.guest.alloc(1).unwrap();
    let l = PageList::new(0, 512, pfns).unwrap();
    let id = r.id();
    r.guest.send_gpa_direct(id, &[l], &p).unwrap();
    assert_eq!(r.answer(id).payload()[12 + 2], srb_status::INVALID_REQUEST);
    // A reset is answered; the device still works.
    let p = r.call(&control(op::RESET_BUS, &[]));
    assert_eq!(status_of(&p).1, status::SUCCESS);
    let (rep, _) = r.srb(0, &TUR, 2, &[], 0);
    assert_eq!(rep.srb_status, srb_status::SUCCESS);
}

#[test]
fn memory_outside_guest_ram_or_broken_packets_close_the_channel() {
    for threads in [0, 2] {
        let mut r = Rig::new(threads);
        r.handle
            .attach(0, scsi(VecDisk::new(1 << 20, false), "a"))
            .unwrap();
        r.init();
        let far = vmbus_core::fake::RAM_BYTES / PAGE + 10;
        let l = PageList::new(0, 4096, vec![far]).unwrap();
        r.guest
            .send_gpa_direct(9, &[l], &srb_packet(0, &read10(0, 8), 1, 4096))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if r.guest.run(&mut r.dev).is_err() {
                break;
            }
            assert!(Instant::now() < deadline, "the bad page list was accepted");
            std::thread::sleep(Duration::from_millis(1));
        }
        r.dev.closed();
    }
    let mut r = Rig::new(0);
    r.init();
    r.guest.send_inband(3, &[1, 0, 0]).unwrap();
    assert!(
        r.guest.run(&mut r.dev).is_err(),
        "a packet shorter than a header"
    );
    let mut r = Rig::new(0);
    r.init();
    r.guest
        .send_inband(3, &srb_packet(0, &TUR, 2, 0)[..40])
        .unwrap();
    assert!(r.guest.run(&mut r.dev).is_err(), "an SRB cut short");
    let mut r = Rig::new(0);
    r.guest
        .send_raw(pkt::DATA_USING_XFER_PAGES, 0, 3, &[0; 8], &[0; 64])
        .unwrap();
    assert!(r.guest.run(&mut r.dev).is_err(), "a transfer-page packet");
}

#[test]
fn a_reopened_channel_starts_over() {
    let mut r = Rig::new(2);
    r.handle
        .attach(0, scsi(VecDisk::new(1 << 20, false), "a"))
        .unwrap();
    r.init();
    r.dev.closed();
    r.guest = FakeGuest::new();
    r.guest.open(&mut r.dev).unwrap();
    let p = r.call(&srb_packet(0, &TUR, 2, 0));
    assert_eq!(status_of(&p).1, status::INVALID_DEVICE_STATE);
    r.init();
    let (rep, _) = r.srb(0, &TUR, 2, &[], 0);
    assert_eq!(rep.srb_status, srb_status::SUCCESS);
    assert_eq!(r.dev.offer().class, SCSI_CLASS);
    assert_ne!(instance_guid(0), instance_guid(1));
}

#[test]
fn a_batch_of_commands_costs_the_guest_one_interrupt() {
    let mut r = Rig::new(0);
    r.handle
        .attach(0, scsi(VecDisk::new(1 << 20, false), "a"))
        .unwrap();
    r.init();
    let before = r.guest.host().signals;
    for i in 0..8u32 {
        let pfns = r.guest.alloc(1).unwrap();
        let l = PageList::new(0, 4096, pfns).unwrap();
        let p = srb_packet(0, &read10(i * 8, 8), 1, 4096);
        r.guest
            .send_gpa_direct(100 + u64::from(i), std::slice::from_ref(&l), &p)
            .unwrap();
    }
    r.guest.run(&mut r.dev).unwrap();
    let done = r.guest.recv_all().unwrap();
    assert_eq!(done.len(), 8);
    assert!(
        done.iter()
            .all(|p| p.payload()[12 + 2] == srb_status::SUCCESS)
    );
    assert_eq!(
        r.guest.host().signals - before,
        1,
        "one interrupt for the batch"
    );
}
