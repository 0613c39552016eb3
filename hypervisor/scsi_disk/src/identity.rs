//! A disk's stable identity: the unit serial number (VPD page 80h) and the 8-byte NAA
//! world wide name (VPD page 83h). Guests name disks after these (udev's
//! `/dev/disk/by-id/wwn-0x…` and `scsi-…` links), so they must not change between boots.

use crate::ConfigError;

/// Longest unit serial number accepted, in bytes.
pub const MAX_SERIAL_LEN: usize = 64;

/// The serial number and WWN one disk reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIdentity {
    serial: String,
    wwn: u64,
}

impl DiskIdentity {
    /// An identity from explicit values. `serial`: 1 to [`MAX_SERIAL_LEN`] printable ASCII
    /// characters (20h-7Eh). `wwn`: an 8-byte NAA designator, i.e. its top four bits are
    /// the NAA field and must be 2 (IEEE extended), 3 (locally assigned) or 5 (IEEE
    /// registered); the 16-byte NAA 6 form does not fit in 64 bits.
    pub fn new(serial: &str, wwn: u64) -> Result<Self, ConfigError> {
        let printable = serial.bytes().all(|c| (0x20..=0x7E).contains(&c));
        if serial.is_empty() || serial.len() > MAX_SERIAL_LEN || !printable {
            return Err(ConfigError::Serial {
                max: MAX_SERIAL_LEN,
            });
        }
        if !matches!(wwn >> 60, 2 | 3 | 5) {
            return Err(ConfigError::Wwn { wwn });
        }
        Ok(Self {
            serial: serial.to_owned(),
            wwn,
        })
    }

    /// An identity derived from a stable disk id (e.g. the agent's disk UUID): the serial is
    /// the id's letters, digits and `-_.` (at most [`MAX_SERIAL_LEN`], "0" if none are
    /// left); the WWN is a locally assigned NAA (3h) whose other 60 bits are the 64-bit
    /// FNV-1a hash of the whole id. The same id always gives the same identity.
    pub fn derive(disk_id: &str) -> Self {
        let mut serial: String = disk_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .take(MAX_SERIAL_LEN)
            .collect();
        if serial.is_empty() {
            serial.push('0');
        }
        let wwn = (3u64 << 60) | (fnv1a64(disk_id.as_bytes()) & ((1u64 << 60) - 1));
        Self { serial, wwn }
    }

    /// The unit serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The 8-byte NAA designator.
    pub fn wwn(&self) -> u64 {
        self.wwn
    }
}

/// 64-bit FNV-1a (Fowler/Noll/Vo): small, stable across releases and platforms.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_identity_is_validated() {
        let id = DiskIdentity::new("disk-1", 0x5000_0000_0000_0001).unwrap();
        assert_eq!(id.serial(), "disk-1");
        assert_eq!(id.wwn(), 0x5000_0000_0000_0001);
        assert!(DiskIdentity::new("", 0x5000_0000_0000_0001).is_err());
        assert!(DiskIdentity::new("tab\there", 0x5000_0000_0000_0001).is_err());
        assert!(DiskIdentity::new(&"x".repeat(65), 0x5000_0000_0000_0001).is_err());
        assert!(DiskIdentity::new("ok", 0x6000_0000_0000_0001).is_err());
        assert!(DiskIdentity::new("ok", 0).is_err());
    }

    #[test]
    fn derived_identity_is_stable_and_well_formed() {
        let a = DiskIdentity::derive("0b7e9c1a-3f2d-4c55-9a51-2d3c4b5a6978");
        let b = DiskIdentity::derive("0b7e9c1a-3f2d-4c55-9a51-2d3c4b5a6978");
        assert_eq!(a, b);
        assert_eq!(a.serial(), "0b7e9c1a-3f2d-4c55-9a51-2d3c4b5a6978");
        assert_eq!(a.wwn() >> 60, 3);
        // The FNV-1a reference value for "a" is af63dc4c8601ec8c.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(DiskIdentity::derive("other").wwn(), a.wwn());
        assert_eq!(DiskIdentity::derive("\u{1F600} \n").serial(), "0");
        assert_eq!(DiskIdentity::derive(&"y".repeat(200)).serial().len(), 64);
        // A derived identity passes the explicit constructor's checks.
        assert!(DiskIdentity::new(a.serial(), a.wwn()).is_ok());
    }
}
