//! The checks a VM's settings must pass, as the agent makes them (`agent::vms::config`), so
//! the New VM and Settings dialogs say what is wrong beside the field before anything is
//! sent. The agent stays the judge: what it refuses anyway is shown in its words.

use proto::v1::VmSpec;

use super::state::Host;

/// Most vCPUs the worker supports.
const MAX_CPUS: u32 = 254;
/// Least guest memory, in MiB.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Screen sizes the worker's VRAM (16 MiB of 32-bit pixels) holds.
const VRAM: u64 = 16 << 20;
pub const WIDTHS: std::ops::RangeInclusive<u32> = 320..=7680;
pub const HEIGHTS: std::ops::RangeInclusive<u32> = 200..=4320;

/// A setting that can be wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Name,
    Cpus,
    Memory,
    Screen,
    Cmdline,
    Disks,
    Boot,
}

/// What the host allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_cpus: u32,
    /// 0: not known.
    pub memory_bytes: u64,
}

impl Limits {
    pub fn of(host: Option<&Host>) -> Self {
        let info = host.and_then(|h| h.info.as_ref());
        let max_vcpus = info.and_then(|i| i.kvm.as_ref()).map_or(0, |k| k.max_vcpus);
        Limits {
            max_cpus: match max_vcpus {
                0 => MAX_CPUS,
                n => n.min(MAX_CPUS),
            },
            memory_bytes: info.map_or(0, |i| i.memory_bytes),
        }
    }
}

/// Every problem of `spec`, one sentence each. `name_taken`: another VM on the host has the
/// name.
pub fn check(spec: &VmSpec, limits: Limits, name_taken: bool) -> Vec<(Field, String)> {
    let mut out = Vec::new();
    let name = spec.name.trim();
    if name.is_empty() {
        out.push((Field::Name, "give the VM a name".to_string()));
    } else if name.chars().count() > 100 || name.chars().any(char::is_control) {
        out.push((
            Field::Name,
            "the name must be at most 100 characters, without control characters".into(),
        ));
    } else if name_taken {
        out.push((Field::Name, format!("a VM named '{name}' already exists")));
    }
    if spec.cpus == 0 || spec.cpus > limits.max_cpus {
        out.push((
            Field::Cpus,
            format!("CPUs must be between 1 and {}", limits.max_cpus),
        ));
    }
    let mib = spec.memory_bytes >> 20;
    if mib < MIN_MEMORY_MIB || !spec.memory_bytes.is_multiple_of(1 << 20) {
        out.push((
            Field::Memory,
            format!("memory must be a whole number of MiB and at least {MIN_MEMORY_MIB} MiB"),
        ));
    } else if limits.memory_bytes > 0 && spec.memory_bytes > limits.memory_bytes {
        out.push((
            Field::Memory,
            format!(
                "{mib} MiB is more than this host has ({} MiB)",
                limits.memory_bytes >> 20
            ),
        ));
    }
    let (w, h) = match (spec.display_width, spec.display_height) {
        (0, 0) => (1024, 768),
        s => s,
    };
    if !WIDTHS.contains(&w) || !HEIGHTS.contains(&h) || u64::from(w) * u64::from(h) * 4 > VRAM {
        out.push((
            Field::Screen,
            format!("{w}x{h} is not a supported screen size (at most 16 MiB of 32-bit pixels)"),
        ));
    }
    if spec.cmdline.len() > 2048 {
        out.push((
            Field::Cmdline,
            "the kernel command line must be at most 2048 bytes".into(),
        ));
    }
    if spec.boot_source == proto::v1::BootSource::Disk as i32 && spec.disks.is_empty() {
        out.push((
            Field::Boot,
            "attach the disk to boot from, or boot a boot image".into(),
        ));
    }
    for (i, d) in spec.disks.iter().enumerate() {
        if spec.disks[..i].iter().any(|x| x.disk_id == d.disk_id) {
            out.push((Field::Disks, "the same disk is attached twice".into()));
            break;
        }
    }
    out
}

/// The problem with `field`, if any.
pub fn problem(problems: &[(Field, String)], field: Field) -> Option<&str> {
    problems
        .iter()
        .find(|(f, _)| *f == field)
        .map(|(_, s)| s.as_str())
}

#[cfg(test)]
mod tests {
    use proto::v1::DiskAttachment;

    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "web".into(),
            cpus: 2,
            memory_bytes: 512 << 20,
            display_width: 1024,
            display_height: 768,
            ..Default::default()
        }
    }

    const HOST: Limits = Limits {
        max_cpus: 8,
        memory_bytes: 4 << 30,
    };

    #[test]
    fn settings_are_checked_as_the_agent_checks_them() {
        assert!(check(&spec(), HOST, false).is_empty());
        let fields = |s: &VmSpec, taken| -> Vec<Field> {
            check(s, HOST, taken).into_iter().map(|(f, _)| f).collect()
        };
        assert_eq!(fields(&spec(), true), [Field::Name]);
        assert_eq!(fields(&VmSpec { cpus: 9, ..spec() }, false), [Field::Cpus]);
        assert_eq!(fields(&VmSpec { cpus: 0, ..spec() }, false), [Field::Cpus]);
        assert_eq!(
            fields(
                &VmSpec {
                    memory_bytes: 32 << 20,
                    ..spec()
                },
                false
            ),
            [Field::Memory]
        );
        assert_eq!(
            check(
                &VmSpec {
                    memory_bytes: 8 << 30,
                    ..spec()
                },
                HOST,
                false
            )[0]
            .1,
            "8192 MiB is more than this host has (4096 MiB)"
        );
        assert_eq!(
            fields(
                &VmSpec {
                    display_width: 3840,
                    display_height: 2160,
                    ..spec()
                },
                false
            ),
            [Field::Screen]
        );
        assert!(
            check(
                &VmSpec {
                    display_width: 0,
                    display_height: 0,
                    ..spec()
                },
                HOST,
                false
            )
            .is_empty()
        );
        let d = DiskAttachment {
            disk_id: "d".into(),
            read_only: false,
            ..Default::default()
        };
        assert_eq!(
            fields(
                &VmSpec {
                    disks: vec![d.clone(), d],
                    ..spec()
                },
                false
            ),
            [Field::Disks]
        );
        assert_eq!(Limits::of(None).max_cpus, 254);
    }
}
