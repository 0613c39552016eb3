//! A VM's stored configuration, and the checks a spec must pass.

use proto::v1::{BootSource, DiskAttachment, DiskBus, DiskFormat, VmSpec};
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
    /// Configs written before boot sources existed boot their boot image.
    #[serde(default)]
    pub boot_source: Boot,
    /// With [`Boot::Disk`]: the entry to start (kernel version, title or index); empty =
    /// the disk's default.
    #[serde(default)]
    pub boot_entry: String,
    #[serde(default)]
    pub cmdline: String,
    pub display_width: u32,
    pub display_height: u32,
    #[serde(default)]
    pub autostart: bool,
    pub created_ms: i64,
    /// Network adapters, eth0 first.
    #[serde(default)]
    pub nics: Vec<NicRef>,
}

/// A network adapter: the switch it plugs into and its MAC address (given once, kept).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicRef {
    pub switch: String,
    pub mac: String,
}

/// Network adapters a VM may have.
pub const MAX_NICS: usize = 8;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRef {
    pub disk_id: String,
    #[serde(default)]
    pub read_only: bool,
    /// Configs written before buses existed booted their disks on virtio-blk: they still do.
    #[serde(default)]
    pub bus: Bus,
    /// SCSI controller.
    #[serde(default)]
    pub controller: u8,
    /// SCSI LUN (always set for SCSI disks once validated).
    #[serde(default)]
    pub lun: Option<u8>,
}

/// The controller a disk hangs on.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    #[default]
    Virtio,
    Scsi,
}

/// What a VM starts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Boot {
    /// The host's boot image (`boot_image`).
    #[default]
    Image,
    /// The kernel the first disk's own boot loader would start.
    Disk,
}

impl Boot {
    pub fn to_proto(self) -> BootSource {
        match self {
            Boot::Image => BootSource::Image,
            Boot::Disk => BootSource::Disk,
        }
    }
}

/// The entry `want` names among a disk's boot entries, as the worker's reader finds it: a
/// kernel version, a title, or a place in the menu.
pub fn find_entry(entries: &[proto::v1::BootEntry], want: &str) -> Option<usize> {
    let want = want.trim();
    entries
        .iter()
        .position(|e| !e.version.is_empty() && e.version == want)
        .or_else(|| entries.iter().position(|e| e.title == want))
        .or_else(|| want.parse::<usize>().ok().filter(|&n| n < entries.len()))
}

/// SCSI controllers a VM may have.
pub const MAX_SCSI_CONTROLLERS: u8 = 4;
/// LUNs per SCSI controller.
pub const MAX_LUNS: u8 = 64;

impl DiskRef {
    pub fn attachment(&self) -> DiskAttachment {
        DiskAttachment {
            disk_id: self.disk_id.clone(),
            read_only: self.read_only,
            bus: match self.bus {
                Bus::Virtio => DiskBus::Virtio,
                Bus::Scsi => DiskBus::Scsi,
            } as i32,
            controller: u32::from(self.controller),
            lun: self.lun.map(u32::from),
        }
    }

    /// A stored reference from a request's attachment: `format` is the library disk's,
    /// deciding the bus when the request leaves it open. `field` names the attachment in
    /// errors.
    pub fn from_attachment(
        d: &DiskAttachment,
        format: DiskFormat,
        field: &str,
    ) -> AgentResult<DiskRef> {
        let bad = |r: String| AgentError::invalid(field, r);
        let bus = match DiskBus::try_from(d.bus).unwrap_or(DiskBus::Unspecified) {
            DiskBus::Virtio => Bus::Virtio,
            DiskBus::Scsi => Bus::Scsi,
            DiskBus::Unspecified if d.bus != 0 => {
                return Err(bad(format!("bus {} is not virtio or SCSI", d.bus)));
            }
            DiskBus::Unspecified => match format {
                DiskFormat::Vhd | DiskFormat::Vhdx => Bus::Scsi,
                _ => Bus::Virtio,
            },
        };
        if bus == Bus::Virtio && (d.controller != 0 || d.lun.is_some()) {
            return Err(bad("controller and LUN apply to SCSI disks only".into()));
        }
        if d.controller >= u32::from(MAX_SCSI_CONTROLLERS) {
            return Err(bad(format!(
                "SCSI controller must be 0 to {}",
                MAX_SCSI_CONTROLLERS - 1
            )));
        }
        if let Some(l) = d.lun
            && l >= u32::from(MAX_LUNS)
        {
            return Err(bad(format!("SCSI LUN must be 0 to {}", MAX_LUNS - 1)));
        }
        Ok(DiskRef {
            disk_id: d.disk_id.clone(),
            read_only: d.read_only,
            bus,
            controller: d.controller as u8,
            lun: d.lun.map(|l| l as u8),
        })
    }
}

/// Give every SCSI disk of `disks` without a LUN the lowest free one on its controller; the
/// index and reason of the first disk whose place is taken or that finds none free.
pub fn place_disks(disks: &mut [DiskRef]) -> Result<(), (usize, String)> {
    let mut used = std::collections::HashSet::new();
    for (i, d) in disks.iter().enumerate() {
        if d.bus == Bus::Scsi
            && let Some(l) = d.lun
            && !used.insert((d.controller, l))
        {
            return Err((
                i,
                format!("controller {} LUN {l} holds another disk", d.controller),
            ));
        }
    }
    for (i, d) in disks.iter_mut().enumerate() {
        if d.bus == Bus::Scsi && d.lun.is_none() {
            let free = (0..MAX_LUNS)
                .find(|l| !used.contains(&(d.controller, *l)))
                .ok_or((i, format!("controller {} has no free LUN", d.controller)))?;
            used.insert((d.controller, free));
            d.lun = Some(free);
        }
    }
    Ok(())
}

impl VmConfig {
    pub fn spec(&self) -> VmSpec {
        VmSpec {
            name: self.name.clone(),
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
            disks: self.disks.iter().map(DiskRef::attachment).collect(),
            boot_image: self.boot_image.clone(),
            cmdline: self.cmdline.clone(),
            display_width: self.display_width,
            display_height: self.display_height,
            autostart: self.autostart,
            boot_source: self.boot_source.to_proto() as i32,
            boot_entry: self.boot_entry.clone(),
            nics: self
                .nics
                .iter()
                .map(|n| proto::v1::NetworkAdapter {
                    switch_name: n.switch.clone(),
                    mac: n.mac.clone(),
                })
                .collect(),
        }
    }
}

/// Check a spec and turn it into a config. `disk_format` is the format of a disk in the
/// library (None: no such disk); `name_taken` says whether another VM has the name;
/// `boots_by_default` whether a VM made from a disk boots that disk when the spec does not
/// say (an imported disk, or one whose boot entries were found).
pub fn validate(
    spec: &VmSpec,
    host: &HostFacts,
    disk_format: impl Fn(&str) -> Option<DiskFormat>,
    name_taken: impl Fn(&str) -> bool,
    boots_by_default: impl Fn(&str) -> bool,
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
        let format = crate::store::is_id(&d.disk_id)
            .then(|| disk_format(&d.disk_id))
            .flatten()
            .ok_or_else(|| {
                bad(
                    &field,
                    format!(
                        "no disk '{}' in the library",
                        crate::error::quote(&d.disk_id)
                    ),
                )
            })?;
        if disks.iter().any(|x: &DiskRef| x.disk_id == d.disk_id) {
            return Err(bad(field, "the same disk is attached twice"));
        }
        disks.push(DiskRef::from_attachment(
            d,
            format,
            &format!("spec.disks[{i}]"),
        )?);
    }
    place_disks(&mut disks).map_err(|(i, why)| bad(format!("spec.disks[{i}].lun"), why))?;
    let boot_source = match BootSource::try_from(spec.boot_source) {
        Ok(BootSource::Image) => Boot::Image,
        Ok(BootSource::Disk) => Boot::Disk,
        Ok(BootSource::Unspecified) => {
            if spec.boot_image.is_empty()
                && disks.first().is_some_and(|d| boots_by_default(&d.disk_id))
            {
                Boot::Disk
            } else {
                Boot::Image
            }
        }
        Err(_) => return Err(bad("spec.boot_source", "is not a known boot source")),
    };
    let boot_image = match boot_source {
        Boot::Image => {
            let name = if spec.boot_image.is_empty() {
                "default".to_string()
            } else {
                spec.boot_image.clone()
            };
            host.boot_image(&name)?;
            name
        }
        Boot::Disk => {
            if disks.is_empty() {
                return Err(bad(
                    "spec.boot_source",
                    "a VM that boots from its disk needs a disk",
                ));
            }
            spec.boot_image.clone()
        }
    };
    if spec.boot_image.len() > 200 {
        return Err(bad("spec.boot_image", "must be at most 200 bytes"));
    }
    let boot_entry = spec.boot_entry.trim().to_string();
    if boot_entry.len() > 200 || boot_entry.chars().any(char::is_control) {
        return Err(bad(
            "spec.boot_entry",
            "must be at most 200 bytes, without control characters",
        ));
    }
    if !boot_entry.is_empty() && boot_source != Boot::Disk {
        return Err(bad(
            "spec.boot_entry",
            "only a VM that boots from its disk has boot entries",
        ));
    }
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
    if spec.nics.len() > MAX_NICS {
        return Err(bad(
            "spec.nics",
            format!("at most {MAX_NICS} network adapters"),
        ));
    }
    let mut nics: Vec<NicRef> = Vec::new();
    for (i, n) in spec.nics.iter().enumerate() {
        if !crate::network::valid_name(&n.switch_name) {
            return Err(bad(
                format!("spec.nics[{i}].switch_name"),
                "must name a switch",
            ));
        }
        let mac = if n.mac.is_empty() {
            String::new()
        } else {
            crate::network::normalize_mac(&n.mac)
                .map_err(|r| bad(format!("spec.nics[{i}].mac"), r))?
        };
        if !mac.is_empty() && nics.iter().any(|x| x.mac == mac) {
            return Err(bad(
                format!("spec.nics[{i}].mac"),
                "two adapters have this address",
            ));
        }
        nics.push(NicRef {
            switch: n.switch_name.clone(),
            mac,
        });
    }
    Ok(VmConfig {
        id: String::new(),
        name: name.to_string(),
        cpus: spec.cpus,
        memory_bytes: spec.memory_bytes,
        disks,
        boot_image,
        boot_source,
        boot_entry,
        cmdline: spec.cmdline.clone(),
        display_width: w,
        display_height: h,
        autostart: spec.autostart,
        created_ms: 0,
        nics,
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
        let c = validate(
            &spec(),
            &host(d.path()),
            |_| Some(DiskFormat::Raw),
            |_| false,
            |_| false,
        )
        .unwrap();
        assert_eq!((c.display_width, c.display_height), DEFAULT_DISPLAY);
        assert_eq!(c.boot_image, "default");
    }

    #[test]
    fn network_adapters_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        let nic = |sw: &str, mac: &str| proto::v1::NetworkAdapter {
            switch_name: sw.into(),
            mac: mac.into(),
        };
        let v = |nics: Vec<proto::v1::NetworkAdapter>| {
            validate(
                &VmSpec { nics, ..spec() },
                &h,
                |_| None,
                |_| false,
                |_| false,
            )
        };
        let c = v(vec![nic("lab", "02-50-76-AA-00-01"), nic("lab", "")]).unwrap();
        assert_eq!(c.nics[0].mac, "02:50:76:aa:00:01");
        assert_eq!(c.nics[1].mac, "", "filled in by the VM inventory");
        assert_eq!(c.spec().nics[0].switch_name, "lab");
        assert_eq!(field_of(v(vec![nic("", "")])), "spec.nics[0].switch_name");
        assert_eq!(
            field_of(v(vec![nic("a b", "")])),
            "spec.nics[0].switch_name"
        );
        assert_eq!(
            field_of(v(vec![nic("lab", "01:00:00:00:00:01")])),
            "spec.nics[0].mac"
        );
        assert_eq!(
            field_of(v(vec![
                nic("lab", "02:00:00:00:00:01"),
                nic("x", "02:00:00:00:00:01")
            ])),
            "spec.nics[1].mac"
        );
        assert_eq!(field_of(v(vec![nic("lab", ""); 9])), "spec.nics");
    }

    #[test]
    fn bad_specs_name_the_field() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        let v = |s: VmSpec| {
            validate(
                &s,
                &h,
                |id| (id == "aaaaaaaaaaaa").then_some(DiskFormat::Raw),
                |_| false,
                |_| false,
            )
        };
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
                ..Default::default()
            }],
            ..spec()
        };
        assert_eq!(field_of(v(missing)), "spec.disks[0].disk_id");
        let traversal = VmSpec {
            disks: vec![DiskAttachment {
                disk_id: "../../etc".into(),
                ..Default::default()
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
            validate(&spec(), &h, |_| None, |n| n == "web", |_| false),
            Err(AgentError::AlreadyExists(_))
        ));
    }

    #[test]
    fn an_imported_disk_boots_itself_unless_the_spec_says_otherwise() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        let format = |_: &str| Some(DiskFormat::Vhdx);
        let imported = |id: &str| id == "aaaaaaaaaaaa";
        let with = |id: &str| VmSpec {
            disks: vec![DiskAttachment {
                disk_id: id.into(),
                ..Default::default()
            }],
            ..spec()
        };
        let v = |s: &VmSpec| validate(s, &h, format, |_| false, imported);
        // Imported, nothing said: the disk, and GetVm's spec says so.
        let c = v(&with("aaaaaaaaaaaa")).unwrap();
        assert_eq!(c.boot_source, Boot::Disk);
        assert_eq!(c.spec().boot_source, BootSource::Disk as i32);
        assert_eq!(v(&c.spec()).unwrap(), c);
        // A disk made empty on the host, or a boot image named: the boot image.
        assert_eq!(v(&with("bbbbbbbbbbbb")).unwrap().boot_source, Boot::Image);
        let named = VmSpec {
            boot_image: "default".into(),
            ..with("aaaaaaaaaaaa")
        };
        assert_eq!(v(&named).unwrap().boot_source, Boot::Image);
        // Said explicitly, either way.
        let image = VmSpec {
            boot_source: BootSource::Image as i32,
            ..with("aaaaaaaaaaaa")
        };
        assert_eq!(v(&image).unwrap().boot_image, "default");
        let disk = VmSpec {
            boot_source: BootSource::Disk as i32,
            boot_entry: " 6.1.0-28-amd64 ".into(),
            ..with("bbbbbbbbbbbb")
        };
        let c = v(&disk).unwrap();
        assert_eq!(
            (c.boot_source, c.boot_entry.as_str()),
            (Boot::Disk, "6.1.0-28-amd64")
        );
        // A disk boot with no disk, an entry without a disk boot, junk.
        let none = VmSpec {
            boot_source: BootSource::Disk as i32,
            ..spec()
        };
        assert_eq!(field_of(v(&none)), "spec.boot_source");
        let entry = VmSpec {
            boot_entry: "6.1".into(),
            ..spec()
        };
        assert_eq!(field_of(v(&entry)), "spec.boot_entry");
        let junk = VmSpec {
            boot_source: 7,
            ..spec()
        };
        assert_eq!(field_of(v(&junk)), "spec.boot_source");
        let control = VmSpec {
            boot_entry: "a\nb".into(),
            ..disk.clone()
        };
        assert_eq!(field_of(v(&control)), "spec.boot_entry");
        // Stored settings from before boot sources existed: the boot image.
        let old: VmConfig = serde_json::from_str(
            r#"{"id":"x","name":"n","cpus":1,"memory_bytes":67108864,"disks":[],
                "boot_image":"default","display_width":1024,"display_height":768,
                "created_ms":0}"#,
        )
        .unwrap();
        assert_eq!(
            (old.boot_source, old.boot_entry.as_str()),
            (Boot::Image, "")
        );
    }

    #[test]
    fn vhdx_disks_go_on_scsi_and_get_the_lowest_free_lun() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        let format = |id: &str| match id {
            "aaaaaaaaaaaa" | "cccccccccccc" => Some(DiskFormat::Vhdx),
            "bbbbbbbbbbbb" => Some(DiskFormat::Raw),
            "dddddddddddd" => Some(DiskFormat::Vhd),
            _ => None,
        };
        let att = |id: &str, bus: DiskBus, lun: Option<u32>| DiskAttachment {
            disk_id: id.into(),
            bus: bus as i32,
            lun,
            ..Default::default()
        };
        let s = VmSpec {
            disks: vec![
                att("aaaaaaaaaaaa", DiskBus::Unspecified, None),
                att("bbbbbbbbbbbb", DiskBus::Unspecified, None),
                att("cccccccccccc", DiskBus::Scsi, Some(0)),
                att("dddddddddddd", DiskBus::Virtio, None),
            ],
            ..spec()
        };
        let c = validate(&s, &h, format, |_| false, |_| false).unwrap();
        let got: Vec<(Bus, Option<u8>)> = c.disks.iter().map(|d| (d.bus, d.lun)).collect();
        assert_eq!(
            got,
            [
                (Bus::Scsi, Some(1)),
                (Bus::Virtio, None),
                (Bus::Scsi, Some(0)),
                (Bus::Virtio, None)
            ]
        );
        // What GetVm reports goes back in unchanged.
        let again = validate(&c.spec(), &h, format, |_| false, |_| false).unwrap();
        assert_eq!(again.disks, c.disks);
        // Two disks in one place, a LUN on virtio, numbers out of range.
        let clash = VmSpec {
            disks: vec![
                att("aaaaaaaaaaaa", DiskBus::Scsi, Some(3)),
                att("cccccccccccc", DiskBus::Scsi, Some(3)),
            ],
            ..spec()
        };
        assert_eq!(
            field_of(validate(&clash, &h, format, |_| false, |_| false)),
            "spec.disks[1].lun"
        );
        for bad in [
            att("bbbbbbbbbbbb", DiskBus::Virtio, Some(0)),
            att("aaaaaaaaaaaa", DiskBus::Scsi, Some(64)),
            DiskAttachment {
                controller: 4,
                ..att("aaaaaaaaaaaa", DiskBus::Scsi, None)
            },
            att(
                "aaaaaaaaaaaa",
                7.try_into().unwrap_or(DiskBus::Unspecified),
                None,
            ),
        ] {
            let mut b = bad.clone();
            if bad.bus == 0 {
                b.bus = 7;
            }
            let s = VmSpec {
                disks: vec![b],
                ..spec()
            };
            assert_eq!(
                field_of(validate(&s, &h, format, |_| false, |_| false)),
                "spec.disks[0]"
            );
        }
        // An old config without buses reads as virtio-blk.
        let old: DiskRef = serde_json::from_str(r#"{"disk_id":"aaaaaaaaaaaa"}"#).unwrap();
        assert_eq!((old.bus, old.lun), (Bus::Virtio, None));
    }
}
