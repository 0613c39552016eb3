//! The VHD hard disk footer: the 512-byte (511 in images older than Virtual PC 2004)
//! structure at the end of every VHD, mirrored at offset 0 of dynamic and differencing images.
//!
//! All fields are big-endian. Layout (offsets in bytes):
//!
//! | off | len | field |
//! |----:|----:|-------|
//! |   0 |   8 | cookie `conectix` |
//! |   8 |   4 | features (bit 1 is reserved and always set) |
//! |  12 |   4 | format version `0x00010000` |
//! |  16 |   8 | data offset: the dynamic header, or all ones for a fixed disk |
//! |  24 |   4 | timestamp, seconds since 2000-01-01 00:00:00 UTC |
//! |  28 |   4 | creator application (`vpc `, `qemu`, `win `, `pvis`, ...) |
//! |  32 |   4 | creator version |
//! |  36 |   4 | creator host OS (`Wi2k`, `Mac `) |
//! |  40 |   8 | original size |
//! |  48 |   8 | current size |
//! |  56 |   4 | CHS geometry: cylinders u16, heads u8, sectors per track u8 |
//! |  60 |   4 | disk type: 2 fixed, 3 dynamic, 4 differencing |
//! |  64 |   4 | checksum |
//! |  68 |  16 | unique id |
//! |  84 |   1 | saved state |

use crate::DiskError;

/// Size of a footer as written today.
pub const FOOTER_SIZE: usize = 512;
/// Size of a footer written by tools older than Virtual PC 2004.
pub const OLD_FOOTER_SIZE: usize = 511;
/// Footer cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;
/// The largest CHS geometry a footer can hold (65535 × 16 × 255 sectors); an image carrying
/// it is always sized by its current size.
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// The largest virtual size in sectors (2040 GiB), the limit qemu and Hyper-V apply.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// The largest virtual size in bytes.
pub const MAX_SIZE: u64 = MAX_SECTORS * 512;

const CHECKSUM_OFF: usize = 64;

/// The disk type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Data followed by the footer.
    Fixed,
    /// Sparse blocks through a BAT.
    Dynamic,
    /// Sparse blocks with per-sector bitmaps over a parent image.
    Differencing,
}

impl DiskType {
    fn from_raw(v: u32) -> Option<Self> {
        match v {
            2 => Some(Self::Fixed),
            3 => Some(Self::Dynamic),
            4 => Some(Self::Differencing),
            _ => None,
        }
    }

    fn to_raw(self) -> u32 {
        match self {
            Self::Fixed => 2,
            Self::Dynamic => 3,
            Self::Differencing => 4,
        }
    }

    /// The name shown in [`crate::ImageInfo::variant`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::Dynamic => "dynamic",
            Self::Differencing => "differencing",
        }
    }
}

/// CHS geometry as stored in the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

impl Geometry {
    /// Total sectors the geometry describes.
    pub fn total_sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }

    /// The geometry for `total_sectors` by the algorithm of the VHD specification
    /// (appendix "CHS calculation"). It may describe fewer sectors than asked for.
    pub fn for_sectors(total_sectors: u64) -> Self {
        let total = total_sectors.min(MAX_CHS_SECTORS);
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            let mut s = 17;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        // `total` is capped, so every value fits its field.
        Self {
            cylinders: u16::try_from(cth / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(u8::MAX),
            sectors: u8::try_from(spt).unwrap_or(u8::MAX),
        }
    }
}

/// How the virtual size is derived from a footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeRule {
    /// cylinders × heads × sectors × 512 (Virtual PC, old qemu, unknown creators).
    Chs,
    /// The current size field (Hyper-V, Disk2VHD, XenServer, qemu `force_size`, Parvis).
    CurrentSize,
}

/// A parsed footer. `raw` keeps the exact bytes so that rewriting an opened image's footer
/// preserves fields Parvis does not interpret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// The bytes, with a valid checksum.
    pub raw: [u8; FOOTER_SIZE],
    /// Disk type.
    pub disk_type: DiskType,
    /// Data offset (the dynamic header for dynamic and differencing disks).
    pub data_offset: u64,
    /// Timestamp (VHD epoch).
    pub timestamp: u32,
    /// Creator application.
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS.
    pub creator_os: [u8; 4],
    /// Original size.
    pub original_size: u64,
    /// Current size.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Unique id.
    pub uuid: [u8; 16],
    /// Saved-state flag.
    pub saved_state: bool,
}

/// Big-endian field readers over a byte slice whose length the caller has checked.
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    (u64::from(be32(b, off)) << 32) | u64::from(be32(b, off + 4))
}

/// The VHD checksum: the ones' complement of the byte sum, with the 4-byte checksum field at
/// `checksum_off` taken as zero.
pub fn checksum(buf: &[u8], checksum_off: usize) -> u32 {
    let sum = buf.iter().enumerate().fold(0u32, |acc, (i, &b)| {
        if (checksum_off..checksum_off + 4).contains(&i) {
            acc
        } else {
            acc.wrapping_add(u32::from(b))
        }
    });
    !sum
}

/// A `Corrupt` error.
pub(crate) fn corrupt(
    structure: impl Into<String>,
    offset: u64,
    reason: impl Into<String>,
) -> DiskError {
    DiskError::Corrupt {
        structure: structure.into(),
        offset,
        reason: reason.into(),
    }
}

/// Printable form of a 4-byte tag such as the creator application.
pub fn tag(t: &[u8; 4]) -> String {
    t.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '.'
            }
        })
        .collect::<String>()
}

/// Canonical text form of a UUID as stored (big-endian, no field swapping).
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Footer {
    /// Parse a footer from `buf` (511 or 512 bytes; a 511-byte footer is taken as padded
    /// with a zero byte). `offset` is where it was read, for error messages.
    pub fn parse(buf: &[u8], offset: u64) -> Result<Self, DiskError> {
        const S: &str = "VHD footer";
        if buf.len() != FOOTER_SIZE && buf.len() != OLD_FOOTER_SIZE {
            return Err(corrupt(S, offset, "wrong length"));
        }
        let mut raw = [0u8; FOOTER_SIZE];
        raw[..buf.len()].copy_from_slice(buf);
        if &raw[..8] != FOOTER_COOKIE {
            return Err(corrupt(S, offset, "no \"conectix\" cookie"));
        }
        let stored = be32(&raw, CHECKSUM_OFF);
        let computed = checksum(&raw, CHECKSUM_OFF);
        if stored != computed {
            return Err(corrupt(
                S,
                offset,
                format!("checksum {stored:#010x} does not match computed {computed:#010x}"),
            ));
        }
        let type_raw = be32(&raw, 60);
        let disk_type = DiskType::from_raw(type_raw)
            .ok_or_else(|| corrupt(S, offset, format!("unknown disk type {type_raw}")))?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&raw[68..84]);
        Ok(Self {
            disk_type,
            data_offset: be64(&raw, 16),
            timestamp: be32(&raw, 24),
            creator_app: [raw[28], raw[29], raw[30], raw[31]],
            creator_version: be32(&raw, 32),
            creator_os: [raw[36], raw[37], raw[38], raw[39]],
            original_size: be64(&raw, 40),
            current_size: be64(&raw, 48),
            geometry: Geometry {
                cylinders: be16(&raw, 56),
                heads: raw[58],
                sectors: raw[59],
            },
            uuid,
            saved_state: raw[84] != 0,
            raw,
        })
    }

    /// A new footer with the fields Parvis writes (creator `pvis` on `Wi2k`).
    pub fn new(disk_type: DiskType, size: u64, timestamp: u32, uuid: [u8; 16]) -> Self {
        let mut raw = [0u8; FOOTER_SIZE];
        raw[..8].copy_from_slice(FOOTER_COOKIE);
        raw[8..12].copy_from_slice(&2u32.to_be_bytes());
        raw[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        let data_offset = if disk_type == DiskType::Fixed {
            u64::MAX
        } else {
            512
        };
        raw[16..24].copy_from_slice(&data_offset.to_be_bytes());
        raw[28..32].copy_from_slice(b"pvis");
        raw[32..36].copy_from_slice(&creator_version().to_be_bytes());
        raw[36..40].copy_from_slice(b"Wi2k");
        raw[40..48].copy_from_slice(&size.to_be_bytes());
        raw[60..64].copy_from_slice(&disk_type.to_raw().to_be_bytes());
        raw[68..84].copy_from_slice(&uuid);
        raw[24..28].copy_from_slice(&timestamp.to_be_bytes());
        let mut f = Self::parse_unchecked(raw, disk_type);
        f.set_size(size);
        f
    }

    fn parse_unchecked(mut raw: [u8; FOOTER_SIZE], disk_type: DiskType) -> Self {
        let sum = checksum(&raw, CHECKSUM_OFF);
        raw[CHECKSUM_OFF..CHECKSUM_OFF + 4].copy_from_slice(&sum.to_be_bytes());
        let mut f = Self::parse(&raw, 0).unwrap_or_else(|_| unreachable!("self-made footer"));
        f.disk_type = disk_type;
        f
    }

    /// Set the current size and the geometry derived from it, and refresh the checksum.
    ///
    /// When the specification's geometry cannot describe the size exactly, the saturated
    /// geometry (65535 × 16 × 255) is stored instead: readers that size images by geometry
    /// (qemu for unknown creators, Virtual PC) then fall back to the current size, so every
    /// tool sees the same disk size.
    pub fn set_size(&mut self, size: u64) {
        let spec = Geometry::for_sectors(size / 512);
        let g = if spec.total_sectors() * 512 == size {
            spec
        } else {
            Geometry {
                cylinders: 65535,
                heads: 16,
                sectors: 255,
            }
        };
        let mut raw = self.raw;
        raw[48..56].copy_from_slice(&size.to_be_bytes());
        raw[56..58].copy_from_slice(&g.cylinders.to_be_bytes());
        raw[58] = g.heads;
        raw[59] = g.sectors;
        *self = Self::parse_unchecked(raw, self.disk_type);
    }

    /// Replace the creator application (and refresh the checksum).
    pub fn set_creator_app(&mut self, app: &[u8; 4]) {
        let mut raw = self.raw;
        raw[28..32].copy_from_slice(app);
        *self = Self::parse_unchecked(raw, self.disk_type);
    }

    /// Which size the image's creator meant, following qemu's `vpc_open` (7.2) table: the
    /// creators `win ` (Hyper-V), `qem2` (qemu `force_size`), `d2v ` (Disk2VHD), `CTXS`
    /// (XenConverter) and `tap\0` (XenServer) use the current size; everything else
    /// (`vpc `, `qemu`, unknown) uses the CHS geometry, except that a saturated geometry
    /// (65535 × 16 × 255) always means the current size. Parvis adds its own creator `pvis`
    /// to the current-size list: images it creates are always sized by current size.
    pub fn size_rule(&self) -> SizeRule {
        let current = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0", b"pvis"];
        if current.contains(&&self.creator_app) || self.geometry.total_sectors() == MAX_CHS_SECTORS
        {
            SizeRule::CurrentSize
        } else {
            SizeRule::Chs
        }
    }

    /// The virtual size in bytes by [`Footer::size_rule`], rounded down to whole sectors.
    pub fn virtual_size(&self) -> u64 {
        match self.size_rule() {
            SizeRule::Chs => self.geometry.total_sectors() * 512,
            SizeRule::CurrentSize => self.current_size & !511,
        }
    }
}

/// The creator version Parvis writes: major in the high 16 bits, minor in the low.
fn creator_version() -> u32 {
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    (major << 16) | (minor & 0xffff)
}

/// Seconds since the VHD epoch, now (saturating).
pub fn now_timestamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// Convert a file time to the VHD epoch (0 if before it).
pub fn to_timestamp(t: std::time::SystemTime) -> u32 {
    let unix = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// A random (version 4) UUID, from the standard library's randomly keyed hasher mixed with
/// the time, the process id and a counter (this crate has no RNG dependency).
pub fn new_uuid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.write_u64(n);
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_be_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_spec_examples() {
        // 1 MiB: 2048 sectors -> 17 spt, 4 heads, 30 cylinders (2040 sectors).
        let g = Geometry::for_sectors(2048);
        assert_eq!((g.cylinders, g.heads, g.sectors), (30, 4, 17));
        // Saturated above 127 GiB.
        let g = Geometry::for_sectors(MAX_SECTORS);
        assert_eq!(g.total_sectors(), MAX_CHS_SECTORS);
    }

    #[test]
    fn footer_round_trip_and_rules() {
        let f = Footer::new(DiskType::Dynamic, 3 << 30, 1234, [7; 16]);
        let p = Footer::parse(&f.raw, 0).unwrap();
        assert_eq!(p, f);
        assert_eq!(p.size_rule(), SizeRule::CurrentSize);
        assert_eq!(p.virtual_size(), 3 << 30);
        // 3 GiB has no exact geometry: the saturated one is stored, so even a geometry
        // creator means the current size.
        let mut q = p.clone();
        q.set_creator_app(b"vpc ");
        assert_eq!(q.geometry.total_sectors(), MAX_CHS_SECTORS);
        assert_eq!(q.virtual_size(), 3 << 30);
        // A size the geometry describes exactly keeps the spec geometry.
        let mut e = Footer::new(DiskType::Dynamic, 2040 * 512, 1234, [7; 16]);
        assert_eq!(
            (e.geometry.cylinders, e.geometry.heads, e.geometry.sectors),
            (30, 4, 17)
        );
        e.set_creator_app(b"vpc ");
        assert_eq!(e.size_rule(), SizeRule::Chs);
        assert_eq!(e.virtual_size(), 2040 * 512);
        // An old 511-byte footer is accepted.
        assert!(Footer::parse(&f.raw[..511], 0).is_ok());
        let mut bad = f.raw;
        bad[100] ^= 1;
        assert!(matches!(
            Footer::parse(&bad, 0),
            Err(DiskError::Corrupt { .. })
        ));
    }

    #[test]
    fn uuids_differ() {
        let a = new_uuid();
        assert_ne!(a, new_uuid());
        assert_eq!(a[6] >> 4, 4);
    }
}
