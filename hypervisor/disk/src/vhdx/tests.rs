//! Unit tests for the VHDX backend: hostile images give typed errors, and a deterministic
//! mutation run never panics.

use super::format::{HEADER_OFFSETS, MIB, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE};
use super::*;
use crate::BlockDevice;
use crate::storage::MemStorage;

/// A small valid image (1 MiB blocks) with some blocks written, as bytes.
fn image(kind: VhdxKind, size: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.vhdx");
    let mut o = VhdxCreateOptions::new(kind, size);
    o.block_size = 1 << 20;
    let v = Vhdx::create(&p, &o).unwrap();
    v.write_at(&[0x5a; 4096], 0).unwrap();
    v.write_at(&[0x6b; 8192], 2 * MIB - 4096).unwrap();
    drop(v);
    std::fs::read(&p).unwrap()
}

fn open(bytes: Vec<u8>, writable: bool) -> Result<Vhdx, DiskError> {
    let s = MemStorage::new(bytes, 64 * MIB);
    let o = VhdxOpenOptions {
        read_only: !writable,
        allow_replay: true,
    };
    Vhdx::open_storage(Box::new(s), &o, None)
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Offsets of the BAT and metadata regions of an image Parvis created.
fn regions(b: &[u8]) -> (usize, usize) {
    let rt = REGION_TABLE_OFFSETS[0] as usize;
    (
        le64(b, rt + 16 + 16) as usize,
        le64(b, rt + 48 + 16) as usize,
    )
}

fn reseal_regions(b: &mut [u8]) {
    for &o in &REGION_TABLE_OFFSETS {
        let o = o as usize;
        crc::seal(&mut b[o..o + REGION_TABLE_SIZE], 4);
    }
}

fn reseal_headers(b: &mut [u8]) {
    for &o in &HEADER_OFFSETS {
        let o = o as usize;
        crc::seal(&mut b[o..o + 4096], 4);
    }
}

fn expect_corrupt(r: Result<Vhdx, DiskError>, what: &str) {
    match r {
        Err(DiskError::Corrupt { structure, .. }) => {
            assert!(
                structure.contains(what),
                "{structure:?} does not name {what:?}"
            )
        }
        other => panic!("expected corrupt {what}, got {other:?}"),
    }
}

#[test]
fn valid_image_round_trips() {
    let v = open(image(VhdxKind::Dynamic, 4 * MIB), false).unwrap();
    let mut b = vec![0u8; 4096];
    v.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    v.read_at(&mut b, 2 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0x6b));
    assert!(matches!(v.write_at(&b, 0), Err(DiskError::ReadOnly)));
    assert!(matches!(
        v.read_at(&mut b[..100], 0),
        Err(DiskError::Misaligned { .. })
    ));
    assert!(matches!(
        v.read_at(&mut b, 4 * MIB),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(v.check().unwrap().errors.is_empty());
}

#[test]
fn hostile_structures_give_typed_errors() {
    let good = image(VhdxKind::Dynamic, 4 * MIB);
    let (bat, meta) = regions(&good);

    let mut b = good.clone();
    b[0] = b'X';
    expect_corrupt(open(b, false), "file identifier");

    let mut b = good.clone();
    b[HEADER_OFFSETS[0] as usize + 100] ^= 1;
    b[HEADER_OFFSETS[1] as usize + 100] ^= 1;
    expect_corrupt(open(b, false), "header");

    let mut b = good.clone();
    for &o in &REGION_TABLE_OFFSETS {
        b[o as usize + 8..o as usize + 12].copy_from_slice(&2048u32.to_le_bytes());
    }
    reseal_regions(&mut b);
    expect_corrupt(open(b, false), "region table");

    // Unknown required region.
    let mut b = good.clone();
    for &o in &REGION_TABLE_OFFSETS {
        let o = o as usize;
        b[o + 8..o + 12].copy_from_slice(&3u32.to_le_bytes());
        let e = o + 16 + 64;
        b[e..e + 16].copy_from_slice(&[7; 16]);
        b[e + 16..e + 24].copy_from_slice(&(40 * MIB).to_le_bytes());
        b[e + 24..e + 28].copy_from_slice(&(MIB as u32).to_le_bytes());
        b[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
    }
    reseal_regions(&mut b);
    assert!(matches!(open(b, false), Err(DiskError::Unsupported { .. })));

    // BAT entry past the end of the file, and overlapping the metadata region.
    let mut b = good.clone();
    b[bat + 8..bat + 16].copy_from_slice(&((1000 * MIB) | 6).to_le_bytes());
    expect_corrupt(open(b, false), "BAT entry 1");
    let mut b = good.clone();
    b[bat + 8..bat + 16].copy_from_slice(&(meta as u64 | 6).to_le_bytes());
    expect_corrupt(open(b, false), "BAT entry 1");
    let mut b = good.clone();
    b[bat + 8..bat + 16].copy_from_slice(&(bat as u64 | 6).to_le_bytes());
    expect_corrupt(open(b, false), "BAT entry 1");

    // Metadata: item outside the region, bad block size, absurd size, unknown required.
    let mut b = good.clone();
    b[meta + 32 + 16..meta + 32 + 20].copy_from_slice(&(2 * MIB as u32).to_le_bytes());
    expect_corrupt(open(b, false), "metadata entry 0");
    let fp = meta + 64 * 1024;
    let mut b = good.clone();
    b[fp..fp + 4].copy_from_slice(&(512u32 << 20).to_le_bytes());
    expect_corrupt(open(b, false), "file parameters");
    let mut b = good.clone();
    b[fp + 8..fp + 16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    expect_corrupt(open(b, false), "virtual disk size");
    let mut b = good.clone();
    b[meta + 32..meta + 48].copy_from_slice(&[9; 16]);
    assert!(matches!(open(b, false), Err(DiskError::Unsupported { .. })));

    // Truncated file.
    let mut b = good.clone();
    b.truncate(bat + 100);
    expect_corrupt(open(b, false), "metadata table");
    let mut b = good.clone();
    b.truncate(meta + 64 * 1024 + 4);
    expect_corrupt(open(b, false), "metadata item");
}

#[test]
fn hostile_logs_give_typed_errors() {
    let good = image(VhdxKind::Dynamic, 4 * MIB);
    let guid = Guid([0x42; 16]);
    let with_log = |entry: &[u8]| {
        let mut b = good.clone();
        b[MIB as usize..MIB as usize + entry.len()].copy_from_slice(entry);
        for &o in &HEADER_OFFSETS {
            let o = o as usize;
            b[o + 48..o + 64].copy_from_slice(&guid.0);
        }
        reseal_headers(&mut b);
        b
    };
    let (bat, _) = regions(&good);
    let sector = vec![1u8; 4096];
    let ok = log::build_entry(3, guid, 0, good.len() as u64, &[(bat as u64, &sector)]);
    // A well-formed entry needs replay: refused read-only.
    assert!(matches!(
        open(with_log(&ok), false),
        Err(DiskError::NeedsLogReplay)
    ));

    let mut bad_len = ok.clone();
    bad_len[8..12].copy_from_slice(&4100u32.to_le_bytes());
    expect_corrupt(open(with_log(&bad_len), true), "log entry");

    let mut bad_seq = ok.clone();
    bad_seq[64 + 24..64 + 32].copy_from_slice(&4u64.to_le_bytes());
    crc::seal(&mut bad_seq, 4);
    expect_corrupt(open(with_log(&bad_seq), true), "log entry");

    let into_header = log::build_entry(
        3,
        guid,
        0,
        good.len() as u64,
        &[(HEADER_OFFSETS[0], &sector)],
    );
    expect_corrupt(open(with_log(&into_header), true), "log entry");

    let truncated = log::build_entry(3, guid, 0, 1 << 40, &[(bat as u64, &sector)]);
    expect_corrupt(open(with_log(&truncated), true), "log entry");

    // A torn (bad CRC) entry is not replayed.
    let mut torn = ok;
    torn[5000] ^= 1;
    assert!(open(with_log(&torn), false).is_ok());
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Copy-on-write storage over a shared base image, so mutation runs copy no images.
#[derive(Debug)]
struct Cow {
    base: std::sync::Arc<Vec<u8>>,
    /// (length, base bytes at or past this offset read as zeros, changed 4 KiB pages)
    state: std::sync::Mutex<(u64, u64, std::collections::BTreeMap<u64, Vec<u8>>)>,
}

const PAGE: u64 = 4096;

impl Cow {
    fn new(base: std::sync::Arc<Vec<u8>>, patches: &[(usize, u8)], len: u64) -> Self {
        let c = Cow {
            state: std::sync::Mutex::new((len, len, Default::default())),
            base,
        };
        for &(at, v) in patches {
            let _ = crate::storage::Storage::write_at(&c, &[v], at as u64);
        }
        c
    }
}

impl Cow {
    /// Base bytes at `at` (zeros past the base or the truncation point).
    fn base_into(&self, zero_from: u64, buf: &mut [u8], at: u64) {
        buf.fill(0);
        let lim = zero_from.min(self.base.len() as u64);
        if at < lim {
            let n = ((lim - at) as usize).min(buf.len());
            buf[..n].copy_from_slice(&self.base[at as usize..at as usize + n]);
        }
    }
}

impl crate::storage::Storage for Cow {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let st = self.state.lock().unwrap();
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= st.0);
        if end.is_none() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(buf.len() - done);
            match st.2.get(&(at / PAGE)) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[within..within + n]),
                None => self.base_into(st.1, &mut buf[done..done + n], at),
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= 64 * MIB)
            .ok_or(std::io::ErrorKind::OutOfMemory)?;
        let mut st = self.state.lock().unwrap();
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let page = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(buf.len() - done);
            if !st.2.contains_key(&page) {
                let mut p = vec![0u8; PAGE as usize];
                self.base_into(st.1, &mut p, page * PAGE);
                st.2.insert(page, p);
            }
            st.2.get_mut(&page).unwrap()[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        st.0 = st.0.max(end);
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state.lock().unwrap().0)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > 64 * MIB {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        let mut st = self.state.lock().unwrap();
        if len < st.0 {
            st.1 = st.1.min(len);
            let first_gone = len.div_ceil(PAGE);
            st.2.retain(|&p, _| p < first_gone);
            if let Some(p) = st.2.get_mut(&(len / PAGE)) {
                p[(len % PAGE) as usize..].fill(0);
            }
        }
        st.0 = len;
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Open, read everything, write and flush a mutated image; only panics count as failures.
fn exercise(storage: Cow, rng: &mut Rng) {
    let o = VhdxOpenOptions {
        read_only: false,
        allow_replay: true,
    };
    let Ok(v) = Vhdx::open_storage(Box::new(storage), &o, None) else {
        return;
    };
    let size = v.size();
    let mut buf = vec![0u8; 64 * 1024];
    // The first 2 MiB and the last 64 KiB.
    let mut off = 0;
    while off < size.min(2 * MIB) {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = v.read_at(&mut buf[..n], off);
        off += n as u64;
    }
    let tail = size.saturating_sub(buf.len() as u64) / 512 * 512;
    let _ = v.read_at(&mut buf[..(size - tail) as usize], tail);
    for _ in 0..4 {
        let sectors = size / 512;
        if sectors == 0 {
            break;
        }
        let at = rng.below(sectors) * 512;
        let len = (512 * (1 + rng.below(16))).min(size - at) as usize;
        let _ = v.write_at(&buf[..len], at);
        let _ = v.read_at(&mut buf[..len], at);
        let _ = v.allocation(at, len as u64);
    }
    let _ = v.flush();
    let _ = v.check();
    let _ = v.info();
    if rng.below(8) == 0 {
        let _ = v.resize(size / 2 / 4096 * 4096 + 4096);
    }
}

#[test]
fn mutated_images_never_panic() {
    let bases: Vec<std::sync::Arc<Vec<u8>>> = [
        image(VhdxKind::Dynamic, 4 * MIB),
        image(VhdxKind::Fixed, 2 * MIB + 4096),
    ]
    .into_iter()
    .map(std::sync::Arc::new)
    .collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for i in 0..3000 {
        let base = &bases[i % bases.len()];
        let (bat, meta) = regions(base);
        let hot = [
            0,
            HEADER_OFFSETS[0] as usize,
            HEADER_OFFSETS[1] as usize,
            REGION_TABLE_OFFSETS[0] as usize,
            REGION_TABLE_OFFSETS[1] as usize,
            MIB as usize,
            bat,
            meta,
            meta + 64 * 1024,
        ];
        let mut patches = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let at = hot[rng.below(hot.len() as u64) as usize];
            let span = if rng.below(2) == 0 { 128 } else { 4096 };
            let at = at + rng.below(span) as usize;
            let old = base.get(at).copied().unwrap_or(0);
            let v = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                2 => old ^ (1 << rng.below(8)),
                _ => rng.next() as u8,
            };
            patches.push((at, v));
        }
        if rng.below(2) == 0 {
            // Re-seal the checksums so the mutation reaches the deeper structures.
            let mut fix = Vec::new();
            for (off, len) in HEADER_OFFSETS.iter().map(|&o| (o as usize, 4096)).chain(
                REGION_TABLE_OFFSETS
                    .iter()
                    .map(|&o| (o as usize, REGION_TABLE_SIZE)),
            ) {
                let mut b = base[off..off + len].to_vec();
                for &(at, v) in &patches {
                    if (off..off + len).contains(&at) {
                        b[at - off] = v;
                    }
                }
                crc::seal(&mut b, 4);
                fix.extend((4..8).map(|k| (off + k, b[k])));
            }
            patches.extend(fix);
        }
        let mut len = base.len() as u64;
        if rng.below(16) == 0 {
            len = rng.below(len);
        }
        exercise(Cow::new(base.clone(), &patches, len), &mut rng);
    }
}

#[test]
fn writes_to_present_blocks_run_in_parallel_and_others_allocate() {
    // Blocks 0, 1 and 2 are present (from `image`); 3.. are not.
    let v = std::sync::Arc::new(open(image(VhdxKind::Dynamic, 8 * MIB), true).unwrap());
    let before = v.read_state().bat.clone();
    // Before the session's first write the slow path runs (it writes the session header).
    assert!(!v.write_present(&[1; 512], 0).unwrap());
    v.write_at(&[1; 512], 0).unwrap();
    // Present blocks: the shared-lock path takes it, the BAT does not change.
    assert!(v.write_present(&[2; 4096], MIB).unwrap());
    assert_eq!(v.read_state().bat, before);
    // A write reaching into an absent block falls back (and allocates it).
    assert!(!v.write_present(&[3; 8192], 3 * MIB - 4096).unwrap());
    v.write_at(&[3; 8192], 3 * MIB - 4096).unwrap();
    assert_ne!(v.read_state().bat, before);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                for k in 0..64u64 {
                    let at = u64::from(t) * (MIB / 2) + k * 8192;
                    v.write_at(&[t + 10; 8192], at).unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let mut b = vec![0u8; 3 * MIB as usize + 4096];
    v.read_at(&mut b, 0).unwrap();
    for t in 0..4u8 {
        let r = (u64::from(t) * (MIB / 2)) as usize..(u64::from(t) * (MIB / 2) + MIB / 2) as usize;
        assert!(b[r].iter().all(|&x| x == t + 10), "thread {t}");
    }
    assert!(b[3 * MIB as usize - 4096..].iter().all(|&x| x == 3));
    v.flush().unwrap();
    let r = v.check().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
}
