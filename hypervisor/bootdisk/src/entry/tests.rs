//! The resolver against disks made as distributions make them: partitioned by sfdisk, file
//! systems by mkfs with the files in place, boot configurations in their generators' shape
//! (`fixtures/`).

use std::collections::HashMap;

use super::*;
use crate::testutil::{Scratch, disk};

const ROOT: &str = "11111111-2222-3333-4444-555555555555";
const BOOT: &str = "66666666-7777-8888-9999-aaaaaaaaaaaa";

fn fixture(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/entry/fixtures")
        .join(name);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .replace("@ROOT@", ROOT)
        .replace("@BOOT@", BOOT)
}

fn inspect(s: &Scratch, img: &std::path::Path) -> (Disk, Result<Inspection>) {
    let _ = s;
    let d = Disk::open(disk(img), Limits::default()).unwrap();
    let i = d.inspect();
    (d, i)
}

fn chosen(d: &Disk, i: &Inspection) -> (String, Vec<String>, String, String) {
    let e = &i.entries[i.default];
    let k = String::from_utf8(d.read_file(&e.kernel, 1 << 20).unwrap()).unwrap();
    let ins = e
        .initrds
        .iter()
        .map(|f| String::from_utf8(d.read_file(f, 1 << 20).unwrap()).unwrap())
        .collect();
    (e.title.clone(), ins, e.cmdline.clone(), k)
}

fn debian_root(s: &Scratch, grub_cfg: Option<&str>) {
    let fstab = format!(
        "# /etc/fstab: static file system information.\nUUID={ROOT} /               ext4    errors=remount-ro 0       1\n# /boot/efi was on /dev/sda1 during installation\nUUID=ABCD-1234  /boot/efi       vfat    umask=0077      0       1\n"
    );
    let mut files: Vec<(&str, String)> = vec![
        ("etc/fstab", fstab),
        (
            "etc/os-release",
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n".into(),
        ),
        ("boot/vmlinuz-6.1.0-9-amd64", "KERNEL 6.1.0-9".into()),
        ("boot/initrd.img-6.1.0-9-amd64", "INITRD 6.1.0-9".into()),
        ("boot/vmlinuz-6.1.0-8-amd64", "KERNEL 6.1.0-8".into()),
        ("boot/initrd.img-6.1.0-8-amd64", "INITRD 6.1.0-8".into()),
        ("vmlinuz", "->boot/vmlinuz-6.1.0-9-amd64".into()),
        ("initrd.img", "->boot/initrd.img-6.1.0-9-amd64".into()),
        ("vmlinuz.old", "->boot/vmlinuz-6.1.0-8-amd64".into()),
        (
            "etc/default/grub",
            "# If you change this file, run 'update-grub' afterwards.\nGRUB_DEFAULT=0\nGRUB_TIMEOUT=5\nGRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"\"\n".into(),
        ),
        (
            "etc/default/grub.d/50-cloud.cfg",
            "GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT console=ttyS0\"\n".into(),
        ),
    ];
    if let Some(cfg) = grub_cfg {
        files.push(("boot/grub/grub.cfg", cfg.to_string()));
    }
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
    s.tree("root", &files);
}

#[test]
fn debian12_gpt_boots_the_saved_entry_of_its_grub_cfg() {
    let s = Scratch::new();
    debian_root(&s, Some(&fixture("debian12-grub.cfg")));
    // GRUB_DEFAULT=saved: grubenv names an entry in the Advanced submenu.
    let env = format!(
        "# GRUB Environment Block\nsaved_entry=gnulinux-advanced-{ROOT}>gnulinux-6.1.0-8-amd64-advanced-{ROOT}\n"
    );
    s.tree("root", &[("boot/grub/grubenv", &env)]);
    s.tree(
        "esp",
        &[("EFI/debian/grub.cfg", &fixture("debian12-esp-stub.cfg"))],
    );
    let root = s.ext4("root", "root", 24, ROOT);
    let esp = s.vfat("esp", "esp", 8, "abcd1234");
    let img = s.partitioned("d", 64, "label: gpt\n,8M,U\n,,L", &[(1, &esp), (2, &root)]);
    let (d, i) = inspect(&s, &img);
    let i = i.unwrap();
    assert_eq!(i.os.as_deref(), Some("Debian GNU/Linux 12 (bookworm)"));
    // Every Linux entry, in menu order; the firmware-settings one has no kernel.
    let titles: Vec<&str> = i.entries.iter().map(|e| e.title.as_str()).collect();
    assert_eq!(
        titles,
        [
            "Debian GNU/Linux",
            "Debian GNU/Linux, with Linux 6.1.0-9-amd64",
            "Debian GNU/Linux, with Linux 6.1.0-9-amd64 (recovery mode)",
            "Debian GNU/Linux, with Linux 6.1.0-8-amd64",
            "Debian GNU/Linux, with Linux 6.1.0-8-amd64 (recovery mode)",
        ]
    );
    assert_eq!(
        chosen(&d, &i),
        (
            "Debian GNU/Linux, with Linux 6.1.0-8-amd64".into(),
            vec!["INITRD 6.1.0-8".into()],
            format!("root=UUID={ROOT} ro quiet"),
            "KERNEL 6.1.0-8".into()
        )
    );
    assert_eq!(
        i.entries[i.default].version.as_deref(),
        Some("6.1.0-8-amd64")
    );
    assert_eq!(i.entries[2].cmdline, format!("root=UUID={ROOT} ro single"));
    assert_eq!(i.entries[0].source, "/boot/grub/grub.cfg on partition 2");
    // Without grubenv, ${saved_entry} is empty: the first entry.
    let s2 = Scratch::new();
    debian_root(&s2, Some(&fixture("debian12-grub.cfg")));
    let root = s2.ext4("root", "root", 24, ROOT);
    let img = s2.partitioned("d", 64, "label: gpt\n,8M,U\n,,L", &[(2, &root)]);
    let (d, i) = inspect(&s2, &img);
    let i = i.unwrap();
    assert_eq!(chosen(&d, &i).3, "KERNEL 6.1.0-9");
}

#[test]
fn a_root_on_btrfs_boots_its_grub_cfg() {
    // Debian's installer with a btrfs root: /boot is a directory of it.
    let s = Scratch::new();
    debian_root(&s, Some(&fixture("debian12-grub.cfg")));
    let root = s.btrfs("root", "root", 48, ROOT, "");
    let img = s.partitioned("d", 64, "label: gpt\n,8M,U\n,,L", &[(2, &root)]);
    let (d, i) = inspect(&s, &img);
    assert_eq!(d.volumes[1].found, Some("btrfs"));
    let i = i.unwrap();
    assert_eq!(i.os.as_deref(), Some("Debian GNU/Linux 12 (bookworm)"));
    assert_eq!(
        chosen(&d, &i),
        (
            "Debian GNU/Linux".into(),
            vec!["INITRD 6.1.0-9".into()],
            format!("root=UUID={ROOT} ro quiet"),
            "KERNEL 6.1.0-9".into()
        )
    );
}

#[test]
fn ubuntu_mbr_bios_disk_boots_its_first_entry_and_skips_memtest() {
    let s = Scratch::new();
    s.tree(
        "root",
        &[
            (
                "etc/fstab",
                "LABEL=cloudimg-rootfs\t/\t ext4\tdiscard,errors=remount-ro\t0 1\n",
            ),
            ("etc/os-release", "PRETTY_NAME=\"Ubuntu 24.04 LTS\"\n"),
            ("boot/vmlinuz-6.8.0-31-generic", "KERNEL 6.8"),
            ("boot/initrd.img-6.8.0-31-generic", "INITRD 6.8"),
            ("boot/memtest86+x64.bin", "MEMTEST"),
            ("boot/grub/grub.cfg", &fixture("ubuntu2404-grub.cfg")),
        ],
    );
    let root = s.ext4("root", "root", 24, ROOT);
    let img = s.partitioned("d", 64, "label: dos\n,,83,*", &[(1, &root)]);
    let (d, i) = inspect(&s, &img);
    let i = i.unwrap();
    assert_eq!(i.entries.len(), 2, "{:?}", i.entries);
    let (title, initrds, cmdline, kernel) = chosen(&d, &i);
    assert_eq!(title, "Ubuntu");
    assert_eq!(kernel, "KERNEL 6.8");
    assert_eq!(initrds, ["INITRD 6.8"]);
    // $vt_handoff is set only inside a function GRUB runs at boot: it expands to nothing.
    assert_eq!(
        cmdline,
        format!("root=UUID={ROOT} ro console=tty1 console=ttyS0")
    );
}

#[test]
fn ubuntu_on_btrfs_boots_from_its_subvolume() {
    // Ubuntu's installer on btrfs: the system in the subvolume "@" of a top level that stays
    // the default, and grub.cfg naming the kernel by its path from the top ("/@/boot/...").
    // Only the kernel makes subvolumes: the image is loop-mounted (root and the kernel's
    // btrfs, as CI has).
    let s = Scratch::new();
    let cfg = fixture("ubuntu2404-grub.cfg")
        .replace("\t/boot/", "\t/@/boot/")
        .replace(" ro  ", " ro rootflags=subvol=@ ");
    s.tree(
        "root",
        &[
            (
                "etc/fstab",
                &format!("UUID={ROOT} / btrfs defaults,subvol=@ 0 1\n"),
            ),
            ("etc/os-release", "PRETTY_NAME=\"Ubuntu 24.04 LTS\"\n"),
            ("boot/vmlinuz-6.8.0-31-generic", "KERNEL 6.8"),
            ("boot/initrd.img-6.8.0-31-generic", "INITRD 6.8"),
            ("boot/grub/grub.cfg", &cfg),
        ],
    );
    let fs = s.btrfs("top", "none", 128, ROOT, "");
    s.sh(&format!(
        "mkdir -p mnt; mount -o loop {} mnt
         trap 'umount mnt' EXIT
         btrfs -q subvolume create mnt/@
         cp -a root/. mnt/@/",
        fs.display()
    ));
    let img = s.partitioned("d", 160, "label: gpt\n,,L", &[(1, &fs)]);
    let (d, i) = inspect(&s, &img);
    let i = i.unwrap();
    assert_eq!(i.os.as_deref(), Some("Ubuntu 24.04 LTS"));
    let (title, initrds, cmdline, kernel) = chosen(&d, &i);
    assert_eq!(title, "Ubuntu");
    assert_eq!(kernel, "KERNEL 6.8");
    assert_eq!(initrds, ["INITRD 6.8"]);
    assert_eq!(
        cmdline,
        format!("root=UUID={ROOT} ro rootflags=subvol=@ console=tty1 console=ttyS0")
    );
    assert_eq!(i.entries[0].kernel.path, "/@/boot/vmlinuz-6.8.0-31-generic");
}

/// RHEL's layout: an ESP, /boot on its own partition, the root on LVM.
fn rhel_disk(
    s: &Scratch,
    entries: &[(&str, String)],
    grub: Option<(&str, String)>,
) -> std::path::PathBuf {
    rhel_disk_on(s, entries, grub, "ext4", "label: gpt")
}

/// The same with /boot on `fs` ("ext4" or "xfs", as RHEL installs it) and the partition
/// table `label` ("label: gpt" or "label: dos").
fn rhel_disk_on(
    s: &Scratch,
    entries: &[(&str, String)],
    grub: Option<(&str, String)>,
    fs: &str,
    label: &str,
) -> std::path::PathBuf {
    let mut files: Vec<(String, String)> = entries
        .iter()
        .map(|(n, c)| {
            (
                format!("loader/entries/0123456789abcdef0123456789abcdef-{n}.conf"),
                c.clone(),
            )
        })
        .collect();
    for v in [
        "4.18.0-425.3.1.el8.x86_64",
        "4.18.0-477.10.1.el8_8.x86_64",
        "5.14.0-362.8.1.el9_3.x86_64",
        "5.14.0-427.13.1.el9_4.x86_64",
    ] {
        files.push((format!("vmlinuz-{v}"), format!("KERNEL {v}")));
        files.push((format!("initramfs-{v}.img"), format!("INITRD {v}")));
    }
    if let Some((p, c)) = grub {
        files.push((p.to_string(), c));
    }
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    s.tree("boot", &files);
    let boot = match fs {
        "xfs" => s.xfs("boot", "boot", 24, BOOT, ""),
        _ => s.ext4("boot", "boot", 16, BOOT),
    };
    // An LVM physical volume: its label where LVM writes it.
    s.sh("truncate -s 8M pv; printf 'LABELONE' | dd of=pv bs=1 seek=512 conv=notrunc status=none; printf 'LVM2 001' | dd of=pv bs=1 seek=536 conv=notrunc status=none");
    let table = match label {
        "label: dos" => "label: dos\n,8M,ef\n,24M,83\n,,8e",
        _ => "label: gpt\n,8M,U\n,24M,L\n,,E6D6D379-F507-44C2-A23C-238F2A3DF928",
    };
    s.partitioned("d", 64, table, &[(2, &boot), (3, &s.path("pv"))])
}

#[test]
fn rhel8_blscfg_takes_kernelopts_and_the_saved_entry_from_grubenv() {
    let s = Scratch::new();
    let entries: Vec<(&str, String)> =
        ["4.18.0-425.3.1.el8.x86_64", "4.18.0-477.10.1.el8_8.x86_64"]
            .iter()
            .map(|v| (*v, fixture(&format!("rhel8-{v}.conf"))))
            .collect();
    s.tree("boot", &[("grub2/grubenv", &fixture("rhel8-grubenv"))]);
    let img = rhel_disk(
        &s,
        &entries,
        Some(("grub2/grub.cfg", fixture("rhel8-grub.cfg"))),
    );
    let (d, i) = inspect(&s, &img);
    let i = i.unwrap();
    assert_eq!(i.os, None, "the root is on LVM");
    // Newest first, as the menu shows them; the saved entry is the older kernel.
    let versions: Vec<_> = i
        .entries
        .iter()
        .map(|e| e.version.clone().unwrap())
        .collect();
    assert_eq!(
        versions,
        ["4.18.0-477.10.1.el8_8.x86_64", "4.18.0-425.3.1.el8.x86_64"]
    );
    let (title, initrds, cmdline, kernel) = chosen(&d, &i);
    assert_eq!(
        title,
        "Red Hat Enterprise Linux (4.18.0-425.3.1.el8.x86_64) 8.8 (Ootpa)"
    );
    assert_eq!(kernel, "KERNEL 4.18.0-425.3.1.el8.x86_64");
    // $tuned_initrd is empty: one initrd.
    assert_eq!(initrds, ["INITRD 4.18.0-425.3.1.el8.x86_64"]);
    assert_eq!(
        cmdline,
        "root=/dev/mapper/rhel-root ro crashkernel=auto resume=/dev/mapper/rhel-swap rd.lvm.lv=rhel/root rd.lvm.lv=rhel/swap console=ttyS0"
    );
    // Without grubenv: grub.cfg's fallback kernelopts, and the newest entry.
    let s = Scratch::new();
    let img = rhel_disk(
        &s,
        &entries,
        Some(("grub2/grub.cfg", fixture("rhel8-grub.cfg"))),
    );
    let (d, i) = inspect(&s, &img);
    let (_, _, cmdline, kernel) = chosen(&d, &i.unwrap());
    assert_eq!(kernel, "KERNEL 4.18.0-477.10.1.el8_8.x86_64");
    assert!(
        cmdline.ends_with("rd.lvm.lv=rhel/swap rhgb quiet"),
        "{cmdline}"
    );
    // UEFI: grub.cfg and grubenv on the ESP, the snippets on /boot, which grub.cfg searches.
    let s = Scratch::new();
    s.tree(
        "esp",
        &[
            ("EFI/redhat/grub.cfg", &fixture("rhel8-grub.cfg")),
            ("EFI/redhat/grubenv", &fixture("rhel8-grubenv")),
        ],
    );
    let esp = s.vfat("esp", "esp", 8, "abcd1234");
    let img = rhel_disk(&s, &entries, None);
    s.sh(&format!(
        "dd if={} of=d bs=512 seek=2048 conv=notrunc status=none",
        esp.display()
    ));
    let (d, i) = inspect(&s, &img);
    let i = i.unwrap();
    let (_, _, cmdline, kernel) = chosen(&d, &i);
    assert_eq!(kernel, "KERNEL 4.18.0-425.3.1.el8.x86_64");
    assert!(
        cmdline.ends_with("rd.lvm.lv=rhel/swap console=ttyS0"),
        "{cmdline}"
    );
}

#[test]
fn rhel9_bls_entries_carry_their_own_options() {
    let s = Scratch::new();
    let entries: Vec<(&str, String)> = [
        "5.14.0-362.8.1.el9_3.x86_64",
        "5.14.0-427.13.1.el9_4.x86_64",
    ]
    .iter()
    .map(|v| (*v, fixture(&format!("rhel9-{v}.conf"))))
    .collect();
    // No grub.cfg at all (a BLS-only /boot): the entries alone.
    let img = rhel_disk(&s, &entries, None);
    let (d, i) = inspect(&s, &img);
    let i = i.unwrap();
    let (_, initrds, cmdline, kernel) = chosen(&d, &i);
    assert_eq!(kernel, "KERNEL 5.14.0-427.13.1.el9_4.x86_64");
    assert_eq!(initrds, ["INITRD 5.14.0-427.13.1.el9_4.x86_64"]);
    assert!(
        cmdline.starts_with("root=/dev/mapper/rhel-root ro crashkernel=1G-4G:192M"),
        "{cmdline}"
    );
    assert!(
        i.entries[0].source.starts_with("/loader/entries/"),
        "{}",
        i.entries[0].source
    );
}

#[test]
fn rhel_bls_entries_on_an_xfs_boot_partition() {
    // RHEL's installer puts /boot on xfs: BLS snippets with grub.cfg and grubenv (GPT, UEFI
    // layout), and the snippets alone (MBR, BIOS layout).
    let entries: Vec<(&str, String)> = [
        "5.14.0-362.8.1.el9_3.x86_64",
        "5.14.0-427.13.1.el9_4.x86_64",
    ]
    .iter()
    .map(|v| (*v, fixture(&format!("rhel9-{v}.conf"))))
    .collect();
    for label in ["label: gpt", "label: dos"] {
        let s = Scratch::new();
        let img = rhel_disk_on(&s, &entries, None, "xfs", label);
        let (d, i) = inspect(&s, &img);
        let boot = &d.volumes[1];
        assert_eq!(boot.found, Some("xfs"));
        assert_eq!(boot.uuid().as_deref(), Some(BOOT));
        let i = i.unwrap();
        assert_eq!(i.entries.len(), 2, "{label}");
        let (_, initrds, cmdline, kernel) = chosen(&d, &i);
        assert_eq!(kernel, "KERNEL 5.14.0-427.13.1.el9_4.x86_64", "{label}");
        assert_eq!(initrds, ["INITRD 5.14.0-427.13.1.el9_4.x86_64"]);
        assert!(
            cmdline.starts_with("root=/dev/mapper/rhel-root ro crashkernel=1G-4G:192M"),
            "{cmdline}"
        );
    }
    // RHEL 8: grub.cfg's blscfg, $kernelopts and the saved entry from grubenv, on xfs.
    let s = Scratch::new();
    let entries: Vec<(&str, String)> =
        ["4.18.0-425.3.1.el8.x86_64", "4.18.0-477.10.1.el8_8.x86_64"]
            .iter()
            .map(|v| (*v, fixture(&format!("rhel8-{v}.conf"))))
            .collect();
    s.tree("boot", &[("grub2/grubenv", &fixture("rhel8-grubenv"))]);
    let img = rhel_disk_on(
        &s,
        &entries,
        Some(("grub2/grub.cfg", fixture("rhel8-grub.cfg"))),
        "xfs",
        "label: gpt",
    );
    let (d, i) = inspect(&s, &img);
    let (title, initrds, _, kernel) = chosen(&d, &i.unwrap());
    assert_eq!(
        title,
        "Red Hat Enterprise Linux (4.18.0-425.3.1.el8.x86_64) 8.8 (Ootpa)"
    );
    assert_eq!(kernel, "KERNEL 4.18.0-425.3.1.el8.x86_64");
    assert_eq!(initrds, ["INITRD 4.18.0-425.3.1.el8.x86_64"]);
}

#[test]
fn debian_symlinks_and_default_grub_when_there_is_no_grub_cfg() {
    let s = Scratch::new();
    debian_root(&s, None);
    let root = s.ext4("root", "root", 24, ROOT);
    // A bare file system on the whole disk, as some cloud images are.
    let (d, i) = inspect(&s, &root);
    let i = i.unwrap();
    assert_eq!(i.entries.len(), 1);
    let (title, initrds, cmdline, kernel) = chosen(&d, &i);
    assert_eq!(
        title,
        "Debian GNU/Linux 12 (bookworm), with Linux 6.1.0-9-amd64"
    );
    assert_eq!(kernel, "KERNEL 6.1.0-9");
    assert_eq!(initrds, ["INITRD 6.1.0-9"]);
    assert_eq!(cmdline, format!("root=UUID={ROOT} ro quiet console=ttyS0"));
}

#[test]
fn a_separate_boot_partition_found_through_fstab() {
    let s = Scratch::new();
    s.tree(
        "root",
        &[
            (
                "etc/fstab",
                &format!("UUID={ROOT} / ext4 defaults 0 1\nUUID={BOOT} /boot ext4 defaults 0 2\n"),
            ),
            ("vmlinuz", "->boot/vmlinuz-6.1.0-9-amd64"),
            ("initrd.img", "->boot/initrd.img-6.1.0-9-amd64"),
            ("boot/.mountpoint", ""),
        ],
    );
    s.tree(
        "boot",
        &[
            ("vmlinuz-6.1.0-9-amd64", "KERNEL"),
            ("initrd.img-6.1.0-9-amd64", "INITRD"),
        ],
    );
    let root = s.ext4("root", "root", 16, ROOT);
    let boot = s.ext4("boot", "boot", 16, BOOT);
    let img = s.partitioned(
        "d",
        64,
        "label: dos\n,20M,83\n,,83",
        &[(1, &boot), (2, &root)],
    );
    let (d, i) = inspect(&s, &img);
    let i = i.unwrap();
    let e = &i.entries[0];
    assert_eq!(
        e.kernel,
        FileRef {
            volume: 0,
            path: "/vmlinuz-6.1.0-9-amd64".into()
        }
    );
    assert_eq!(chosen(&d, &i).3, "KERNEL");
    assert_eq!(e.cmdline, format!("root=UUID={ROOT} ro"));
}

#[test]
fn disks_that_cannot_boot_say_why_in_one_sentence() {
    let why =
        |img: &std::path::Path| match Disk::open(disk(img), Limits::default()).unwrap().inspect() {
            Err(Error::NotBootable(w)) => w,
            other => panic!("{other:?}"),
        };
    // Empty.
    let s = Scratch::new();
    s.sh("truncate -s 8M empty");
    assert_eq!(
        why(&s.path("empty")),
        "the disk holds no file system: it looks empty"
    );
    // /boot and root on LVM.
    s.sh("truncate -s 8M pv; printf 'LABELONE' | dd of=pv bs=1 seek=512 conv=notrunc status=none; printf 'LVM2 001' | dd of=pv bs=1 seek=536 conv=notrunc status=none");
    let img = s.partitioned(
        "lvm",
        32,
        "label: gpt\n,,E6D6D379-F507-44C2-A23C-238F2A3DF928",
        &[(1, &s.path("pv"))],
    );
    assert_eq!(why(&img), "/boot is on LVM, which Parvis cannot read");
    // LUKS.
    s.sh("truncate -s 8M luks; printf 'LUKS\\xba\\xbe\\x00\\x02' | dd of=luks conv=notrunc status=none");
    let img = s.partitioned("crypt", 32, "label: gpt\n,,L", &[(1, &s.path("luks"))]);
    assert!(
        why(&img).starts_with("the root file system is encrypted (LUKS)"),
        "{}",
        why(&img)
    );
    // A btrfs whose superblock is only its magic number: read, and found damaged.
    s.sh("truncate -s 8M btrfs; printf '_BHRfS_M' | dd of=btrfs bs=1 seek=65600 conv=notrunc status=none");
    let img = s.partitioned("b", 32, "label: gpt\n,,L", &[(1, &s.path("btrfs"))]);
    assert_eq!(
        why(&img),
        "the btrfs file system on partition 1 cannot be read: its superblock checksum is \
         wrong"
    );
    // An xfs whose superblock is only its magic number: read, and found damaged.
    s.sh("truncate -s 8M xfs; printf 'XFSB' | dd of=xfs conv=notrunc status=none");
    let img = s.partitioned("x", 32, "label: gpt\n,,L", &[(1, &s.path("xfs"))]);
    assert_eq!(
        why(&img),
        "the xfs file system on partition 1 cannot be read: its superblock version 0 is not \
         known"
    );
    // A Linux root without any kernel.
    s.tree(
        "nokernel",
        &[("etc/fstab", &format!("UUID={ROOT} / ext4 defaults 0 1\n"))],
    );
    let root = s.ext4("nokernel", "nokernel", 8, ROOT);
    assert_eq!(why(&root), "no Linux kernel found on the disk");
    // A grub.cfg entry whose kernel is gone (and no other kernel to fall back on).
    let s = Scratch::new();
    s.tree(
        "root",
        &[
            ("etc/fstab", &format!("UUID={ROOT} / ext4 defaults 0 1\n")),
            ("boot/grub/grub.cfg", &fixture("ubuntu2404-grub.cfg")),
        ],
    );
    let root = s.ext4("root", "root", 8, ROOT);
    let w = why(&root);
    assert!(
        w.contains("names the kernel /boot/vmlinuz-6.8.0-31-generic, which is not on the disk"),
        "{w}"
    );
    // fstab puts /boot on LVM.
    let s = Scratch::new();
    s.tree(
        "root",
        &[(
            "etc/fstab",
            &format!(
                "UUID={ROOT} / ext4 defaults 0 1\n/dev/mapper/vg-boot /boot ext4 defaults 0 2\n"
            ),
        )],
    );
    let root = s.ext4("root", "root", 8, ROOT);
    assert_eq!(why(&root), "/boot is on LVM or device-mapper");
}

#[test]
fn grub_words_quotes_and_variables() {
    let env: HashMap<String, String> = [("a".to_string(), "A".to_string())].into();
    let cmds = grub::tokenize("set x=\"q $a ${a}b\" 'l $a' m\\ n # c\nif [ x ]; then y; fi\n");
    let words: Vec<Vec<String>> = cmds
        .iter()
        .map(|c| c.iter().map(|w| grub::expand(w, &env)).collect())
        .collect();
    assert_eq!(
        words,
        vec![
            vec![
                "set".to_string(),
                "x=q A Ab".into(),
                "l $a".into(),
                "m n".into()
            ],
            vec!["if".into(), "[".into(), "x".into(), "]".into()],
            vec!["then".into(), "y".into()],
            vec!["fi".into()],
        ]
    );
    // Unbalanced and hostile input parses to something, never panics or loops.
    for t in [
        "menuentry 'x' {",
        "}}}}",
        "if\nelse\nelif\nfi\nfi",
        "\"unterminated",
        "${",
        "$",
        "\\",
    ] {
        let _ = grub::read_config(t, &HashMap::new());
    }
    let deep = "submenu a {\n".repeat(10_000);
    let _ = grub::read_config(&deep, &HashMap::new());
}

#[test]
fn grub_defaults_by_index_path_title_and_id() {
    let cfg = "menuentry 'A' --id a { linux /a }\nsubmenu 'S' --id s {\n menuentry 'B' --id b { linux /b }\n menuentry 'C' $menuentry_id_option c { linux /c }\n}\n";
    let c = grub::read_config(cfg, &HashMap::new());
    let title = |d: &str| {
        let p = grub::select(&c.items, Some(d)).unwrap();
        grub::at(&c.items, &p).unwrap().title.clone()
    };
    assert_eq!(title("0"), "A");
    assert_eq!(title("1>1"), "C");
    assert_eq!(title("s>c"), "C");
    assert_eq!(title("S>B"), "B");
    assert_eq!(
        title("1"),
        "B",
        "a submenu as the default opens at its first entry"
    );
    assert_eq!(title(""), "A");
    assert!(grub::select(&c.items, Some("7")).is_none());
}

#[test]
fn versions_sort_as_rpm_and_systemd_sort_them() {
    use std::cmp::Ordering::*;
    assert_eq!(
        bls::vercmp("5.14.0-427.13.1.el9_4", "5.14.0-362.8.1.el9_3"),
        Greater
    );
    assert_eq!(bls::vercmp("6.1.0-10-amd64", "6.1.0-9-amd64"), Greater);
    assert_eq!(bls::vercmp("1.0~rc1", "1.0"), Less);
    assert_eq!(bls::vercmp("1.01", "1.1"), Equal);
    assert_eq!(bls::vercmp("1.a", "1.1"), Less);
}

/// What Debian 12's own generators wrote on the disks `assets/guest/build-disks.sh` builds
/// (`update-grub` with grub-efi-amd64 and grub-pc, `grub-install`'s ESP stub, an entry in
/// kernel-install's format), read back as text.
#[test]
fn golden_configs_written_by_debian12s_own_generators() {
    let none = HashMap::new();
    let kernel = "6.1.0-57-amd64";
    for (file, root, cmdline) in [
        (
            "debian12-generated-gen2-grub.cfg",
            "f93f41c4-1668-422b-a799-729030f6db41",
            "ro quiet",
        ),
        (
            "debian12-generated-gen1-grub.cfg",
            "fbb480fd-0ddb-4651-9211-7c12a6fb76da",
            "ro quiet",
        ),
    ] {
        let c = grub::read_config(&fixture(file), &none);
        assert!(!c.blscfg && c.configfile.is_none(), "{file}");
        let p = grub::select(&c.items, c.default.as_deref()).unwrap();
        let e = grub::at(&c.items, &p).unwrap();
        assert_eq!(e.title, "Debian GNU/Linux", "{file}");
        assert_eq!(
            e.id.as_deref(),
            Some(&*format!("gnulinux-simple-{root}")),
            "{file}"
        );
        let grub::ItemKind::Entry(cmds) = &e.kind else {
            panic!("{file}: the default is a submenu");
        };
        assert_eq!(cmds.root, Some(grub::Device::Uuid(root.into())), "{file}");
        let (path, args) = cmds.linux.clone().unwrap();
        assert_eq!(path, format!("/boot/vmlinuz-{kernel}"));
        assert_eq!(args.join(" "), format!("root=UUID={root} {cmdline}"));
        assert_eq!(cmds.initrds, [format!("/boot/initrd.img-{kernel}")]);
        // The advanced submenu: the same kernel, and its recovery mode.
        let titles: Vec<String> = grub::entries(&c.items)
            .iter()
            .map(|(_, i)| i.title.clone())
            .collect();
        assert!(
            titles.contains(&format!("Debian GNU/Linux, with Linux {kernel}"))
                && titles.contains(&format!(
                    "Debian GNU/Linux, with Linux {kernel} (recovery mode)"
                )),
            "{file}: {titles:?}"
        );
    }
    // The cloud kernel's disk: Azure's console settings in the generated line.
    let c = grub::read_config(&fixture("debian12-generated-azure-grub.cfg"), &none);
    let p = grub::select(&c.items, c.default.as_deref()).unwrap();
    let grub::ItemKind::Entry(cmds) = &grub::at(&c.items, &p).unwrap().kind else {
        panic!("the default is a submenu");
    };
    let (path, args) = cmds.linux.clone().unwrap();
    assert_eq!(path, "/boot/vmlinuz-6.1.0-57-cloud-amd64");
    let args = args.join(" ");
    assert!(
        args.contains("console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200"),
        "{args}"
    );
    // grub-install's stub on the ESP hands over to /boot/grub on the root's UUID.
    let stub = grub::read_config(&fixture("debian12-generated-gen2-esp.cfg"), &none);
    assert!(stub.items.is_empty());
    let (dev, path) = stub.configfile.unwrap();
    assert_eq!(
        dev,
        Some(grub::Device::Uuid(
            "f93f41c4-1668-422b-a799-729030f6db41".into()
        ))
    );
    assert_eq!(path, "/boot/grub/grub.cfg");
    // An entry as kernel-install writes it, on an xfs /boot.
    let e = bls::parse_entry(
        "b4083d3ac81421ae41563fe1c5d53cd9-6.1.0-57-amd64",
        &fixture("debian12-generated-bls.conf"),
        &none,
    );
    assert_eq!(e.version.as_deref(), Some(kernel));
    assert_eq!(e.linux.as_deref(), Some("/vmlinuz-6.1.0-57-amd64"));
    assert_eq!(e.initrds, ["/initrd.img-6.1.0-57-amd64"]);
    assert_eq!(
        e.options,
        "root=UUID=0620c2af-39c3-4cf0-8740-c84f5eb74b3a ro quiet"
    );
}

#[test]
fn the_xfs_disk_fuzz_seed_boots_its_bls_entry() {
    // fuzz/seeds/disk/mbr-xfs-boot: an MBR whose one partition holds the first KiBs of an
    // xfs /boot (a BLS entry, its kernel and initrd), as the disk target starts from.
    let bytes = include_bytes!("../../fuzz/seeds/disk/mbr-xfs-boot").to_vec();
    let d = Disk::open(std::sync::Arc::new(bytes), Limits::default()).unwrap();
    assert_eq!(d.volumes[0].found, Some("xfs"));
    let i = d.inspect().unwrap();
    let e = &i.entries[i.default];
    assert_eq!(e.kernel.path, "/vmlinuz-6.1.0");
    assert_eq!(d.read_file(&e.kernel, 1 << 20).unwrap().len(), 3000);
    assert_eq!(e.cmdline, "root=UUID=1234 ro");
}

#[test]
fn the_btrfs_disk_fuzz_seed_boots_its_bls_entry() {
    // fuzz/seeds/disk/mbr-btrfs-boot: an MBR whose one partition holds fuzz/seeds/btrfs/small
    // (a BLS entry, its kernel and initrd).
    let bytes = include_bytes!("../../fuzz/seeds/disk/mbr-btrfs-boot").to_vec();
    let d = Disk::open(std::sync::Arc::new(bytes), Limits::default()).unwrap();
    assert_eq!(d.volumes[0].found, Some("btrfs"));
    let i = d.inspect().unwrap();
    let e = &i.entries[i.default];
    assert_eq!(e.kernel.path, "/vmlinuz-6.1.0");
    assert_eq!(d.read_file(&e.kernel, 1 << 20).unwrap().len(), 6000);
    assert_eq!(e.cmdline, "root=UUID=1234 ro");
}
