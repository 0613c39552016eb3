//! Worker configuration: a TOML file and/or command-line flags, merged into a
//! [`PartitionConfig`](crate::partition::PartitionConfig).

use std::path::PathBuf;
use std::str::FromStr;

use crate::framebuffer::FbFormat;
use crate::partition::RebootAction;

/// A configuration value that cannot be used, with the setting it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    /// The setting (flag or TOML key).
    pub setting: &'static str,
    /// What is wrong.
    pub message: String,
}

fn bad(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        message: message.into(),
    }
}

/// A byte size written as `536870912`, `512M`, `512MiB`, `2G`, `1T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a size (examples: 512M, 2G)"))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" | "kb" => 10,
            "m" | "mib" | "mb" => 20,
            "g" | "gib" | "gb" => 30,
            "t" | "tib" | "tb" => 40,
            u => return Err(format!("unknown size unit '{u}' in '{s}'")),
        };
        n.checked_mul(1 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("size '{s}' is too large"))
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The controller a disk hangs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// virtio-blk over virtio-mmio (`/dev/vdX` in a Linux guest).
    #[default]
    Virtio,
    /// The VMBus synthetic SCSI controller (`hv_storvsc`, `/dev/sdX`); needs Hyper-V
    /// enlightenments. Disks can be added and removed while the guest runs.
    Scsi,
}

impl FromStr for DiskBus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "virtio" => Ok(DiskBus::Virtio),
            "scsi" => Ok(DiskBus::Scsi),
            _ => Err(format!("unknown bus '{s}' (use virtio or scsi)")),
        }
    }
}

/// One disk:
/// `PATH[,ro][,sector-size=512|4096][,bus=virtio|scsi][,controller=N][,lun=N][,id=ID][,discard]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Image path.
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Logical sector size the guest sees (raw images; VHDX images carry their own).
    #[serde(default)]
    pub sector_size: Option<u32>,
    /// Which controller.
    #[serde(default)]
    pub bus: DiskBus,
    /// SCSI controller number (0 to 3).
    #[serde(default)]
    pub controller: u8,
    /// SCSI LUN (0 to 63); the next free one when not given.
    #[serde(default)]
    pub lun: Option<u8>,
    /// Stable id the SCSI serial number and WWN derive from (default: the file name).
    #[serde(default)]
    pub id: Option<String>,
    /// Let the guest discard (SCSI UNMAP): freed blocks are punched out of the image.
    #[serde(default)]
    pub discard: bool,
}

impl DiskSpec {
    /// A read-write virtio-blk disk at `path` with everything else default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskSpec {
            path: path.into(),
            read_only: false,
            sector_size: None,
            bus: DiskBus::Virtio,
            controller: 0,
            lun: None,
            id: None,
            discard: false,
        }
    }

    /// The id the disk's SCSI identity derives from.
    pub fn identity_key(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.path.display().to_string())
        })
    }

    /// Check the values a parser or a TOML file cannot.
    pub fn check(&self) -> Result<(), String> {
        if let Some(s) = self.sector_size
            && s != 512
            && s != 4096
        {
            return Err(format!("sector size must be 512 or 4096, not {s}"));
        }
        if self.controller > 3 {
            return Err(format!(
                "SCSI controller must be 0 to 3, not {}",
                self.controller
            ));
        }
        if let Some(l) = self.lun
            && l > 63
        {
            return Err(format!("SCSI LUN must be 0 to 63, not {l}"));
        }
        if self.bus == DiskBus::Virtio && (self.lun.is_some() || self.controller != 0) {
            return Err("controller and lun apply to SCSI disks only (add bus=scsi)".into());
        }
        if let Some(id) = &self.id
            && (id.is_empty() || id.len() > 128 || id.chars().any(char::is_control))
        {
            return Err("disk id must be 1 to 128 characters without control characters".into());
        }
        Ok(())
    }
}

impl FromStr for DiskSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("empty disk path")?;
        let mut d = DiskSpec::new(path);
        let number = |k: &str, v: &str| -> Result<u32, String> {
            v.parse().map_err(|_| format!("bad {k} '{v}'"))
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => d.read_only = true,
                None if opt == "rw" => d.read_only = false,
                None if opt == "discard" => d.discard = true,
                Some(("sector-size", v)) => d.sector_size = Some(number("sector size", v)?),
                Some(("bus", v)) => d.bus = v.parse()?,
                Some(("controller", v)) => {
                    d.controller = u8::try_from(number("controller", v)?)
                        .map_err(|_| format!("bad controller '{v}'"))?;
                }
                Some(("lun", v)) => {
                    d.lun = Some(
                        u8::try_from(number("LUN", v)?).map_err(|_| format!("bad LUN '{v}'"))?,
                    );
                }
                Some(("id", v)) => d.id = Some(v.to_string()),
                _ => {
                    return Err(format!(
                        "unknown disk option '{opt}' (use ro, sector-size=N, bus=virtio|scsi, \
                         controller=N, lun=N, id=ID, discard)"
                    ));
                }
            }
        }
        d.check()?;
        Ok(d)
    }
}

/// A framebuffer geometry `WIDTHxHEIGHT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution(pub u32, pub u32);

impl FromStr for Resolution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (w, h) = s
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("'{s}' is not WIDTHxHEIGHT"))?;
        let p = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("'{s}' is not WIDTHxHEIGHT"))
        };
        Ok(Resolution(p(w)?, p(h)?))
    }
}

impl<'de> serde::Deserialize<'de> for Resolution {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The settings a worker runs with. Every field is optional in the file; flags override.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Kernel image.
    pub kernel: Option<PathBuf>,
    /// initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// RAM.
    pub memory: Option<ByteSize>,
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Framebuffer geometry, or absent for the default.
    pub framebuffer: Option<Resolution>,
    /// Disable the boot framebuffer.
    #[serde(default)]
    pub no_framebuffer: bool,
    /// Reboot handling.
    pub on_reboot: Option<RebootAction>,
    /// Hyper-V enlightenments and VMBus: off, auto, kernel or userspace.
    pub hyperv: Option<crate::hv::HvMode>,
}

/// Defaults.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Default framebuffer.
pub const DEFAULT_FB: Resolution = Resolution(1024, 768);
/// Default Hyper-V mode.
pub const DEFAULT_HYPERV: crate::hv::HvMode = crate::hv::HvMode::Off;
/// Default command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

impl WorkerSettings {
    /// Parse a TOML file's contents.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| bad("config file", e.message().to_string()))
    }

    /// Overlay `other` (the command line) on `self` (the file).
    pub fn merge(mut self, other: WorkerSettings) -> Self {
        self.kernel = other.kernel.or(self.kernel);
        self.initrd = other.initrd.or(self.initrd);
        self.cmdline = other.cmdline.or(self.cmdline);
        self.memory = other.memory.or(self.memory);
        self.cpus = other.cpus.or(self.cpus);
        if !other.disks.is_empty() {
            self.disks = other.disks;
        }
        self.framebuffer = other.framebuffer.or(self.framebuffer);
        self.no_framebuffer |= other.no_framebuffer;
        self.on_reboot = other.on_reboot.or(self.on_reboot);
        self.hyperv = other.hyperv.or(self.hyperv);
        self
    }

    /// Validate and resolve defaults. Disks are opened by the caller.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let kernel = self
            .kernel
            .clone()
            .ok_or_else(|| bad("kernel", "no kernel given (--kernel PATH)"))?;
        if !kernel.is_file() {
            return Err(bad(
                "kernel",
                format!("{} is not a readable file", kernel.display()),
            ));
        }
        if let Some(i) = &self.initrd
            && !i.is_file()
        {
            return Err(bad(
                "initrd",
                format!("{} is not a readable file", i.display()),
            ));
        }
        let cpus = self.cpus.unwrap_or(1);
        if cpus == 0 || cpus > u32::from(crate::partition::MAX_CPUS) {
            return Err(bad(
                "cpus",
                format!("must be between 1 and {}", crate::partition::MAX_CPUS),
            ));
        }
        let memory = self.memory.map_or(DEFAULT_MEMORY, |m| m.0);
        if memory < crate::layout::MIN_MEMORY {
            return Err(bad(
                "memory",
                format!("must be at least {} MiB", crate::layout::MIN_MEMORY >> 20),
            ));
        }
        if let Some(host) = host_memory()
            && memory > host
        {
            return Err(bad(
                "memory",
                format!(
                    "{} MiB is more than this host has ({} MiB)",
                    memory >> 20,
                    host >> 20
                ),
            ));
        }
        for d in &self.disks {
            d.check().map_err(|e| bad("disk", e))?;
        }
        let framebuffer = if self.no_framebuffer {
            None
        } else {
            let Resolution(w, h) = self.framebuffer.unwrap_or(DEFAULT_FB);
            let f = FbFormat::xrgb(w, h);
            f.validate(crate::layout::VRAM_SIZE)
                .map_err(|e| bad("framebuffer", e.to_string()))?;
            Some(f)
        };
        Ok(Resolved {
            kernel,
            initrd: self.initrd.clone(),
            cmdline: self
                .cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.into()),
            memory,
            cpus: cpus as u8,
            disks: self.disks.clone(),
            framebuffer,
            on_reboot: self.on_reboot.unwrap_or_default(),
            hyperv: self.hyperv.unwrap_or(DEFAULT_HYPERV),
        })
    }
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Kernel.
    pub kernel: PathBuf,
    /// initramfs.
    pub initrd: Option<PathBuf>,
    /// Command line.
    pub cmdline: String,
    /// RAM bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u8,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// Framebuffer.
    pub framebuffer: Option<FbFormat>,
    /// Reboot handling.
    pub on_reboot: RebootAction,
    /// Hyper-V enlightenments and VMBus.
    pub hyperv: crate::hv::HvMode,
}

/// Total host memory from /proc/meminfo.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("512M".parse::<ByteSize>(), Ok(ByteSize(512 << 20)));
        assert_eq!("2GiB".parse::<ByteSize>(), Ok(ByteSize(2 << 30)));
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!("1 g".parse::<ByteSize>(), Ok(ByteSize(1 << 30)));
        assert!("12Q".parse::<ByteSize>().is_err());
        assert!("M".parse::<ByteSize>().is_err());
        assert!("99999999999T".parse::<ByteSize>().is_err());
    }

    #[test]
    fn disk_specs() {
        let d: DiskSpec = "/tmp/a.img,ro,sector-size=4096".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.read_only);
        assert_eq!(d.sector_size, Some(4096));
        assert!("".parse::<DiskSpec>().is_err());
        assert!("/a,bogus".parse::<DiskSpec>().is_err());
        assert!("/a,sector-size=x".parse::<DiskSpec>().is_err());
        assert!("/a,sector-size=1024".parse::<DiskSpec>().is_err());
        assert_eq!(d.bus, DiskBus::Virtio);
        let s: DiskSpec = "/d/x.vhdx,bus=scsi,controller=1,lun=7,id=abc,discard"
            .parse()
            .unwrap();
        assert_eq!(
            (s.bus, s.controller, s.lun, s.discard),
            (DiskBus::Scsi, 1, Some(7), true)
        );
        assert_eq!(s.identity_key(), "abc");
        assert_eq!(DiskSpec::new("/d/x.vhdx").identity_key(), "x.vhdx");
        for bad in [
            "/a,bus=ide",
            "/a,bus=scsi,lun=64",
            "/a,bus=scsi,controller=4",
            "/a,bus=scsi,lun=300",
            "/a,lun=1",
            "/a,bus=scsi,id=",
        ] {
            assert!(bad.parse::<DiskSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn toml_file_and_flags_merge() {
        let file = WorkerSettings::from_toml(
            r#"
            kernel = "/boot/vmlinuz"
            memory = "1G"
            cpus = 2
            framebuffer = "1280x800"
            on_reboot = "exit"
            [[disks]]
            path = "/var/a.img"
            read_only = true
            "#,
        )
        .unwrap();
        assert_eq!(file.memory, Some(ByteSize(1 << 30)));
        assert_eq!(file.disks.len(), 1);
        let flags = WorkerSettings {
            cpus: Some(4),
            ..Default::default()
        };
        let m = file.merge(flags);
        assert_eq!(m.cpus, Some(4));
        assert_eq!(m.memory, Some(ByteSize(1 << 30)));
        assert_eq!(m.framebuffer, Some(Resolution(1280, 800)));
        assert_eq!(m.on_reboot, Some(RebootAction::Exit));
        assert!(WorkerSettings::from_toml("kernal = 'x'").is_err());
        assert!(WorkerSettings::from_toml("cpus = 'two'").is_err());
    }

    #[test]
    fn resolve_reports_the_bad_setting() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"x").unwrap();
        let base = WorkerSettings {
            kernel: Some(k.clone()),
            ..Default::default()
        };
        let r = base.resolve().unwrap();
        assert_eq!(
            (r.cpus, r.memory, r.cmdline.as_str()),
            (1, DEFAULT_MEMORY, DEFAULT_CMDLINE)
        );
        assert_eq!(r.framebuffer, Some(FbFormat::xrgb(1024, 768)));
        let e = |s: WorkerSettings| s.resolve().unwrap_err().setting;
        assert_eq!(e(WorkerSettings::default()), "kernel");
        assert_eq!(
            e(WorkerSettings {
                kernel: Some(dir.path().join("nope")),
                ..Default::default()
            }),
            "kernel"
        );
        assert_eq!(
            e(WorkerSettings {
                cpus: Some(0),
                ..base.clone()
            }),
            "cpus"
        );
        assert_eq!(
            e(WorkerSettings {
                cpus: Some(300),
                ..base.clone()
            }),
            "cpus"
        );
        assert_eq!(
            e(WorkerSettings {
                memory: Some(ByteSize(1 << 20)),
                ..base.clone()
            }),
            "memory"
        );
        assert_eq!(
            e(WorkerSettings {
                memory: Some(ByteSize(1 << 50)),
                ..base.clone()
            }),
            "memory"
        );
        assert_eq!(
            e(WorkerSettings {
                framebuffer: Some(Resolution(9000, 9000)),
                ..base.clone()
            }),
            "framebuffer"
        );
        assert_eq!(
            e(WorkerSettings {
                initrd: Some(dir.path().join("nope")),
                ..base.clone()
            }),
            "initrd"
        );
        let bad_disk = DiskSpec {
            sector_size: Some(1024),
            ..DiskSpec::new(k)
        };
        assert_eq!(
            e(WorkerSettings {
                disks: vec![bad_disk],
                ..base.clone()
            }),
            "disk"
        );
        let nofb = WorkerSettings {
            no_framebuffer: true,
            ..base
        };
        assert_eq!(nofb.resolve().unwrap().framebuffer, None);
    }
}
