//! Unit tests of the VHD backend: round trips, resize, differencing, damaged and hostile
//! images (a deterministic mutation corpus).

use std::path::{Path, PathBuf};

use super::*;
use crate::storage::MemStorage;
use crate::{Allocation, AllocationState, BlockDevice};

const MIB: u64 = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn mem(bytes: Vec<u8>) -> Box<dyn Storage> {
    Box::new(MemStorage::new(bytes, 64 * MIB))
}

/// A small dynamic image (4 MiB virtual, 64 KiB blocks) with a few blocks written, as bytes.
fn small_dynamic(dir: &Path) -> Vec<u8> {
    let p = dir.join("small.vhd");
    let opts = VhdCreateOptions {
        block_size: 64 * 1024,
        ..VhdCreateOptions::dynamic(4 * MIB)
    };
    let v = Vhd::create(&p, &opts).unwrap();
    v.write_at(&pattern(4096, 1), 0).unwrap();
    v.write_at(&pattern(128 * 1024, 2), 200 * 1024).unwrap();
    v.write_at(&pattern(512, 3), 4 * MIB - 512).unwrap();
    v.flush().unwrap();
    drop(v);
    std::fs::read(&p).unwrap()
}

#[test]
fn dynamic_round_trip_allocation_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhd");
    let v = Vhd::create(&p, &VhdCreateOptions::dynamic(10 * MIB + 512)).unwrap();
    assert_eq!(v.size(), 10 * MIB + 512);
    let mut buf = vec![0xeeu8; 3 * MIB as usize];
    v.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let a = v.allocation(0, v.size()).unwrap();
    assert_eq!((a.state, a.len), (AllocationState::Unallocated, v.size()));
    // A write spanning two blocks, and one in the last partial block.
    let data = pattern(MIB as usize, 9);
    v.write_at(&data, 2 * MIB - 4096).unwrap();
    v.write_at(&[7; 512], 10 * MIB).unwrap();
    let mut back = vec![0u8; MIB as usize];
    v.read_at(&mut back, 2 * MIB - 4096).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        v.allocation(0, v.size()).unwrap(),
        Allocation {
            state: AllocationState::Data,
            len: 4 * MIB
        }
    );
    assert_eq!(
        v.allocation(4 * MIB, 100 * 512).unwrap(),
        Allocation {
            state: AllocationState::Unallocated,
            len: 100 * 512
        }
    );
    assert!(matches!(
        v.read_at(&mut back[..512], 10 * MIB + 512),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.read_at(&mut back[..100], 0),
        Err(DiskError::Misaligned { .. })
    ));
    assert_eq!(v.info().allocated, 3 * 2 * MIB);
    assert!(v.check().unwrap().errors.is_empty() || !v.read_state().dirty.is_empty());
    v.flush().unwrap();
    let r = v.check().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    drop(v);
    let before = std::fs::read(&p).unwrap();
    let v = Vhd::open(&p, true).unwrap();
    v.read_at(&mut back, 2 * MIB - 4096).unwrap();
    assert_eq!(back, data);
    v.read_at(&mut back[..512], 10 * MIB).unwrap();
    assert_eq!(&back[..512], &[7; 512]);
    assert!(matches!(
        v.write_at(&back[..512], 0),
        Err(DiskError::ReadOnly)
    ));
    drop(v);
    assert_eq!(std::fs::read(&p).unwrap(), before, "a read-only open wrote");
}

#[test]
fn fixed_round_trip_resize_and_old_footer() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.vhd");
    let v = Vhd::create(&p, &VhdCreateOptions::fixed(3 * MIB)).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 3 * MIB + 512);
    v.write_at(&pattern(8192, 4), 3 * MIB - 8192).unwrap();
    assert_eq!(v.info().variant, "fixed");
    assert!(matches!(v.resize(MIB), Err(DiskError::Unsupported { .. })));
    v.resize(5 * MIB).unwrap();
    assert_eq!(v.size(), 5 * MIB);
    let mut b = vec![1u8; 2 * MIB as usize];
    v.read_at(&mut b, 3 * MIB).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "old footer must not show in the grown area"
    );
    assert!(v.check().unwrap().errors.is_empty());
    drop(v);
    let v = Vhd::open(&p, false).unwrap();
    assert_eq!(v.size(), 5 * MIB);
    let mut b = vec![0u8; 8192];
    v.read_at(&mut b, 3 * MIB - 8192).unwrap();
    assert_eq!(b, pattern(8192, 4));
    drop(v);
    // A 511-byte footer (pre-2004 tools): drop the last (reserved, zero) byte.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.pop();
    let v = Vhd::open_storage(mem(bytes), true, None).unwrap();
    assert_eq!(v.size(), 5 * MIB);
    v.read_at(&mut b, 3 * MIB - 8192).unwrap();
    assert_eq!(b, pattern(8192, 4));
    assert!(Vhd::detect(v.storage.as_ref()).unwrap());
    assert!(!Vhd::detect(&MemStorage::new(vec![0; 4096], 4096)).unwrap());
}

#[test]
fn dynamic_resize_extends_or_relocates_the_bat() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.vhd");
    let v = Vhd::create(&p, &VhdCreateOptions::dynamic(4 * MIB)).unwrap();
    v.write_at(&[5; 512], 0).unwrap();
    let toff = |v: &Vhd| v.read_state().table_offset;
    assert_eq!(toff(&v), 1536);
    // 2 entries -> one BAT sector has room for 128 (256 MiB): extended in place.
    v.resize(256 * MIB).unwrap();
    assert_eq!(toff(&v), 1536);
    v.write_at(&[6; 512], 256 * MIB - 512).unwrap();
    // Beyond the padding the first data block is in the way: the table moves to the end.
    let end_before = v.storage.len().unwrap() - 512;
    v.resize(8 << 30).unwrap();
    assert_eq!(toff(&v), end_before);
    assert_eq!(v.read_state().bat.len(), 4096);
    let r = v.check().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    // The table is now the last structure: growing again extends it in place.
    v.resize(16 << 30).unwrap();
    assert_eq!(toff(&v), end_before);
    v.write_at(&[7; 512], (16 << 30) - 512).unwrap();
    // ... until a block follows it: then it moves again (unflushed entries included).
    v.resize(32 << 30).unwrap();
    assert!(toff(&v) > end_before);
    assert!(matches!(v.resize(MIB), Err(DiskError::Unsupported { .. })));
    v.flush().unwrap();
    let r = v.check().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    drop(v);
    let v = Vhd::open(&p, true).unwrap();
    assert_eq!(v.size(), 32 << 30);
    assert!(v.check().unwrap().errors.is_empty());
    let mut b = [0u8; 512];
    for (at, want) in [
        (0, 5),
        (256 * MIB - 512, 6),
        ((16 << 30) - 512, 7),
        (256 * MIB, 0),
        ((8 << 30) - 512, 0),
        ((32 << 30) - 512, 0),
    ] {
        v.read_at(&mut b, at).unwrap();
        assert_eq!(b, [want; 512], "at {at:#x}");
    }
    // The BAT limit still applies.
    let small = dir.path().join("s.vhd");
    let opts = VhdCreateOptions {
        block_size: 4096,
        ..VhdCreateOptions::dynamic(MIB)
    };
    let v = Vhd::create(&small, &opts).unwrap();
    assert!(matches!(
        v.resize(1 << 40),
        Err(DiskError::Unsupported { ref what }) if what.contains("BAT")
    ));
}

/// Storage that keeps a copy of its contents after every change: each copy is what the
/// file would hold after a crash right after that write.
#[derive(Debug)]
struct Snapshots {
    inner: MemStorage,
    snaps: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Storage for Snapshots {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)?;
        self.snaps.lock().unwrap().push(self.inner.contents());
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)?;
        self.snaps.lock().unwrap().push(self.inner.contents());
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn bat_relocation_is_crash_safe() {
    let dir = tempfile::tempdir().unwrap();
    // A dynamic image and a differencing one (its parent locators follow the BAT), both
    // 4 MiB with data in their first blocks, grown to 8 GiB (the table is relocated).
    let dynamic = small_dynamic(dir.path());
    let base = dir.path().join("base.vhd");
    drop(Vhd::create(&base, &VhdCreateOptions::dynamic(8 << 30)).unwrap());
    let child = dir.path().join("child.vhd");
    let c = Vhd::create(
        &child,
        &VhdCreateOptions {
            size: 4 * MIB,
            ..VhdCreateOptions::differencing(&base)
        },
    )
    .unwrap();
    c.write_at(&pattern(4096, 1), 0).unwrap();
    c.write_at(&pattern(512, 3), 4 * MIB - 512).unwrap();
    drop(c);
    let diff = std::fs::read(&child).unwrap();
    for image in [dynamic, diff] {
        let snaps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let storage = Snapshots {
            inner: MemStorage::new(image, 64 * MIB),
            snaps: snaps.clone(),
        };
        let v = Vhd::open_storage(Box::new(storage), false, None).unwrap();
        let toff = v.read_state().table_offset;
        // An allocation not yet flushed when the resize starts.
        v.write_at(&pattern(1024, 4), 3 * MIB).unwrap();
        // (A crash inside the allocation itself is `recovers_from_a_missing_trailing_footer`.)
        snaps.lock().unwrap().clear();
        v.resize(8 << 30).unwrap();
        assert_ne!(v.read_state().table_offset, toff, "relocated");
        drop(v);
        let snaps = std::mem::take(&mut *snaps.lock().unwrap());
        assert!(snaps.len() > 4);
        let mut saw_new = false;
        for (i, snap) in snaps.into_iter().enumerate() {
            let v = Vhd::open_storage(mem(snap), true, None)
                .unwrap_or_else(|e| panic!("crash after write {i}: {e}"));
            assert!(v.size() == 4 * MIB || v.size() == 8 << 30, "{i}");
            saw_new |= v.size() == 8 << 30;
            let r = v.check().unwrap();
            assert!(r.errors.is_empty(), "crash after write {i}: {r:?}");
            let mut b = vec![0u8; 4096];
            v.read_at(&mut b, 0).unwrap();
            assert_eq!(b, pattern(4096, 1), "{i}");
            v.read_at(&mut b[..512], 4 * MIB - 512).unwrap();
            assert_eq!(b[..512], pattern(512, 3), "{i}");
            // The unflushed block is either absent (zeros) or complete.
            v.read_at(&mut b[..1024], 3 * MIB).unwrap();
            assert!(
                b[..1024] == pattern(1024, 4) || b[..1024] == [0; 1024],
                "{i}"
            );
        }
        assert!(saw_new);
    }
}

#[test]
fn differencing_reads_through_the_chain_per_sector() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let b = Vhd::create(&base, &VhdCreateOptions::dynamic(8 * MIB)).unwrap();
    b.write_at(&vec![0xbb; 4 * MIB as usize], 0).unwrap();
    drop(b);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let child = sub.join("child.vhd");
    let c = Vhd::create(&child, &VhdCreateOptions::differencing(&base)).unwrap();
    assert_eq!(c.size(), 8 * MIB);
    assert_eq!(
        c.parent_path(),
        Some(base.canonicalize().unwrap().as_path())
    );
    c.write_at(&[0xcc; 1024], 4096).unwrap();
    c.write_at(&[0xdd; 512], 2 * MIB + 512).unwrap();
    let mut buf = vec![0u8; 3 * MIB as usize];
    c.read_at(&mut buf, 0).unwrap();
    let mut expect = vec![0xbbu8; 3 * MIB as usize];
    expect[4096..5120].fill(0xcc);
    expect[2 * MIB as usize + 512..2 * MIB as usize + 1024].fill(0xdd);
    assert_eq!(buf, expect);
    assert_eq!(
        c.allocation(0, 8 * MIB).unwrap(),
        Allocation {
            state: AllocationState::Unallocated,
            len: 4096
        }
    );
    assert_eq!(
        c.allocation(4096, 8 * MIB - 4096).unwrap(),
        Allocation {
            state: AllocationState::Data,
            len: 1024
        }
    );
    assert_eq!(
        c.allocation(5120, 8 * MIB - 5120).unwrap(),
        Allocation {
            state: AllocationState::Unallocated,
            len: 2 * MIB + 512 - 5120
        }
    );
    c.flush().unwrap();
    let r = c.check().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(c.info().variant, "differencing");
    drop(c);
    // Reopen; also found when the child moves next to the parent (relative locator fails,
    // absolute one works) and via the name when only the name matches.
    let c = Vhd::open(&child, true).unwrap();
    c.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, expect);
    drop(c);
    let moved = dir.path().join("moved.vhd");
    std::fs::rename(&child, &moved).unwrap();
    let c = Vhd::open(&moved, true).unwrap();
    c.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, expect);
    // Without a directory the parent is not opened: absent sectors read as zeros.
    let c = Vhd::open_storage(mem(std::fs::read(&moved).unwrap()), true, None).unwrap();
    c.read_at(&mut buf[..8192], 0).unwrap();
    assert_eq!(&buf[..4096], &[0; 4096]);
    assert_eq!(&buf[4096..5120], &[0xcc; 1024]);
    // A parent whose unique id differs is refused.
    let other = dir.path().join("other.vhd");
    drop(Vhd::create(&other, &VhdCreateOptions::dynamic(8 * MIB)).unwrap());
    std::fs::rename(&other, &base).unwrap();
    let e = Vhd::open(&moved, true).unwrap_err();
    assert!(
        matches!(e, DiskError::Parent { ref source, .. } if matches!(**source, DiskError::Corrupt { .. })),
        "{e}"
    );
}

#[test]
fn parent_loops_and_missing_parents() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vhd");
    let b = dir.path().join("b.vhd");
    let c = dir.path().join("c.vhd");
    drop(Vhd::create(&a, &VhdCreateOptions::dynamic(4 * MIB)).unwrap());
    drop(Vhd::create(&b, &VhdCreateOptions::differencing(&a)).unwrap());
    drop(Vhd::create(&c, &VhdCreateOptions::differencing(&b)).unwrap());
    // c (whose parent is b) replaces a: a -> b -> a.
    std::fs::rename(&c, &a).unwrap();
    let e = Vhd::open(&a, true).unwrap_err();
    assert!(
        matches!(
            e,
            DiskError::ParentChain {
                limit: MAX_CHAIN_DEPTH,
                ..
            }
        ),
        "{e}"
    );
    let e = Vhd::open(&b, true).unwrap_err();
    assert!(matches!(e, DiskError::ParentChain { .. }), "{e}");
    // A missing parent is a Parent error.
    std::fs::remove_file(&a).unwrap();
    let e = Vhd::open(&b, true).unwrap_err();
    assert!(matches!(e, DiskError::Parent { .. }), "{e}");
    // A chain deeper than the limit.
    let mut prev = dir.path().join("l0.vhd");
    drop(Vhd::create(&prev, &VhdCreateOptions::dynamic(MIB)).unwrap());
    for i in 1..MAX_CHAIN_DEPTH {
        let next = dir.path().join(format!("l{i}.vhd"));
        drop(
            Vhd::create(&next, &VhdCreateOptions::differencing(&prev))
                .unwrap_or_else(|e| panic!("{i}: {e}")),
        );
        prev = next;
    }
    assert_eq!(
        Vhd::open(&prev, true).unwrap().chain_depth(),
        MAX_CHAIN_DEPTH
    );
    let deep = dir.path().join("deep.vhd");
    let e = Vhd::create(&deep, &VhdCreateOptions::differencing(&prev)).unwrap_err();
    assert!(matches!(e, DiskError::ParentChain { .. }), "{e}");
    assert!(!deep.exists());
    // Opening with one more image above the chain exceeds the limit.
    let top = dir
        .path()
        .join(format!("l{}.vhd", MAX_CHAIN_DEPTH - 1))
        .canonicalize()
        .unwrap();
    let e = Vhd::open_chain(&top, true, &mut vec![PathBuf::from("/above")]).unwrap_err();
    assert!(matches!(e, DiskError::ParentChain { .. }), "{e}");
}

/// Build the raw bytes of a dynamic image via `Vhd::create` and return (bytes, bat offset).
fn dynamic_bytes(dir: &Path, name: &str, size: u64) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    let v = Vhd::create(&p, &VhdCreateOptions::dynamic(size)).unwrap();
    v.write_at(&[1; 512], 0).unwrap();
    drop(v);
    let b = std::fs::read(&p).unwrap();
    (p, b)
}

fn refooter(bytes: &mut [u8], at: usize, edit: impl Fn(&mut [u8])) {
    edit(&mut bytes[at..at + 512]);
    let sum = footer::checksum(&bytes[at..at + 512], 64);
    bytes[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
}

#[test]
fn hostile_images_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good) = dynamic_bytes(dir.path(), "g.vhd", 4 * MIB);
    let n = good.len();
    let open = |b: Vec<u8>| Vhd::open_storage(mem(b), true, None);
    assert!(open(good.clone()).is_ok());
    // Truncated file: the BAT points past the end of the data.
    let mut t = good[..n - 4096].to_vec();
    t.extend_from_slice(&good[n - 512..]);
    let e = open(t).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { ref structure, offset: 1536, .. } if structure == "VHD BAT entry 0"),
        "{e}"
    );
    // Tiny files.
    assert!(matches!(open(vec![0; 100]), Err(DiskError::Corrupt { .. })));
    assert!(matches!(open(Vec::new()), Err(DiskError::Corrupt { .. })));
    // Bad checksums in both footers.
    let mut b = good.clone();
    b[n - 512 + 70] ^= 1;
    b[70] ^= 1;
    let e = open(b).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { ref structure, .. } if structure == "VHD footer"),
        "{e}"
    );
    // Only the trailing one bad: the copy at 0 is used, and check() says so.
    let mut b = good.clone();
    b[n - 512 + 70] ^= 1;
    let v = open(b).unwrap();
    assert!(!v.check().unwrap().errors.is_empty());
    // BAT entry past EOF.
    let mut b = good.clone();
    b[1536 + 4..1536 + 8].copy_from_slice(&0x0010_0000u32.to_be_bytes());
    let e = open(b).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { ref structure, offset: 1540, .. } if structure == "VHD BAT entry 1"),
        "{e}"
    );
    // BAT entry pointing into the header.
    let mut b = good.clone();
    b[1536 + 4..1536 + 8].copy_from_slice(&1u32.to_be_bytes());
    assert!(matches!(open(b), Err(DiskError::Corrupt { .. })));
    // Absurd sizes, in both footers.
    let mut b = good.clone();
    for at in [0, n - 512] {
        refooter(&mut b, at, |f| {
            f[48..56].copy_from_slice(&(1u64 << 60).to_be_bytes());
            f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
        });
    }
    let e = open(b).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { ref reason, .. } if reason.contains("2040 GiB")),
        "{e}"
    );
    // A size the BAT does not cover.
    let mut b = good.clone();
    for at in [0, n - 512] {
        refooter(&mut b, at, |f| {
            f[48..56].copy_from_slice(&(64 * MIB).to_be_bytes());
            f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
        });
    }
    let e = open(b).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { ref structure, .. } if structure == "VHD dynamic header"),
        "{e}"
    );
    // Header offset past EOF.
    let mut b = good.clone();
    for at in [0, n - 512] {
        refooter(&mut b, at, |f| {
            f[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes())
        });
    }
    assert!(matches!(open(b), Err(DiskError::Corrupt { .. })));
}

#[test]
fn concurrent_writers_on_different_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhd");
    let v = std::sync::Arc::new(Vhd::create(&p, &VhdCreateOptions::dynamic(32 * MIB)).unwrap());
    let hs: Vec<_> = (0..8u8)
        .map(|i| {
            let v = v.clone();
            std::thread::spawn(move || {
                let off = u64::from(i) * 4 * MIB + 512;
                v.write_at(&vec![i + 1; 65536], off).unwrap();
                let mut b = vec![0u8; 65536];
                v.read_at(&mut b, off).unwrap();
                assert!(b.iter().all(|&x| x == i + 1));
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    v.flush().unwrap();
    assert!(v.check().unwrap().errors.is_empty());
}

/// xorshift64*: deterministic pseudo-random numbers for the mutation corpus.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Exercise an opened hostile image: bounded reads, allocation, info and check must not
/// panic (errors are fine).
pub(super) fn poke(v: &Vhd, rng_seed: u64) {
    let size = v.size();
    let sectors = size / 512;
    let mut rng = Rng(rng_seed | 1);
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..4 {
        if sectors == 0 {
            break;
        }
        let s = rng.next() % sectors;
        let n = (1 + rng.next() % 128).min(sectors - s);
        let _ = v.read_at(&mut buf[..(n * 512) as usize], s * 512);
        let _ = v.allocation(s * 512, size - s * 512);
    }
    let _ = v.info();
    let _ = v.check();
}

#[test]
fn hostile_mutation_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let dynamic = small_dynamic(dir.path());
    let base = dir.path().join("base.vhd");
    drop(
        Vhd::create(
            &base,
            &VhdCreateOptions {
                block_size: 64 * 1024,
                ..VhdCreateOptions::dynamic(2 * MIB)
            },
        )
        .unwrap(),
    );
    let child = dir.path().join("child.vhd");
    let c = Vhd::create(
        &child,
        &VhdCreateOptions {
            block_size: 64 * 1024,
            ..VhdCreateOptions::differencing(&base)
        },
    )
    .unwrap();
    c.write_at(&[9; 1536], 65536 + 512).unwrap();
    drop(c);
    let diff = std::fs::read(&child).unwrap();
    let fixed_p = dir.path().join("fixed.vhd");
    let f = Vhd::create(&fixed_p, &VhdCreateOptions::fixed(64 * 1024)).unwrap();
    f.write_at(&[3; 4096], 0).unwrap();
    drop(f);
    let fixed = std::fs::read(&fixed_p).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut opened = 0;
    for iter in 0..3000 {
        let src = match iter % 3 {
            0 => &dynamic,
            1 => &diff,
            _ => &fixed,
        };
        let mut b = src.clone();
        let n = b.len();
        for _ in 0..1 + rng.below(6) {
            // Aim mostly at metadata: the first 8 KiB and the trailing footer.
            let at = match rng.below(4) {
                0 => rng.below(n),
                1 => n - 512 + rng.below(512),
                _ => rng.below(8192.min(n)),
            };
            b[at] = match rng.below(3) {
                0 => b[at] ^ (1 << rng.below(8)),
                1 => 0xff,
                _ => rng.next() as u8,
            };
        }
        // Footer checksums are recomputed half of the time so that deeper fields get tested.
        if iter % 2 == 0 {
            for at in [0, n - 512] {
                if &b[at..at + 8] == footer::FOOTER_COOKIE {
                    refooter(&mut b, at, |_| {});
                }
            }
        }
        if rng.below(8) == 0 {
            b.truncate(rng.below(n));
        }
        // Parents are resolved in the temp dir for differencing inputs.
        let dirp = (iter % 3 == 1).then_some(dir.path());
        if let Ok(v) = Vhd::open_storage(mem(b), true, dirp) {
            opened += 1;
            poke(&v, rng.next());
        }
    }
    assert!(
        opened > 100,
        "the corpus should open often enough to test reads ({opened})"
    );
}

#[test]
fn recovers_from_a_missing_trailing_footer() {
    // The state after a crash between appending a block and writing the footer behind it.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = small_dynamic(dir.path());
    bytes.truncate(bytes.len() - 512);
    let v = Vhd::open_storage(mem(bytes), false, None).unwrap();
    assert!(
        !v.check().unwrap().errors.is_empty(),
        "check reports the missing footer"
    );
    v.write_at(&pattern(4096, 7), 2 * MIB).unwrap();
    v.flush().unwrap();
    let r = v.check().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    let mut b = vec![0u8; 4096];
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(b, pattern(4096, 1));
    let again = Vhd::open_storage(mem(v.storage_contents()), true, None).unwrap();
    again.read_at(&mut b, 2 * MIB).unwrap();
    assert_eq!(b, pattern(4096, 7));
    assert!(again.check().unwrap().errors.is_empty());
}

impl Vhd {
    /// The bytes of an image held in memory (tests only).
    fn storage_contents(&self) -> Vec<u8> {
        let len = self.storage.len().unwrap();
        let mut b = vec![0u8; len as usize];
        self.storage.read_at(&mut b, 0).unwrap();
        b
    }
}
