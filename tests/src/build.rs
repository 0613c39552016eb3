//! Everything a scenario needs, built once per test process: the guest images (Debian kernel,
//! L2 and L1 initramfs, cached under `~/.cache/parvis`) and the statically linked
//! `parvis-worker` that runs inside the test host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// Paths of the built artefacts.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// Folder with `vmlinux`, `vmlinuz`, `l2-initramfs.cpio`, `l1-initramfs.cpio`.
    pub images: PathBuf,
    /// Folder with the static `parvis-worker` and `parvis-agent`.
    pub bin: PathBuf,
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Build (or reuse) the images and the static worker. Fails with the reason when a build
/// step fails; the result is cached for the life of the process.
pub fn artifacts() -> Result<&'static Artifacts> {
    static CELL: OnceLock<std::result::Result<Artifacts, String>> = OnceLock::new();
    CELL.get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn build() -> Result<Artifacts> {
    let images = build_images()?;
    let bin = build_static_worker()?;
    Ok(Artifacts { images, bin })
}

fn build_images() -> Result<PathBuf> {
    let script = workspace().join("assets/guest/build-images.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = String::from_utf8(out.stdout).context("images path is not UTF-8")?;
    let dir = PathBuf::from(dir.trim());
    for f in [
        "vmlinux",
        "vmlinuz",
        "l2-initramfs.cpio",
        "l2-storvsc.cpio",
        "l1-initramfs.cpio",
    ] {
        if !dir.join(f).is_file() {
            bail!("the image build did not produce {}", dir.join(f).display());
        }
    }
    Ok(dir)
}

/// Build (or reuse) the realistic guest disks of `assets/guest/build-disks.sh` (Debian 12
/// installed with debootstrap, GRUB and initramfs-tools: Generation 1 and 2 VHDX, an Azure
/// fixed VHD, an xfs /boot with Boot Loader Spec entries, a disk with no Linux); returns
/// their folder, with `manifest.txt`. Fails with the reason when the build fails.
pub fn guest_disks() -> Result<PathBuf> {
    static CELL: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    CELL.get_or_init(|| {
        let script = workspace().join("assets/guest/build-disks.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                crate::testhost::tail(&String::from_utf8_lossy(&out.stderr), 40)
            ));
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !dir.join("manifest.txt").is_file() {
            return Err(format!("{} made no manifest.txt", script.display()));
        }
        Ok(dir)
    })
    .clone()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Where the static build goes: beside the normal target folder, never inside the clone when
/// `CARGO_TARGET_DIR` points elsewhere (CI caches it).
pub fn static_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("l1-static")
}

/// The programs built statically for the test host.
pub const L1_PROGRAMS: [&str; 3] = ["parvis-worker", "parvis-agent", "parvis"];

fn build_static_worker() -> Result<PathBuf> {
    let target = static_target_dir();
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "parvis_worker",
            "--bin",
            "parvis-worker",
            "-p",
            "agent",
            "--bin",
            "parvis-agent",
            "--bin",
            "parvis",
        ])
        .env("CARGO_TARGET_DIR", &target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .context("cannot run cargo to build the static programs")?;
    if !status.success() {
        bail!("building the static parvis-worker, parvis-agent and parvis failed ({status})");
    }
    let bin = target.join("x86_64-unknown-linux-gnu/release");
    for name in L1_PROGRAMS {
        if !bin.join(name).is_file() {
            bail!("{} is missing after the build", bin.join(name).display());
        }
    }
    Ok(bin)
}
