//! Booting the VM's own disk: a confined child process reads the disk's partition table,
//! `/boot` and boot configuration (the `bootdisk` crate) and hands back the kernel, the
//! initrd and the command line its own boot loader would use; the worker then direct-boots
//! them as it boots a boot image.
//!
//! The child is this binary (`parvis-worker boot-disk-read`). Everything it reads comes from
//! the guest, so before it reads anything it gives up what it could abuse: as root it becomes
//! nobody (uid/gid 65534, no groups), it sets no_new_privs, and a seccomp filter lets it only
//! read and write the descriptors it has, allocate memory and exit; any other system call
//! kills it. Its only input is the disk's file descriptor (stdin, opened read-only by the
//! worker); its output on stdout is:
//!
//! ```text
//! u32 LE length, JSON metadata ({"title", "version", "cmdline", "os", "entries": [...]})
//! u64 LE length, the kernel
//! u64 LE length, the initrds concatenated (0 when there is none)
//! ```
//!
//! and on failure one sentence on stderr and exit status 2. Asked `--inspect` (the agent, on
//! import), it answers the disk's description instead ([`describe`]). The worker caps every length and
//! kills the child after [`TIMEOUT`]. The lesson is Xen's pygrub (XSA-443): a guest disk
//! parser running with the host's privileges is the host's problem.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bootdisk::entry::Disk;
use bootdisk::{Limits, ReadAt};
use parvis_disk::BlockDevice;
use serde::{Deserialize, Serialize};

/// How long the reader may take.
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The largest metadata block accepted.
const MAX_META: u32 = 1 << 20;

/// What the reader found, as the worker and the agent show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    /// The entry booted.
    pub title: String,
    pub version: Option<String>,
    /// The guest's own command line (before Parvis adds a console when it has none).
    pub cmdline: String,
    /// The distribution, when the root file system could be read.
    pub os: Option<String>,
    /// Every entry's title, in menu order, and which one is the disk's default.
    pub entries: Vec<String>,
    pub default: usize,
}

/// A kernel and initrd read from the disk, held in memory files for the boot code (and for
/// every reboot), with the command line to start them with.
#[derive(Debug)]
pub struct DiskBoot {
    pub meta: Meta,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Keeps the memory files open for as long as the VM may reboot.
    _files: Vec<OwnedFd>,
}

/// Read the boot entry `entry` (else the disk's default) of the disk image at `path` in a
/// confined child process.
pub fn resolve(path: &Path, entry: Option<&str>) -> Result<DiskBoot> {
    let disk = std::fs::File::open(path)
        .with_context(|| format!("cannot open the boot disk {}", path.display()))?;
    let exe = std::env::current_exe().context("cannot find the worker's own program")?;
    let mut cmd = Command::new(exe);
    cmd.arg("boot-disk-read");
    if let Some(e) = entry {
        cmd.arg("--entry").arg(e);
    }
    let mut child = cmd
        .stdin(disk)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .spawn()
        .context("cannot start the boot disk reader")?;
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(TIMEOUT).is_err() {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
            return true;
        }
        false
    });
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = (&mut stderr).take(64 << 10).read_to_string(&mut s);
        s
    });
    let mut out = child.stdout.take().expect("piped");
    let read = read_reply(&mut out);
    drop(out);
    let status = child.wait().context("the boot disk reader vanished")?;
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let stderr = err_reader.join().unwrap_or_default();
    let said = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    if timed_out {
        bail!(
            "reading the boot disk took longer than {} s and was stopped",
            TIMEOUT.as_secs()
        );
    }
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        if status.signal() == Some(libc::SIGSYS) {
            bail!(
                "the boot disk reader broke its sandbox and was stopped (a forbidden system call)"
            );
        }
        if status.code() == Some(2) && !said.is_empty() {
            bail!("the disk cannot be booted: {said}");
        }
        bail!(
            "the boot disk reader failed ({status}){}",
            if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            }
        );
    }
    let (meta, kernel, initrd) = read?;
    let mut cmdline = meta.cmdline.clone();
    // The guest's own console settings stay; a disk that sets none gets the screen and the
    // serial console, so both show the boot.
    if !cmdline
        .split_whitespace()
        .any(|w| w.starts_with("console="))
    {
        cmdline.push_str(if cmdline.is_empty() { "" } else { " " });
        cmdline.push_str("console=tty0 console=ttyS0");
    }
    let kpath = fd_path(&kernel);
    let ipath = initrd.as_ref().map(fd_path);
    let mut files = vec![kernel];
    files.extend(initrd);
    Ok(DiskBoot {
        meta,
        kernel: kpath,
        initrd: ipath,
        cmdline,
        _files: files,
    })
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The reply's three parts: the metadata, the kernel's memory file and the initrd's (None
/// when it is empty).
fn read_reply(r: &mut impl Read) -> Result<(Meta, OwnedFd, Option<OwnedFd>)> {
    let mut n4 = [0u8; 4];
    r.read_exact(&mut n4)
        .context("the boot disk reader gave no answer")?;
    let n = u32::from_le_bytes(n4);
    if n > MAX_META {
        bail!("the boot disk reader's answer is malformed ({n}-byte metadata)");
    }
    let mut m = vec![0u8; n as usize];
    r.read_exact(&mut m)
        .context("the boot disk reader's answer was cut short")?;
    let meta: Meta = serde_json::from_slice(&m)
        .map_err(|e| anyhow!("the boot disk reader's answer is malformed: {e}"))?;
    let limits = Limits::default();
    let kernel = read_part(r, "kernel", limits.kernel)?
        .ok_or_else(|| anyhow!("the boot disk reader returned an empty kernel"))?;
    let initrd = read_part(r, "initrd", limits.initrd)?;
    Ok((meta, kernel, initrd))
}

/// A length-prefixed part copied into a memory file; None when it is empty.
fn read_part(r: &mut impl Read, what: &str, cap: u64) -> Result<Option<OwnedFd>> {
    let mut n8 = [0u8; 8];
    r.read_exact(&mut n8)
        .with_context(|| format!("the boot disk reader's answer has no {what}"))?;
    let n = u64::from_le_bytes(n8);
    if n > cap {
        bail!("the boot disk reader's {what} is {n} bytes, more than the {cap} allowed");
    }
    if n == 0 {
        return Ok(None);
    }
    let fd = rustix::fs::memfd_create(what, rustix::fs::MemfdFlags::CLOEXEC)
        .context("cannot make a memory file")?;
    let mut f = std::fs::File::from(fd);
    let copied = std::io::copy(&mut r.take(n), &mut f).context("cannot fill a memory file")?;
    if copied != n {
        bail!("the boot disk reader's {what} was cut short");
    }
    Ok(Some(OwnedFd::from(f)))
}

/// A disk image as the reader sees it.
struct ImageReader(parvis_disk::image::Image);

impl ReadAt for ImageReader {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let err = |e: parvis_disk::DiskError| std::io::Error::other(e.to_string());
        // Disk images take whole sectors; file systems ask for any byte range.
        let ss = u64::from(self.0.logical_sector_size());
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.0.size())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end")
            })?;
        if offset.is_multiple_of(ss) && end.is_multiple_of(ss) {
            return self.0.read_at(buf, offset).map_err(err);
        }
        let start = offset / ss * ss;
        let stop = end.div_ceil(ss) * ss;
        let mut tmp = vec![0u8; (stop - start) as usize];
        self.0.read_at(&mut tmp, start).map_err(err)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&tmp[at..at + buf.len()]);
        Ok(())
    }
}

/// What the child is asked for.
pub enum Ask {
    /// The kernel, initrd and command line of an entry (by version, title or menu index;
    /// None: the disk's default).
    Boot(Option<String>),
    /// What the disk holds (partitions, file systems, distribution, boot entries), as a
    /// `parvis.v1.DiskBootInfo` message: `u32 LE length` + the message. The agent asks this
    /// when a disk is imported.
    Inspect,
}

/// The child: confine, read, answer. Returns the exit status.
pub fn child_main(ask: Ask, hold: Option<u64>) -> i32 {
    let disk = match crate::sandbox::confine_reader() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("the boot disk reader could not confine itself: {e}");
            return 1;
        }
    };
    if let Some(secs) = hold {
        // A test hook: show the confined process to a test before reading.
        let _ = writeln!(std::io::stderr(), "confined");
        std::thread::sleep(Duration::from_secs(secs));
    }
    let done = match ask {
        Ask::Boot(entry) => read_disk(disk, entry.as_deref()),
        Ask::Inspect => inspect_disk(disk),
    };
    match done {
        Ok(()) => 0,
        Err(why) => {
            eprintln!("{why}");
            2
        }
    }
}

fn open_disk(disk: std::fs::File) -> std::result::Result<Disk, String> {
    let image = parvis_disk::image::open_file(disk, None)
        .map_err(|e| format!("the disk image cannot be opened: {e}"))?;
    Disk::open(Arc::new(ImageReader(image)), Limits::default()).map_err(|e| e.to_string())
}

/// The entry `want` names: a kernel version, a title, or a menu index.
pub fn choose(entries: &[bootdisk::entry::BootEntry], want: &str) -> Option<usize> {
    let want = want.trim();
    entries
        .iter()
        .position(|e| e.version.as_deref() == Some(want))
        .or_else(|| entries.iter().position(|e| e.title == want))
        .or_else(|| want.parse::<usize>().ok().filter(|&n| n < entries.len()))
}

fn read_disk(disk: std::fs::File, entry: Option<&str>) -> std::result::Result<(), String> {
    let limits = Limits::default();
    let d = open_disk(disk)?;
    let i = d.inspect().map_err(|e| e.to_string())?;
    let chosen = match entry {
        Some(want) => choose(&i.entries, want).ok_or_else(|| {
            let names: Vec<String> = i
                .entries
                .iter()
                .map(|e| e.version.clone().unwrap_or_else(|| e.title.clone()))
                .collect();
            format!(
                "the disk has no boot entry '{want}'; its entries: {}",
                names.join(", ")
            )
        })?,
        None => i.default,
    };
    let e = &i.entries[chosen];
    let kernel = d
        .read_file(&e.kernel, limits.kernel)
        .map_err(|e| e.to_string())?;
    let mut initrd = Vec::new();
    for f in &e.initrds {
        let left = limits.initrd - initrd.len() as u64;
        let part = d.read_file(f, left).map_err(|e| e.to_string())?;
        initrd.extend_from_slice(&part);
    }
    let meta = Meta {
        title: e.title.clone(),
        version: e.version.clone(),
        cmdline: e.cmdline.clone(),
        os: i.os.clone(),
        entries: i.entries.iter().map(|e| e.title.clone()).collect(),
        default: i.default,
    };
    let m = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
    let out = std::io::stdout();
    let mut out = out.lock();
    let w = (|| -> std::io::Result<()> {
        out.write_all(&(m.len() as u32).to_le_bytes())?;
        out.write_all(&m)?;
        out.write_all(&(kernel.len() as u64).to_le_bytes())?;
        out.write_all(&kernel)?;
        out.write_all(&(initrd.len() as u64).to_le_bytes())?;
        out.write_all(&initrd)?;
        out.flush()
    })();
    w.map_err(|e| format!("cannot hand the kernel to the worker: {e}"))
}

fn inspect_disk(disk: std::fs::File) -> std::result::Result<(), String> {
    use prost::Message;
    let info = match open_disk(disk) {
        Ok(d) => describe(&d),
        Err(why) => proto::v1::DiskBootInfo {
            inspected: true,
            reason: why,
            ..Default::default()
        },
    };
    let m = info.encode_to_vec();
    let out = std::io::stdout();
    let mut out = out.lock();
    out.write_all(&(m.len() as u32).to_le_bytes())
        .and_then(|()| out.write_all(&m))
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot hand the disk's description over: {e}"))
}

/// A disk's partitions, file systems and boot entries, or why it cannot boot.
pub fn describe(d: &Disk) -> proto::v1::DiskBootInfo {
    use bootdisk::part::{Kind, Table};
    let place = |f: &bootdisk::entry::FileRef| {
        let v = d
            .volumes
            .get(f.volume)
            .map_or_else(String::new, |v| v.place());
        format!("{v}: {}", f.path)
    };
    let volumes = d
        .volumes
        .iter()
        .map(|v| proto::v1::DiskVolume {
            partition: v.part.as_ref().map_or(0, |p| p.number),
            kind: v.part.as_ref().map_or_else(String::new, |p| match &p.kind {
                Kind::Esp => "EFI system".into(),
                Kind::Linux => "Linux".into(),
                Kind::XbootLdr => "Linux extended boot".into(),
                Kind::LinuxRoot => "Linux root".into(),
                Kind::Lvm => "LVM".into(),
                Kind::Raid => "Linux RAID".into(),
                Kind::Luks => "LUKS".into(),
                Kind::Swap => "Linux swap".into(),
                Kind::BiosBoot => "BIOS boot".into(),
                Kind::BasicData => "Basic data".into(),
                Kind::Other(t) => t.clone(),
            }),
            file_system: v
                .fs
                .as_ref()
                .map(|f| f.kind().to_string())
                .or(v.found.map(str::to_string))
                .unwrap_or_default(),
            uuid: v.uuid().unwrap_or_default(),
            label: v.label().unwrap_or_default(),
            size: v.part.as_ref().map_or(0, |p| p.len),
        })
        .collect();
    let mut info = proto::v1::DiskBootInfo {
        inspected: true,
        partition_table: match d.layout.table {
            Table::Gpt => "GPT",
            Table::Mbr => "MBR",
            Table::None => "none",
        }
        .into(),
        volumes,
        ..Default::default()
    };
    match d.inspect() {
        Ok(i) => {
            info.bootable = !i.entries.is_empty();
            info.os = i.os.unwrap_or_default();
            info.default_entry = i.default as u32;
            info.entries = i
                .entries
                .iter()
                .map(|e| proto::v1::BootEntry {
                    title: e.title.clone(),
                    version: e.version.clone().unwrap_or_default(),
                    kernel: place(&e.kernel),
                    initrd: e.initrds.iter().map(place).collect::<Vec<_>>().join(" "),
                    cmdline: e.cmdline.clone(),
                })
                .collect();
        }
        Err(e) => info.reason = e.to_string(),
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_reads_of_an_image_cover_whole_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let img = parvis_disk::image::open_file(std::fs::File::open(&p).unwrap(), None).unwrap();
        let r = ImageReader(img);
        for (off, len) in [(0u64, 512usize), (3, 5), (510, 4), (1000, 3000), (8191, 1)] {
            let mut b = vec![0u8; len];
            r.read_at(&mut b, off).unwrap();
            assert_eq!(b, data[off as usize..off as usize + len], "{off}+{len}");
        }
        let mut b = [0u8; 2];
        assert!(r.read_at(&mut b, 8191).is_err());
    }
}
