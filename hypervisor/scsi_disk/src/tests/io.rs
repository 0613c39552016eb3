//! READ, WRITE, SYNCHRONIZE CACHE, START STOP UNIT, backend errors, a raw file backend.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use parvis_disk::counters::{IoCounters, IoTotals};
use parvis_disk::{RawFile, RawFileOptions};

use super::*;
use crate::MAX_TRANSFER_BYTES;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn read_write_round_trip_in_every_cdb_size() {
    let m = mem();
    let d = scsi(&m);
    let cases: [(Vec<u8>, Vec<u8>); 4] = [
        (cdb6_rw(0x0A, 10, 2).to_vec(), cdb6_rw(0x08, 10, 2).to_vec()),
        (
            cdb10(0x2A, 0, 20, 2).to_vec(),
            cdb10(0x28, 0, 20, 2).to_vec(),
        ),
        (
            cdb12(0xAA, 0, 30, 2).to_vec(),
            cdb12(0xA8, 0, 30, 2).to_vec(),
        ),
        (
            cdb16(0x8A, 0, 40, 2).to_vec(),
            cdb16(0x88, 0, 40, 2).to_vec(),
        ),
    ];
    for (i, (write, read)) in cases.iter().enumerate() {
        let data = pattern(1024, i as u8);
        let (o, _) = run(&d, write, &data, 0);
        assert_good(&o);
        assert_eq!((o.data_out_len, o.residual), (1024, 0));
        let (o, back) = run(&d, read, &[], 1024);
        assert_good(&o);
        assert_eq!(back, data);
    }
    assert_eq!(m.peek(20 * 512, 1024), pattern(1024, 1));
}

#[test]
fn rw6_transfer_length_zero_means_256_blocks() {
    let m = mem();
    let d = scsi(&m);
    let data = pattern(256 * 512, 7);
    let (o, _) = run(&d, &cdb6_rw(0x0A, 0x1F_FF00 - 256, 0), &data, 0);
    // A 21-bit LBA near its limit is past this 64 MiB disk.
    assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
    let (o, _) = run(&d, &cdb6_rw(0x0A, 1000, 0), &data, 0);
    assert_good(&o);
    assert_eq!(o.data_out_len, 256 * 512);
    let (o, back) = run(&d, &cdb6_rw(0x08, 1000, 0), &[], 256 * 512);
    assert_good(&o);
    assert_eq!(back, data);
    // The LBA's top byte holds only 5 bits; bits 7-5 (the old LUN field) are ignored.
    let mut c = cdb6_rw(0x08, 1000, 1);
    c[1] |= 0xE0;
    let (o, back) = run(&d, &c, &[], 512);
    assert_good(&o);
    assert_eq!(back, data[..512]);
}

#[test]
fn zero_length_transfers_move_nothing() {
    let m = mem();
    let d = scsi(&m);
    for c in [
        cdb10(0x28, 0, 5, 0).to_vec(),
        cdb10(0x2A, 0, 5, 0).to_vec(),
        cdb16(0x88, 0, 5, 0).to_vec(),
    ] {
        let (o, data) = run(&d, &c, &[], 512);
        assert_good(&o);
        assert!(data.is_empty());
        assert_eq!(o.residual, 512);
    }
    // Even at the capacity, but not past it.
    let cap = (64u32 << 20) >> 9;
    assert_good(&run(&d, &cdb10(0x28, 0, cap, 0), &[], 0).0);
    assert_illegal(
        &run(&d, &cdb10(0x28, 0, cap + 1, 0), &[], 0).0,
        Asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn out_of_range_lbas() {
    let m = mem();
    let d = scsi(&m);
    let cap = (64u64 << 20) >> 9;
    // The last block is fine; one past, or straddling the end, is not.
    assert_good(&run(&d, &cdb16(0x88, 0, cap - 1, 1), &[], 512).0);
    for (lba, n) in [
        (cap, 1),
        (cap - 1, 2),
        (u64::MAX, 1),
        (u64::MAX - 1, u32::MAX),
    ] {
        let (o, _) = run(&d, &cdb16(0x88, 0, lba, n), &[], 512);
        assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
        let (o, _) = run(&d, &cdb16(0x8A, 0, lba, n), &[0; 1024], 0);
        assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
    }
    let (o, _) = run(&d, &cdb12(0xA8, 0, u32::MAX, u32::MAX), &[], 512);
    assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
}

#[test]
fn transfers_longer_than_the_buffer_are_refused() {
    let m = mem();
    let d = scsi(&m);
    let (o, _) = run(&d, &cdb10(0x28, 0, 0, 8), &[], 8 * 512 - 1);
    assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
    let (o, _) = run(&d, &cdb10(0x2A, 0, 0, 8), &[0; 8 * 512 - 1], 0);
    assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
    // A longer buffer is fine: the rest is residual.
    let (o, data) = run(&d, &cdb10(0x28, 0, 0, 1), &[], 4096);
    assert_good(&o);
    assert_eq!((data.len(), o.residual), (512, 3584));
    let (o, _) = run(&d, &cdb10(0x2A, 0, 0, 1), &[0; 4096], 0);
    assert_eq!((o.data_out_len, o.residual), (512, 3584));
}

#[test]
fn transfers_above_the_maximum_are_invalid_fields() {
    let m = mem();
    let d = scsi(&m);
    let max_blocks = (MAX_TRANSFER_BYTES / 512) as u32;
    let (o, data) = run(&d, &cdb16(0x88, 0, 0, max_blocks), &[], MAX_TRANSFER_BYTES);
    assert_good(&o);
    assert_eq!(data.len(), MAX_TRANSFER_BYTES);
    let (o, _) = run(&d, &cdb16(0x88, 0, 0, max_blocks + 1), &[], usize::MAX);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(o.sense_data().unwrap()[15..18], [0xC0, 0, 10]);
    assert_eq!(o.residual, usize::MAX);
    let (o, _) = run(&d, &cdb10(0x2A, 0, 0, 0xFFFF), &[], 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
}

#[test]
fn protection_and_reladr_bits_are_refused() {
    let m = mem();
    let d = scsi(&m);
    for flags in [0x20, 0x40, 0x80, 0x01] {
        for c in [
            cdb10(0x28, flags, 0, 1).to_vec(),
            cdb12(0xA8, flags, 0, 1).to_vec(),
        ] {
            let (o, _) = run(&d, &c, &[], 512);
            assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
        }
    }
    let (o, _) = run(&d, &cdb16(0x8A, 0x20, 0, 1), &[0; 512], 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    // DPO, FUA and the READ(16) DLD bit are accepted.
    assert_good(&run(&d, &cdb16(0x88, 0x19, 0, 1), &[], 512).0);
}

#[test]
fn writes_to_a_read_only_disk_are_data_protect() {
    let m = MemDisk::new(1 << 20, 512, 512, true);
    let d = scsi_with(
        &m,
        ScsiDiskOptions {
            unmap: true,
            write_same_16: true,
            lun: 0,
        },
    );
    let writes: [Vec<u8>; 4] = [
        cdb6_rw(0x0A, 0, 1).to_vec(),
        cdb10(0x2A, 0, 0, 1).to_vec(),
        cdb12(0xAA, 0, 0, 1).to_vec(),
        cdb16(0x8A, 0, 0, 1).to_vec(),
    ];
    for c in &writes {
        let (o, _) = run(&d, c, &[0; 512], 0);
        assert_sense(&o, SenseKey::DataProtect, Asc::WRITE_PROTECTED);
    }
    let (o, _) = run(&d, &cdb16(0x93, 0, 0, 1), &[0; 512], 0);
    assert_sense(&o, SenseKey::DataProtect, Asc::WRITE_PROTECTED);
    let mut unmap = vec![0, 22, 0, 16, 0, 0, 0, 0];
    unmap.extend_from_slice(&[0; 16]);
    let (o, _) = run(&d, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &unmap, 0);
    assert_sense(&o, SenseKey::DataProtect, Asc::WRITE_PROTECTED);
    // Reads, flushes and stops work.
    assert_good(&run(&d, &cdb10(0x28, 0, 0, 1), &[], 512).0);
    assert_good(&run(&d, &cdb10(0x35, 0, 0, 0), &[], 0).0);
    assert_good(&run(&d, &[0x1B, 0, 0, 0, 0, 0], &[], 0).0);
    // Out-of-range is still reported as such.
    let (o, _) = run(&d, &cdb10(0x2A, 0, 4096, 1), &[0; 512], 0);
    assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
}

#[test]
fn fua_writes_are_flushed() {
    let m = mem();
    let d = scsi(&m);
    assert_good(&run(&d, &cdb10(0x2A, 0, 0, 1), &[1; 512], 0).0);
    assert_eq!(m.flushes.load(Ordering::Relaxed), 0);
    assert_good(&run(&d, &cdb10(0x2A, 0x08, 0, 1), &[1; 512], 0).0);
    assert_good(&run(&d, &cdb16(0x8A, 0x08, 0, 1), &[1; 512], 0).0);
    assert_eq!(m.flushes.load(Ordering::Relaxed), 2);
    // FUA on a read means nothing here.
    assert_good(&run(&d, &cdb10(0x28, 0x08, 0, 1), &[], 512).0);
    assert_eq!(m.flushes.load(Ordering::Relaxed), 2);
}

#[test]
fn counters_count_completed_reads_and_writes() {
    let m = mem();
    let counters = Arc::new(IoCounters::default());
    let d = ScsiDisk::new(
        m.clone(),
        identity(),
        counters.clone(),
        ScsiDiskOptions::default(),
    )
    .unwrap();
    run(&d, &cdb10(0x2A, 0, 0, 8), &[0; 4096], 0);
    run(&d, &cdb10(0x28, 0, 0, 2), &[], 1024);
    run(&d, &cdb10(0x28, 0, 0, 1), &[], 512);
    // Refused and failed commands are not counted; other commands neither.
    run(&d, &cdb10(0x28, 0, u32::MAX, 1), &[], 512);
    run(&d, &inquiry(false, 0, 36), &[], 36);
    m.fail.store(true, Ordering::Relaxed);
    run(&d, &cdb10(0x28, 0, 0, 1), &[], 512);
    assert_eq!(
        counters.totals(),
        IoTotals {
            read_bytes: 1536,
            write_bytes: 4096,
            read_ops: 2,
            write_ops: 1
        }
    );
}

#[test]
fn backend_errors_become_medium_errors() {
    let m = mem();
    let d = scsi(&m);
    m.fail.store(true, Ordering::Relaxed);
    for _ in 0..20 {
        // Repeated failures: the log line is rate-limited, the sense stays right.
        let (o, _) = run(&d, &cdb10(0x28, 0, 0, 1), &[], 512);
        assert_sense(&o, SenseKey::MediumError, Asc::UNRECOVERED_READ_ERROR);
    }
    let (o, _) = run(&d, &cdb10(0x2A, 0, 0, 1), &[0; 512], 0);
    assert_sense(&o, SenseKey::MediumError, Asc::WRITE_ERROR);
    let (o, _) = run(&d, &cdb10(0x35, 0, 0, 0), &[], 0);
    assert_sense(&o, SenseKey::MediumError, Asc::WRITE_ERROR);
    // REQUEST SENSE reports the last one.
    let (_, s) = run(&d, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!((s[2], s[12]), (0x03, 0x0C));
    m.fail.store(false, Ordering::Relaxed);
    assert_good(&run(&d, &cdb10(0x28, 0, 0, 1), &[], 512).0);
}

#[test]
fn synchronize_cache_flushes_within_range() {
    let m = mem();
    let d = scsi(&m);
    let cap = (64u64 << 20) >> 9;
    assert_good(&run(&d, &cdb10(0x35, 0, 0, 0), &[], 0).0);
    assert_good(&run(&d, &cdb10(0x35, 0x02, 100, 10), &[], 0).0);
    assert_good(&run(&d, &cdb16(0x91, 0, cap - 1, 1), &[], 0).0);
    assert_eq!(m.flushes.load(Ordering::Relaxed), 3);
    for c in [
        cdb16(0x91, 0, cap, 0).to_vec(),
        cdb16(0x91, 0, cap - 1, 2).to_vec(),
        cdb16(0x91, 0, u64::MAX, u32::MAX).to_vec(),
    ] {
        assert_illegal(&run(&d, &c, &[], 0).0, Asc::LBA_OUT_OF_RANGE);
    }
    assert_eq!(m.flushes.load(Ordering::Relaxed), 3);
}

#[test]
fn start_stop_unit() {
    let m = mem();
    let d = scsi(&m);
    let ssu = |immed: u8, b4: u8| [0x1B, immed, 0, 0, b4, 0];
    // Start (Linux's spin-up sends IMMED), active/idle: no flush.
    for c in [ssu(1, 0x01), ssu(0, 0x11), ssu(0, 0x21)] {
        assert_good(&run(&d, &c, &[], 0).0);
    }
    assert_eq!(m.flushes.load(Ordering::Relaxed), 0);
    // Stop and standby flush, unless NO_FLUSH.
    for c in [ssu(0, 0x00), ssu(0, 0x30), ssu(0, 0xB0)] {
        assert_good(&run(&d, &c, &[], 0).0);
    }
    assert_eq!(m.flushes.load(Ordering::Relaxed), 3);
    assert_good(&run(&d, &ssu(0, 0x04), &[], 0).0);
    assert_eq!(m.flushes.load(Ordering::Relaxed), 3);
    // Eject, and reserved power conditions.
    for c in [ssu(0, 0x02), ssu(0, 0x03), ssu(0, 0x40), ssu(0, 0xF0)] {
        assert_illegal(&run(&d, &c, &[], 0).0, Asc::INVALID_FIELD_IN_CDB);
    }
    // The unit is still ready and readable after a stop.
    assert_good(&run(&d, &[0; 6], &[], 0).0);
    assert_good(&run(&d, &cdb10(0x28, 0, 0, 1), &[], 512).0);
}

#[test]
fn sector_4096_read_write() {
    let m = MemDisk::new(64 << 20, 4096, 4096, false);
    let d = scsi(&m);
    let data = pattern(8192, 3);
    assert_good(&run(&d, &cdb10(0x2A, 0, 5, 2), &data, 0).0);
    assert_eq!(m.peek(5 * 4096, 8192), data);
    let (o, back) = run(&d, &cdb10(0x28, 0, 5, 2), &[], 8192);
    assert_good(&o);
    assert_eq!(back, data);
    // READ(6) with 0 = 256 blocks is 1 MiB here.
    let (o, back) = run(&d, &cdb6_rw(0x08, 0, 0), &[], 1 << 20);
    assert_good(&o);
    assert_eq!(back.len(), 1 << 20);
    // 2 MiB is 512 blocks; 513 is too many.
    assert_good(&run(&d, &cdb10(0x28, 0, 0, 512), &[], 2 << 20).0);
    let (o, _) = run(&d, &cdb10(0x28, 0, 0, 513), &[], 4 << 20);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    let cap = (64u32 << 20) >> 12;
    assert_illegal(
        &run(&d, &cdb10(0x28, 0, cap, 1), &[], 4096).0,
        Asc::LBA_OUT_OF_RANGE,
    );
    // A buffer of 512-byte granularity is too short for one 4 KiB block.
    assert_illegal(
        &run(&d, &cdb10(0x28, 0, 0, 1), &[], 512).0,
        Asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn raw_file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let raw = RawFile::create_with(
        &path,
        4 << 20,
        &RawFileOptions {
            read_only: false,
            logical_sector_size: 4096,
            physical_sector_size: None,
        },
    )
    .unwrap();
    let d = ScsiDisk::new(
        Arc::new(raw),
        identity(),
        Arc::new(IoCounters::default()),
        ScsiDiskOptions {
            unmap: true,
            ..Default::default()
        },
    )
    .unwrap();
    let data = pattern(3 * 4096, 9);
    assert_good(&run(&d, &cdb16(0x8A, 0x08, 100, 3), &data, 0).0);
    assert_good(&run(&d, &cdb10(0x35, 0, 0, 0), &[], 0).0);
    let (o, back) = run(&d, &cdb16(0x88, 0, 100, 3), &[], 3 * 4096);
    assert_good(&o);
    assert_eq!(back, data);
    // UNMAP the middle block; the file punches a hole, which reads as zeros.
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&101u64.to_be_bytes());
    list.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    assert_good(&run(&d, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0).0);
    let (_, back) = run(&d, &cdb16(0x88, 0, 100, 3), &[], 3 * 4096);
    assert_eq!(back[..4096], data[..4096]);
    assert_eq!(back[8192..], data[8192..]);
    drop(d);
    assert_eq!(
        std::fs::read(&path).unwrap()[100 * 4096..101 * 4096],
        data[..4096]
    );
}

#[test]
fn execute_vec_never_allocates_what_the_guest_asks() {
    let m = mem();
    let d = scsi(&m);
    let (o, data) = run(&d, &inquiry(false, 0, 36), &[], usize::MAX);
    assert_good(&o);
    assert_eq!(data.len(), 36);
    assert_eq!(o.residual, usize::MAX - 36);
    // The caller-buffer form: a zero-length buffer gets nothing, whatever the CDB says.
    let o = d.execute(&inquiry(false, 0, 255), &[], &mut []);
    assert_good(&o);
    assert_eq!(o.data_in_len, 0);
}
