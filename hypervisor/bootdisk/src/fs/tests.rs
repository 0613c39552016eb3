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
