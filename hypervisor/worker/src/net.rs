//! The VM's network adapters: each `--nic` is a synthetic NIC (netvsp) on a TAP device.
//!
//! The TAP is either a descriptor the agent opened and passed down (`fd=N`: the worker
//! needs no CAP_NET_ADMIN) or, for development and tests run as root, one the worker
//! opens or creates by name (`tap=NAME`). A thread per NIC reads frames from the TAP into
//! the NIC's queue; the guest's frames are written from its VMBus channel thread.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use netvsp::{Netvsp, NicHandle, Transmit};
use vmbus_core::SharedVsp;

/// One `--nic`: `tap=NAME|fd=N[,mac=XX:XX:XX:XX:XX:XX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub backend: Backend,
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A TAP opened (or created) by name.
    Tap(String),
    /// An open TAP descriptor inherited from the agent.
    Fd(i32),
}

impl std::str::FromStr for NicSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut backend = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) => {
                    if name.is_empty() || name.len() > 15 || name.contains('/') {
                        return Err(format!("'{name}' is not a network interface name"));
                    }
                    backend = Some(Backend::Tap(name.into()));
                }
                Some(("fd", n)) => {
                    let n: i32 = n
                        .parse()
                        .ok()
                        .filter(|n| *n > 2)
                        .ok_or_else(|| format!("'{n}' is not an inherited descriptor"))?;
                    backend = Some(Backend::Fd(n));
                }
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                _ => return Err(format!("unknown NIC option '{part}' (use tap=, fd=, mac=)")),
            }
        }
        let backend = backend.ok_or("a NIC needs tap=NAME or fd=N")?;
        Ok(NicSpec { backend, mac })
    }
}

/// "02:50:76:00:00:01" as bytes; a multicast address is refused.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("'{s}' is not a MAC address"));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!("'{s}' is not a MAC address"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("'{s}' is not a MAC address"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address"));
    }
    Ok(mac)
}

/// A locally administered address for a NIC given none: Parvis's prefix 02:50:76 and three
/// random bytes.
fn random_mac() -> [u8; 6] {
    let mut r = [0u8; 3];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut r))
        .is_err()
    {
        let t = std::process::id().to_le_bytes();
        r.copy_from_slice(&t[..3]);
    }
    [0x02, 0x50, 0x76, r[0], r[1], r[2]]
}

/// The NICs of a VM.
pub struct Nics {
    vsps: Vec<SharedVsp>,
}

impl Nics {
    /// Open each NIC's TAP, start its reader thread and make its device.
    pub fn new(vmbus: bool, specs: &[NicSpec]) -> Result<Self> {
        if !specs.is_empty() && !vmbus {
            bail!("network adapters are VMBus devices: they need --hyperv other than off");
        }
        if specs.len() > 8 {
            bail!("at most 8 network adapters");
        }
        let mut vsps: Vec<SharedVsp> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let tap = match &spec.backend {
                Backend::Tap(name) => {
                    tap::open(name).with_context(|| format!("cannot open TAP device {name}"))?
                }
                Backend::Fd(n) => tap::adopt(*n)
                    .with_context(|| format!("descriptor {n} is not an open TAP device"))?,
            };
            let mac = spec.mac.unwrap_or_else(random_mac);
            let vnet = tap::has_vnet_header(&tap);
            let reader = tap
                .try_clone()
                .context("cannot duplicate the TAP descriptor")?;
            let (dev, handle) = Netvsp::new(i as u8, mac, Box::new(TapTx { fd: tap, vnet }))
                .context("cannot create the network adapter")?;
            let h = handle.clone();
            std::thread::Builder::new()
                .name(format!("nic{i}-rx"))
                .spawn(move || rx_loop(reader, vnet, &h))
                .context("cannot start the network adapter's thread")?;
            tracing::info!(nic = i, mac = %format_mac(&mac), offloads = vnet, "network adapter");
            vsps.push(Arc::new(std::sync::Mutex::new(dev)));
        }
        Ok(Nics { vsps })
    }

    /// The NICs to offer on VMBus.
    pub fn vsps(&self) -> Vec<SharedVsp> {
        self.vsps.clone()
    }
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The guest's frames into the TAP. With virtio-net headers (IFF_VNET_HDR) the host
/// stack completes checksums and cuts large sends: the guest is offered both.
struct TapTx {
    fd: OwnedFd,
    vnet: bool,
}

impl Transmit for TapTx {
    fn transmit(&mut self, frame: &[u8], o: &netvsp::offload::Offload) -> std::io::Result<()> {
        if self.vnet {
            let h = netvsp::offload::vnet_header(o);
            rustix::io::writev(
                &self.fd,
                &[std::io::IoSlice::new(&h), std::io::IoSlice::new(frame)],
            )?;
        } else {
            rustix::io::write(&self.fd, frame)?;
        }
        Ok(())
    }

    fn offloads(&self) -> bool {
        self.vnet
    }
}

/// Bytes of the virtio-net header before each frame read from a TAP with IFF_VNET_HDR.
const VNET_HDR: usize = 10;

/// Frames from the TAP into the NIC until the TAP goes away. No offloads are enabled for
/// reading (TUNSETOFFLOAD stays 0), so every frame arrives whole and checksummed.
fn rx_loop(fd: OwnedFd, vnet: bool, nic: &NicHandle) {
    let mut buf = vec![0u8; 65536];
    let skip = if vnet { VNET_HDR } else { 0 };
    loop {
        match rustix::io::read(fd.as_fd(), &mut buf) {
            Ok(0) => return,
            Ok(n) if n > skip => {
                nic.receive(&buf[skip..n]);
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
            Err(e) => {
                tracing::warn!("TAP read failed, the adapter receives nothing more: {e}");
                return;
            }
        }
    }
}

#[allow(
    unsafe_code,
    reason = "the TUNSETIFF/TUNGETIFF ioctls and adopting an inherited descriptor"
)]
mod tap {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use anyhow::{Result, bail};

    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    // _IOW('T', 202, int) and _IOR('T', 210, unsigned int).
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }

    /// Attach to TAP `name`, creating it when it does not exist (that needs CAP_NET_ADMIN).
    pub fn open(name: &str) -> Result<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let fd = OwnedFd::from(f);
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        if name.len() >= libc::IFNAMSIZ {
            bail!("interface name too long");
        }
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes one struct ifreq at the pointer: `req` is a live
        // local with ifreq's layout (16-byte name, flags, padding to 40 bytes).
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(fd)
    }

    /// Whether the TAP hands frames with a virtio-net header.
    pub fn has_vnet_header(fd: &OwnedFd) -> bool {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes one struct ifreq at the pointer, a live local of that
        // layout.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) };
        r >= 0 && req.flags & IFF_VNET_HDR != 0
    }

    /// Take ownership of inherited descriptor `n` after checking it is a TAP.
    pub fn adopt(n: i32) -> Result<OwnedFd> {
        // SAFETY: fcntl(F_GETFD) only asks whether `n` is open; nothing is owned yet.
        if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
            bail!("it is not open");
        }
        // SAFETY: `n` is open (checked above) and was handed to this process for the NIC
        // alone: nothing else in the worker owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(n) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes one struct ifreq at the pointer, a live local of that
        // layout; on a descriptor that is not a TAP it fails with EBADFD/EINVAL.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) };
        if r < 0 || req.flags & IFF_TAP == 0 {
            bail!("TUNGETIFF says it is not a TAP");
        }
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_specs_parse_and_refuse_nonsense() {
        let s: NicSpec = "tap=pv0,mac=02:50:76:00:00:01".parse().unwrap();
        assert_eq!(s.backend, Backend::Tap("pv0".into()));
        assert_eq!(s.mac, Some([2, 0x50, 0x76, 0, 0, 1]));
        let s: NicSpec = "fd=7".parse().unwrap();
        assert_eq!(s.backend, Backend::Fd(7));
        for bad in [
            "",
            "mac=02:00:00:00:00:01",
            "tap=",
            "tap=a-very-long-interface-name",
            "fd=1",
            "fd=x",
            "tap=x,mac=01:00:00:00:00:00",
            "tap=x,mac=02:00:00:00:00",
            "tap=x,speed=10",
        ] {
            assert!(bad.parse::<NicSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_macs_are_local_unicast() {
        let m = random_mac();
        assert_eq!(m[0] & 3, 2);
        assert_eq!(&m[..3], &[0x02, 0x50, 0x76]);
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let n = std::os::fd::IntoRawFd::into_raw_fd(f);
        assert!(tap::adopt(n).is_err());
        assert!(tap::adopt(987_654).is_err());
    }
}
