//! CRC-32C (Castagnoli), which XFS and btrfs stamp their metadata with.

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// The register after `data`, from `crc`: no inversion before or after (Linux's `crc32c()`;
/// the usual checksum is `!update(!0, data)`).
pub(crate) fn update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_is_castagnoli() {
        assert_eq!(!super::update(!0, b"123456789"), 0xe306_9283);
    }
}
