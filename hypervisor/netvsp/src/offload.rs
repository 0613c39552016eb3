//! Checksum and large-send offload for the guest's frames: the capabilities the device
//! offers, the per-packet information (PPI) hv_netvsc attaches, and the header fix-ups that
//! turn an NDIS large send into what the host's network stack (a TAP with virtio-net
//! headers) expects.
//!
//! NDIS's large send leaves the IPv4 total length, the IPv4 header checksum and the IPv6
//! payload length at zero and puts a pseudo-header checksum without a length in the TCP
//! header (Linux's `netvsc_xmit` does exactly that); the host stack wants the real lengths,
//! a valid IPv4 header checksum and the pseudo-header checksum with the length.

use crate::protocol::u32_at;

/// What the host must still do to a frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    /// Fill in a checksum: over the frame from `start`, stored at `start + offset`.
    pub csum: Option<(u16, u16)>,
    /// Cut into TCP segments of `mss` payload bytes.
    pub gso: Option<Gso>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    pub ipv6: bool,
    pub mss: u16,
    /// Bytes of headers (Ethernet, IP, TCP) each segment repeats.
    pub hdr_len: u16,
}

/// Largest large-send frame offered to the guest.
pub const LSO_MAX: u32 = 62_780;
/// Smallest number of segments the guest may ask a large send to be cut into.
const LSO_MIN_SEGMENTS: u32 = 2;

/// The NDIS_OFFLOAD capabilities when the backend takes checksum and segmentation work:
/// TCP and UDP checksums over IPv4 and IPv6, and large send (LSOv2) for both.
pub fn advertise(o: &mut [u8]) {
    const ENCAP_8023: u32 = 2;
    // NDIS_TXCSUM_CAP_* bits: IP4OPT|TCP4OPT|TCP4|UDP4|IP4, and IP6EXT|TCP6OPT|TCP6|UDP6.
    const TX4: u32 = 0x001 | 0x004 | 0x010 | 0x040 | 0x100;
    const TX6: u32 = 0x001 | 0x004 | 0x010 | 0x040;
    let mut put = |at: usize, v: u32| {
        if let Some(s) = o.get_mut(at..at + 4) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    };
    // csum: ip4_txenc, ip4_txcsum, ip4_rxenc, ip4_rxcsum, ip6_* likewise (from byte 4).
    put(4, ENCAP_8023);
    put(8, TX4);
    put(20, ENCAP_8023);
    put(24, TX6);
    // lsov2 (from byte 80): ip4_encap, ip4_maxsz, ip4_minsg, ip6_encap, ip6_maxsz,
    // ip6_minsg, ip6_opts (IP6EXT|TCP6OPT).
    put(80, ENCAP_8023);
    put(84, LSO_MAX);
    put(88, LSO_MIN_SEGMENTS);
    put(92, ENCAP_8023);
    put(96, LSO_MAX);
    put(100, LSO_MIN_SEGMENTS);
    put(104, 0x001 | 0x004);
}

const PPI_CHECKSUM: u32 = 0;
const PPI_LSO: u32 = 2;

/// The checksum and large-send requests in an RNDIS data message's per-packet
/// information (`m` is the whole message). Malformed entries are ignored, as Linux's own
/// receive side does.
fn ppis(m: &[u8]) -> (Option<u32>, Option<u32>) {
    let (mut csum, mut lso) = (None, None);
    let (Some(off), Some(len)) = (u32_at(m, 28), u32_at(m, 32)) else {
        return (None, None);
    };
    if off == 0 || len == 0 {
        return (None, None);
    }
    let Some(mut at) = 8usize.checked_add(off as usize) else {
        return (None, None);
    };
    let end = at.saturating_add(len as usize).min(m.len());
    while at + 12 <= end {
        let (Some(size), Some(kind), Some(data)) =
            (u32_at(m, at), u32_at(m, at + 4), u32_at(m, at + 8))
        else {
            break;
        };
        let size = size as usize;
        if size < 12 || at + size > end || data as usize + 4 > size {
            break;
        }
        if kind & 0x8000_0000 == 0 {
            let value = u32_at(m, at + data as usize);
            match kind {
                PPI_CHECKSUM => csum = value,
                PPI_LSO => lso = value,
                _ => {}
            }
        }
        at += size;
    }
    (csum, lso)
}

/// One's-complement sum of big-endian 16-bit words.
fn sum16(mut acc: u32, b: &[u8]) -> u32 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// What to do with the frame of data message `m`, fixing its headers for a large send.
/// `None`: the request is inconsistent with the frame (the frame is dropped).
pub fn take(m: &[u8], frame: &mut [u8]) -> Option<Offload> {
    let (csum, lso) = ppis(m);
    if let Some(l) = lso {
        let mss = (l & 0xf_ffff) as u16;
        let th = ((l >> 20) & 0x3ff) as usize;
        let ipv6 = l & 0x8000_0000 != 0;
        return large_send(frame, th, mss, ipv6).map(|gso| Offload {
            csum: Some((th as u16, 16)),
            gso: Some(gso),
        });
    }
    if let Some(c) = csum {
        let (tcp, udp) = (c & 4 != 0, c & 8 != 0);
        if !tcp && !udp {
            return Some(Offload::default());
        }
        let start = ((c >> 16) & 0x3ff) as usize;
        let offset = if tcp { 16 } else { 6 };
        if start < 14 + 20 || start + offset + 2 > frame.len() {
            return None;
        }
        return Some(Offload {
            csum: Some((start as u16, offset as u16)),
            gso: None,
        });
    }
    Some(Offload::default())
}

fn large_send(f: &mut [u8], th: usize, mss: u16, ipv6: bool) -> Option<Gso> {
    const ETH: usize = 14;
    let len = f.len();
    if mss == 0 || th < ETH + 20 || th + 20 > len || len > 65_535 + ETH {
        return None;
    }
    let thl = usize::from(f[th + 12] >> 4) * 4;
    if thl < 20 || th + thl > len {
        return None;
    }
    let tcp_len = len - th;
    let mut acc = u32::from(6u16); // protocol TCP
    if ipv6 {
        if th < ETH + 40 || f[ETH] >> 4 != 6 {
            return None;
        }
        let payload = u16::try_from(len - ETH - 40).ok()?;
        f[ETH + 4..ETH + 6].copy_from_slice(&payload.to_be_bytes());
        acc = sum16(acc, &f[ETH + 8..ETH + 40]);
        acc = acc
            .wrapping_add((tcp_len as u32) >> 16)
            .wrapping_add(tcp_len as u32 & 0xffff);
    } else {
        if f[ETH] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(f[ETH] & 0xf) * 4;
        if ihl < 20 || ETH + ihl > th {
            return None;
        }
        let total = u16::try_from(len - ETH).ok()?;
        f[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
        f[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
        let ip_sum = !fold(sum16(0, &f[ETH..ETH + ihl]));
        f[ETH + 10..ETH + 12].copy_from_slice(&ip_sum.to_be_bytes());
        acc = sum16(acc, &f[ETH + 12..ETH + 20]);
        acc = acc.wrapping_add(u32::try_from(tcp_len).ok()?);
    }
    // The host stack completes the checksum from here (CHECKSUM_PARTIAL semantics).
    let pseudo = fold(acc);
    f[th + 16..th + 18].copy_from_slice(&pseudo.to_be_bytes());
    Some(Gso {
        ipv6,
        mss,
        hdr_len: (th + thl) as u16,
    })
}

/// The 10-byte virtio-net header a TAP with IFF_VNET_HDR expects before `o`'s frame.
pub fn vnet_header(o: &Offload) -> [u8; 10] {
    let mut h = [0u8; 10];
    if let Some((start, offset)) = o.csum {
        h[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        h[6..8].copy_from_slice(&start.to_le_bytes());
        h[8..10].copy_from_slice(&offset.to_le_bytes());
    }
    if let Some(g) = o.gso {
        h[1] = if g.ipv6 { 4 } else { 1 }; // GSO_TCPV6 / GSO_TCPV4
        h[2..4].copy_from_slice(&g.hdr_len.to_le_bytes());
        h[4..6].copy_from_slice(&g.mss.to_le_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4/TCP frame of `payload` bytes as netvsc hands a large send over: total
    /// length and header checksum zero, TCP checksum the pseudo-header without length.
    fn lso_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[14 + 8] = 64;
        f[14 + 9] = 6;
        f[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 2]);
        f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 1]);
        f[34 + 12] = 5 << 4;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    /// An RNDIS data message header with one PPI entry (16 bytes: size, type, offset 12,
    /// the value).
    fn message_with_ppi(kind: u32, value: u32) -> Vec<u8> {
        let mut m = vec![0u8; 8 + 36];
        m[28..32].copy_from_slice(&36u32.to_le_bytes());
        m[32..36].copy_from_slice(&16u32.to_le_bytes());
        for w in [16, kind, 12, value] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        m
    }

    #[test]
    fn a_large_send_gets_real_lengths_and_a_full_pseudo_checksum() {
        let mut f = lso_frame(3000);
        let value = 1448 | (34 << 20) | (1 << 30);
        let m = message_with_ppi(PPI_LSO, value);
        let o = take(&m, &mut f).unwrap();
        let g = o.gso.unwrap();
        assert_eq!((g.mss, g.hdr_len, g.ipv6), (1448, 54, false));
        assert_eq!(o.csum, Some((34, 16)));
        assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
        // The IPv4 header now sums to 0xffff.
        assert_eq!(fold(sum16(0, &f[14..34])), 0xffff);
        // The TCP field holds the pseudo-header sum with the TCP length.
        let mut acc = 6u32 + (f.len() - 34) as u32;
        acc = sum16(acc, &f[26..34]);
        assert_eq!(u16::from_be_bytes([f[50], f[51]]), fold(acc));
        let h = vnet_header(&o);
        assert_eq!(h[0..2], [1, 1]);
        assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1448);
    }

    #[test]
    fn checksum_requests_and_nonsense() {
        let mut f = lso_frame(100);
        let m = message_with_ppi(PPI_CHECKSUM, 1 | 4 | (34 << 16));
        assert_eq!(take(&m, &mut f).unwrap().csum, Some((34, 16)));
        let m = message_with_ppi(PPI_CHECKSUM, 1 | 8 | (34 << 16));
        assert_eq!(take(&m, &mut f).unwrap().csum, Some((34, 6)));
        // A header offset past the frame is refused.
        let m = message_with_ppi(PPI_CHECKSUM, 1 | 4 | (1000 << 16));
        assert!(take(&m, &mut f).is_none());
        let m = message_with_ppi(PPI_LSO, 1448 | (1000 << 20));
        assert!(take(&m, &mut f).is_none());
        // No PPIs: nothing to do.
        let mut plain = vec![0u8; 44];
        assert_eq!(take(&plain.clone(), &mut plain), Some(Offload::default()));
        // A PPI list pointing outside the message is ignored.
        let mut m = message_with_ppi(PPI_LSO, 1448 | (34 << 20));
        m[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(take(&m, &mut f), Some(Offload::default()));
    }
}
