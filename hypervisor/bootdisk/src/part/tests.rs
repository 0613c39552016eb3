use super::*;
use crate::testutil::{Scratch, disk};

fn uuid_of(table: &serde_json::Value, node: &str) -> String {
    table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == node)
        .unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_lowercase()
}

#[test]
fn a_gpt_as_sfdisk_writes_it() {
    let s = Scratch::new();
    let img = s.partitioned(
        "d",
        64,
        "label: gpt\nsize=8M, type=U, name=EFI\nsize=16M, type=BC13C2FF-59E6-4262-A352-B275FD6F7172\nsize=8M, type=21686148-6449-6E6F-744E-656564454649\ntype=L",
        &[],
    );
    let l = read_layout(disk(&img).as_ref()).unwrap();
    assert_eq!((l.table, l.sector_size), (Table::Gpt, 512));
    let t = s.table("d");
    let kinds: Vec<_> = l
        .partitions
        .iter()
        .map(|p| (p.number, p.kind.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            (1, Kind::Esp),
            (2, Kind::XbootLdr),
            (3, Kind::BiosBoot),
            (4, Kind::Linux)
        ]
    );
    for (i, p) in l.partitions.iter().enumerate() {
        let sp = &t["partitions"][i];
        assert_eq!(p.start, sp["start"].as_u64().unwrap() * 512);
        assert_eq!(p.len, sp["size"].as_u64().unwrap() * 512);
        assert_eq!(
            p.partuuid.as_deref(),
            Some(uuid_of(&t, &format!("d{}", i + 1)).as_str())
        );
    }
    assert_eq!(l.partitions[0].name.as_deref(), Some("EFI"));
}

#[test]
fn a_damaged_primary_gpt_falls_back_to_the_backup() {
    let s = Scratch::new();
    let img = s.partitioned("d", 16, "label: gpt\n,4M,U\n,,L", &[]);
    let good = read_layout(disk(&img).as_ref()).unwrap();
    // Break the primary header's checksum, then the primary entries.
    s.sh("printf 'XX' | dd of=d bs=1 seek=$((512+16)) conv=notrunc status=none");
    assert_eq!(read_layout(disk(&img).as_ref()).unwrap(), good);
    s.sh("printf 'XX' | dd of=d bs=1 seek=1024 conv=notrunc status=none");
    assert_eq!(read_layout(disk(&img).as_ref()).unwrap(), good);
    // Both headers gone: the protective MBR still says GPT.
    s.sh("dd if=/dev/zero of=d bs=512 seek=$((16*2048-1)) count=1 conv=notrunc status=none");
    let e = read_layout(disk(&img).as_ref()).unwrap_err();
    assert!(e.to_string().contains("neither GPT header"), "{e}");
}

#[test]
fn a_gpt_on_4k_sectors() {
    let s = Scratch::new();
    // sfdisk 2.38 cannot choose the sector size of an image file; fdisk -b can.
    s.sh("truncate -s 64M d; printf 'g\\nn\\n\\n\\n+8M\\nt\\n1\\nn\\n\\n\\n\\nw\\n' | fdisk -b 4096 d >/dev/null");
    let l = read_layout(disk(&s.path("d")).as_ref()).unwrap();
    assert_eq!((l.table, l.sector_size), (Table::Gpt, 4096));
    assert_eq!(l.partitions.len(), 2);
    assert_eq!(l.partitions[0].kind, Kind::Esp);
    assert_eq!(l.partitions[0].start, 256 * 4096);
    assert_eq!(l.partitions[0].len, 8 << 20);
    assert_eq!(l.partitions[1].start, l.partitions[0].start + (8 << 20));
}

#[test]
fn an_mbr_with_logical_partitions() {
    let s = Scratch::new();
    let img = s.partitioned(
        "d",
        64,
        "label: dos\nlabel-id: 0x1234abcd\n,8M,83,*\n,8M,82\n,,E\n,8M,83\n,8M,8e\n,,83",
        &[],
    );
    let l = read_layout(disk(&img).as_ref()).unwrap();
    assert_eq!(l.table, Table::Mbr);
    let t = s.table("d");
    let got: Vec<_> = l
        .partitions
        .iter()
        .map(|p| (p.number, p.kind.clone(), p.start / 512, p.len / 512))
        .collect();
    let want: Vec<_> = t["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "5")
        .map(|p| {
            let n: u32 = p["node"].as_str().unwrap()[1..].parse().unwrap();
            let kind = match p["type"].as_str().unwrap() {
                "83" => Kind::Linux,
                "82" => Kind::Swap,
                "8e" => Kind::Lvm,
                o => panic!("{o}"),
            };
            (
                n,
                kind,
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 2, 5, 6, 7]);
    assert_eq!(l.partitions[3].partuuid.as_deref(), Some("1234abcd-06"));
}

#[test]
fn no_table_is_a_whole_disk_file_system() {
    let s = Scratch::new();
    let fat = s.vfat("esp", "empty", 8, "12345678");
    let l = read_layout(disk(&fat).as_ref()).unwrap();
    assert_eq!((l.table, l.partitions.len()), (Table::None, 0));
    let zeros: Vec<u8> = vec![0; 1 << 20];
    assert_eq!(read_layout(&zeros).unwrap().table, Table::None);
    // Smaller than a 4 KiB sector (found by the fuzzer: the backup header's LBA underflowed).
    let small: &[u8] = &[0; 1024];
    assert_eq!(read_layout(&small).unwrap().table, Table::None);
    let tiny: &[u8] = &[0; 100];
    assert!(read_layout(&tiny).is_err());
}

/// A little MBR by hand, for the hostile cases sfdisk refuses to write.
fn mbr(entries: &[(u8, u8, u32, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; 8 << 20];
    for (i, (status, t, start, count)) in entries.iter().enumerate() {
        let e = 446 + i * 16;
        d[e] = *status;
        d[e + 4] = *t;
        d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        d[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
    }
    d[510] = 0x55;
    d[511] = 0xAA;
    d
}

fn ebr(d: &mut [u8], at: u32, logical: (u32, u32), next: u32) {
    let b = at as usize * 512;
    d[b + 446 + 4] = 0x83;
    d[b + 446 + 8..b + 446 + 12].copy_from_slice(&logical.0.to_le_bytes());
    d[b + 446 + 12..b + 446 + 16].copy_from_slice(&logical.1.to_le_bytes());
    if next != 0 {
        d[b + 462 + 4] = 0x05;
        d[b + 462 + 8..b + 462 + 12].copy_from_slice(&next.to_le_bytes());
        d[b + 462 + 12..b + 462 + 16].copy_from_slice(&100u32.to_le_bytes());
    }
    d[b + 510] = 0x55;
    d[b + 511] = 0xAA;
}

#[test]
fn hostile_mbrs_are_refused_with_a_reason() {
    // A partition past the end of the disk.
    let d = mbr(&[(0x80, 0x83, 2048, 1 << 30)]);
    let e = read_layout(&d).unwrap_err().to_string();
    assert!(e.contains("outside the disk"), "{e}");
    // An extended chain that loops back on itself.
    let mut d = mbr(&[(0, 0x05, 2048, 8192)]);
    ebr(&mut d, 2048, (63, 100), 1000);
    ebr(&mut d, 3048, (63, 100), 0);
    assert_eq!(read_layout(&d).unwrap().partitions.len(), 2);
    ebr(&mut d, 3048, (63, 100), 1);
    ebr(&mut d, 2049, (63, 10), 1000);
    let e = read_layout(&d).unwrap_err().to_string();
    assert!(e.contains("loops"), "{e}");
    // A logical partition reaching out of its extended partition.
    let mut d = mbr(&[(0, 0x05, 2048, 8192)]);
    ebr(&mut d, 2048, (63, 9000), 0);
    let e = read_layout(&d).unwrap_err().to_string();
    assert!(e.contains("outside its extended"), "{e}");
    // Status bytes that are not 0 or 0x80: a boot sector, not a table.
    let d = mbr(&[(0x12, 0x83, 2048, 100)]);
    assert_eq!(read_layout(&d).unwrap().table, Table::None);
}

#[test]
fn hostile_gpts_are_refused_with_a_reason() {
    let s = Scratch::new();
    let img = s.partitioned("d", 16, "label: gpt\n,4M,U\n,,L", &[]);
    let good = std::fs::read(&img).unwrap();
    // Rewrite a header field and fix its checksum, as an attacker would.
    let patch = |at: usize, v: &[u8]| {
        let mut d = good.clone();
        for h in [512usize, good.len() - 512] {
            d[h + at..h + at + v.len()].copy_from_slice(v);
            let size = u32::from_le_bytes(d[h + 12..h + 16].try_into().unwrap()) as usize;
            d[h + 16..h + 20].fill(0);
            let crc = crc32fast::hash(&d[h..h + size]);
            d[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
        }
        d
    };
    let e = read_layout(&patch(80, &100_000u32.to_le_bytes())).unwrap_err();
    assert!(e.to_string().contains("100000 entries"), "{e}");
    let e = read_layout(&patch(84, &17u32.to_le_bytes())).unwrap_err();
    assert!(e.to_string().contains("17 bytes"), "{e}");
    let e = read_layout(&patch(72, &u64::MAX.to_le_bytes())).unwrap_err();
    assert!(e.to_string().contains("outside the disk"), "{e}");
}
