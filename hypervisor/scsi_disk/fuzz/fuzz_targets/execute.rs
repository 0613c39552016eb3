//! A disk built from the first input byte, then up to 16 commands as a guest would send
//! them: any CDB (0-31 bytes), any data-out (explicit bytes, padded with a fill byte up to
//! a declared length of up to 3 MiB), any data-in buffer size (up to 4 MiB, past the 2 MiB
//! transfer limit), a backend that fails on request. Each command also goes to the
//! controller helpers (REPORT LUNS, absent LUN). Nothing may panic or allocate without
//! bound, and every outcome must be consistent: CHECK CONDITION exactly when there is
//! sense, no data moved on CHECK CONDITION, no more data than the buffers, and the residual
//! is what was not moved.
//!
//! ```text
//! u8 config: bit 0 unmap, bit 1 write same(16), bit 2 read-only, bit 3 4 KiB logical
//!            sectors, bit 4 4 KiB physical sectors, bits 5-7 disk size class
//! commands until the input ends:
//!   u8 header: bits 0-4 CDB length, bit 5 backend fails
//!   CDB bytes
//!   u24 LE data-out length (at most 3 MiB) | u16 LE explicit byte count | those bytes |
//!   u8 fill
//!   u16 LE data-in length: bytes, or (bit 15 set) 128-byte units
//! ```

#![no_main]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use libfuzzer_sys::fuzz_target;
use parvis_disk::counters::IoCounters;
use parvis_disk::{Allocation, AllocationState, BlockDevice, DiskError, check_range};
use scsi_disk::{
    DiskIdentity, Outcome, SENSE_LEN, ScsiDisk, ScsiDiskOptions, ScsiStatus, controller,
};

const PAGE: u64 = 4096;
const MAX_COMMANDS: usize = 16;
const MAX_DATA_OUT: usize = 3 << 20;
const MAX_DATA_IN: usize = 0x7FFF * 128;

thread_local! {
    /// The data-in buffer, allocated once: a transport reuses its buffer too, so stale
    /// contents from earlier commands are part of what is being tested.
    static DATA_IN: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0xA5; MAX_DATA_IN]);
}

/// A sparse in-memory disk (pages allocated on write), so huge sizes cost nothing.
struct SparseDisk {
    pages: Mutex<HashMap<u64, Box<[u8]>>>,
    size: u64,
    logical: u32,
    physical: u32,
    read_only: bool,
    fail: AtomicBool,
}

impl SparseDisk {
    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(offset, len, self.size)?;
        if self.fail.load(Ordering::Relaxed) {
            return Err(DiskError::Io {
                op,
                offset,
                source: std::io::Error::other("injected"),
            });
        }
        Ok(())
    }
}

impl BlockDevice for SparseDisk {
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
        let pages = self.pages.lock().unwrap();
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let start = (at % PAGE) as usize;
            let n = (PAGE as usize - start).min(buf.len() - done);
            match pages.get(&(at / PAGE)) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[start..start + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
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
            let start = (at % PAGE) as usize;
            let n = (PAGE as usize - start).min(buf.len() - done);
            let page = pages
                .entry(at / PAGE)
                .or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
            page[start..start + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.check("flush", 0, 0)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.check("discard", offset, len)?;
        let mut pages = self.pages.lock().unwrap();
        // Drop whole pages inside the range (a discard leaves contents unspecified).
        let first = offset.div_ceil(PAGE);
        let end = (offset + len) / PAGE;
        if end > first && end - first < pages.len() as u64 {
            for p in first..end {
                pages.remove(&p);
            }
        } else {
            pages.retain(|&p, _| p < first || p >= end);
        }
        Ok(())
    }
    fn allocation(&self, _offset: u64, len: u64) -> Result<Allocation, DiskError> {
        Ok(Allocation {
            state: AllocationState::Data,
            len,
        })
    }
}

/// A byte cursor over the input.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).first().copied()
    }
    fn le(&mut self, n: usize) -> usize {
        self.take(n)
            .iter()
            .rev()
            .fold(0usize, |v, &b| (v << 8) | usize::from(b))
    }
}

#[track_caller]
fn check(o: &Outcome, in_cap: usize, out_cap: usize) {
    match o.status {
        ScsiStatus::Good => assert!(o.sense.is_none()),
        ScsiStatus::CheckCondition => {
            let sense = o.sense_data().expect("CHECK CONDITION without sense");
            assert_eq!(sense.len(), SENSE_LEN);
            assert_eq!(sense[0], 0x70);
            assert_ne!(sense[2], 0, "CHECK CONDITION with NO SENSE");
            assert_eq!((o.data_in_len, o.data_out_len), (0, 0));
        }
    }
    assert!(o.data_in_len <= in_cap);
    assert!(o.data_out_len <= out_cap);
    assert_eq!(
        o.residual,
        (in_cap - o.data_in_len) + (out_cap - o.data_out_len)
    );
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(config) = input.u8() else {
        return;
    };
    let logical = if config & 0x08 != 0 { 4096 } else { 512 };
    let physical = if config & 0x10 != 0 { 4096 } else { logical };
    let size = [
        4096,
        64 << 10,
        1 << 20,
        8 << 20,
        1 << 30,
        2 << 40,
        (4 << 40) + 4096,
        1 << 50,
    ][usize::from(config >> 5)];
    let backend = Arc::new(SparseDisk {
        pages: Mutex::new(HashMap::new()),
        size,
        logical,
        physical,
        read_only: config & 0x04 != 0,
        fail: AtomicBool::new(false),
    });
    let options = ScsiDiskOptions {
        unmap: config & 0x01 != 0,
        write_same_16: config & 0x02 != 0,
        lun: u16::from(config),
    };
    let disk = ScsiDisk::new(
        backend.clone(),
        DiskIdentity::derive("fuzz-disk"),
        Arc::new(IoCounters::default()),
        options,
    )
    .expect("valid geometry");

    DATA_IN.with_borrow_mut(|buf| run(&mut input, &disk, &backend, config, buf));
    // The allocating form with a guest-chosen size allocates at most the transfer limit.
    let (o, v) = disk.execute_vec(&[0x12, 0, 0, 0xFF, 0xFF, 0], &[], usize::MAX);
    assert_eq!(o.status, ScsiStatus::Good);
    assert_eq!(v.len(), o.data_in_len);
});

fn run(input: &mut Input<'_>, disk: &ScsiDisk, backend: &SparseDisk, config: u8, buf: &mut [u8]) {
    let mut data_out = Vec::new();
    for _ in 0..MAX_COMMANDS {
        let Some(header) = input.u8() else {
            break;
        };
        let cdb = input.take(usize::from(header & 0x1F));
        backend.fail.store(header & 0x20 != 0, Ordering::Relaxed);
        let out_len = input.le(3).min(MAX_DATA_OUT);
        let explicit = input.le(2).min(out_len);
        data_out.clear();
        data_out.extend_from_slice(input.take(explicit));
        let fill = input.u8().unwrap_or(0);
        data_out.resize(out_len, fill);
        let v = input.le(2);
        let in_len = if v & 0x8000 != 0 {
            (v & 0x7FFF) * 128
        } else {
            v
        };
        let data_in = &mut buf[..in_len];

        let o = disk.execute(cdb, &data_out, data_in);
        check(&o, in_len, data_out.len());

        let o = controller::report_luns(cdb, &[0, 1, 300, u16::from(config) << 8], data_in);
        check(&o, in_len, 0);
        let o = controller::absent_lun(cdb, data_in);
        check(&o, in_len, 0);
    }
}
