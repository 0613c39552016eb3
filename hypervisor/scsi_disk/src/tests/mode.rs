//! MODE SENSE and MODE SELECT.

use std::sync::atomic::Ordering;

use super::*;

fn sense6(dbd: bool, pc: u8, page: u8, alloc: u8) -> [u8; 6] {
    [
        0x1A,
        if dbd { 0x08 } else { 0 },
        (pc << 6) | page,
        0,
        alloc,
        0,
    ]
}

fn sense10(flags: u8, pc: u8, page: u8, alloc: u16) -> [u8; 10] {
    let a = alloc.to_be_bytes();
    [0x5A, flags, (pc << 6) | page, 0, 0, 0, 0, a[0], a[1], 0]
}

/// Find a page in mode parameter data after `offset` (header + block descriptors).
fn find_page(data: &[u8], mut offset: usize, code: u8) -> Option<&[u8]> {
    while offset + 2 <= data.len() {
        let len = 2 + usize::from(data[offset + 1]);
        if data[offset] & 0x3F == code {
            return data.get(offset..offset + len);
        }
        offset += len;
    }
    None
}

#[test]
fn mode_sense_6_all_pages() {
    let m = MemDisk::new(64 << 20, 512, 512, false);
    let d = scsi(&m);
    let (o, data) = run(&d, &sense6(false, 0, 0x3F, 255), &[], 255);
    assert_good(&o);
    // Header 4 + short block descriptor 8 + caching 20 + control 12.
    assert_eq!(data.len(), 44);
    assert_eq!(usize::from(data[0]) + 1, data.len(), "mode data length");
    assert_eq!(data[1], 0, "medium type");
    assert_eq!(data[2], 0x10, "WP off, DPOFUA");
    assert_eq!(data[3], 8, "block descriptor length");
    assert_eq!(data[4..8], (64u32 << 20 >> 9).to_be_bytes());
    assert_eq!(data[9..12], [0x00, 0x02, 0x00], "512-byte blocks");
    let caching = find_page(&data, 12, 0x08).unwrap();
    assert_eq!(caching.len(), 20);
    assert_eq!(caching[2] & 0x05, 0x04, "WCE set, RCD clear");
    let control = find_page(&data, 12, 0x0A).unwrap();
    assert_eq!(control.len(), 12);
    assert_eq!(control[2] & 0x04, 0, "D_SENSE 0: fixed-format sense");
}

#[test]
fn mode_sense_header_only_first_probe() {
    // Linux's first write-protect probe: page 3Fh with 4 bytes. The header must still say
    // how much there is.
    let m = mem();
    let d = scsi(&m);
    let (o, data) = run(&d, &sense6(false, 0, 0x3F, 4), &[], 4);
    assert_good(&o);
    assert_eq!(data, [43, 0, 0x10, 8]);
    // A 2-byte buffer.
    let (_, data) = run(&d, &sense6(false, 0, 0x3F, 255), &[], 2);
    assert_eq!(data, [43, 0]);
}

#[test]
fn mode_sense_write_protect_on_read_only_disk() {
    let m = MemDisk::new(1 << 20, 512, 512, true);
    let d = scsi(&m);
    let (_, data) = run(&d, &sense6(true, 0, 0x3F, 255), &[], 255);
    assert_eq!(data[2], 0x90, "WP and DPOFUA");
    let (_, data) = run(&d, &sense10(0x08, 0, 0x08, 255), &[], 255);
    assert_eq!(data[3], 0x90);
}

#[test]
fn mode_sense_dbd_and_caching_page_like_linux() {
    let m = mem();
    let d = scsi(&m);
    // sd_read_cache_type: page 08h, DBD 0, 4 bytes first, then the full length.
    let (_, head) = run(&d, &sense6(false, 0, 0x08, 4), &[], 4);
    let full = usize::from(head[0]) + 1;
    assert_eq!(full, 4 + 8 + 20);
    let (_, data) = run(&d, &sense6(false, 0, 0x08, full as u8), &[], 512);
    assert_eq!(data.len(), full);
    assert_eq!(data[12], 0x08);
    // DBD: no block descriptor.
    let (_, data) = run(&d, &sense6(true, 0, 0x08, 255), &[], 255);
    assert_eq!((data.len(), data[3], data[4]), (24, 0, 0x08));
    // Control page alone.
    let (_, data) = run(&d, &sense6(true, 0, 0x0A, 255), &[], 255);
    assert_eq!(data[4..6], [0x0A, 0x0A]);
    // Subpage FFh ("and all subpages") is the same page.
    let (o, data) = run(&d, &[0x1A, 0x08, 0x08, 0xFF, 255, 0], &[], 255);
    assert_good(&o);
    assert_eq!(data.len(), 24);
}

#[test]
fn mode_sense_10_short_and_long_descriptors() {
    let m = MemDisk::new(4 << 40, 512, 512, false);
    let d = scsi(&m);
    let (o, data) = run(&d, &sense10(0, 0, 0x3F, 512), &[], 512);
    assert_good(&o);
    assert_eq!(data.len(), 8 + 8 + 32);
    assert_eq!(
        usize::from(u16::from_be_bytes([data[0], data[1]])) + 2,
        data.len()
    );
    assert_eq!(data[3], 0x10);
    assert_eq!(data[6..8], [0, 8]);
    assert_eq!(data[8..12], [0xFF; 4], "more than 2^32 blocks saturates");
    // LLBAA: the 16-byte descriptor with the full count.
    let (_, data) = run(&d, &sense10(0x10, 0, 0x3F, 512), &[], 512);
    assert_eq!(data.len(), 8 + 16 + 32);
    assert_eq!(data[4] & 1, 1, "LONGLBA");
    assert_eq!(data[6..8], [0, 16]);
    assert_eq!(data[8..16], (1u64 << 33).to_be_bytes());
    assert_eq!(data[20..24], 512u32.to_be_bytes());
    // Allocation length in two bytes, truncating.
    let (o, data) = run(&d, &sense10(0x08, 0, 0x3F, 10), &[], 512);
    assert_eq!((data.len(), o.residual), (10, 502));
}

#[test]
fn mode_sense_page_control() {
    let m = mem();
    let d = scsi(&m);
    // Changeable values: WCE and RCD in the caching page, nothing in the control page.
    let (o, data) = run(&d, &sense6(true, 1, 0x3F, 255), &[], 255);
    assert_good(&o);
    assert_eq!(find_page(&data, 4, 0x08).unwrap()[2], 0x05);
    assert!(
        find_page(&data, 4, 0x0A).unwrap()[2..]
            .iter()
            .all(|&b| b == 0)
    );
    // Default values: write cache on.
    let (_, data) = run(&d, &sense6(true, 2, 0x08, 255), &[], 255);
    assert_eq!(data[6], 0x04);
    // Saved values are not supported.
    let (o, _) = run(&d, &sense6(true, 3, 0x08, 255), &[], 255);
    assert_illegal(&o, Asc::SAVING_PARAMETERS_NOT_SUPPORTED);
}

#[test]
fn mode_sense_unknown_pages_and_subpages() {
    let m = mem();
    let d = scsi(&m);
    for page in [0x00, 0x01, 0x04, 0x1C, 0x3E] {
        let (o, _) = run(&d, &sense6(true, 0, page, 255), &[], 255);
        assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    }
    let (o, _) = run(&d, &[0x1A, 0x08, 0x0A, 0x05, 255, 0], &[], 255);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
}

/// The parameter list Linux's `cache_type` store sends: the caching page as MODE SENSE
/// (DBD) returned it, with WCE/RCD changed and PS cleared, behind a fresh header.
fn select6_list(page2: u8) -> Vec<u8> {
    let mut l = vec![0, 0, 0, 0, 0x08, 0x12, page2];
    l.resize(4 + 20, 0);
    l
}

fn select6(len: u8) -> [u8; 6] {
    [0x15, 0x10, 0, 0, len, 0]
}

#[test]
fn mode_select_caching_page_toggles_write_cache() {
    let m = mem();
    let d = scsi(&m);
    // "write through": WCE off. Writes now flush before completing.
    let (o, _) = run(&d, &select6(24), &select6_list(0x00), 0);
    assert_good(&o);
    assert_eq!(o.data_out_len, 24);
    let (_, data) = run(&d, &sense6(true, 0, 0x08, 255), &[], 255);
    assert_eq!(data[6] & 0x05, 0x00);
    let flushes = m.flushes.load(Ordering::Relaxed);
    assert_good(&run(&d, &cdb10(0x2A, 0, 0, 1), &[1; 512], 0).0);
    assert_eq!(m.flushes.load(Ordering::Relaxed), flushes + 1);
    // "write back, no read (daft)": WCE and RCD on; no flush per write.
    assert_good(&run(&d, &select6(24), &select6_list(0x05), 0).0);
    let (_, data) = run(&d, &sense6(true, 0, 0x08, 255), &[], 255);
    assert_eq!(data[6] & 0x05, 0x05);
    assert_good(&run(&d, &cdb10(0x2A, 0, 0, 1), &[1; 512], 0).0);
    assert_eq!(m.flushes.load(Ordering::Relaxed), flushes + 1);
    // MODE SELECT(10) with the same page, behind an 8-byte header.
    let mut l = vec![0u8; 8];
    l.extend_from_slice(&select6_list(0x04)[4..]);
    let (o, _) = run(&d, &[0x55, 0x10, 0, 0, 0, 0, 0, 0, 28, 0], &l, 0);
    assert_good(&o);
    let (_, data) = run(&d, &sense6(true, 0, 0x08, 255), &[], 255);
    assert_eq!(data[6] & 0x05, 0x04);
}

#[test]
fn mode_select_refuses_and_changes_nothing() {
    let m = mem();
    let d = scsi(&m);
    let mut other_field = select6_list(0x00);
    other_field[4 + 12] = 0x20; // DRA
    let mut bad_len = select6_list(0x00);
    bad_len[5] = 0x10;
    let mut spf = select6_list(0x00);
    spf[4] |= 0x40;
    let mut unknown = select6_list(0x00);
    unknown[4] = 0x01;
    let mut medium = select6_list(0x00);
    medium[1] = 1;
    let mut bd_len = select6_list(0x00);
    bd_len[3] = 4;
    let mut control = vec![0, 0, 0, 0, 0x0A, 0x0A, 0, 0x10];
    control.resize(16, 0);
    control[6] = 0x04; // D_SENSE
    let lists = [other_field, bad_len, spf, unknown, medium, bd_len, control];
    for list in &lists {
        let (o, _) = run(&d, &select6(list.len() as u8), list, 0);
        assert_illegal(&o, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    }
    // A valid caching page followed by a bad one: nothing applied.
    let mut two = select6_list(0x00);
    two.extend_from_slice(&[0x01, 0x02, 0, 0]);
    let (o, _) = run(&d, &select6(two.len() as u8), &two, 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    let (_, data) = run(&d, &sense6(true, 0, 0x08, 255), &[], 255);
    assert_eq!(data[6] & 0x04, 0x04, "WCE unchanged");
    // The control page sent back unchanged is accepted.
    let mut control = vec![0, 0, 0, 0, 0x0A, 0x0A, 0, 0x10];
    control.resize(16, 0);
    assert_good(&run(&d, &select6(16), &control, 0).0);
}

#[test]
fn mode_select_cdb_and_length_checks() {
    let m = mem();
    let d = scsi(&m);
    let list = select6_list(0x04);
    // SP, and PF = 0.
    let (o, _) = run(&d, &[0x15, 0x11, 0, 0, 24, 0], &list, 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    let (o, _) = run(&d, &[0x15, 0x00, 0, 0, 24, 0], &list, 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    // Parameter list length 0: nothing to do.
    assert_good(&run(&d, &select6(0), &[], 0).0);
    // More parameter list than data, a truncated header, a truncated page.
    for (len, data) in [(24, &list[..20]), (3, &list[..3]), (10, &list[..10])] {
        let (o, _) = run(&d, &select6(len), data, 0);
        assert_illegal(&o, Asc::PARAMETER_LIST_LENGTH_ERROR);
    }
    // Header and block descriptors only.
    assert_good(&run(&d, &select6(4), &[0, 0, 0, 0], 0).0);
}

#[test]
fn mode_select_block_descriptors() {
    let m = MemDisk::new(1 << 20, 512, 512, false);
    let d = scsi(&m);
    let page = &select6_list(0x04)[4..];
    let with_bd = |count: u32, len: u32| {
        let mut l = vec![0, 0, 0, 8];
        l.extend_from_slice(&count.to_be_bytes());
        l.extend_from_slice(&len.to_be_bytes());
        l.extend_from_slice(page);
        l
    };
    for (count, len, ok) in [
        (0, 512, true),
        (2048, 512, true),
        (2047, 512, false),
        (0, 4096, false),
    ] {
        let l = with_bd(count, len);
        let (o, _) = run(&d, &select6(l.len() as u8), &l, 0);
        if ok {
            assert_good(&o);
        } else {
            assert_illegal(&o, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
        }
    }
    // MODE SELECT(10) with a long descriptor.
    let mut l = vec![0, 0, 0, 0, 1, 0, 0, 16];
    l.extend_from_slice(&2048u64.to_be_bytes());
    l.extend_from_slice(&[0, 0, 0, 0]);
    l.extend_from_slice(&512u32.to_be_bytes());
    l.extend_from_slice(page);
    let (o, _) = run(&d, &[0x55, 0x10, 0, 0, 0, 0, 0, 0, l.len() as u8, 0], &l, 0);
    assert_good(&o);
    // A 16-byte descriptor without LONGLBA.
    l[4] = 0;
    let (o, _) = run(&d, &[0x55, 0x10, 0, 0, 0, 0, 0, 0, l.len() as u8, 0], &l, 0);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
}
