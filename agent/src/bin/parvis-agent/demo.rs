//! The demo VM: a boot image made from the guest images, and a VM that boots it.

use std::path::Path;

use agent::Agent;
use anyhow::{Context, Result};
use proto::v1::VmSpec;

pub const DEMO_NAME: &str = "demo";
const IMAGE: &str = "parvis-demo";

/// Create the demo boot image and VM unless they exist.
pub fn ensure(agent: &Agent, images: &Path) -> Result<()> {
    let boot = agent.host.boot_dir.join(IMAGE);
    if !boot.join("kernel").is_file() {
        let kernel = images.join("vmlinuz");
        let initrd = images.join("l2-initramfs.cpio");
        anyhow::ensure!(
            kernel.is_file() && initrd.is_file(),
            "{} has no vmlinuz and l2-initramfs.cpio (run assets/guest/build-images.sh)",
            images.display()
        );
        let tmp = agent.host.boot_dir.join(format!(".{IMAGE}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        std::fs::copy(&kernel, tmp.join("kernel")).context("copying the kernel")?;
        std::fs::copy(&initrd, tmp.join("initrd")).context("copying the initramfs")?;
        std::fs::write(
            tmp.join("cmdline"),
            "console=ttyS0 quiet parvis.test=demo\n",
        )?;
        std::fs::rename(&tmp, &boot)?;
    }
    if agent.vms.find_by_name(DEMO_NAME).is_none() {
        agent
            .vms
            .create(&VmSpec {
                name: DEMO_NAME.into(),
                cpus: 1,
                memory_bytes: 256 << 20,
                boot_image: IMAGE.into(),
                display_width: 1024,
                display_height: 768,
                autostart: true,
                ..Default::default()
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}
