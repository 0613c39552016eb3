//! VHDX log replay: a dirty-log fixture written by this test from the MS-VHDX spec (not by
//! the library), checked against Parvis and qemu-img; and crash consistency of Parvis's own
//! write path (every prefix of its writes must open to the old or the new contents).

#[path = "vhdx_common.rs"]
mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::*;
use parvis_disk::storage::{MemStorage, Storage};
use parvis_disk::vhdx::{Vhdx, VhdxCreateOptions, VhdxOpenOptions, replay_to_copy};
use parvis_disk::{BlockDevice, DiskError};

const MIB: u64 = 1 << 20;
const LOG_GUID: [u8; 16] = *b"parvis-log-guid!";

enum Desc {
    Data { at: u64, sector: Vec<u8> },
    Zero { at: u64, len: u64 },
}

/// A log entry per MS-VHDX 2.3.1: header, descriptors (padded to 4 KiB), data sectors.
fn log_entry(seq: u64, flushed: u64, last: u64, descs: &[Desc]) -> Vec<u8> {
    let dsec = (descs.len() + 2).div_ceil(128);
    let ndata = descs
        .iter()
        .filter(|d| matches!(d, Desc::Data { .. }))
        .count();
    let mut b = vec![0u8; (dsec + ndata) * 4096];
    let total = b.len() as u32;
    b[0..4].copy_from_slice(b"loge");
    b[8..12].copy_from_slice(&total.to_le_bytes());
    b[12..16].copy_from_slice(&0u32.to_le_bytes()); // tail: this entry
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..28].copy_from_slice(&(descs.len() as u32).to_le_bytes());
    b[32..48].copy_from_slice(&LOG_GUID);
    b[48..56].copy_from_slice(&flushed.to_le_bytes());
    b[56..64].copy_from_slice(&last.to_le_bytes());
    let mut data_sector = dsec;
    for (i, d) in descs.iter().enumerate() {
        let o = 64 + i * 32;
        match d {
            Desc::Zero { at, len } => {
                b[o..o + 4].copy_from_slice(b"zero");
                b[o + 8..o + 16].copy_from_slice(&len.to_le_bytes());
                b[o + 16..o + 24].copy_from_slice(&at.to_le_bytes());
            }
            Desc::Data { at, sector } => {
                b[o..o + 4].copy_from_slice(b"desc");
                b[o + 4..o + 8].copy_from_slice(&sector[4092..]);
                b[o + 8..o + 16].copy_from_slice(&sector[..8]);
                b[o + 16..o + 24].copy_from_slice(&at.to_le_bytes());
                let s = data_sector * 4096;
                b[s..s + 4].copy_from_slice(b"data");
                b[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                b[s + 8..s + 4092].copy_from_slice(&sector[8..4092]);
                b[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
                data_sector += 1;
            }
        }
        b[o + 24..o + 32].copy_from_slice(&seq.to_le_bytes());
    }
    seal(&mut b);
    b
}

/// A qemu image with an unreplayed log that rewrites data of block 0 (one data and one
/// zero descriptor) and allocates block 5 past the end of the file through a BAT update.
/// Returns (image, raw file of the contents after replay).
fn dirty_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("dirty.vhdx");
    let raw = dir.join("expected.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        img.to_str().unwrap(),
        "16M",
    ]);
    qemu_io(&img, &["write -P 0x11 0 8k", "write -P 0x12 2M 4k"]);
    to_raw(&img, &raw);

    let (slot, header) = current_header(&img);
    let log_off = le64(&header, 72);
    let (bat_off, _) = region(&img, BAT_GUID);
    let bat_sector = read_file_at(&img, bat_off, 4096);
    let block0 = le64(&bat_sector, 0) & !(MIB - 1);
    assert_eq!(le64(&bat_sector, 0) & 7, 6, "block 0 is fully present");
    let file_len = std::fs::metadata(&img).unwrap().len();
    let new_block = file_len.div_ceil(MIB) * MIB;
    let mut new_bat = bat_sector.clone();
    new_bat[5 * 8..6 * 8].copy_from_slice(&(new_block | 6).to_le_bytes());

    let head = log_entry(
        10,
        file_len,
        new_block + MIB,
        &[
            Desc::Data {
                at: block0,
                sector: vec![0x22; 4096],
            },
            Desc::Zero {
                at: block0 + 4096,
                len: 4096,
            },
            Desc::Data {
                at: bat_off,
                sector: new_bat,
            },
            Desc::Data {
                at: new_block,
                sector: vec![0x33; 4096],
            },
            Desc::Data {
                at: new_block + MIB - 4096,
                sector: vec![0x34; 4096],
            },
        ],
    );
    // An older, valid entry elsewhere in the log must not be replayed over the newer one.
    let old = log_entry(
        9,
        file_len,
        file_len,
        &[Desc::Data {
            at: block0,
            sector: vec![0x99; 4096],
        }],
    );
    write_file_at(&img, log_off, &head);
    write_file_at(&img, log_off + 64 * 4096, &old);
    let mut h = header.clone();
    let seq = le64(&h, 8) + 1;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[48..64].copy_from_slice(&LOG_GUID);
    seal(&mut h);
    write_file_at(&img, [64u64 << 10, 128 << 10][1 - slot], &h);

    write_file_at(&raw, 0, &[0x22; 4096]);
    write_file_at(&raw, 4096, &[0; 4096]);
    write_file_at(&raw, 5 * MIB, &[0x33; 4096]);
    write_file_at(&raw, 6 * MIB - 4096, &[0x34; 4096]);
    (img, raw)
}

fn opts(read_only: bool, allow_replay: bool) -> VhdxOpenOptions {
    VhdxOpenOptions {
        read_only,
        allow_replay,
    }
}

#[test]
fn dirty_log_is_never_replayed_silently() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = dirty_fixture(dir.path());
    let before = std::fs::read(&img).unwrap();
    for o in [opts(true, false), opts(true, true), opts(false, false)] {
        let e = Vhdx::open(&img, &o).unwrap_err();
        assert!(matches!(e, DiskError::NeedsLogReplay), "{o:?}: {e}");
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the image was modified"
    );
}

#[test]
fn dirty_log_replays_to_a_copy_and_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = dirty_fixture(dir.path());
    save_seed("qemu-dirty-log", &std::fs::read(&img).unwrap());
    let before = std::fs::read(&img).unwrap();
    let copy = dir.path().join("copy.vhdx");
    assert!(replay_to_copy(&img, &copy).unwrap());
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the source was modified"
    );
    let v = Vhdx::open(&copy, &opts(true, false)).unwrap();
    assert_same(&v, &raw);
    drop(v);
    qemu_check(&copy);

    let v = Vhdx::open(&img, &opts(false, true)).unwrap();
    assert!(v.log_replayed());
    assert_same(&v, &raw);
    drop(v);
    let v = Vhdx::open(&img, &opts(true, false)).unwrap();
    assert!(!v.log_replayed());
    assert_same(&v, &raw);
    assert!(v.check().unwrap().errors.is_empty());
}

#[test]
fn qemu_replays_the_fixture_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = dirty_fixture(dir.path());
    qemu_img(&[
        "check",
        "-q",
        "-r",
        "all",
        "-f",
        "vhdx",
        img.to_str().unwrap(),
    ]);
    let out = dir.path().join("qemu.raw");
    to_raw(&img, &out);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
}

/// Storage that silently drops every write after the first `limit` (a power cut).
#[derive(Debug)]
struct CutStorage {
    inner: MemStorage,
    count: Mutex<(usize, usize)>,
}

impl CutStorage {
    fn new(data: Vec<u8>, limit: usize) -> Self {
        Self {
            inner: MemStorage::new(data, 1 << 30),
            count: Mutex::new((0, limit)),
        }
    }
    fn allowed(&self) -> bool {
        let mut c = self.count.lock().unwrap();
        c.0 += 1;
        c.0 <= c.1
    }
}

impl Storage for CutStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.allowed() {
            self.inner.write_at(buf, offset)
        } else {
            Ok(())
        }
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.allowed() {
            self.inner.set_len(len)
        } else {
            Ok(())
        }
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.allowed() {
            self.inner.punch_hole(offset, len)
        } else {
            Ok(())
        }
    }
}

#[derive(Debug)]
struct Shared(std::sync::Arc<CutStorage>);

impl Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.punch_hole(offset, len)
    }
}

/// Run a session of writes, cutting the power after `limit` storage writes; returns the
/// bytes left behind and how many writes the full session makes.
fn session(base: &[u8], limit: usize, diff_dir: Option<&Path>) -> (Vec<u8>, usize) {
    let cut = std::sync::Arc::new(CutStorage::new(base.to_vec(), limit));
    let v =
        Vhdx::open_storage(Box::new(Shared(cut.clone())), &opts(false, false), diff_dir).unwrap();
    v.write_at(&[0xa1; 8192], MIB + 4096).unwrap(); // allocates block 1
    v.write_at(&[0xa2; 4096], 7 * MIB).unwrap(); // allocates block 7
    v.flush().unwrap();
    v.write_at(&[0xa3; 4096], 3 * MIB).unwrap(); // allocates block 3
    v.resize(12 * MIB).unwrap(); // logs BAT pages and the virtual size
    drop(v);
    let n = cut.count.lock().unwrap().0;
    (cut.inner.contents(), n)
}

#[test]
fn every_power_cut_leaves_old_or_new_contents() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.vhdx");
    let mut o = VhdxCreateOptions::dynamic(8 * MIB);
    o.block_size = 1 << 20;
    drop(Vhdx::create(&img, &o).unwrap());
    let base = std::fs::read(&img).unwrap();
    let (_, total) = session(&base, usize::MAX, None);
    assert!(total > 10);
    let mut first_flush_done = None;
    let mut replays = 0;
    for limit in 0..=total {
        let (bytes, _) = session(&base, limit, None);
        let s = MemStorage::new(bytes.clone(), 1 << 30);
        let v = match Vhdx::open_storage(Box::new(s), &opts(true, false), None) {
            Ok(v) => v,
            Err(DiskError::NeedsLogReplay) => {
                replays += 1;
                let s = MemStorage::new(bytes, 1 << 30);
                Vhdx::open_storage(Box::new(s), &opts(false, true), None)
                    .unwrap_or_else(|e| panic!("cut after {limit} writes: replay failed: {e}"))
            }
            Err(e) => panic!("cut after {limit} writes: {e}"),
        };
        let mut b = vec![0u8; 4096];
        let mut states = Vec::new();
        for (off, val) in [
            (MIB + 4096, 0xa1),
            (MIB + 8192, 0xa1),
            (7 * MIB, 0xa2),
            (3 * MIB, 0xa3),
        ] {
            v.read_at(&mut b, off).unwrap();
            let new = b.iter().all(|&x| x == val);
            assert!(
                new || b.iter().all(|&x| x == 0),
                "cut after {limit}: torn data at {off:#x}"
            );
            states.push(new);
        }
        assert!(v.size() == 8 * MIB || v.size() == 12 * MIB);
        assert!(v.check().unwrap().errors.is_empty(), "cut after {limit}");
        if states[0] && states[2] && first_flush_done.is_none() {
            first_flush_done = Some(limit);
        }
        if first_flush_done.is_some() {
            assert!(
                states[0] && states[1] && states[2],
                "cut after {limit}: flushed data lost"
            );
        }
    }
    assert!(first_flush_done.is_some());
    assert!(replays > 0, "no cut left a log to replay");
}

#[test]
fn every_power_cut_during_a_shrink_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.vhdx");
    let mut o = VhdxCreateOptions::dynamic(8 * MIB);
    o.block_size = 1 << 20;
    let v = Vhdx::create(&img, &o).unwrap();
    // File order: block 7, block 1, block 3. Shrinking to 2 MiB keeps block 1, punches
    // block 7 (a kept block follows it) and cuts block 3 off the end.
    v.write_at(&[0xa7; 4096], 7 * MIB).unwrap();
    v.write_at(&[0xa1; 4096], MIB).unwrap();
    v.write_at(&[0xa3; 4096], 3 * MIB).unwrap();
    drop(v);
    let base = std::fs::read(&img).unwrap();
    let shrink = |limit: usize| -> (Vec<u8>, usize) {
        let cut = std::sync::Arc::new(CutStorage::new(base.clone(), limit));
        let v =
            Vhdx::open_storage(Box::new(Shared(cut.clone())), &opts(false, false), None).unwrap();
        v.resize(2 * MIB).unwrap();
        drop(v);
        let n = cut.count.lock().unwrap().0;
        (cut.inner.contents(), n)
    };
    let (done, total) = shrink(usize::MAX);
    assert!(total > 5);
    assert_eq!(done.len() as u64, base.len() as u64 - MIB);
    for limit in 0..=total {
        let (bytes, _) = shrink(limit);
        let s = MemStorage::new(bytes.clone(), 1 << 30);
        let v = match Vhdx::open_storage(Box::new(s), &opts(true, false), None) {
            Ok(v) => v,
            Err(DiskError::NeedsLogReplay) => {
                let s = MemStorage::new(bytes, 1 << 30);
                Vhdx::open_storage(Box::new(s), &opts(false, true), None)
                    .unwrap_or_else(|e| panic!("cut after {limit} writes: replay failed: {e}"))
            }
            Err(e) => panic!("cut after {limit} writes: {e}"),
        };
        let r = v.check().unwrap();
        assert!(r.errors.is_empty(), "cut after {limit}: {r:?}");
        let mut b = vec![0u8; 4096];
        v.read_at(&mut b, MIB).unwrap();
        assert_eq!(b, [0xa1; 4096], "cut after {limit}: kept block");
        assert!(v.size() == 8 * MIB || v.size() == 2 * MIB);
        if v.size() == 8 * MIB {
            for (off, val) in [(3 * MIB, 0xa3), (7 * MIB, 0xa7)] {
                v.read_at(&mut b, off).unwrap();
                assert!(
                    b.iter().all(|&x| x == val) || b.iter().all(|&x| x == 0),
                    "cut after {limit}: dropped block at {off:#x} is torn"
                );
            }
        }
    }
}
