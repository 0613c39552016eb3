//! Differencing VHDX (qemu has no support, so these check Parvis against its own model):
//! sector bitmaps, parent resolution, linkage checks, loops and the depth limit.

#[path = "vhdx_common.rs"]
mod common;

use std::path::Path;

use common::*;
use parvis_disk::vhdx::{MAX_CHAIN_DEPTH, Variant, Vhdx, VhdxCreateOptions, VhdxOpenOptions};
use parvis_disk::{AllocationState, BlockDevice, DiskError};

const MIB: u64 = 1 << 20;
const RO: VhdxOpenOptions = VhdxOpenOptions {
    read_only: true,
    allow_replay: false,
};
const RW: VhdxOpenOptions = VhdxOpenOptions {
    read_only: false,
    allow_replay: false,
};

fn base(path: &Path, logical: u32) -> Vec<u8> {
    let mut o = VhdxCreateOptions::dynamic(16 * MIB);
    o.block_size = 1 << 20;
    o.logical_sector_size = logical;
    let v = Vhdx::create(path, &o).unwrap();
    let data = pattern(9, 16 << 20);
    v.write_at(&data[..10 << 20], 0).unwrap();
    data[..10 << 20]
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0, 6 << 20))
        .collect()
}

#[test]
fn child_reads_parent_and_its_own_sectors() {
    for logical in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let bp = dir.path().join("base.vhdx");
        let mut model = base(&bp, logical);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let cp = dir.path().join("sub/child.avhdx");
        let c = Vhdx::create(&cp, &VhdxCreateOptions::differencing(&bp)).unwrap();
        assert_eq!(c.variant(), Variant::Differencing);
        assert_eq!(c.size(), 16 * MIB);
        assert_eq!(c.logical_sector_size(), logical);
        let writes: [(u64, usize); 5] = [
            (4096, 512),             // one 512-byte sector (RMW inside a 4 KiB sector)
            (MIB - 1024, 4096),      // across two blocks
            (3 * MIB, 1 << 20),      // a whole block
            (12 * MIB + 8192, 8192), // past the parent's data
            (5 * MIB + 512 * 9, 1536),
        ];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let d = pattern(50 + i as u8, len);
            c.write_at(&d, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&d);
        }
        let check = |v: &Vhdx, model: &[u8]| {
            let mut got = vec![0u8; 16 << 20];
            v.read_at(&mut got, 0).unwrap();
            assert!(got == model, "logical {logical}: child contents differ");
        };
        check(&c, &model);
        let a = c.allocation(0, 16 * MIB).unwrap();
        assert_eq!(a.state, AllocationState::Unallocated);
        assert_eq!(
            c.allocation(3 * MIB, MIB).unwrap().state,
            AllocationState::Data
        );
        drop(c);
        let c = Vhdx::open(&cp, &RO).unwrap();
        assert_eq!(
            c.parent_path().unwrap().canonicalize().unwrap(),
            bp.canonicalize().unwrap()
        );
        check(&c, &model);
        let r = c.check().unwrap();
        assert!(r.errors.is_empty(), "{r:?}");
        let info = c.info();
        assert_eq!(info.variant, "differencing");
        assert!(
            info.allocated >= (1 << 20) && info.allocated < 4 << 20,
            "{info:?}"
        );
        drop(c);
        // Reopen writable and write over partially present blocks.
        let c = Vhdx::open(&cp, &RW).unwrap();
        let d = pattern(77, 4096);
        c.write_at(&d, 4096 * 2).unwrap();
        model[8192..12288].copy_from_slice(&d);
        check(&c, &model);
        drop(c);
        check(&Vhdx::open(&cp, &RO).unwrap(), &model);
        // The parent moved with its child: resolved through relative_path.
        let moved = tempfile::tempdir().unwrap();
        std::fs::create_dir(moved.path().join("sub")).unwrap();
        std::fs::rename(&bp, moved.path().join("base.vhdx")).unwrap();
        std::fs::rename(&cp, moved.path().join("sub/child.avhdx")).unwrap();
        check(
            &Vhdx::open(&moved.path().join("sub/child.avhdx"), &RO).unwrap(),
            &model,
        );
    }
}

#[test]
fn modified_parent_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("base.vhdx");
    base(&bp, 512);
    let cp = dir.path().join("child.avhdx");
    drop(Vhdx::create(&cp, &VhdxCreateOptions::differencing(&bp)).unwrap());
    assert!(Vhdx::open(&cp, &RO).is_ok());
    // Writing to the parent changes its DataWriteGuid.
    let b = Vhdx::open(&bp, &RW).unwrap();
    b.write_at(&[1; 512], 0).unwrap();
    drop(b);
    match Vhdx::open(&cp, &RO) {
        Err(DiskError::Parent { source, .. }) => {
            assert!(matches!(*source, DiskError::Corrupt { .. }), "{source}")
        }
        other => panic!("expected a parent linkage error, got {other:?}"),
    }
    // A missing parent.
    std::fs::remove_file(&bp).unwrap();
    assert!(matches!(
        Vhdx::open(&cp, &RO),
        Err(DiskError::Parent { .. })
    ));
}

#[test]
fn loops_and_deep_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: usize| dir.path().join(format!("d{n}.vhdx"));
    base(&p(0), 512);
    for n in 1..MAX_CHAIN_DEPTH {
        drop(Vhdx::create(&p(n), &VhdxCreateOptions::differencing(p(n - 1))).unwrap());
    }
    // d15 has 16 images in its chain: allowed. d16 would have 17.
    assert!(Vhdx::open(&p(MAX_CHAIN_DEPTH - 1), &RO).is_ok());
    let deep = Vhdx::create(
        &p(MAX_CHAIN_DEPTH),
        &VhdxCreateOptions::differencing(p(MAX_CHAIN_DEPTH - 1)),
    );
    assert!(
        matches!(deep, Err(DiskError::ParentChain { .. })),
        "{deep:?}"
    );
    assert!(
        !p(MAX_CHAIN_DEPTH).exists(),
        "a failed create leaves no file"
    );
    // A loop: make d0 a copy of d2 (whose parent is d1, whose parent is d0).
    std::fs::copy(p(2), p(0)).unwrap();
    assert!(matches!(
        Vhdx::open(&p(1), &RO),
        Err(DiskError::ParentChain { .. })
    ));
}

#[test]
fn child_without_a_directory_cannot_find_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("base.vhdx");
    base(&bp, 512);
    let cp = dir.path().join("child.avhdx");
    drop(Vhdx::create(&cp, &VhdxCreateOptions::differencing(&bp)).unwrap());
    let bytes = std::fs::read(&cp).unwrap();
    // The absolute path in the locator still finds it.
    let s = parvis_disk::storage::MemStorage::new(bytes.clone(), 1 << 30);
    assert!(Vhdx::open_storage(Box::new(s), &RO, None).is_ok());
    std::fs::rename(&bp, dir.path().join("elsewhere.vhdx")).unwrap();
    let s = parvis_disk::storage::MemStorage::new(bytes, 1 << 30);
    assert!(matches!(
        Vhdx::open_storage(Box::new(s), &RO, None),
        Err(DiskError::Parent { .. })
    ));
}

#[test]
fn shrinking_a_child_drops_blocks_and_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("base.vhdx");
    // 8 GiB parent: a child's sector bitmap covers 4 GiB (2 MiB blocks, 512-byte sectors),
    // so the child has two chunks.
    let v = Vhdx::create(&bp, &VhdxCreateOptions::dynamic(8 << 30)).unwrap();
    v.write_at(&pattern(1, 1 << 20), 0).unwrap();
    drop(v);
    let cp = dir.path().join("child.avhdx");
    let c = Vhdx::create(&cp, &VhdxCreateOptions::differencing(&bp)).unwrap();
    // Partial blocks: each allocates a payload block and its chunk's bitmap block.
    c.write_at(&pattern(2, 4096), 4096).unwrap();
    c.write_at(&pattern(3, 4096), (6 << 30) + 8192).unwrap();
    c.flush().unwrap();
    let len0 = std::fs::metadata(&cp).unwrap().len();
    c.resize(2 << 30).unwrap();
    // The second chunk's payload block (2 MiB) and bitmap (1 MiB) were at the end.
    assert_eq!(std::fs::metadata(&cp).unwrap().len(), len0 - 3 * MIB);
    let r = c.check().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    // Growing again: the dropped range reads from the parent (zeros there), the kept
    // partial block still reads both its own and the parent's sectors.
    c.resize(8 << 30).unwrap();
    let mut b = vec![0xffu8; 16384];
    c.read_at(&mut b, 6 << 30).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    c.read_at(&mut b, 0).unwrap();
    let mut want = pattern(1, 16384);
    want[4096..8192].copy_from_slice(&pattern(2, 4096));
    assert_eq!(b, want);
    drop(c);
    let c = Vhdx::open(&cp, &RO).unwrap();
    assert!(c.check().unwrap().errors.is_empty());
    c.read_at(&mut b, 0).unwrap();
    assert_eq!(b, want);
}
