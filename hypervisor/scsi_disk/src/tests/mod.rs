//! Unit tests: every CDB against an in-memory backend (sparse, so multi-terabyte disks cost
//! nothing), plus a real raw file.

mod controller;
mod inquiry;
mod io;
mod mode;
mod unmap;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use parvis_disk::counters::IoCounters;
use parvis_disk::{Allocation, AllocationState, BlockDevice, DiskError, check_range};

use crate::{Asc, DiskIdentity, Outcome, ScsiDisk, ScsiDiskOptions, ScsiStatus, SenseKey};

const PAGE: u64 = 4096;

/// A sparse in-memory disk: 4 KiB pages allocated on first write, zeros elsewhere.
pub(crate) struct MemDisk {
    pages: Mutex<HashMap<u64, Vec<u8>>>,
    size: u64,
    logical: u32,
    physical: u32,
    read_only: bool,
    /// Make every read, write, flush and discard fail with an I/O error.
    pub(crate) fail: AtomicBool,
    pub(crate) flushes: AtomicU64,
    pub(crate) discards: Mutex<Vec<(u64, u64)>>,
}

impl MemDisk {
    pub(crate) fn new(size: u64, logical: u32, physical: u32, read_only: bool) -> Arc<Self> {
        Arc::new(Self {
            pages: Mutex::new(HashMap::new()),
            size,
            logical,
            physical,
            read_only,
            fail: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            discards: Mutex::new(Vec::new()),
        })
    }

    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(offset, len, self.size)?;
        if self.fail.load(Ordering::Relaxed) {
            return Err(DiskError::Io {
                op,
                offset,
                source: std::io::Error::other("injected failure"),
            });
        }
        Ok(())
    }

    /// Bytes at `offset` (test helper, bypasses the checks).
    pub(crate) fn peek(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.copy_out(&mut buf, offset);
        buf
    }

    fn copy_out(&self, buf: &mut [u8], offset: u64) {
        let pages = self.pages.lock().unwrap();
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match pages.get(&(at / PAGE)) {
                Some(p) => dst.copy_from_slice(&p[in_page..in_page + n]),
                None => dst.fill(0),
            }
            done += n;
        }
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.logical
    }
    fn physical_sector_size(&self) -> u32 {
        self.physical
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.check("read", offset, buf.len() as u64)?;
        self.copy_out(buf, offset);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.check("write", offset, buf.len() as u64)?;
        let mut pages = self.pages.lock().unwrap();
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let page = pages
                .entry(at / PAGE)
                .or_insert_with(|| vec![0; PAGE as usize]);
            page[in_page..in_page + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.check("flush", 0, 0)?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.check("discard", offset, len)?;
        self.discards.lock().unwrap().push((offset, len));
        Ok(())
    }
    fn allocation(&self, _offset: u64, len: u64) -> Result<Allocation, DiskError> {
        Ok(Allocation {
            state: AllocationState::Data,
            len,
        })
    }
}

/// The identity every test disk uses.
pub(crate) fn identity() -> DiskIdentity {
    DiskIdentity::new("PARVIS-TEST-0001", 0x5001_4050_0000_0042).unwrap()
}

/// A writable 64 MiB disk with 512-byte sectors.
pub(crate) fn mem() -> Arc<MemDisk> {
    MemDisk::new(64 << 20, 512, 512, false)
}

pub(crate) fn scsi_with(mem: &Arc<MemDisk>, options: ScsiDiskOptions) -> ScsiDisk {
    ScsiDisk::new(
        mem.clone(),
        identity(),
        Arc::new(IoCounters::default()),
        options,
    )
    .unwrap()
}

pub(crate) fn scsi(mem: &Arc<MemDisk>) -> ScsiDisk {
    scsi_with(mem, ScsiDiskOptions::default())
}

/// Run a command with a data-in buffer of `in_len` bytes.
pub(crate) fn run(d: &ScsiDisk, cdb: &[u8], out: &[u8], in_len: usize) -> (Outcome, Vec<u8>) {
    d.execute_vec(cdb, out, in_len)
}

#[track_caller]
pub(crate) fn assert_good(o: &Outcome) {
    assert_eq!(o.status, ScsiStatus::Good, "sense: {:?}", o.sense);
    assert!(o.sense.is_none());
}

#[track_caller]
pub(crate) fn assert_sense(o: &Outcome, key: SenseKey, asc: Asc) {
    assert_eq!(o.status, ScsiStatus::CheckCondition);
    let s = o.sense.expect("CHECK CONDITION carries sense");
    assert_eq!((s.key, s.asc), (key, asc), "sense: {s:?}");
    assert_eq!(o.data_in_len, 0);
    assert_eq!(o.data_out_len, 0);
}

#[track_caller]
pub(crate) fn assert_illegal(o: &Outcome, asc: Asc) {
    assert_sense(o, SenseKey::IllegalRequest, asc);
}

pub(crate) fn cdb10(op: u8, flags: u8, lba: u32, len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

pub(crate) fn cdb12(op: u8, flags: u8, lba: u32, len: u32) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0] = op;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&len.to_be_bytes());
    c
}

pub(crate) fn cdb16(op: u8, flags: u8, lba: u64, len: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

pub(crate) fn cdb6_rw(op: u8, lba: u32, len: u8) -> [u8; 6] {
    [
        op,
        (lba >> 16) as u8 & 0x1F,
        (lba >> 8) as u8,
        lba as u8,
        len,
        0,
    ]
}

pub(crate) fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, a[0], a[1], 0]
}

#[test]
fn a_disk_is_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<ScsiDisk>();
    let m = mem();
    let d = Arc::new(scsi(&m));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..50u32 {
                    let lba = u32::from(t) * 1000 + i;
                    let data = [t ^ i as u8; 512];
                    assert_good(&run(&d, &cdb10(0x2A, 0, lba, 1), &data, 0).0);
                    let (o, back) = run(&d, &cdb10(0x28, 0, lba, 1), &[], 512);
                    assert_good(&o);
                    assert_eq!(back, data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
