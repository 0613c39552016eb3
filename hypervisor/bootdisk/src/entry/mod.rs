//! The boot-entry resolver: which kernel, initrd and command line the disk's own boot loader
//! would start by default, and every other entry it offers.
//!
//! Order, as the guest's loader would look: grub.cfg (the one `/boot/grub*/grub.cfg`, or an
//! ESP stub's `configfile`), whose `blscfg` hands over to Boot Loader Spec entries; BLS
//! entries alone (systemd-boot); then Debian's `/vmlinuz` symlinks with `/etc/default/grub`
//! and the root from `/etc/fstab`. When nothing boots, one sentence says why.

pub mod bls;
pub mod debian;
pub mod grub;

use std::collections::HashMap;
use std::sync::Arc;

use crate::fs::{self, FileKind, FileSystem, Namespace};
use crate::part::{Kind, Layout, Partition, Table, read_layout};
use crate::{Error, Limits, ReadAt, Result, Slice};
use grub::Device;

/// A partition (or the whole disk) and the file system on it.
pub struct Volume {
    /// The partition, or None for a file system on the whole disk.
    pub part: Option<Partition>,
    /// What the reader found on it by its magic number ("ext4", "vfat", "xfs", "LVM", ...).
    pub found: Option<&'static str>,
    /// The file system, when it is one this reader reads.
    pub fs: Option<Box<dyn FileSystem>>,
    /// Why a file system that should be readable is not.
    pub error: Option<Error>,
}

impl Volume {
    /// "partition 2" or "the disk".
    pub fn place(&self) -> String {
        match &self.part {
            Some(p) => format!("partition {}", p.number),
            None => "the disk".into(),
        }
    }
    pub fn uuid(&self) -> Option<String> {
        self.fs.as_ref()?.uuid()
    }
    pub fn label(&self) -> Option<String> {
        self.fs.as_ref()?.label()
    }
}

/// A disk opened for inspection: its layout and volumes.
pub struct Disk {
    pub layout: Layout,
    pub volumes: Vec<Volume>,
    limits: Limits,
}

/// A file on one of the disk's volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// Index into [`Disk::volumes`].
    pub volume: usize,
    /// The path inside that volume's file system.
    pub path: String,
}

/// A boot entry: what to load and how to start it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub title: String,
    /// The kernel version, from the entry or the kernel's file name.
    pub version: Option<String>,
    pub kernel: FileRef,
    pub initrds: Vec<FileRef>,
    /// The guest's own command line (BOOT_IMAGE not included).
    pub cmdline: String,
    /// Where the entry came from ("/boot/grub/grub.cfg on partition 2").
    pub source: String,
}

/// What the disk holds and how it boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// The distribution (os-release's PRETTY_NAME), when the root file system could be read.
    pub os: Option<String>,
    /// Every bootable entry, in menu order.
    pub entries: Vec<BootEntry>,
    /// Index into `entries` of the one the guest's loader starts by default.
    pub default: usize,
}

impl Disk {
    /// Read the partition table and open every file system on `disk`.
    pub fn open(disk: Arc<dyn ReadAt>, limits: Limits) -> Result<Disk> {
        let layout = read_layout(disk.as_ref())?;
        let mut volumes = Vec::new();
        let parts: Vec<Option<Partition>> = if layout.table == Table::None {
            vec![None]
        } else {
            layout.partitions.iter().cloned().map(Some).collect()
        };
        for part in parts {
            let area: Arc<dyn ReadAt> = match &part {
                Some(p) => Arc::new(Slice::new(disk.clone(), p.start, p.len)),
                None => disk.clone(),
            };
            let place = match &part {
                Some(p) => format!("partition {}", p.number),
                None => "the disk".into(),
            };
            let found = fs::sniff(area.as_ref());
            let (fs, error) = match fs::open(area, &place) {
                Ok(fs) => (fs, None),
                Err(e) => (None, Some(e)),
            };
            volumes.push(Volume {
                part,
                found,
                fs,
                error,
            });
        }
        Ok(Disk {
            layout,
            volumes,
            limits,
        })
    }

    fn fs(&self, v: usize) -> Option<&dyn FileSystem> {
        self.volumes.get(v)?.fs.as_deref()
    }

    /// The volume GRUB's device names.
    pub fn find(&self, d: &Device) -> Option<usize> {
        self.volumes.iter().position(|v| match d {
            Device::Part(n) => v.part.as_ref().is_some_and(|p| p.number == *n),
            Device::Uuid(u) => v.uuid().is_some_and(|x| x.eq_ignore_ascii_case(u)),
            Device::Label(l) => v.label().as_deref() == Some(l.as_str()),
            Device::File(f) => {
                v.fs.as_ref()
                    .is_some_and(|fs| matches!(fs.kind_of(f), Ok(FileKind::File { .. })))
            }
            Device::Unsupported(_) => false,
        })
    }

    /// The volume an fstab or `root=` spec names (UUID=, LABEL=, PARTUUID=, PARTLABEL=,
    /// /dev/disk/by-*/..., /dev/sda2, /dev/vda2, /dev/nvme0n1p2); Err with the reason when
    /// it names something this reader cannot open (LVM, RAID, LUKS).
    pub fn find_spec(&self, spec: &str) -> std::result::Result<Option<usize>, String> {
        let by = |k: &str| {
            spec.strip_prefix(&format!("{k}="))
                .or_else(|| spec.strip_prefix(&format!("/dev/disk/by-{}/", k.to_lowercase())))
                .map(|s| s.trim_matches('"').to_string())
        };
        if let Some(u) = by("UUID") {
            return Ok(self.find(&Device::Uuid(u)));
        }
        if let Some(l) = by("LABEL") {
            return Ok(self.find(&Device::Label(l)));
        }
        if let Some(u) = by("PARTUUID") {
            return Ok(self.volumes.iter().position(|v| {
                v.part
                    .as_ref()
                    .and_then(|p| p.partuuid.as_deref())
                    .is_some_and(|p| p.eq_ignore_ascii_case(&u))
            }));
        }
        if let Some(l) = by("PARTLABEL") {
            return Ok(self.volumes.iter().position(|v| {
                v.part.as_ref().and_then(|p| p.name.as_deref()) == Some(l.as_str())
            }));
        }
        if spec.starts_with("/dev/mapper/") || spec.starts_with("/dev/dm-") {
            return Err("LVM or device-mapper".into());
        }
        if spec.starts_with("/dev/md") {
            return Err("software RAID".into());
        }
        if let Some(dev) = spec.strip_prefix("/dev/") {
            // sda2, vda2, xvda2, hda2, nvme0n1p2: the partition number is the trailing digits.
            let is_disk = ["sd", "vd", "xvd", "hd", "nvme0n1p"]
                .iter()
                .any(|p| dev.starts_with(p));
            let digits: String = dev
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if is_disk && let Ok(n) = digits.parse::<u32>() {
                return Ok(self.find(&Device::Part(n)));
            }
            // /dev/<vg>/<lv>: LVM's own names.
            if dev.split('/').count() == 2 {
                return Err("LVM".into());
            }
        }
        Ok(None)
    }

    /// The contents of `f` (symbolic links followed inside its volume), at most `cap` bytes.
    pub fn read_file(&self, f: &FileRef, cap: u64) -> Result<Vec<u8>> {
        let fs = self
            .fs(f.volume)
            .ok_or_else(|| Error::NotFound(f.path.clone()))?;
        Namespace::new(fs, f.volume, self.limits).read(&f.path, cap)
    }

    /// Inspect the disk: its system and boot entries, or why it cannot boot.
    pub fn inspect(&self) -> Result<Inspection> {
        Inspector::new(self).run()
    }
}

struct Inspector<'a> {
    disk: &'a Disk,
    /// The volume with /etc (the root file system), if readable.
    root: Option<usize>,
    /// Where the system lies in the root volume: "" at its top, or the btrfs subvolume the
    /// guest mounts as / when the top level is not it ("/@" on Ubuntu), as GRUB names it.
    root_dir: String,
    /// Where /boot is: (volume, prefix of /boot inside it: "/boot" or "").
    boot: Option<(usize, String)>,
    /// The ESP, if any.
    esp: Option<usize>,
    /// Why /boot could not be opened, when fstab names something unreadable.
    boot_problem: Option<String>,
    os: Option<String>,
}

impl<'a> Inspector<'a> {
    fn new(disk: &'a Disk) -> Inspector<'a> {
        Inspector {
            disk,
            root: None,
            root_dir: String::new(),
            boot: None,
            esp: None,
            boot_problem: None,
            os: None,
        }
    }

    fn has(&self, v: usize, path: &str) -> bool {
        self.disk
            .fs(v)
            .is_some_and(|fs| Namespace::new(fs, v, self.disk.limits).exists(path))
    }

    fn text(&self, v: usize, path: &str) -> Option<String> {
        let fs = self.disk.fs(v)?;
        Namespace::new(fs, v, self.disk.limits).read_text(path).ok()
    }

    /// Find the root, /boot and the ESP.
    fn locate(&mut self) {
        let n = self.disk.volumes.len();
        let readable = |v: usize| self.disk.volumes[v].fs.is_some();
        // The root: a readable file system with /etc/fstab or os-release (at its top, or in
        // a btrfs subvolume named as installers name the root's); a discoverable root
        // partition first.
        let mut candidates: Vec<(usize, String)> = (0..n)
            .filter(|&v| readable(v))
            .filter_map(|v| Some((v, self.system_dir(v)?)))
            .collect();
        candidates.sort_by_key(|(v, _)| {
            self.disk.volumes[*v]
                .part
                .as_ref()
                .is_none_or(|p| p.kind != Kind::LinuxRoot)
        });
        if let Some((r, dir)) = candidates.first() {
            self.root = Some(*r);
            self.root_dir = dir.clone();
        }
        let rd = self.root_dir.clone();
        self.esp = (0..n).find(|&v| {
            readable(v)
                && self.disk.volumes[v]
                    .part
                    .as_ref()
                    .is_some_and(|p| p.kind == Kind::Esp)
        });
        if let Some(r) = self.root {
            self.os = self
                .text(r, &format!("{rd}/etc/os-release"))
                .or_else(|| self.text(r, &format!("{rd}/usr/lib/os-release")))
                .and_then(|t| {
                    let f = debian::os_release(&t);
                    f.get("PRETTY_NAME").or_else(|| f.get("NAME")).cloned()
                });
            let fstab = self.text(r, &format!("{rd}/etc/fstab")).unwrap_or_default();
            for m in debian::fstab(&fstab) {
                match m.dir.as_str() {
                    "/boot" => match self.disk.find_spec(&m.spec) {
                        Ok(Some(v)) if readable(v) => self.boot = Some((v, String::new())),
                        Ok(Some(v)) => {
                            self.boot_problem = Some(self.unreadable("/boot", v));
                        }
                        Ok(None) => {
                            self.boot_problem =
                                Some(format!("/boot is on {}, which is not on this disk", m.spec))
                        }
                        Err(what) => self.boot_problem = Some(format!("/boot is on {what}")),
                    },
                    "/boot/efi" | "/efi" => {
                        if let Ok(Some(v)) = self.disk.find_spec(&m.spec)
                            && readable(v)
                        {
                            self.esp = Some(v);
                        }
                    }
                    _ => {}
                }
            }
            if self.boot.is_none() && self.boot_problem.is_none() {
                self.boot = Some((r, format!("{rd}/boot")));
            }
        } else {
            // No readable root (LVM, LUKS, an unreadable file system): a /boot partition of
            // its own may still say how to boot.
            self.boot = (0..n)
                .filter(|&v| readable(v) && Some(v) != self.esp)
                .find(|&v| {
                    ["/grub/grub.cfg", "/grub2/grub.cfg", "/loader/entries"]
                        .iter()
                        .any(|p| self.has(v, p))
                        || self.kernels(v, "").next().is_some()
                })
                .map(|v| (v, String::new()));
        }
    }

    /// Where a system lies in volume `v`: "" when /etc/fstab or os-release is at its top;
    /// on btrfs whose top level holds none, the subvolume Ubuntu ("@"), Fedora ("root") or
    /// Debian ("@rootfs") installs into, when it holds one.
    fn system_dir(&self, v: usize) -> Option<String> {
        let has_system = |dir: &str| {
            ["/etc/fstab", "/etc/os-release", "/usr/lib/os-release"]
                .iter()
                .any(|f| self.has(v, &format!("{dir}{f}")))
        };
        if has_system("") {
            return Some(String::new());
        }
        if self.disk.fs(v)?.kind() != "btrfs" {
            return None;
        }
        ["/@", "/root", "/@rootfs"]
            .into_iter()
            .find(|d| has_system(d))
            .map(String::from)
    }

    fn unreadable(&self, what: &str, v: usize) -> String {
        let vol = &self.disk.volumes[v];
        match (&vol.error, vol.found) {
            (Some(e), _) => format!("{what} cannot be read: {e}"),
            (None, Some(kind)) => format!("{what} is on {kind}, which Parvis cannot read yet"),
            (None, None) => format!("{what} is on {}, which holds no file system", vol.place()),
        }
    }

    /// Kernel files in `<prefix>` of volume `v` (names starting with vmlinuz-).
    fn kernels(&self, v: usize, prefix: &str) -> impl Iterator<Item = String> + use<> {
        let names = self
            .disk
            .fs(v)
            .and_then(|fs| {
                Namespace::new(fs, v, self.disk.limits)
                    .list(if prefix.is_empty() { "/" } else { prefix })
                    .ok()
            })
            .unwrap_or_default();
        let prefix = prefix.to_string();
        names
            .into_iter()
            .filter(|n| n.starts_with("vmlinuz-") || n.starts_with("vmlinux-"))
            .map(move |n| format!("{prefix}/{n}"))
    }

    /// A file GRUB or BLS names on volume `v`, if it is there (links followed).
    fn file(&self, v: usize, path: &str) -> Option<FileRef> {
        let fs = self.disk.fs(v)?;
        let ns = Namespace::new(fs, v, self.disk.limits);
        match ns.locate_path(path) {
            Ok((loc, FileKind::File { .. })) => Some(FileRef {
                volume: loc.tag,
                path: loc.path,
            }),
            _ => None,
        }
    }

    fn run(mut self) -> Result<Inspection> {
        self.locate();
        let mut missing: Option<String> = None;
        if let Some((bv, prefix)) = self.boot.clone() {
            // grub.cfg in /boot.
            for dir in ["grub", "grub2"] {
                let cfg = format!("{prefix}/{dir}/grub.cfg");
                if self.has(bv, &cfg)
                    && let Some(found) = self.grub_cfg_entries(bv, &prefix, &cfg, &mut missing)?
                {
                    return Ok(found);
                }
            }
        }
        // An ESP stub that hands over to /boot's grub.cfg, or BLS entries on the ESP.
        if let Some(esp) = self.esp {
            let dirs = self
                .disk
                .fs(esp)
                .and_then(|fs| Namespace::new(fs, esp, self.disk.limits).list("/EFI").ok());
            for d in dirs.unwrap_or_default() {
                let cfg = format!("/EFI/{d}/grub.cfg");
                if self.has(esp, &cfg)
                    && let Some(found) = self.grub_cfg_entries(esp, "", &cfg, &mut missing)?
                {
                    return Ok(found);
                }
            }
        }
        if let Some(found) = self.bls_entries(None, &HashMap::new(), &mut missing)? {
            return Ok(found);
        }
        if let Some(found) = self.debian_entries(&mut missing)? {
            return Ok(found);
        }
        Err(Error::NotBootable(self.why_not(missing)))
    }

    /// The sentence for a disk with no bootable entry.
    fn why_not(&self, missing: Option<String>) -> String {
        if let Some(m) = missing {
            return m;
        }
        if let Some(p) = &self.boot_problem {
            return p.clone();
        }
        let vols = &self.disk.volumes;
        let found = |k: &str| vols.iter().any(|v| v.found == Some(k));
        let kind = |k: Kind| {
            vols.iter()
                .any(|v| v.part.as_ref().is_some_and(|p| p.kind == k))
        };
        if found("LUKS") || kind(Kind::Luks) {
            return "the root file system is encrypted (LUKS) and /boot is not readable \
                    outside it, so Parvis cannot find the kernel"
                .into();
        }
        if found("LVM") || kind(Kind::Lvm) {
            return "/boot is on LVM, which Parvis cannot read".into();
        }
        if let Some(v) = vols.iter().find(|v| v.error.is_some()) {
            return format!("{}", v.error.as_ref().expect("checked"));
        }
        if found("NTFS") {
            return "the disk holds Windows (NTFS), which Parvis cannot boot yet".into();
        }
        if vols.iter().all(|v| v.found.is_none()) {
            return "the disk holds no file system: it looks empty".into();
        }
        "no Linux kernel found on the disk".into()
    }

    fn grubenv(&self, v: usize, dir: &str) -> HashMap<String, String> {
        self.text(v, &format!("{dir}/grubenv"))
            .map(|t| grub::read_grubenv(&t))
            .unwrap_or_default()
    }

    /// Entries from a grub.cfg on volume `v`; `prefix` is where /boot is inside `v`.
    fn grub_cfg_entries(
        &self,
        v: usize,
        prefix: &str,
        path: &str,
        missing: &mut Option<String>,
    ) -> Result<Option<Inspection>> {
        let dir = path.rsplit_once('/').map(|x| x.0).unwrap_or("");
        let mut env = self.grubenv(v, dir);
        let text = self.text(v, path).unwrap_or_default();
        let cfg = grub::read_config(&text, &env);
        let source = format!("{path} on {}", self.disk.volumes[v].place());
        if let Some((dev, next)) = &cfg.configfile {
            // An ESP stub: follow it once.
            let target = match dev {
                Some(d) => self.disk.find(d),
                None => Some(v),
            };
            return match target {
                Some(t) if t != v || next != path => {
                    if self.has(t, next) {
                        let nd = next.rsplit_once('/').map(|x| x.0).unwrap_or("");
                        let inner_env = self.grubenv(t, nd);
                        let text = self.text(t, next).unwrap_or_default();
                        let cfg = grub::read_config(&text, &inner_env);
                        let src = format!("{next} on {}", self.disk.volumes[t].place());
                        self.grub_entries(t, "", &cfg, src, missing)
                    } else {
                        Ok(None)
                    }
                }
                _ => Ok(None),
            };
        }
        if cfg.blscfg {
            env.extend(cfg.env.clone());
            // The snippets are on the file system grub.cfg made its root (RHEL's UEFI
            // grub.cfg lives on the ESP and searches for /boot).
            let bls_vol = cfg
                .env
                .get("root")
                .map(|r| grub::device(r.trim_matches(|c| c == '(' || c == ')' || c == '\'')))
                .and_then(|d| self.disk.find(&d))
                .unwrap_or(v);
            let prefix = if bls_vol == v {
                prefix.to_string()
            } else if self.has(bls_vol, "/loader/entries") {
                String::new()
            } else {
                "/boot".to_string()
            };
            return self.bls_entries(Some((bls_vol, &prefix)), &env, missing);
        }
        self.grub_entries(v, prefix, &cfg, source, missing)
    }

    fn grub_entries(
        &self,
        v: usize,
        _prefix: &str,
        cfg: &grub::Config,
        source: String,
        missing: &mut Option<String>,
    ) -> Result<Option<Inspection>> {
        let all = grub::entries(&cfg.items);
        let default_path = grub::select(&cfg.items, cfg.default.as_deref());
        let mut entries = Vec::new();
        let mut default = 0;
        for (path, item) in all {
            let grub::ItemKind::Entry(c) = &item.kind else {
                continue;
            };
            let Some((kpath, args)) = &c.linux else {
                continue;
            };
            if kpath.contains("memtest") {
                continue;
            }
            // The entry's root: its own search/set root, else where grub.cfg is.
            let root = match &c.root {
                Some(Device::Unsupported(what)) => {
                    missing.get_or_insert(format!(
                        "the boot entry \"{}\" loads its kernel from {what}, which Parvis \
                         cannot read",
                        item.title
                    ));
                    continue;
                }
                Some(d) => match self.disk.find(d) {
                    Some(r) => r,
                    None => {
                        missing.get_or_insert(format!(
                            "the boot entry \"{}\" looks for a file system ({d:?}) that is \
                             not on this disk",
                            item.title
                        ));
                        continue;
                    }
                },
                None => v,
            };
            let locate = |p: &str| {
                let (dev, p) = grub::split_path(p);
                let vol = match dev {
                    Some(d) => self.disk.find(&d)?,
                    None => root,
                };
                self.file(vol, &p)
            };
            let Some(kernel) = locate(kpath) else {
                missing.get_or_insert(format!(
                    "the boot entry \"{}\" names the kernel {kpath}, which is not on the disk",
                    item.title
                ));
                continue;
            };
            let initrds: Option<Vec<FileRef>> = c.initrds.iter().map(|p| locate(p)).collect();
            let Some(initrds) = initrds else {
                missing.get_or_insert(format!(
                    "the boot entry \"{}\" names an initrd that is not on the disk",
                    item.title
                ));
                continue;
            };
            if Some(&path) == default_path.as_ref() {
                default = entries.len();
            }
            entries.push(BootEntry {
                title: item.title.clone(),
                version: debian::kernel_version(kpath),
                kernel,
                initrds,
                cmdline: clean_cmdline(args),
                source: source.clone(),
            });
        }
        if entries.is_empty() {
            return Ok(None);
        }
        Ok(Some(Inspection {
            os: self.os.clone(),
            entries,
            default,
        }))
    }

    /// Entries from BLS snippets: in /boot (`grub_boot` when grub.cfg's blscfg asked for
    /// them) or, otherwise, on the ESP or /boot.
    fn bls_entries(
        &self,
        grub_boot: Option<(usize, &str)>,
        env: &HashMap<String, String>,
        missing: &mut Option<String>,
    ) -> Result<Option<Inspection>> {
        let mut places: Vec<(usize, String)> = Vec::new();
        if let Some((v, p)) = grub_boot {
            places.push((v, p.to_string()));
        } else {
            if let Some((v, p)) = &self.boot {
                places.push((*v, p.clone()));
            }
            if let Some(e) = self.esp {
                places.push((e, String::new()));
            }
        }
        for (v, prefix) in places {
            let dir = format!("{prefix}/loader/entries");
            let Some(fs) = self.disk.fs(v) else { continue };
            let ns = Namespace::new(fs, v, self.disk.limits);
            let Ok(names) = ns.list(&dir) else { continue };
            let mut env = env.clone();
            if env.is_empty() {
                for d in ["grub2", "grub"] {
                    env.extend(self.grubenv(v, &format!("{prefix}/{d}")));
                }
            }
            let mut bls: Vec<bls::BlsEntry> = names
                .iter()
                .filter_map(|n| n.strip_suffix(".conf").map(|id| (n, id)))
                .filter_map(|(n, id)| {
                    let t = ns.read_text(&format!("{dir}/{n}")).ok()?;
                    Some(bls::parse_entry(id, &t, &env))
                })
                .filter(|e| e.linux.is_some())
                .collect();
            bls::sort(&mut bls);
            let saved = env.get("saved_entry").cloned();
            let mut entries = Vec::new();
            let mut default = None;
            for e in &bls {
                let kpath = e.linux.as_deref().expect("filtered");
                // Paths are relative to the file system holding the entries; where that is
                // the root file system, /boot comes first.
                let locate = |p: &str| {
                    if !prefix.is_empty()
                        && let Some(f) = self.file(v, &format!("{prefix}{p}"))
                    {
                        return Some(f);
                    }
                    self.file(v, p)
                };
                let Some(kernel) = locate(kpath) else {
                    missing.get_or_insert(format!(
                        "the boot entry {} names the kernel {kpath}, which is not on the disk",
                        e.id
                    ));
                    continue;
                };
                let Some(initrds) = e.initrds.iter().map(|p| locate(p)).collect() else {
                    missing.get_or_insert(format!(
                        "the boot entry {} names an initrd that is not on the disk",
                        e.id
                    ));
                    continue;
                };
                if saved.as_deref() == Some(e.id.as_str()) {
                    default = Some(entries.len());
                }
                entries.push(BootEntry {
                    title: e.title.clone().unwrap_or_else(|| e.id.clone()),
                    version: e.version.clone().or_else(|| debian::kernel_version(kpath)),
                    kernel,
                    initrds,
                    cmdline: e.options.clone(),
                    source: format!("{dir}/{}.conf on {}", e.id, self.disk.volumes[v].place()),
                });
            }
            if !entries.is_empty() {
                return Ok(Some(Inspection {
                    os: self.os.clone(),
                    entries,
                    default: default.unwrap_or(0),
                }));
            }
        }
        Ok(None)
    }

    /// Debian's symlinks (or the newest kernel in /boot), the command line as Debian's
    /// grub-mkconfig would write it.
    fn debian_entries(&self, missing: &mut Option<String>) -> Result<Option<Inspection>> {
        let Some(r) = self.root else { return Ok(None) };
        // The symlinks are the guest's own paths: from a subvolume's, not the top level's.
        if !self.root_dir.is_empty() {
            return Ok(None);
        }
        let Some(rootfs) = self.disk.fs(r) else {
            return Ok(None);
        };
        let mut ns = Namespace::new(rootfs, r, self.disk.limits);
        if let Some((bv, p)) = &self.boot
            && p.is_empty()
            && let Some(fs) = self.disk.fs(*bv)
        {
            ns.mount("/boot", fs, *bv);
        }
        let located = |p: &str| match ns.locate_path(p) {
            Ok((l, FileKind::File { .. })) => Some((
                FileRef {
                    volume: l.tag,
                    path: l.path,
                },
                p.to_string(),
            )),
            _ => None,
        };
        // The newest kernel in /boot, with its initrd, when the symlinks are missing.
        let newest = || -> Option<(Found, Option<Found>)> {
            let mut ks: Vec<String> = ns
                .list("/boot")
                .ok()?
                .into_iter()
                .filter(|n| n.starts_with("vmlinuz-"))
                .collect();
            ks.sort_by(|a, b| bls::vercmp(b, a));
            let k = ks.first()?;
            let v = debian::kernel_version(k)?;
            let initrd = debian::initrd_names(&v)
                .iter()
                .find_map(|n| located(&format!("/boot/{n}")));
            Some((located(&format!("/boot/{k}"))?, initrd))
        };
        let (kernel, initrd) = match ["/vmlinuz", "/boot/vmlinuz"]
            .iter()
            .find_map(|p| located(p))
        {
            Some(k) => (
                k,
                ["/initrd.img", "/boot/initrd.img"]
                    .iter()
                    .find_map(|p| located(p)),
            ),
            None => match newest() {
                Some(x) => x,
                None => {
                    return Ok(None);
                }
            },
        };
        let mut vars = HashMap::new();
        if let Some(t) = self.text(r, "/etc/default/grub") {
            debian::assignments(&t, &mut vars);
        }
        let mut extra = ns.list("/etc/default/grub.d").unwrap_or_default();
        extra.sort();
        for n in extra.iter().filter(|n| n.ends_with(".cfg")) {
            if let Ok(t) = ns.read_text(&format!("/etc/default/grub.d/{n}")) {
                debian::assignments(&t, &mut vars);
            }
        }
        let fstab = self.text(r, "/etc/fstab").unwrap_or_default();
        let Some(root) = debian::fstab(&fstab).into_iter().find(|m| m.dir == "/") else {
            missing.get_or_insert("the root file system's /etc/fstab does not say which file system is / (needed for the kernel's root=)".into());
            return Ok(None);
        };
        let mut args = vec![format!("root={}", root.spec), "ro".to_string()];
        for k in ["GRUB_CMDLINE_LINUX", "GRUB_CMDLINE_LINUX_DEFAULT"] {
            if let Some(v) = vars.get(k) {
                args.extend(v.split_whitespace().map(String::from));
            }
        }
        // The version from where the symlink really points.
        let version = debian::kernel_version(&kernel.0.path);
        let title = match (&self.os, &version) {
            (Some(os), Some(v)) => format!("{os}, with Linux {v}"),
            (Some(os), None) => os.clone(),
            (None, _) => "Linux".into(),
        };
        Ok(Some(Inspection {
            os: self.os.clone(),
            entries: vec![BootEntry {
                title,
                version,
                kernel: kernel.0,
                initrds: initrd.into_iter().map(|i| i.0).collect(),
                cmdline: clean_cmdline(&args),
                source: format!("{} and /etc/default/grub", kernel.1),
            }],
            default: 0,
        }))
    }
}

/// A file found through the namespace, and the path it was found by.
type Found = (FileRef, String);

/// A command line from words: no `BOOT_IMAGE=`, single spaces.
fn clean_cmdline(args: &[String]) -> String {
    args.iter()
        .flat_map(|a| a.split_whitespace())
        .filter(|a| !a.starts_with("BOOT_IMAGE="))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests;
