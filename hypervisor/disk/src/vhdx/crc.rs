//! CRC-32C (Castagnoli), the checksum of VHDX headers, region tables and log entries.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// Slicing-by-8 tables: `TABLES[0]` is the classic byte table, `TABLES[k][i]` is the CRC
/// of byte `i` followed by `k` zero bytes.
const TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

/// Continue a CRC-32C over `data` (start with 0).
pub fn update(crc: u32, data: &[u8]) -> u32 {
    let t = &TABLES;
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for w in &mut chunks {
        let lo = c ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][w[4] as usize]
            ^ t[2][w[5] as usize]
            ^ t[1][w[6] as usize]
            ^ t[0][w[7] as usize];
    }
    for &b in chunks.remainder() {
        c = t[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// CRC-32C of `data`.
#[cfg(test)]
pub fn crc32c(data: &[u8]) -> u32 {
    update(0, data)
}

/// CRC-32C of `buf` with the 4-byte checksum field at `field` taken as zero.
pub fn checksum(buf: &[u8], field: usize) -> u32 {
    let c = update(0, &buf[..field]);
    let c = update(c, &[0; 4]);
    update(c, &buf[field + 4..])
}

/// Whether the little-endian checksum stored at `field` matches `buf`.
pub fn verify(buf: &[u8], field: usize) -> bool {
    super::format::le32(buf, field) == checksum(buf, field)
}

/// Compute and store the checksum at `field`.
pub fn seal(buf: &mut [u8], field: usize) {
    let c = checksum(buf, field);
    super::format::put32(buf, field, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        let mut b = vec![7u8; 64];
        seal(&mut b, 4);
        assert!(verify(&b, 4));
        b[10] ^= 1;
        assert!(!verify(&b, 4));
        assert_eq!(update(crc32c(b"1234"), b"56789"), 0xE306_9283);
        // Slicing-by-8 agrees with a bitwise CRC on every length and alignment.
        let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(crc32c(&data[start..end]), bitwise(&data[start..end]));
            }
        }
    }

    fn bitwise(d: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in d {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
        }
        !c
    }
}
