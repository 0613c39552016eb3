//! Opening a TAP device by name (created if missing; the agent has CAP_NET_ADMIN).

#![allow(
    unsafe_code,
    reason = "the TUNSETIFF ioctl: no safe wrapper exists in the crates the agent uses"
)]

use std::os::fd::{AsRawFd, OwnedFd};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Frames carry a virtio-net header: the worker hands checksum and segmentation work to
/// the host stack.
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// TAP `name` (Ethernet frames after a virtio-net header), as a descriptor that is
/// closed on exec unless passed on explicitly.
pub fn open(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
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
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes one struct ifreq at the pointer; `req` is a live
    // local with ifreq's layout (16-byte name, flags, padding to 40 bytes).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}
