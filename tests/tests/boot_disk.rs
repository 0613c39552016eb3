//! End-to-end: a VM started with no boot image boots the kernel, initrd and command line
//! its own disk's boot loader would (`parvis-worker --boot-disk`), in the test host:
//!
//! * a Generation 2 style disk (GPT, an ESP whose grub.cfg stub hands over to /boot, an
//!   ext4 root with a Debian-generated-style grub.cfg whose grubenv picks the second entry),
//!   as a dynamic VHDX;
//! * a Generation 1 style disk (MBR, one ext4 partition, no grub.cfg: Debian's /vmlinuz links
//!   and /etc/default/grub), as a fixed VHD;
//! * a disk with nothing to boot, which fails with the reader's sentence.
//!
//! The kernel is Debian's own compressed bzImage (`vmlinuz`), the initrd the test guest's;
//! the entry's command line carries the test action, so the guest reaching its marker
//! proves that entry's command line was used. One test-host boot serves every case.
//! Run: `cargo test -p parvis-tests --test boot_disk`.

use std::sync::OnceLock;

use parvis_tests::boot_disks::ROOT;
use parvis_tests::markers::marker;
use parvis_tests::{Outcome, Scenario};

const SCRIPT: &str = r#"
B="--memory 256M --hyperv off --log info"
run gen2 --boot-disk --disk "$SHARE/gen2.vhdx" $B
run gen1 --boot-disk --disk "$SHARE/gen1.vhd" $B
run empty --boot-disk --disk "$SHARE/empty.raw" $B
"#;

fn outcome() -> &'static Outcome {
    static CELL: OnceLock<Result<Outcome, String>> = OnceLock::new();
    match CELL.get_or_init(|| {
        Scenario::new("boot_disk", SCRIPT)
            .timeout(std::time::Duration::from_secs(1200))
            .run(parvis_tests::boot_disks::make)
            .map_err(|e| format!("{e:#}"))
    }) {
        Ok(o) => o,
        Err(e) => panic!("the boot-disk scenario could not run: {e}"),
    }
}

fn run(name: &str) -> (String, String, i32) {
    outcome().worker_run(name)
}

#[test]
fn a_gpt_vhdx_boots_the_entry_its_grubenv_saved() {
    let (out, err, rc) = run("gen2");
    assert_eq!(rc, 0, "{err}\n{out}");
    assert_eq!(marker(&out, "PARVIS-NPROC"), Some("1"), "{out}");
    assert!(
        err.contains("booting the disk's own kernel")
            && err.contains("with Linux")
            && err.contains("Debian GNU/Linux 12 (bookworm)"),
        "{err}"
    );
    assert!(!out.contains("wrong-entry"), "{out}");
}

#[test]
fn an_mbr_vhd_boots_through_debians_links_and_default_grub() {
    let (out, err, rc) = run("gen1");
    assert_eq!(rc, 0, "{err}\n{out}");
    assert_eq!(marker(&out, "PARVIS-NPROC"), Some("1"), "{out}");
    assert!(
        err.contains(&format!(
            "root=UUID={ROOT} ro console=ttyS0 panic=-1 quiet parvis.test=nproc"
        )),
        "{err}"
    );
}

#[test]
fn a_disk_with_nothing_to_boot_says_so() {
    let (out, err, rc) = run("empty");
    assert_eq!(rc, 1, "{out}");
    assert!(
        err.contains("the disk cannot be booted: the disk holds no file system: it looks empty"),
        "{err}"
    );
}
