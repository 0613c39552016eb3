//! Frame stamps: how a screen writer (the fake worker, or a guest program) tells a reader
//! when it drew what. A stamp is four BGRX pixels at the origin of an 8×16 text cell:
//! `[MAGIC, seq, t_lo, t_hi]`, with `t` the writer's CLOCK_MONOTONIC in nanoseconds. Drawn
//! pixels keep 0xFF in their top byte, so they never read as the magic.

/// The first stamp pixel ("PVSB" read as a little-endian word).
pub const MAGIC: u32 = 0x5056_5342;

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on this machine.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// A stamp found in a picture: its sequence number and when it was drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u32,
    pub drawn_ns: u64,
}

/// Stamps at the 8×16 cell origins of a `w`×`h` BGRX picture whose top-left corner is at
/// (`x0`, `y0`) on the screen (cells are aligned to the screen, not to the picture).
pub fn find(pixels: &[u8], x0: u32, y0: u32, w: u32, h: u32) -> Vec<Stamp> {
    let mut out = Vec::new();
    let (w, h) = (w as usize, h as usize);
    if pixels.len() < w * h * 4 {
        return out;
    }
    let first_x = (8 - x0 as usize % 8) % 8;
    let first_y = (16 - y0 as usize % 16) % 16;
    for y in (first_y..h).step_by(16) {
        for x in (first_x..w.saturating_sub(3)).step_by(8) {
            let at = (y * w + x) * 4;
            let word = |i: usize| {
                u32::from_le_bytes(
                    pixels[at + i * 4..at + i * 4 + 4]
                        .try_into()
                        .unwrap_or([0; 4]),
                )
            };
            if word(0) == MAGIC {
                out.push(Stamp {
                    seq: word(1),
                    drawn_ns: u64::from(word(2)) | (u64::from(word(3)) << 32),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_found_at_cell_origins_only() {
        let (w, h) = (64u32, 64u32);
        let mut px = vec![0xFFu8; (w * h * 4) as usize];
        let put = |px: &mut Vec<u8>, x: usize, y: usize, seq: u32, t: u64| {
            let at = (y * w as usize + x) * 4;
            px[at..at + 4].copy_from_slice(&MAGIC.to_le_bytes());
            px[at + 4..at + 8].copy_from_slice(&seq.to_le_bytes());
            px[at + 8..at + 16].copy_from_slice(&t.to_le_bytes());
        };
        put(&mut px, 8, 16, 7, 0x1_0000_0002);
        // Not at a cell origin: ignored.
        put(&mut px, 4, 0, 9, 1);
        let s = find(&px, 64, 128, w, h);
        assert_eq!(
            s,
            vec![Stamp {
                seq: 7,
                drawn_ns: 0x1_0000_0002
            }]
        );
        // The same picture placed off the cell grid finds nothing at its own origins.
        assert!(find(&px, 4, 0, w, h).iter().all(|s| s.seq != 7));
        assert!(monotonic_ns() > 0);
    }
}
