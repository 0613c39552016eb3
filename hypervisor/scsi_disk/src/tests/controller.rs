//! Construction, CDB framing, sense data, REQUEST SENSE, TEST UNIT READY, REPORT LUNS and
//! the controller helpers.

use std::sync::Arc;

use parvis_disk::counters::IoCounters;

use super::*;
use crate::cdb::Cdb;
use crate::controller::{self, NO_DEVICE, encode_lun};
use crate::{ConfigError, Sense};

fn build(mem: Arc<MemDisk>) -> Result<ScsiDisk, ConfigError> {
    ScsiDisk::new(
        mem,
        identity(),
        Arc::new(IoCounters::default()),
        ScsiDiskOptions::default(),
    )
}

#[test]
fn construction_validates_geometry() {
    assert!(build(MemDisk::new(1 << 20, 512, 4096, false)).is_ok());
    assert!(build(MemDisk::new(1 << 20, 4096, 4096, false)).is_ok());
    for (logical, physical) in [(1024, 1024), (4096, 512), (512, 1536), (2048, 4096)] {
        assert!(matches!(
            build(MemDisk::new(1 << 20, logical, physical, false)),
            Err(ConfigError::SectorSize { .. })
        ));
    }
    assert!(matches!(
        build(MemDisk::new(0, 512, 512, false)),
        Err(ConfigError::Size { .. })
    ));
    assert!(matches!(
        build(MemDisk::new(4096 + 512, 4096, 4096, false)),
        Err(ConfigError::Size { .. })
    ));
}

#[test]
fn cdb_length_follows_the_opcode_group() {
    for (op, len) in [(0x00, 6), (0x28, 10), (0x5A, 10), (0x88, 16), (0xA0, 12)] {
        let mut bytes = [0u8; 16];
        bytes[0] = op;
        assert_eq!(Cdb::parse(&bytes[..len]).unwrap().op(), op);
        assert_eq!(
            Cdb::parse(&bytes[..len - 1]).unwrap_err(),
            Sense::invalid_cdb_field((len - 1) as u16, None)
        );
    }
    // Variable-length and vendor-specific groups are unknown operation codes.
    for op in [0x60, 0x7F, 0xC0, 0xFF] {
        assert_eq!(Cdb::parse(&[op; 16]).unwrap_err(), Sense::invalid_opcode());
    }
    assert_eq!(Cdb::parse(&[]).unwrap_err(), Sense::invalid_opcode());
}

#[test]
fn empty_short_and_padded_cdbs() {
    let m = mem();
    let d = scsi(&m);
    let (o, _) = run(&d, &[], &[], 0);
    assert_illegal(&o, Asc::INVALID_COMMAND_OPERATION_CODE);
    // READ(10) cut to 9 bytes.
    let (o, _) = run(&d, &cdb10(0x28, 0, 0, 1)[..9], &[], 512);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    // A transport that always passes 16 bytes: the tail is ignored.
    let mut padded = [0xEEu8; 16];
    padded[..6].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
    let (o, _) = run(&d, &padded, &[], 0);
    assert_good(&o);
}

#[test]
fn naca_and_link_bits_are_refused() {
    let m = mem();
    let d = scsi(&m);
    let (o, _) = run(&d, &[0, 0, 0, 0, 0, 0x04], &[], 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(o.sense_data().unwrap()[15..18], [0xCA, 0, 5]);
    let (o, _) = run(&d, &[0, 0, 0, 0, 0, 0x01], &[], 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
}

#[test]
fn unknown_opcodes_are_invalid_command_operation_code() {
    let m = mem();
    let d = scsi(&m);
    // PREVENT ALLOW MEDIUM REMOVAL, VERIFY(10), WRITE SAME(10), UNMAP and WRITE SAME(16)
    // (both off by default), READ(32)-style variable length, MAINTENANCE IN, LOG SENSE.
    for op in [0x1E, 0x2F, 0x41, 0x42, 0x93, 0x7F, 0xA3, 0x4D, 0xFF] {
        let mut c = [0u8; 16];
        c[0] = op;
        let (o, _) = run(&d, &c, &[0; 512], 512);
        assert_illegal(&o, Asc::INVALID_COMMAND_OPERATION_CODE);
    }
    // SERVICE ACTION IN(16) with a service action other than READ CAPACITY(16).
    let (o, _) = run(&d, &cdb16(0x9E, 0x12, 0, 32), &[], 32);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
}

#[test]
fn test_unit_ready_is_good_with_no_data() {
    let m = mem();
    let d = scsi(&m);
    let (o, data) = run(&d, &[0; 6], &[], 0);
    assert_good(&o);
    assert!(data.is_empty());
    assert_eq!(o.residual, 0);
}

#[test]
fn fixed_sense_layout() {
    let s = Sense::invalid_cdb_field(2, Some(5)).to_fixed();
    assert_eq!(s.len(), 18);
    assert_eq!(s[0], 0x70);
    assert_eq!(s[2], 0x05);
    assert_eq!(s[7], 10);
    assert_eq!((s[12], s[13]), (0x24, 0x00));
    // SKSV, C/D, BPV, bit 5; field pointer 2.
    assert_eq!(s[15..18], [0x80 | 0x40 | 0x08 | 5, 0, 2]);
    let s = Sense::invalid_param_field(300, None).to_fixed();
    assert_eq!(s[15..18], [0x80, 0x01, 0x2C]);
    let s = Sense::write_protected().to_fixed();
    assert_eq!((s[2], s[12], s[13], s[15]), (0x07, 0x27, 0x00, 0));
}

#[test]
fn request_sense_returns_then_clears_the_last_error() {
    let m = mem();
    let d = scsi(&m);
    // Nothing pending: NO SENSE.
    let (o, data) = run(&d, &[0x03, 0, 0, 0, 252, 0], &[], 252);
    assert_good(&o);
    assert_eq!(data.len(), 18);
    assert_eq!((data[2], data[12]), (0, 0));
    // A failed command leaves its sense for REQUEST SENSE, once.
    let (o, _) = run(&d, &[0x42; 10], &[], 0);
    assert_illegal(&o, Asc::INVALID_COMMAND_OPERATION_CODE);
    let (o, data) = run(&d, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_good(&o);
    assert_eq!((data[2], data[12]), (0x05, 0x20));
    let (_, data) = run(&d, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!(data[12], 0);
    // A later success clears it too.
    run(&d, &[0x42; 10], &[], 0);
    assert_good(&run(&d, &[0; 6], &[], 0).0);
    let (_, data) = run(&d, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    assert_eq!(data[12], 0);
    // Short allocation length and short buffer truncate.
    let (o, data) = run(&d, &[0x03, 0, 0, 0, 8, 0], &[], 64);
    assert_eq!((data.len(), o.residual), (8, 56));
    let (o, _) = run(&d, &[0x03, 0, 0, 0, 18, 0], &[], 4);
    assert_eq!(o.data_in_len, 4);
    // Descriptor format is not supported.
    let (o, _) = run(&d, &[0x03, 1, 0, 0, 18, 0], &[], 18);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
}

fn report_luns_cdb(select: u8, alloc: u32) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0] = 0xA0;
    c[2] = select;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[test]
fn report_luns_on_a_disk_lists_its_own_lun() {
    let m = mem();
    let d = scsi_with(
        &m,
        ScsiDiskOptions {
            lun: 3,
            ..Default::default()
        },
    );
    let (o, data) = run(&d, &report_luns_cdb(0, 4096), &[], 4096);
    assert_good(&o);
    assert_eq!(data, [0, 0, 0, 8, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0]);
    assert_eq!(o.residual, 4096 - 16);
}

#[test]
fn report_luns_sorts_dedups_and_truncates() {
    let luns = [7, 0, 300, 7, 0x4000, 1];
    let mut buf = [0u8; 64];
    let o = controller::report_luns(&report_luns_cdb(0, 64), &luns, &mut buf);
    assert_good(&o);
    assert_eq!(o.data_in_len, 8 + 4 * 8);
    assert_eq!(buf[0..4], 32u32.to_be_bytes());
    assert_eq!(buf[8..16], encode_lun(0));
    assert_eq!(buf[16..24], encode_lun(1));
    assert_eq!(buf[24..32], encode_lun(7));
    assert_eq!(buf[32..40], [0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
    // The list length stays the full length when the allocation length truncates.
    let mut buf = [0u8; 64];
    let o = controller::report_luns(&report_luns_cdb(2, 16), &luns, &mut buf);
    assert_eq!(o.data_in_len, 16);
    assert_eq!(buf[0..4], 32u32.to_be_bytes());
    // Well-known LUNs only: none.
    let o = controller::report_luns(&report_luns_cdb(1, 64), &luns, &mut buf);
    assert_eq!(o.data_in_len, 8);
    assert_eq!(buf[0..4], [0, 0, 0, 0]);
}

#[test]
fn report_luns_field_checks() {
    let mut buf = [0u8; 64];
    for cdb in [report_luns_cdb(0, 15), report_luns_cdb(0x10, 64)] {
        let o = controller::report_luns(&cdb, &[0], &mut buf);
        assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    }
    let o = controller::report_luns(&[0x12, 0, 0, 0, 36, 0], &[0], &mut buf);
    assert_illegal(&o, Asc::INVALID_COMMAND_OPERATION_CODE);
}

#[test]
fn absent_lun_answers() {
    let mut buf = [0u8; 255];
    let o = controller::absent_lun(&inquiry(false, 0, 255), &mut buf);
    assert_good(&o);
    assert_eq!(o.data_in_len, 36);
    assert_eq!(buf[0], NO_DEVICE);
    assert_eq!(buf[0], 0x7F);
    assert_eq!(buf[4], 31);
    assert!(buf[8..36].iter().all(|&b| b == b' '));
    // Linux's first probe asks for 36 bytes; a shorter allocation truncates.
    let o = controller::absent_lun(&inquiry(false, 0, 5), &mut buf);
    assert_eq!(o.data_in_len, 5);
    let o = controller::absent_lun(&inquiry(true, 0x83, 255), &mut buf);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    let o = controller::absent_lun(&[0x03, 0, 0, 0, 18, 0], &mut buf);
    assert_good(&o);
    assert_eq!((buf[2], buf[12]), (0x05, 0x25));
    for cdb in [&[0u8; 6][..], &cdb10(0x28, 0, 0, 1)] {
        let o = controller::absent_lun(cdb, &mut buf);
        assert_illegal(&o, Asc::LOGICAL_UNIT_NOT_SUPPORTED);
    }
}
