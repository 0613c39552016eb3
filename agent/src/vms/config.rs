//! A VM's stored configuration, and the checks a spec must pass.

use proto::v1::{DiskAttachment, VmSpec};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, AgentResult};
use crate::host::HostFacts;

/// Largest vCPU count the worker supports.
pub const MAX_CPUS: u32 = 254;
/// Smallest guest memory.
pub const MIN_MEMORY: u64 = 64 << 20;
/// VRAM the worker gives each VM; the screen must fit.
pub const VRAM: u64 = 16 << 20;
pub const DEFAULT_DISPLAY: (u32, u32) = (1024, 768);

/// What `vms/<id>/vm.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmConfig {
    pub id: String,
    pub name: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disks: Vec<DiskRef>,
    pub boot_image: String,
    #[serde(default)]
    pub cmdline: String,
    pub display_width: u32,
    pub display_height: u32,
    #[serde(default)]
    pub autostart: bool,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRef {
    pub disk_id: String,
    #[serde(default)]
    pub read_only: bool,
}

impl VmConfig {
    pub fn spec(&self) -> VmSpec {
        VmSpec {
            name: self.name.clone(),
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
            disks: self
                .disks
                .iter()
                .map(|d| DiskAttachment {
                    disk_id: d.disk_id.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            boot_image: self.boot_image.clone(),
            cmdline: self.cmdline.clone(),
            display_width: self.display_width,
            display_height: self.display_height,
            autostart: self.autostart,
        }
    }
}

/// Check a spec and turn it into a config. `disk_exists` says whether a disk id is in the
/// library; `name_taken` whether another VM has the name.
pub fn validate(
    spec: &VmSpec,
    host: &HostFacts,
    disk_exists: impl Fn(&str) -> bool,
    name_taken: impl Fn(&str) -> bool,
) -> AgentResult<VmConfig> {
    fn bad(f: impl Into<String>, r: impl Into<String>) -> AgentError {
        AgentError::invalid(f, r)
    }
    let name = spec.name.trim();
    if name.is_empty() {
        return Err(bad("spec.name", "must not be empty"));
    }
    if name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(bad(
            "spec.name",
            "must be at most 100 characters, without control characters",
        ));
    }
    if name_taken(name) {
        return Err(AgentError::AlreadyExists(format!(
            "a VM named '{name}' already exists"
        )));
    }
    let max_cpus = match host.kvm.max_vcpus {
        0 => MAX_CPUS,
        n => n.min(MAX_CPUS),
    };
    if spec.cpus == 0 || spec.cpus > max_cpus {
        return Err(bad(
            "spec.cpus",
            format!("must be between 1 and {max_cpus}"),
        ));
    }
    if spec.memory_bytes < MIN_MEMORY || !spec.memory_bytes.is_multiple_of(1 << 20) {
        return Err(bad(
            "spec.memory_bytes",
            format!(
                "must be a whole number of MiB and at least {} MiB",
                MIN_MEMORY >> 20
            ),
        ));
    }
    if host.memory_bytes > 0 && spec.memory_bytes > host.memory_bytes {
        return Err(bad(
            "spec.memory_bytes",
            format!(
                "{} MiB is more than this host has ({} MiB)",
                spec.memory_bytes >> 20,
                host.memory_bytes >> 20
            ),
        ));
    }
    let mut disks = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let field = format!("spec.disks[{i}].disk_id");
        if !crate::store::is_id(&d.disk_id) || !disk_exists(&d.disk_id) {
            return Err(bad(
                field,
                format!(
                    "no disk '{}' in the library",
                    crate::error::quote(&d.disk_id)
                ),
            ));
        }
        if disks.iter().any(|x: &DiskRef| x.disk_id == d.disk_id) {
            return Err(bad(field, "the same disk is attached twice"));
        }
        disks.push(DiskRef {
            disk_id: d.disk_id.clone(),
            read_only: d.read_only,
        });
    }
    let boot_image = if spec.boot_image.is_empty() {
        "default".to_string()
    } else {
        spec.boot_image.clone()
    };
    host.boot_image(&boot_image)?;
    if spec.cmdline.len() > 2048 {
        return Err(bad("spec.cmdline", "must be at most 2048 bytes"));
    }
    let (w, h) = match (spec.display_width, spec.display_height) {
        (0, 0) => DEFAULT_DISPLAY,
        (w, h) => (w, h),
    };
    if !(320..=7680).contains(&w)
        || !(200..=4320).contains(&h)
        || u64::from(w) * u64::from(h) * 4 > VRAM
    {
        return Err(bad(
            "spec.display_width",
            format!("{w}x{h} is not a supported screen size (at most 16 MiB of 32-bit pixels)"),
        ));
    }
    Ok(VmConfig {
        id: String::new(),
        name: name.to_string(),
        cpus: spec.cpus,
        memory_bytes: spec.memory_bytes,
        disks,
        boot_image,
        cmdline: spec.cmdline.clone(),
        display_width: w,
        display_height: h,
        autostart: spec.autostart,
        created_ms: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dir: &std::path::Path) -> HostFacts {
        let boot = dir.join("boot");
        std::fs::create_dir_all(boot.join("default")).unwrap();
        std::fs::write(boot.join("default/kernel"), b"k").unwrap();
        HostFacts {
            hostname: "h".into(),
            logical_cpus: 2,
            memory_bytes: 4 << 30,
            kvm: Default::default(),
            worker_bin: "/nonexistent".into(),
            boot_dir: boot,
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            name: "web".into(),
            cpus: 2,
            memory_bytes: 512 << 20,
            ..Default::default()
        }
    }

    fn field_of(r: AgentResult<VmConfig>) -> String {
        match r {
            Err(AgentError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_good_spec_gets_defaults() {
        let d = tempfile::tempdir().unwrap();
        let c = validate(&spec(), &host(d.path()), |_| true, |_| false).unwrap();
        assert_eq!((c.display_width, c.display_height), DEFAULT_DISPLAY);
        assert_eq!(c.boot_image, "default");
    }

    #[test]
    fn bad_specs_name_the_field() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        let v = |s: VmSpec| validate(&s, &h, |id| id == "aaaaaaaaaaaa", |_| false);
        assert_eq!(field_of(v(VmSpec { cpus: 0, ..spec() })), "spec.cpus");
        assert_eq!(
            field_of(v(VmSpec {
                name: " ".into(),
                ..spec()
            })),
            "spec.name"
        );
        assert_eq!(
            field_of(v(VmSpec {
                memory_bytes: 64 << 30,
                ..spec()
            })),
            "spec.memory_bytes"
        );
        assert_eq!(
            field_of(v(VmSpec {
                memory_bytes: 1,
                ..spec()
            })),
            "spec.memory_bytes"
        );
        let missing = VmSpec {
            disks: vec![DiskAttachment {
                disk_id: "bbbbbbbbbbbb".into(),
                read_only: false,
            }],
            ..spec()
        };
        assert_eq!(field_of(v(missing)), "spec.disks[0].disk_id");
        let traversal = VmSpec {
            disks: vec![DiskAttachment {
                disk_id: "../../etc".into(),
                read_only: false,
            }],
            ..spec()
        };
        assert_eq!(field_of(v(traversal)), "spec.disks[0].disk_id");
        assert_eq!(
            field_of(v(VmSpec {
                boot_image: "../x".into(),
                ..spec()
            })),
            "spec.boot_image"
        );
        assert_eq!(
            field_of(v(VmSpec {
                display_width: 8000,
                display_height: 8000,
                ..spec()
            })),
            "spec.display_width"
        );
        assert!(matches!(
            validate(&spec(), &h, |_| true, |n| n == "web"),
            Err(AgentError::AlreadyExists(_))
        ));
    }
}
