use std::sync::Arc;

use super::*;
use crate::part::read_layout;
use crate::testutil::{Scratch, disk};
use crate::{Error, Limits, Slice};

/// A Debian-like root with /boot on its own ext4 and the ESP on FAT, in one GPT disk.
fn debian_like(s: &Scratch) -> Arc<dyn ReadAt> {
    s.tree(
        "root",
        &[
            (
                "etc/fstab",
                "UUID=22222222-2222-2222-2222-222222222222 /boot ext4 defaults 0 2\n",
            ),
            ("vmlinuz", "->boot/vmlinuz-6.1.0-9-amd64"),
            ("initrd.img", "->/boot/initrd.img-6.1.0-9-amd64"),
            ("boot/.keep", ""),
            ("loop1", "->loop2"),
            ("loop2", "->loop1"),
            ("up", "->../../../etc"),
            ("etc/default/grub", "GRUB_DEFAULT=0\n"),
            ("etc/alternatives/grub", "->../default/grub"),
        ],
    );
    s.tree(
        "boot",
        &[
            ("vmlinuz-6.1.0-9-amd64", "KERNEL"),
            ("initrd.img-6.1.0-9-amd64", "INITRD"),
            ("grub/grub.cfg", "set default=0\n"),
            ("big", &"x".repeat(5000)),
        ],
    );
    s.tree(
        "esp",
        &[("EFI/debian/grub.cfg", "search.fs_uuid 2222 root\n")],
    );
    let root = s.ext4("root", "root", 16, "11111111-1111-1111-1111-111111111111");
    let boot = s.ext4("boot", "boot", 8, "22222222-2222-2222-2222-222222222222");
    let esp = s.vfat("esp", "esp", 8, "abcd1234");
    let img = s.partitioned(
        "d",
        64,
        "label: gpt\n,8M,U\n,8M,L\n,,L",
        &[(1, &esp), (2, &boot), (3, &root)],
    );
    disk(&img)
}

fn part(d: &Arc<dyn ReadAt>, n: usize) -> Arc<dyn ReadAt> {
    let l = read_layout(d.as_ref()).unwrap();
    let p = &l.partitions[n - 1];
    Arc::new(Slice::new(d.clone(), p.start, p.len))
}

#[test]
fn each_file_system_is_recognised_and_names_itself() {
    let s = Scratch::new();
    let d = debian_like(&s);
    let esp = open(part(&d, 1), "partition 1").unwrap().unwrap();
    assert_eq!(esp.kind(), "vfat");
    assert_eq!(esp.uuid().as_deref(), Some("abcd-1234"));
    assert_eq!(esp.label().as_deref(), Some("ESP"));
    let boot = open(part(&d, 2), "partition 2").unwrap().unwrap();
    assert_eq!(boot.kind(), "ext4");
    assert_eq!(
        boot.uuid().as_deref(),
        Some("22222222-2222-2222-2222-222222222222")
    );
    assert_eq!(boot.label().as_deref(), Some("boot"));
    assert_eq!(sniff(part(&d, 3).as_ref()), Some("ext4"));
    let blank: Arc<dyn ReadAt> = Arc::new(vec![0u8; 1 << 20]);
    assert!(open(blank.clone(), "p").unwrap().is_none());
    assert_eq!(sniff(blank.as_ref()), None);
}

#[test]
fn the_namespace_follows_links_across_mounts() {
    let s = Scratch::new();
    let d = debian_like(&s);
    let root = open(part(&d, 3), "partition 3").unwrap().unwrap();
    let boot = open(part(&d, 2), "partition 2").unwrap().unwrap();
    let esp = open(part(&d, 1), "partition 1").unwrap().unwrap();
    let mut ns = Namespace::new(
        root.as_ref(),
        3,
        Limits {
            config: 4096,
            ..Limits::default()
        },
    );
    // Before /boot is mounted, the root's own (empty) /boot is what the links reach.
    assert!(matches!(
        ns.read("/vmlinuz", 1 << 20),
        Err(Error::NotFound(_))
    ));
    ns.mount("/boot", boot.as_ref(), 2);
    ns.mount("/boot/efi", esp.as_ref(), 1);
    assert_eq!(ns.read("/vmlinuz", 1 << 20).unwrap(), b"KERNEL");
    assert_eq!(
        ns.locate_path("/initrd.img").unwrap().0,
        Located {
            tag: 2,
            path: "/initrd.img-6.1.0-9-amd64".into()
        }
    );
    assert_eq!(ns.read("/initrd.img", 1 << 20).unwrap(), b"INITRD");
    assert_eq!(
        ns.resolve("/vmlinuz").unwrap(),
        (
            "/boot/vmlinuz-6.1.0-9-amd64".into(),
            FileKind::File { size: 6 }
        )
    );
    // `..` above a mount point climbs into the file system below it, and above / stays.
    assert_eq!(
        ns.read_text("/boot/efi/../grub/grub.cfg").unwrap(),
        "set default=0\n"
    );
    assert!(ns.read_text("/up/fstab").unwrap().contains("/boot ext4"));
    // A relative target's `..` climbs from the link's own directory.
    assert_eq!(
        ns.read_text("/etc/alternatives/grub").unwrap(),
        "GRUB_DEFAULT=0\n"
    );
    // FAT names match whatever their case.
    assert_eq!(
        ns.read_text("/boot/efi/efi/DEBIAN/grub.cfg").unwrap(),
        "search.fs_uuid 2222 root\n"
    );
    let mut names = ns.list("/boot").unwrap();
    names.sort();
    assert!(
        names.contains(&"vmlinuz-6.1.0-9-amd64".to_string()),
        "{names:?}"
    );
    assert!(!names.contains(&".".to_string()));
}

#[test]
fn loops_sizes_and_kinds_fail_with_their_reason() {
    let s = Scratch::new();
    let d = debian_like(&s);
    let root = open(part(&d, 3), "partition 3").unwrap().unwrap();
    let boot = open(part(&d, 2), "partition 2").unwrap().unwrap();
    let mut ns = Namespace::new(
        root.as_ref(),
        3,
        Limits {
            config: 4096,
            ..Limits::default()
        },
    );
    ns.mount("/boot", boot.as_ref(), 2);
    assert!(matches!(ns.read("/loop1", 100), Err(Error::SymlinkLoop(_))));
    assert!(matches!(
        ns.read_text("/boot/big"),
        Err(Error::TooLarge { limit: 4096, .. })
    ));
    assert_eq!(ns.read("/boot/big", 5000).unwrap().len(), 5000);
    assert!(matches!(
        ns.read("/boot/grub", 100),
        Err(Error::WrongKind {
            what: "a directory",
            ..
        })
    ));
    assert!(matches!(
        ns.read("/etc/fstab/x", 100),
        Err(Error::WrongKind { .. })
    ));
    assert!(matches!(ns.read("/nope", 100), Err(Error::NotFound(_))));
}

#[test]
fn corrupt_file_systems_are_errors_not_panics() {
    let s = Scratch::new();
    let d = debian_like(&s);
    for n in [1usize, 2] {
        let p = part(&d, n);
        let mut bytes = vec![0u8; p.size() as usize];
        p.read_at(&mut bytes, 0).unwrap();
        // Scribble over the metadata after the superblock / boot sector, keep the magic.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for b in bytes.iter_mut().skip(2048).take(256 << 10) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            *b = rng as u8;
        }
        let bad: Arc<dyn ReadAt> = Arc::new(bytes);
        if let Ok(Some(fs)) = open(bad, "p") {
            let ns = Namespace::new(fs.as_ref(), 0, Limits::default());
            let _ = ns.list("/");
            let _ = ns.read("/EFI/debian/grub.cfg", 1 << 20);
            let _ = ns.read("/grub/grub.cfg", 1 << 20);
        }
    }
}

#[test]
fn an_ext4_claiming_billions_of_block_groups_is_an_error() {
    // Found by the ext4 fuzz target: ext4-view 1.0 reserves memory for every block group
    // the superblock claims (here 2^32 - 1, tens of GB) before reading any, which aborts.
    let bytes = include_bytes!("../../fuzz/seeds/ext4/group-count-oom").to_vec();
    let e = Ext4Fs::open(Arc::new(bytes), "p").err().unwrap();
    assert!(
        e.to_string().contains("more than the partition can hold"),
        "{e}"
    );
}

#[test]
fn an_ext4_link_claiming_a_terabyte_is_an_error() {
    // Found by the ext4 fuzz target: ext4-view 1.0 allocates a link kept in blocks at the
    // size its inode claims (here 1 TiB) before reading it, which aborts.
    let bytes = include_bytes!("../../fuzz/seeds/ext4/link-size-oom").to_vec();
    let fs = Ext4Fs::open(Arc::new(bytes), "p").unwrap();
    let mut links = 0;
    let mut dirs = vec!["/".to_string()];
    while let Some(d) = dirs.pop() {
        for n in fs.list(&d, 256).unwrap_or_default() {
            let p = format!("{}/{n}", d.trim_end_matches('/'));
            match fs.kind_of(&p) {
                Ok(FileKind::Dir) if dirs.len() < 16 => dirs.push(p),
                Ok(FileKind::Symlink) => {
                    links += 1;
                    if let Err(e) = fs.read_link(&p) {
                        assert!(matches!(e, Error::BadFs { .. }), "{e}");
                    }
                }
                _ => {}
            }
        }
    }
    assert!(links > 0);
}

#[test]
fn a_fat_volume_that_makes_fatfs_panic_is_an_error() {
    // Found by the vfat fuzz target: fatfs 0.3.6's cluster arithmetic overflows on it. The
    // reader's guard turns the panic into an error; nothing escapes.
    let bytes = include_bytes!("../../fuzz/seeds/vfat/cluster-underflow").to_vec();
    let part: Arc<dyn ReadAt> = Arc::new(bytes);
    if let Ok(fs) = FatFs::open(part, "p") {
        let ns = Namespace::new(&fs, 0, Limits::default());
        let mut dirs = vec!["/".to_string()];
        let mut errors = 0;
        while let Some(d) = dirs.pop() {
            match ns.list(&d) {
                Ok(names) => {
                    for n in names.into_iter().take(64) {
                        let p = format!("{}/{n}", d.trim_end_matches('/'));
                        match fs.kind_of(&p) {
                            Ok(FileKind::Dir) if dirs.len() < 16 => dirs.push(p),
                            Ok(_) => errors += ns.read(&p, 1 << 16).is_err() as usize,
                            Err(_) => errors += 1,
                        }
                    }
                }
                Err(e) => {
                    assert!(matches!(e, Error::BadFs { .. } | Error::NotFound(_)), "{e}");
                    errors += 1;
                }
            }
        }
        assert!(errors > 0, "the corrupt volume read cleanly");
    }
}

/// `len` bytes that differ from offset to offset and from seed to seed (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// What xfs_db prints for `field` of the inode at `path` ("core.format = 3 (btree)").
fn xfs_db(s: &Scratch, img: &std::path::Path, path: &str, field: &str) -> String {
    s.sh(&format!(
        "xfs_db -r -c 'path {path}' -c 'p {field}' {}",
        img.display()
    ))
    .trim()
    .to_string()
}

const XFS_UUID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
const KERNEL: &str = "vmlinuz-6.1.0-27-amd64";

/// A /boot as an installer leaves it, plus directories big enough for every directory form
/// and a symbolic link too long to live in its inode.
fn xfs_boot_tree(s: &Scratch, root: &str) -> (Vec<u8>, Vec<u8>, String) {
    let kernel = noise((6 << 20) + 123, 1);
    let initrd = noise((3 << 20) + 7, 2);
    // A link of about 1000 bytes (XFS's limit is 1024) that still names the kernel.
    let deep = format!("{}{KERNEL}", "./".repeat(480));
    s.tree(
        root,
        &[
            ("vmlinuz", &format!("->{KERNEL}")),
            ("initrd.img", "->/initrd.img-6.1.0-27-amd64"),
            ("deep", &format!("->{deep}")),
            (
                "loader/entries/0123456789abcdef-6.1.0-27-amd64.conf",
                "title Linux 6.1.0-27\nversion 6.1.0-27-amd64\nlinux /vmlinuz-6.1.0-27-amd64\ninitrd /initrd.img-6.1.0-27-amd64\noptions root=UUID=1234 ro quiet\n",
            ),
            ("grub2/grub.cfg", "set default=0\nblscfg\n"),
            ("grub2/cfg-link", "->../grub2/grub.cfg"),
            ("empty", ""),
        ],
    );
    std::fs::write(s.path(root).join(KERNEL), &kernel).unwrap();
    std::fs::write(s.path(root).join("initrd.img-6.1.0-27-amd64"), &initrd).unwrap();
    // 40 entries: too many for the inode, one directory block. 300: several data blocks and
    // one leaf block. 2000: a node directory, whose blocks interleave with its files' so
    // that its own extents need a bmap btree.
    for (dir, n) in [("block", 40), ("leaf", 300), ("node", 2000)] {
        std::fs::create_dir_all(s.path(root).join(dir)).unwrap();
        for i in 0..n {
            std::fs::write(
                s.path(root)
                    .join(dir)
                    .join(format!("kernel-config-6.1.0-27-amd64-{i:05}")),
                format!("{dir} entry {i}\n"),
            )
            .unwrap();
        }
    }
    (kernel, initrd, deep)
}

#[test]
fn xfs_boot_trees_read_back_as_written_in_every_form() {
    let s = Scratch::new();
    let (kernel, initrd, deep) = xfs_boot_tree(&s, "boot");
    for (name, opts) in [
        ("v5", ""),
        ("v5sect4k", "-s size=4096"),
        ("v5blk1k", "-b size=1024 -i nrext64=1"),
        ("v4", "-m crc=0"),
        // 512-byte blocks, 8 KiB directory blocks (each spans 16 file system blocks, which
        // may lie in different extents), no file types in directory entries.
        ("v4blk512", "-m crc=0 -b size=512 -n size=8192,ftype=0"),
    ] {
        let img = s.xfs(name, "boot", 64, XFS_UUID, opts);
        // What the test covers, as xfs_db sees it.
        for (path, field, want) in [
            ("/node", "core.format", "btree"),
            ("/leaf", "core.format", "extents"),
            ("/block", "core.format", "extents"),
            ("/loader", "core.format", "local"),
            ("/deep", "core.format", "extents"),
            ("/vmlinuz", "core.format", "local"),
        ] {
            let got = xfs_db(&s, &img, path, field);
            assert!(got.contains(want), "{name} {path}: {got}");
        }
        let part: Arc<dyn ReadAt> = Arc::new(std::fs::File::open(&img).unwrap());
        assert_eq!(sniff(part.as_ref()), Some("xfs"));
        let fs = open(part, "partition 2").unwrap().unwrap();
        assert_eq!(fs.kind(), "xfs");
        assert_eq!(fs.uuid().as_deref(), Some(XFS_UUID), "{name}");
        assert_eq!(fs.label().as_deref(), Some(name));
        let ns = Namespace::new(fs.as_ref(), 0, Limits::default());
        assert_eq!(
            ns.read(&format!("/{KERNEL}"), 64 << 20).unwrap(),
            kernel,
            "{name}"
        );
        assert_eq!(ns.read("/vmlinuz", 64 << 20).unwrap(), kernel, "{name}");
        assert_eq!(ns.read("/initrd.img", 64 << 20).unwrap(), initrd, "{name}");
        // mkfs.xfs 6.1 writes a v5 link's remote block without its header (the kernel then
        // refuses the link); later versions write it. Whatever xfs_db says, the reader says.
        let link_block = s.sh(&format!(
            "xfs_db -r -c 'path /deep' -c 'dblock 0' -c 'type symlink' -c 'p magic crc' {} 2>&1",
            img.display()
        ));
        if opts.contains("crc=0") || link_block.contains("(correct)") {
            assert_eq!(fs.read_link("/deep").unwrap(), deep, "{name}");
            assert_eq!(ns.read("/deep", 64 << 20).unwrap(), kernel, "{name}");
        } else {
            assert!(link_block.contains("(bad)"), "{name}: {link_block}");
            let e = fs.read_link("/deep").unwrap_err();
            assert!(e.to_string().contains("header is corrupt"), "{e}");
        }
        assert_eq!(
            fs.read_link("/initrd.img").unwrap(),
            "/initrd.img-6.1.0-27-amd64"
        );
        assert_eq!(
            ns.read_text("/grub2/cfg-link").unwrap(),
            "set default=0\nblscfg\n"
        );
        assert_eq!(
            ns.list("/loader/entries").unwrap(),
            ["0123456789abcdef-6.1.0-27-amd64.conf"]
        );
        assert!(
            ns.read_text("/loader/entries/0123456789abcdef-6.1.0-27-amd64.conf")
                .unwrap()
                .contains("options root=UUID=1234 ro quiet\n")
        );
        assert_eq!(ns.read("/empty", 10).unwrap(), b"");
        for (dir, n) in [("block", 40), ("leaf", 300), ("node", 2000)] {
            let mut names = ns.list(&format!("/{dir}")).unwrap();
            names.sort();
            let want: Vec<String> = (0..n)
                .map(|i| format!("kernel-config-6.1.0-27-amd64-{i:05}"))
                .collect();
            assert_eq!(names, want, "{name} /{dir}");
            for i in (0..n).step_by(37).chain([n - 1]) {
                assert_eq!(
                    ns.read_text(&format!("/{dir}/kernel-config-6.1.0-27-amd64-{i:05}"))
                        .unwrap(),
                    format!("{dir} entry {i}\n"),
                    "{name}"
                );
            }
        }
        let mut root = ns.list("/").unwrap();
        root.sort();
        assert_eq!(
            root,
            [
                "block",
                "deep",
                "empty",
                "grub2",
                "initrd.img",
                "initrd.img-6.1.0-27-amd64",
                "leaf",
                "loader",
                "node",
                "vmlinuz",
                KERNEL
            ]
        );
        assert_eq!(fs.list("/node", 10).unwrap().len(), 10);
        assert_eq!(fs.kind_of("/vmlinuz").unwrap(), FileKind::Symlink);
        assert_eq!(fs.kind_of("/node").unwrap(), FileKind::Dir);
        assert_eq!(
            fs.kind_of("/node/kernel-config-6.1.0-27-amd64-00007")
                .unwrap(),
            FileKind::File { size: 13 }
        );
        assert!(matches!(
            ns.read("/node/nope", 100),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            ns.read("/grub2", 100),
            Err(Error::WrongKind { .. })
        ));
        assert!(matches!(
            fs.read("/vmlinuz-6.1.0-27-amd64", 1 << 20),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            fs.kind_of("/empty/x"),
            Err(Error::WrongKind { .. })
        ));
    }
}

/// Unmounts a loop-mounted image when dropped, so that a failing test leaves no mount.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn xfs_files_the_kernel_fragmented_left_sparse_or_preallocated_read_as_written() {
    // mkfs.xfs writes each prototype file in one piece; only the kernel leaves holes,
    // preallocates (unwritten extents), fragments a file and writes v5 remote link headers.
    // So this test loop-mounts its images: it needs root and the kernel's xfs (CI has both).
    // Kernels built without v4 support (as this machine's) refuse to mount v4: the v4 bmap
    // btree is covered by the node directories above.
    let s = Scratch::new();
    for (name, opts) in [("v5", ""), ("v5blk1k", "-b size=1024 -i nrext64=1")] {
        let img = s.xfs(name, "none", 64, XFS_UUID, opts);
        let mnt = s.path(&format!("{name}.mnt"));
        std::fs::create_dir_all(&mnt).unwrap();
        s.sh(&format!(
            "mount -o loop,allocsize=4k {} {}",
            img.display(),
            mnt.display()
        ));
        let mounted = Mounted(mnt.clone());
        // sparse: 100 pieces of 64 KiB with 64 KiB holes between them (100 extents: a bmap
        // btree), a hole preallocated, a preallocated MiB with 4 KiB written in its middle,
        // and a hole at the end.
        let mut cmds = String::new();
        for i in 0..100u64 {
            cmds.push_str(&format!(
                " -c 'pwrite -q -S {} {} 65536'",
                i + 1,
                i * 131072
            ));
        }
        cmds.push_str(" -c 'falloc 65536 65536' -c 'falloc 14680064 1048576'");
        cmds.push_str(" -c 'pwrite -q -S 0x77 14942208 4096' -c 'truncate 16777216'");
        s.sh(&format!("xfs_io -f {cmds} {}/sparse", mnt.display()));
        // frag: written 4 KiB at a time in turns with another file, each piece synced, so that
        // its blocks interleave with the other's: no holes, 100 extents.
        s.sh(&format!(
            "cd {}; for i in $(seq 0 99); do
                 xfs_io -f -c \"pwrite -q -S $((i + 1)) $((i * 4096)) 4096\" -c fsync frag
                 xfs_io -f -c \"pwrite -q -S 0xee $((i * 4096)) 4096\" -c fsync other
             done
             ln -s \"$(printf './%.0s' $(seq 480))frag\" deep",
            mnt.display()
        ));
        drop(mounted);
        for (path, want) in [
            ("/sparse", "btree"),
            ("/frag", "btree"),
            ("/deep", "extents"),
        ] {
            let got = xfs_db(&s, &img, path, "core.format");
            assert!(got.contains(want), "{name} {path}: {got}");
        }
        let map = s.sh(&format!(
            "xfs_db -r -c 'path /sparse' -c 'bmap' {}",
            img.display()
        ));
        assert!(map.contains("flag 1"), "no unwritten extent: {map}");
        let mut sparse = vec![0u8; 16 << 20];
        for i in 0..100usize {
            sparse[i * 131072..i * 131072 + 65536].fill(i as u8 + 1);
        }
        sparse[14942208..14942208 + 4096].fill(0x77);
        let frag: Vec<u8> = (0..100u8).flat_map(|i| [i + 1; 4096]).collect();

        let part: Arc<dyn ReadAt> = Arc::new(std::fs::File::open(&img).unwrap());
        let fs = open(part, "p").unwrap().unwrap();
        let ns = Namespace::new(fs.as_ref(), 0, Limits::default());
        assert!(ns.read("/sparse", 16 << 20).unwrap() == sparse, "{name}");
        assert_eq!(ns.read("/frag", 1 << 20).unwrap(), frag, "{name}");
        assert_eq!(ns.read("/other", 1 << 20).unwrap(), vec![0xee; 409600]);
        assert_eq!(fs.read_link("/deep").unwrap().len(), 960 + 4);
        assert_eq!(ns.read("/deep", 1 << 20).unwrap(), frag, "{name}");
    }
}

#[test]
fn corrupt_xfs_is_an_error_not_a_panic() {
    let s = Scratch::new();
    xfs_boot_tree(&s, "boot");
    for (name, opts) in [("v5", ""), ("v4", "-m crc=0")] {
        let img = s.xfs(name, "boot", 64, XFS_UUID, opts);
        let clean = std::fs::read(&img).unwrap();
        // Scribble over the metadata after the superblock (AG headers, inodes, directory
        // and btree blocks, most of them in the first MiB), keeping the superblock.
        for seed in 1..=8u64 {
            let mut bytes = clean.clone();
            let start = 512 * seed as usize;
            let junk = noise(1 << 20, seed);
            for (i, b) in bytes.iter_mut().skip(start).take(1 << 20).enumerate() {
                if i % (seed as usize + 1) == 0 {
                    *b = junk[i];
                }
            }
            let bad: Arc<dyn ReadAt> = Arc::new(bytes);
            if let Ok(Some(fs)) = open(bad, "p") {
                let ns = Namespace::new(fs.as_ref(), 0, Limits::default());
                for d in ["/", "/node", "/leaf", "/block", "/loader/entries"] {
                    let _ = ns.list(d);
                }
                let _ = ns.read("/vmlinuz", 64 << 20);
                let _ = ns.read("/deep", 64 << 20);
                let _ = ns.read_text("/grub2/grub.cfg");
            }
        }
        // A v5 superblock whose checksum no longer matches is refused with that reason.
        if name == "v5" {
            let mut bytes = clean.clone();
            bytes[108] ^= 1; // the label
            let e = open(Arc::new(bytes), "partition 2").err().unwrap();
            assert_eq!(
                e.to_string(),
                "the xfs file system on partition 2 cannot be read: its superblock checksum \
                 is wrong"
            );
        }
    }
}

#[test]
fn the_xfs_fuzz_seeds_hold_a_readable_boot() {
    // The seeds are the first KiBs of file systems made with an external log (so that the
    // data device starts with the inodes and files), cut after the last file.
    for seed in ["small-v5", "small-v4"] {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds/xfs")
            .join(seed);
        let part: Arc<dyn ReadAt> = Arc::new(std::fs::read(p).unwrap());
        let fs = XfsFs::open(part, "seed").unwrap();
        let ns = Namespace::new(&fs, 0, Limits::default());
        assert_eq!(ns.list("/d").unwrap().len(), 40, "{seed}");
        assert_eq!(ns.read_text("/d/entry-7").unwrap(), "7\n");
        assert_eq!(ns.read("/vmlinuz", 1 << 20).unwrap().len(), 3000, "{seed}");
        assert_eq!(ns.read("/deep", 1 << 20).unwrap().len(), 3000, "{seed}");
        assert_eq!(
            ns.read("/initramfs-6.1.0.img", 1 << 20).unwrap().len(),
            1500
        );
        assert!(
            ns.read_text("/loader/entries/abc-6.1.0.conf")
                .unwrap()
                .starts_with("title Linux\n")
        );
        assert_eq!(
            ns.read_text("/grub2/grub.cfg").unwrap(),
            "set default=0\nblscfg\n"
        );
    }
}

const BTRFS_UUID: &str = "5a6b7c8d-9e0f-4123-8456-789abcdef012";

#[test]
fn btrfs_boot_trees_read_back_as_written() {
    let s = Scratch::new();
    let (kernel, initrd, deep) = xfs_boot_tree(&s, "boot");
    for (name, opts) in [
        // DUP metadata in 16 KiB nodes, as mkfs.btrfs makes it by default.
        ("dup16k", ""),
        // Single metadata in 4 KiB nodes: the 2000-entry directory needs a deeper tree.
        ("single4k", "-m single -n 4096"),
        // Mixed data and metadata block groups, as small file systems get.
        ("mixed", "-M"),
        // Checksums this reader does not verify (it still checks each block's place).
        ("xxhash", "--csum xxhash"),
    ] {
        let img = s.btrfs(name, "boot", 96, BTRFS_UUID, opts);
        let tree = s.sh(&format!(
            "btrfs inspect-internal dump-tree -t fs {} | awk '/ level / && !x {{ print; x = 1 }}'",
            img.display()
        ));
        if name == "single4k" {
            assert!(!tree.contains("level 0"), "the fs tree is one leaf: {tree}");
        }
        let part: Arc<dyn ReadAt> = Arc::new(std::fs::File::open(&img).unwrap());
        assert_eq!(sniff(part.as_ref()), Some("btrfs"));
        let fs = open(part, "partition 2").unwrap().unwrap();
        assert_eq!(fs.kind(), "btrfs");
        assert_eq!(fs.uuid().as_deref(), Some(BTRFS_UUID), "{name}");
        assert_eq!(fs.label().as_deref(), Some(name));
        let ns = Namespace::new(fs.as_ref(), 0, Limits::default());
        assert!(
            ns.read(&format!("/{KERNEL}"), 64 << 20).unwrap() == kernel,
            "{name}"
        );
        assert!(ns.read("/vmlinuz", 64 << 20).unwrap() == kernel, "{name}");
        assert!(
            ns.read("/initrd.img", 64 << 20).unwrap() == initrd,
            "{name}"
        );
        assert_eq!(fs.read_link("/deep").unwrap(), deep, "{name}");
        assert!(ns.read("/deep", 64 << 20).unwrap() == kernel, "{name}");
        assert_eq!(
            ns.read_text("/grub2/cfg-link").unwrap(),
            "set default=0\nblscfg\n"
        );
        assert_eq!(
            ns.list("/loader/entries").unwrap(),
            ["0123456789abcdef-6.1.0-27-amd64.conf"]
        );
        assert_eq!(ns.read("/empty", 10).unwrap(), b"");
        for (dir, n) in [("block", 40), ("leaf", 300), ("node", 2000)] {
            let mut names = ns.list(&format!("/{dir}")).unwrap();
            names.sort();
            let want: Vec<String> = (0..n)
                .map(|i| format!("kernel-config-6.1.0-27-amd64-{i:05}"))
                .collect();
            assert_eq!(names, want, "{name} /{dir}");
            for i in (0..n).step_by(37).chain([n - 1]) {
                assert_eq!(
                    ns.read_text(&format!("/{dir}/kernel-config-6.1.0-27-amd64-{i:05}"))
                        .unwrap(),
                    format!("{dir} entry {i}\n"),
                    "{name}"
                );
            }
        }
        assert_eq!(fs.list("/node", 10).unwrap().len(), 10);
        assert_eq!(fs.kind_of("/vmlinuz").unwrap(), FileKind::Symlink);
        assert_eq!(fs.kind_of("/").unwrap(), FileKind::Dir);
        assert!(matches!(
            ns.read("/node/nope", 100),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            fs.read(&format!("/{KERNEL}"), 1 << 20),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            fs.kind_of("/empty/x"),
            Err(Error::WrongKind { .. })
        ));
    }
}

#[test]
fn btrfs_subvolumes_holes_preallocation_and_compression_as_the_kernel_writes_them() {
    // mkfs.btrfs --rootdir makes neither subvolumes, holes, preallocated nor compressed
    // extents: the kernel does, so this test loop-mounts its image (root and the kernel's
    // btrfs, as CI has). Ubuntu's layout: the top level holds the subvolume "@" with /boot
    // in it, and "@" holds a nested subvolume.
    let s = Scratch::new();
    let img = s.btrfs("subvols", "none", 128, BTRFS_UUID, "");
    let mnt = s.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = mnt.display();
    let kernel = noise((5 << 20) + 3, 7);
    std::fs::write(s.path("kernel"), &kernel).unwrap();
    s.sh(&format!("mount -o loop {} {m}", img.display()));
    let mounted = Mounted(mnt.clone());
    let mut cmds = String::new();
    // 1000 pieces of 4 KiB with holes between: 1000 extent items, over several leaves.
    for i in 0..1000u64 {
        cmds.push_str(&format!(
            " -c 'pwrite -q -S {} {} 4096'",
            i % 250 + 1,
            i * 8192
        ));
    }
    cmds.push_str(" -c 'falloc 65536 65536' -c 'falloc 14680064 1048576'");
    cmds.push_str(" -c 'pwrite -q -S 0x77 14942208 4096' -c 'truncate 16777216'");
    s.sh(&format!(
        "btrfs -q subvolume create {m}/@
         mkdir -p {m}/@/boot/grub {m}/@/etc
         cp ../kernel {m}/@/boot/vmlinuz-6.1.0-27-amd64
         ln -s vmlinuz-6.1.0-27-amd64 {m}/@/boot/vmlinuz
         echo 'set default=0' > {m}/@/boot/grub/grub.cfg
         btrfs -q subvolume create {m}/@/var
         echo 'in a nested subvolume' > {m}/@/var/note
         xfs_io -f {cmds} {m}/@/boot/sparse
         touch {m}/@/boot/packed
         btrfs property set {m}/@/boot/packed compression zstd
         {{ yes 'compress me' || true; }} | head -c 1000000 > {m}/@/boot/packed
         sync",
    )
    .replace("../kernel", &s.path("kernel").display().to_string()));
    drop(mounted);
    // What the test covers, as btrfs itself sees it.
    let tree = s.sh(&format!(
        "btrfs inspect-internal dump-tree {} 2>/dev/null",
        img.display()
    ));
    for want in [
        "type 2 (prealloc)",
        "compression 3 (zstd)",
        "(257 ROOT_ITEM 0)",
    ] {
        assert!(tree.contains(want), "{want} is not in the image");
    }
    let mut sparse = vec![0u8; 16 << 20];
    for i in 0..1000usize {
        sparse[i * 8192..i * 8192 + 4096].fill((i % 250) as u8 + 1);
    }
    sparse[14942208..14942208 + 4096].fill(0x77);

    let check = |fs: &dyn FileSystem, boot: &str| {
        let ns = Namespace::new(fs, 0, Limits::default());
        assert!(ns.read(&format!("{boot}/vmlinuz"), 64 << 20).unwrap() == kernel);
        assert_eq!(
            ns.read_text(&format!("{boot}/grub/grub.cfg")).unwrap(),
            "set default=0\n"
        );
        assert!(ns.read(&format!("{boot}/sparse"), 16 << 20).unwrap() == sparse);
        let e = ns.read(&format!("{boot}/packed"), 16 << 20).unwrap_err();
        assert!(
            e.to_string()
                .contains("compressed with zstd, which this reader does not decompress"),
            "{e}"
        );
    };
    // The top level is the default subvolume: "@" is a directory in it.
    let part: Arc<dyn ReadAt> = Arc::new(std::fs::read(&img).unwrap());
    let fs = open(part, "p").unwrap().unwrap();
    let mut top = fs.list("/", 100).unwrap();
    top.sort();
    assert_eq!(top, ["@"]);
    check(fs.as_ref(), "/@/boot");
    assert_eq!(
        fs.read("/@/var/note", 100).unwrap(),
        b"in a nested subvolume\n"
    );
    // "@" made the default subvolume, as openSUSE does with its snapshots: it is the root.
    s.sh(&format!(
        "mount -o loop {} {m}
         btrfs subvolume set-default {m}/@",
        img.display()
    ));
    drop(Mounted(mnt.clone()));
    let part: Arc<dyn ReadAt> = Arc::new(std::fs::read(&img).unwrap());
    let fs = open(part, "p").unwrap().unwrap();
    let mut top = fs.list("/", 100).unwrap();
    top.sort();
    assert_eq!(top, ["boot", "etc", "var"]);
    check(fs.as_ref(), "/boot");
    assert_eq!(
        fs.read("/var/note", 100).unwrap(),
        b"in a nested subvolume\n"
    );
}

#[test]
fn btrfs_raid_is_refused_and_corrupt_btrfs_is_an_error_not_a_panic() {
    let s = Scratch::new();
    s.tree("files", &[("boot/grub/grub.cfg", "set default=0\n")]);
    s.sh("truncate -s 128M r1.img r2.img
         mkfs.btrfs -q -f -d raid1 -m raid1 r1.img r2.img");
    let e = open(disk(&s.path("r1.img")), "partition 3").err().unwrap();
    assert_eq!(
        e.to_string(),
        "the btrfs file system on partition 3 cannot be read: it uses a RAID profile; only \
         single and DUP file systems are read"
    );
    xfs_boot_tree(&s, "boot");
    let img = s.btrfs("b", "boot", 96, BTRFS_UUID, "-n 4096");
    let clean = std::fs::read(&img).unwrap();
    // Scribble over the tree blocks (all past the superblock; 4 KiB nodes), keeping the
    // superblock: most are refused by their checksum, so also fix some checksums up.
    let nodes: Vec<usize> = (0x11000..clean.len())
        .step_by(4096)
        .filter(|&at| clean[at + 0x20..at + 0x30] == clean[0x10020..0x10030])
        .collect();
    assert!(nodes.len() > 10, "{} tree blocks", nodes.len());
    for seed in 1..=8u64 {
        let mut bytes = clean.clone();
        let junk = noise(4096, seed);
        for (k, &at) in nodes.iter().enumerate() {
            if !(k as u64 + seed).is_multiple_of(3) {
                continue;
            }
            // Flip bytes after the header: keys, pointers, item offsets and sizes.
            for j in (0x65..4096).step_by(seed as usize * 7 + 3) {
                bytes[at + j] ^= junk[j];
            }
            if seed.is_multiple_of(2) {
                let sum = !crate::fs::crc32c::update(!0, &bytes[at + 0x20..at + 4096]);
                bytes[at..at + 4].copy_from_slice(&sum.to_le_bytes());
            }
        }
        if let Ok(Some(fs)) = open(Arc::new(bytes), "p") {
            let ns = Namespace::new(fs.as_ref(), 0, Limits::default());
            for d in ["/", "/node", "/leaf", "/block", "/loader/entries"] {
                let _ = ns.list(d);
            }
            let _ = ns.read("/vmlinuz", 64 << 20);
            let _ = ns.read("/deep", 64 << 20);
            let _ = ns.read_text("/grub2/grub.cfg");
        }
    }
}

#[test]
fn the_btrfs_fuzz_seed_holds_a_readable_boot() {
    // fuzz/btrfs-seed.py packed a mkfs.btrfs image's trees and data below its superblock.
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/btrfs/small");
    let part: Arc<dyn ReadAt> = Arc::new(std::fs::read(p).unwrap());
    let fs = BtrfsFs::open(part, "seed").unwrap();
    let ns = Namespace::new(&fs, 0, Limits::default());
    assert_eq!(ns.list("/d").unwrap().len(), 20);
    assert_eq!(ns.read_text("/d/entry-7").unwrap(), "7\n");
    assert_eq!(ns.read("/vmlinuz", 1 << 20).unwrap().len(), 6000);
    assert_eq!(ns.read("/deep", 1 << 20).unwrap().len(), 6000);
    assert_eq!(
        ns.read("/initramfs-6.1.0.img", 1 << 20).unwrap().len(),
        1500
    );
    assert!(
        ns.read_text("/loader/entries/abc-6.1.0.conf")
            .unwrap()
            .starts_with("title Linux\n")
    );
    assert_eq!(
        ns.read_text("/grub2/grub.cfg").unwrap(),
        "set default=0\nblscfg\n"
    );
}
