//! Small boot disks made by the tests from the test guest's kernel and initramfs: the
//! layouts imported disks have, without a distribution inside.
//!
//! * `gen2.vhdx`: Generation 2 style: GPT, an ESP whose grub.cfg stub hands over to /boot,
//!   an ext4 root with a Debian-generated-style grub.cfg whose grubenv saves the second
//!   entry (its command line carries `parvis.test=nproc`; the first's `wrong-entry`), as a
//!   dynamic VHDX;
//! * `gen1.vhd`: Generation 1 style: MBR, one ext4 partition, no grub.cfg: Debian's /vmlinuz
//!   links and /etc/default/grub (+ grub.d), as a fixed VHD;
//! * `empty.raw`: nothing to boot.

use std::path::Path;
use std::process::Command;

/// The root file system's UUID on both bootable disks.
pub const ROOT: &str = "5c1e0f3a-6b1d-4f0e-9a55-2d3c4b5a6978";

fn sh(dir: &Path, script: &str) -> anyhow::Result<()> {
    let o = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// Write `gen2.vhdx`, `gen1.vhd` and `empty.raw` into `dir`.
pub fn make(dir: &Path) -> anyhow::Result<()> {
    let share = dir;
    let a = crate::build::artifacts()?;
    let release = std::fs::read_to_string(a.images.join("kernel-release"))?
        .trim()
        .to_string();
    let vmlinuz = a.images.join("vmlinuz");
    let initrd = a.images.join("l2-initramfs.cpio");
    let work = share.join("work");
    std::fs::create_dir_all(&work)?;
    // Generation 2: GPT, ESP stub, ext4 root with grub.cfg + grubenv (saved entry: the
    // second, whose command line runs the test action).
    let cfg = format!(
        "if [ -s $prefix/grubenv ]; then\n  load_env\nfi\n\
         if [ \"${{next_entry}}\" ] ; then\n   set default=\"${{next_entry}}\"\nelse\n   set default=\"${{saved_entry}}\"\nfi\n\
         menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-{ROOT}' {{\n\
         \tinsmod ext2\n\tset root='hd0,gpt2'\n\
         \tif [ x$feature_platform_search_hint = xy ]; then\n\t  search --no-floppy --fs-uuid --set=root --hint-bios=hd0,gpt2 {ROOT}\n\telse\n\t  search --no-floppy --fs-uuid --set=root {ROOT}\n\tfi\n\
         \tlinux\t/boot/vmlinuz-{release} root=UUID={ROOT} ro console=ttyS0 quiet panic=-1 parvis.test=wrong-entry\n\
         \tinitrd\t/boot/initrd.img-{release}\n}}\n\
         submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-{ROOT}' {{\n\
         \tmenuentry 'Debian GNU/Linux, with Linux {release}' --class debian $menuentry_id_option 'gnulinux-{release}-advanced-{ROOT}' {{\n\
         \t\tsearch --no-floppy --fs-uuid --set=root {ROOT}\n\
         \t\tlinux\t/boot/vmlinuz-{release} root=UUID={ROOT} ro console=ttyS0 quiet panic=-1 parvis.test=nproc\n\
         \t\tinitrd\t/boot/initrd.img-{release}\n\t}}\n}}\n"
    );
    let r2 = work.join("r2");
    std::fs::create_dir_all(r2.join("boot/grub"))?;
    std::fs::create_dir_all(r2.join("etc"))?;
    std::fs::write(r2.join("boot/grub/grub.cfg"), cfg)?;
    std::fs::write(
        r2.join("boot/grub/grubenv"),
        format!(
            "# GRUB Environment Block\nsaved_entry=gnulinux-advanced-{ROOT}>gnulinux-{release}-advanced-{ROOT}\n"
        ),
    )?;
    std::fs::write(
        r2.join("etc/fstab"),
        format!("UUID={ROOT} / ext4 errors=remount-ro 0 1\n"),
    )?;
    std::fs::write(
        r2.join("etc/os-release"),
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
    )?;
    std::fs::copy(&vmlinuz, r2.join(format!("boot/vmlinuz-{release}")))?;
    std::fs::copy(&initrd, r2.join(format!("boot/initrd.img-{release}")))?;
    let e2 = work.join("esp");
    std::fs::create_dir_all(e2.join("EFI/debian"))?;
    std::fs::write(
        e2.join("EFI/debian/grub.cfg"),
        format!(
            "search.fs_uuid {ROOT} root hd0,gpt2\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n"
        ),
    )?;
    sh(
        &work,
        &format!(
            "mkfs.ext4 -q -F -U {ROOT} -d r2 root2.img 64M
             mkfs.vfat -C esp.img 16384 >/dev/null && mcopy -s -i esp.img esp/EFI ::/
             truncate -s 96M gen2.raw
             printf 'label: gpt\\nsize=16M, type=U\\ntype=L\\n' | sfdisk -q gen2.raw
             dd if=esp.img of=gen2.raw bs=512 seek=2048 conv=notrunc status=none
             dd if=root2.img of=gen2.raw bs=512 seek=34816 conv=notrunc status=none
             qemu-img convert -O vhdx -o subformat=dynamic gen2.raw ../gen2.vhdx"
        ),
    )?;
    // Generation 1: MBR, one ext4 partition, Debian's links and /etc/default/grub.
    let r1 = work.join("r1");
    std::fs::create_dir_all(r1.join("boot"))?;
    std::fs::create_dir_all(r1.join("etc/default/grub.d"))?;
    std::fs::copy(&vmlinuz, r1.join(format!("boot/vmlinuz-{release}")))?;
    std::fs::copy(&initrd, r1.join(format!("boot/initrd.img-{release}")))?;
    std::os::unix::fs::symlink(format!("boot/vmlinuz-{release}"), r1.join("vmlinuz"))?;
    std::os::unix::fs::symlink(format!("boot/initrd.img-{release}"), r1.join("initrd.img"))?;
    std::fs::write(
        r1.join("etc/fstab"),
        format!("UUID={ROOT} / ext4 defaults 0 1\n"),
    )?;
    std::fs::write(
        r1.join("etc/default/grub"),
        "GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"console=ttyS0 panic=-1\"\n",
    )?;
    std::fs::write(
        r1.join("etc/default/grub.d/50-test.cfg"),
        "GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT parvis.test=nproc\"\n",
    )?;
    sh(
        &work,
        &format!(
            "mkfs.ext4 -q -F -U {ROOT} -d r1 root1.img 64M
             truncate -s 80M gen1.raw
             printf 'label: dos\\nstart=2048, type=83, bootable\\n' | sfdisk -q gen1.raw
             dd if=root1.img of=gen1.raw bs=512 seek=2048 conv=notrunc status=none
             qemu-img convert -O vpc -o subformat=fixed,force_size=on gen1.raw ../gen1.vhd
             truncate -s 16M ../empty.raw"
        ),
    )?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
