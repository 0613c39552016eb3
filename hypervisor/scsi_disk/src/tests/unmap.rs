//! UNMAP parameter lists (hostile ones included) and WRITE SAME(16).

use std::sync::atomic::Ordering;

use super::*;
use crate::MAX_UNMAP_DESCRIPTORS;

fn with_unmap(m: &std::sync::Arc<MemDisk>) -> ScsiDisk {
    scsi_with(
        m,
        ScsiDiskOptions {
            unmap: true,
            write_same_16: true,
            lun: 0,
        },
    )
}

fn unmap_cdb(anchor: bool, len: u16) -> [u8; 10] {
    let l = len.to_be_bytes();
    [0x42, u8::from(anchor), 0, 0, 0, 0, 0, l[0], l[1], 0]
}

/// An UNMAP parameter list with consistent header lengths.
fn unmap_list(descriptors: &[(u64, u32)]) -> Vec<u8> {
    let bd_len = 16 * descriptors.len();
    let mut l = Vec::with_capacity(8 + bd_len);
    l.extend_from_slice(&((6 + bd_len) as u16).to_be_bytes());
    l.extend_from_slice(&(bd_len as u16).to_be_bytes());
    l.extend_from_slice(&[0; 4]);
    for &(lba, n) in descriptors {
        l.extend_from_slice(&lba.to_be_bytes());
        l.extend_from_slice(&n.to_be_bytes());
        l.extend_from_slice(&[0; 4]);
    }
    l
}

fn unmap(d: &ScsiDisk, list: &[u8]) -> Outcome {
    run(d, &unmap_cdb(false, list.len() as u16), list, 0).0
}

#[test]
fn unmap_discards_every_range() {
    let m = mem();
    let d = with_unmap(&m);
    let cap = (64u64 << 20) >> 9;
    let list = unmap_list(&[(8, 16), (100, 0), (cap - 1, 1)]);
    let o = unmap(&d, &list);
    assert_good(&o);
    assert_eq!(o.data_out_len, list.len());
    // The 0-block descriptor is a no-op.
    assert_eq!(
        *m.discards.lock().unwrap(),
        [(8 * 512, 16 * 512), ((cap - 1) * 512, 512)]
    );
    // Parameter list length 0: nothing.
    assert_good(&run(&d, &unmap_cdb(false, 0), &[], 0).0);
    // Header only.
    assert_good(&unmap(&d, &unmap_list(&[])));
    assert_eq!(m.discards.lock().unwrap().len(), 2);
}

#[test]
fn unmap_is_refused_when_not_offered() {
    let m = mem();
    let d = scsi(&m);
    let o = unmap(&d, &unmap_list(&[(0, 1)]));
    assert_illegal(&o, Asc::INVALID_COMMAND_OPERATION_CODE);
    assert!(m.discards.lock().unwrap().is_empty());
}

#[test]
fn unmap_hostile_parameter_lists() {
    let m = mem();
    let d = with_unmap(&m);
    let cap = (64u64 << 20) >> 9;
    // 1-7 bytes of parameter list.
    for len in 1..8u16 {
        let (o, _) = run(&d, &unmap_cdb(false, len), &[0; 8], 0);
        assert_illegal(&o, Asc::PARAMETER_LIST_LENGTH_ERROR);
    }
    // The CDB promises more list than the transport delivered.
    let list = unmap_list(&[(0, 1)]);
    let (o, _) = run(&d, &unmap_cdb(false, 24), &list[..20], 0);
    assert_illegal(&o, Asc::PARAMETER_LIST_LENGTH_ERROR);
    // ANCHOR.
    let (o, _) = run(&d, &unmap_cdb(true, 24), &list, 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    // A block descriptor data length larger than the list: only whole descriptors that are
    // really there count (one here).
    let mut l = unmap_list(&[(0, 1)]);
    l[2..4].copy_from_slice(&0xFFF0u16.to_be_bytes());
    l[0..2].copy_from_slice(&0xFFFFu16.to_be_bytes());
    assert_good(&unmap(&d, &l));
    assert_eq!(m.discards.lock().unwrap().len(), 1);
    // A trailing partial descriptor is ignored.
    let mut l = unmap_list(&[(2, 1)]);
    l.extend_from_slice(&[0xFF; 15]);
    l[2..4].copy_from_slice(&31u16.to_be_bytes());
    assert_good(&unmap(&d, &l));
    assert_eq!(m.discards.lock().unwrap().len(), 2);
    // More descriptors than advertised.
    let many: Vec<(u64, u32)> = (0..=u64::from(MAX_UNMAP_DESCRIPTORS))
        .map(|i| (i, 1))
        .collect();
    let o = unmap(&d, &unmap_list(&many));
    assert_illegal(&o, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    // Exactly the maximum is fine.
    assert_good(&unmap(&d, &unmap_list(&many[..many.len() - 1])));
    m.discards.lock().unwrap().clear();
    // More blocks in total than the maximum unmap LBA count (2^32 - 1), on a disk big
    // enough for the ranges themselves (4 TiB: 2^33 blocks).
    let big = MemDisk::new(4 << 40, 512, 512, false);
    let o = unmap(&with_unmap(&big), &unmap_list(&[(0, u32::MAX), (0, 1)]));
    assert_illegal(&o, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    assert!(big.discards.lock().unwrap().is_empty());
    // A range past the end, after a good one: nothing is discarded.
    for bad in [
        (cap, 1),
        (cap - 1, 2),
        (u64::MAX, 1),
        (u64::MAX - 1, u32::MAX),
    ] {
        let o = unmap(&d, &unmap_list(&[(0, 8), bad]));
        assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
    }
    assert!(m.discards.lock().unwrap().is_empty());
    // The maximum parameter list length (65535 bytes, 4095 descriptors claimed).
    let mut l = vec![0u8; 65535];
    l[0..2].copy_from_slice(&65533u16.to_be_bytes());
    l[2..4].copy_from_slice(&65520u16.to_be_bytes());
    let o = unmap(&d, &l);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
}

#[test]
fn unmap_backend_failure_is_a_medium_error() {
    let m = mem();
    let d = with_unmap(&m);
    m.fail.store(true, Ordering::Relaxed);
    let o = unmap(&d, &unmap_list(&[(0, 8)]));
    assert_sense(&o, SenseKey::MediumError, Asc::WRITE_ERROR);
}

fn ws16(flags: u8, lba: u64, n: u32) -> [u8; 16] {
    cdb16(0x93, flags, lba, n)
}

#[test]
fn write_same_16_writes_the_block_everywhere() {
    let m = mem();
    let d = with_unmap(&m);
    let block: Vec<u8> = (0..512).map(|i| i as u8 ^ 0x5A).collect();
    let (o, _) = run(&d, &ws16(0, 10, 3000), &block, 0);
    assert_good(&o);
    assert_eq!(o.data_out_len, 512);
    let written = m.peek(10 * 512, 3000 * 512);
    assert!(written.chunks(512).all(|c| c == block));
    assert_eq!(m.peek(9 * 512, 512), [0; 512]);
    assert_eq!(m.peek(3010 * 512, 512), [0; 512]);
    // The UNMAP bit writes too (LBPRZ is 0, so the data must read back).
    let zeros = [0u8; 512];
    assert_good(&run(&d, &ws16(0x08, 10, 2), &zeros, 0).0);
    assert_eq!(m.peek(10 * 512, 1024), [0; 1024]);
    assert_eq!(m.peek(12 * 512, 512), block);
}

#[test]
fn write_same_16_field_checks() {
    let m = mem();
    let d = with_unmap(&m);
    let block = [1u8; 512];
    // WRPROTECT, ANCHOR, PBDATA/LBDATA, NDOB.
    for flags in [0x20, 0x10, 0x04, 0x02, 0x01] {
        let (o, _) = run(&d, &ws16(flags, 0, 1), &block, 0);
        assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    }
    // 0 blocks (WSNZ), more than the maximum write same length.
    let (o, _) = run(&d, &ws16(0, 0, 0), &block, 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    let max = (crate::MAX_WRITE_SAME_BYTES / 512) as u32;
    assert_good(&run(&d, &ws16(0, 0, max), &block, 0).0);
    let (o, _) = run(&d, &ws16(0, 0, max + 1), &block, 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    // Out of range, and no data block.
    let cap = (64u64 << 20) >> 9;
    let (o, _) = run(&d, &ws16(0, cap - 1, 2), &block, 0);
    assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
    let (o, _) = run(&d, &ws16(0, 0, 1), &block[..511], 0);
    assert_illegal(&o, Asc::LBA_OUT_OF_RANGE);
    // Not offered: unknown operation code.
    let d = scsi(&m);
    let (o, _) = run(&d, &ws16(0, 0, 1), &block, 0);
    assert_illegal(&o, Asc::INVALID_COMMAND_OPERATION_CODE);
}
