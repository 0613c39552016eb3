//! `demo`: boot the demo guest (Debian's kernel and a busybox userland) with
//! `parvis-worker` and attach this terminal to its serial console. Inside the guest,
//! `poweroff -f` ends the VM; Ctrl-A x stops it from outside.

fn main() {
    let script = r#"
echo "parvis demo: starting parvis-worker (2 vCPUs, 512 MiB, one 16 MiB virtio disk)"
dd if=/dev/zero of="$SHARE/demo-disk.img" bs=1M count=0 seek=16 2>/dev/null
parvis-worker --kernel "$IMAGES/vmlinux" --initrd "$IMAGES/l2-initramfs.cpio" \
    --cpus 2 --memory 512M --disk "$SHARE/demo-disk.img" \
    --cmdline "console=ttyS0 panic=-1 parvis.test=nproc,disk,shell"
echo "parvis demo: parvis-worker exited with status $?"
"#;
    match parvis_tests::testhost::run_interactive(script) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("demo: {e:#}");
            std::process::exit(1);
        }
    }
}
