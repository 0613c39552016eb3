//! Facts about the host: CPUs, memory, KVM, boot images.

use std::path::{Path, PathBuf};
use std::process::Command;

use proto::v1::{BootImage, KvmInfo};
use serde::Deserialize;

use crate::error::{AgentError, AgentResult};

/// What does not change while the agent runs.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub hostname: String,
    pub logical_cpus: u32,
    pub memory_bytes: u64,
    pub kvm: KvmInfo,
    /// The worker binary the agent spawns.
    pub worker_bin: PathBuf,
    /// Directory of boot images: one subdirectory per image with `kernel`, optional
    /// `initrd` and optional `cmdline`.
    pub boot_dir: PathBuf,
}

#[derive(Debug, Deserialize)]
struct Probe {
    usable: bool,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    api_version: i32,
    #[serde(default)]
    max_vcpus: u32,
    #[serde(default)]
    capabilities: Vec<String>,
}

impl HostFacts {
    /// Gather the facts; KVM's are asked of the worker (`parvis-worker probe`), since the
    /// agent never talks to KVM itself.
    pub fn gather(worker_bin: PathBuf, boot_dir: PathBuf) -> Self {
        let hostname = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let logical_cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_bytes = meminfo("MemTotal:").unwrap_or(0);
        let kvm = probe_kvm(&worker_bin);
        HostFacts {
            hostname,
            logical_cpus,
            memory_bytes,
            kvm,
            worker_bin,
            boot_dir,
        }
    }

    /// Memory the host could give a new VM now.
    pub fn memory_available(&self) -> u64 {
        meminfo("MemAvailable:").unwrap_or(0)
    }

    /// The boot images, sorted by name.
    pub fn boot_images(&self) -> Vec<BootImage> {
        let Ok(rd) = std::fs::read_dir(&self.boot_dir) else {
            return Vec::new();
        };
        let mut v: Vec<BootImage> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let b = self.boot_image(&name).ok()?;
                Some(BootImage {
                    name,
                    kernel_size: std::fs::metadata(&b.kernel).ok()?.len(),
                    has_initrd: b.initrd.is_some(),
                    default_cmdline: b.cmdline,
                })
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Find a boot image by name.
    pub fn boot_image(&self, name: &str) -> AgentResult<BootFiles> {
        let bad = || {
            AgentError::invalid(
                "spec.boot_image",
                format!("no boot image '{}' on this host", crate::error::quote(name)),
            )
        };
        if name.is_empty() || name.starts_with('.') || name.contains('/') {
            return Err(bad());
        }
        let dir = self.boot_dir.join(name);
        let kernel = dir.join("kernel");
        if !kernel.is_file() {
            return Err(bad());
        }
        let initrd = Some(dir.join("initrd")).filter(|p| p.is_file());
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "console=ttyS0".into());
        Ok(BootFiles {
            kernel,
            initrd,
            cmdline,
        })
    }
}

/// A boot image's files.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn probe_kvm(worker_bin: &Path) -> KvmInfo {
    let out = match Command::new(worker_bin).arg("probe").output() {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("cannot run {} probe: {e}", worker_bin.display());
            return KvmInfo {
                usable: false,
                reason: "the VM worker program could not be run".into(),
                ..Default::default()
            };
        }
    };
    match serde_json::from_slice::<Probe>(&out.stdout) {
        Ok(p) => KvmInfo {
            usable: p.usable,
            reason: p.reason,
            api_version: p.api_version,
            max_vcpus: p.max_vcpus,
            capabilities: p.capabilities,
        },
        Err(e) => {
            tracing::warn!("unreadable probe output from the worker: {e}");
            KvmInfo {
                usable: false,
                reason: "the VM worker's KVM probe failed".into(),
                ..Default::default()
            }
        }
    }
}
