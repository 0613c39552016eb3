//! INQUIRY, the VPD pages and READ CAPACITY.

use super::*;

fn unmap_on() -> ScsiDiskOptions {
    ScsiDiskOptions {
        unmap: true,
        ..Default::default()
    }
}

#[test]
fn standard_inquiry_identifies_msft_virtual_disk() {
    let m = mem();
    let d = scsi(&m);
    let (o, data) = run(&d, &inquiry(false, 0, 255), &[], 255);
    assert_good(&o);
    assert_eq!(data.len(), 36);
    assert_eq!(o.residual, 255 - 36);
    assert_eq!(data[0], 0x00, "direct-access device, qualifier 0");
    assert_eq!(data[1] & 0x80, 0, "not removable");
    assert_eq!(data[2], 0x05, "SPC-3");
    assert_eq!(data[3] & 0x0F, 2, "response data format");
    assert_eq!(usize::from(data[4]) + 5, 36, "additional length");
    assert_eq!(data[7] & 0x02, 0x02, "CMDQUE");
    assert_eq!(&data[8..16], b"Msft    ");
    assert_eq!(&data[16..32], b"Virtual Disk    ");
}

#[test]
fn inquiry_truncates_to_allocation_length_and_buffer() {
    let m = mem();
    let d = scsi(&m);
    // Allocation length shorter than the data.
    let (o, data) = run(&d, &inquiry(false, 0, 5), &[], 255);
    assert_good(&o);
    assert_eq!(data.len(), 5);
    assert_eq!(data[4], 31);
    // Buffer shorter than the allocation length.
    let (o, data) = run(&d, &inquiry(false, 0, 36), &[], 10);
    assert_good(&o);
    assert_eq!((data.len(), o.residual), (10, 0));
    // Allocation length 0: nothing, and not an error.
    let (o, data) = run(&d, &inquiry(false, 0, 0), &[], 36);
    assert_good(&o);
    assert!(data.is_empty());
    // The same for a VPD page: a 4-byte header only.
    let (o, data) = run(&d, &inquiry(true, 0x83, 4), &[], 255);
    assert_good(&o);
    assert_eq!(data[..2], [0x00, 0x83]);
    assert_eq!(data.len(), 4);
}

#[test]
fn inquiry_field_checks() {
    let m = mem();
    let d = scsi(&m);
    // A page code without EVPD.
    let (o, _) = run(&d, &inquiry(false, 0x80, 255), &[], 255);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(o.sense_data().unwrap()[15..18], [0xC0, 0, 2]);
    // CMDDT.
    let (o, _) = run(&d, &[0x12, 0x02, 0, 0, 255, 0], &[], 255);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    // Pages not implemented (ATA information, block limits extension, anything).
    for page in [0x01, 0x86, 0x89, 0xB7, 0xB9, 0xC0, 0xFF] {
        let (o, _) = run(&d, &inquiry(true, page, 255), &[], 255);
        assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    }
}

#[test]
fn vpd_00_lists_exactly_the_pages_served() {
    for options in [ScsiDiskOptions::default(), unmap_on()] {
        let m = mem();
        let d = scsi_with(&m, options);
        let (o, data) = run(&d, &inquiry(true, 0, 255), &[], 255);
        assert_good(&o);
        assert_eq!(
            data,
            [0x00, 0x00, 0x00, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
        );
        for &page in &data[4..] {
            let (o, page_data) = run(&d, &inquiry(true, page, 255), &[], 255);
            assert_good(&o);
            assert_eq!(page_data[1], page);
            let len = usize::from(u16::from_be_bytes([page_data[2], page_data[3]]));
            assert_eq!(page_data.len(), 4 + len);
        }
    }
}

#[test]
fn vpd_80_is_the_unit_serial() {
    let m = mem();
    let d = scsi(&m);
    let (_, data) = run(&d, &inquiry(true, 0x80, 255), &[], 255);
    assert_eq!(&data[..4], &[0, 0x80, 0, 16]);
    assert_eq!(&data[4..], b"PARVIS-TEST-0001");
}

#[test]
fn vpd_83_has_the_naa_wwn_only() {
    let m = mem();
    let d = scsi(&m);
    let (_, data) = run(&d, &inquiry(true, 0x83, 255), &[], 255);
    let len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    assert_eq!(data.len(), 4 + len);
    // NAA: binary, LU association, type 3, 8 bytes.
    assert_eq!(data[4..8], [0x01, 0x03, 0x00, 0x08]);
    assert_eq!(data[8..16], 0x5001_4050_0000_0042u64.to_be_bytes());
    assert_eq!(data.len(), 16);
}

#[test]
fn vpd_b0_block_limits() {
    let m = MemDisk::new(64 << 20, 512, 4096, false);
    let d = scsi(&m);
    let (_, p) = run(&d, &inquiry(true, 0xB0, 255), &[], 255);
    assert_eq!(p.len(), 64);
    assert_eq!(p[3], 0x3C);
    assert_eq!(p[4] & 1, 1, "WSNZ");
    assert_eq!(
        p[6..8],
        8u16.to_be_bytes(),
        "granularity: one 4 KiB physical block"
    );
    assert_eq!(p[8..12], 4096u32.to_be_bytes(), "2 MiB of 512-byte blocks");
    assert_eq!(p[12..16], [0; 4], "optimal transfer length not reported");
    assert!(p[20..44].iter().all(|&b| b == 0), "no unmap, no write same");

    let d = scsi_with(
        &m,
        ScsiDiskOptions {
            unmap: true,
            write_same_16: true,
            lun: 0,
        },
    );
    let (_, p) = run(&d, &inquiry(true, 0xB0, 255), &[], 255);
    assert_eq!(p[20..24], u32::MAX.to_be_bytes());
    assert_eq!(p[24..28], 256u32.to_be_bytes());
    assert_eq!(p[28..32], 8u32.to_be_bytes());
    assert_eq!(p[32], 0x80, "UGAVALID");
    assert_eq!(p[36..44], (8u64 << 20 >> 9).to_be_bytes());
}

#[test]
fn vpd_b1_says_non_rotational() {
    let m = mem();
    let d = scsi(&m);
    let (_, p) = run(&d, &inquiry(true, 0xB1, 255), &[], 255);
    assert_eq!(p.len(), 64);
    assert_eq!(p[4..6], [0, 1]);
}

#[test]
fn vpd_b2_provisioning_bits() {
    let cases = [
        (ScsiDiskOptions::default(), false, 0x00, 0),
        (unmap_on(), false, 0x80, 2),
        (
            ScsiDiskOptions {
                unmap: true,
                write_same_16: true,
                lun: 0,
            },
            false,
            0xC0,
            2,
        ),
        // A read-only disk advertises no unmapping.
        (unmap_on(), true, 0x00, 0),
    ];
    for (options, read_only, bits, kind) in cases {
        let m = MemDisk::new(1 << 20, 512, 512, read_only);
        let d = scsi_with(&m, options);
        let (o, p) = run(&d, &inquiry(true, 0xB2, 255), &[], 255);
        assert_good(&o);
        assert_eq!(p.len(), 8);
        assert_eq!(
            (p[5], p[6]),
            (bits, kind),
            "{options:?} read-only {read_only}"
        );
    }
}

#[test]
fn read_capacity_10_and_16() {
    let m = MemDisk::new(64 << 20, 512, 4096, false);
    let d = scsi_with(&m, unmap_on());
    let (o, data) = run(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_good(&o);
    assert_eq!(data[0..4], ((64u32 << 20 >> 9) - 1).to_be_bytes());
    assert_eq!(data[4..8], 512u32.to_be_bytes());

    let (o, data) = run(&d, &cdb16(0x9E, 0x10, 0, 32), &[], 32);
    assert_good(&o);
    assert_eq!(data[0..8], ((64u64 << 20 >> 9) - 1).to_be_bytes());
    assert_eq!(data[8..12], 512u32.to_be_bytes());
    assert_eq!(data[12], 0, "no protection");
    assert_eq!(data[13], 3, "8 logical blocks per physical block");
    assert_eq!(data[14], 0x80, "LBPME, LBPRZ 0");
    // Without unmapping: no LBPME.
    let d = scsi(&m);
    let (_, data) = run(&d, &cdb16(0x9E, 0x10, 0, 32), &[], 32);
    assert_eq!(data[14], 0);
}

#[test]
fn read_capacity_truncation_and_field_checks() {
    let m = mem();
    let d = scsi(&m);
    // READ CAPACITY(16) honours its allocation length, and the buffer.
    let (o, data) = run(&d, &cdb16(0x9E, 0x10, 0, 12), &[], 32);
    assert_eq!((data.len(), o.residual), (12, 20));
    let (o, data) = run(&d, &cdb16(0x9E, 0x10, 0, 32), &[], 8);
    assert_eq!((data.len(), o.residual), (8, 0));
    let (o, data) = run(&d, &cdb16(0x9E, 0x10, 0, 0), &[], 32);
    assert_good(&o);
    assert!(data.is_empty());
    // READ CAPACITY(10) into a short buffer.
    let (_, data) = run(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 4);
    assert_eq!(data.len(), 4);
    // An LBA without PMI.
    let (o, _) = run(&d, &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[], 8);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
    let (o, _) = run(&d, &[0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0], &[], 8);
    assert_good(&o);
    let (o, _) = run(&d, &cdb16(0x9E, 0x10, 5, 32), &[], 32);
    assert_illegal(&o, Asc::INVALID_FIELD_IN_CDB);
}

#[test]
fn read_capacity_10_saturates_on_huge_disks() {
    // 4 TiB of 512-byte blocks: 2^33 blocks.
    let m = MemDisk::new(4 << 40, 512, 512, false);
    let d = scsi(&m);
    let (_, data) = run(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(data[0..4], [0xFF; 4]);
    let (_, data) = run(&d, &cdb16(0x9E, 0x10, 0, 32), &[], 32);
    assert_eq!(data[0..8], ((1u64 << 33) - 1).to_be_bytes());
}

#[test]
fn sector_4096_capacity() {
    let m = MemDisk::new(64 << 20, 4096, 4096, false);
    let d = scsi_with(&m, unmap_on());
    assert_eq!(d.block_size(), 4096);
    let (_, data) = run(&d, &cdb16(0x9E, 0x10, 0, 32), &[], 32);
    assert_eq!(data[0..8], ((64u64 << 20 >> 12) - 1).to_be_bytes());
    assert_eq!(data[8..12], 4096u32.to_be_bytes());
    assert_eq!(data[13], 0);
    let (_, p) = run(&d, &inquiry(true, 0xB0, 255), &[], 255);
    assert_eq!(p[6..8], 1u16.to_be_bytes());
    assert_eq!(p[8..12], 512u32.to_be_bytes(), "2 MiB of 4 KiB blocks");
    assert_eq!(p[28..32], 1u32.to_be_bytes());
}
