//! The boot framebuffer: a linear 32-bit XRGB surface in VRAM that the guest's efifb or
//! simpledrm draws into, and its conversion to PNG.

use std::path::Path;

/// Geometry of a 32-bit x8r8g8b8 framebuffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FbFormat {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes per line.
    pub stride: u32,
}

/// Errors from framebuffer handling.
#[derive(Debug, thiserror::Error)]
pub enum FbError {
    /// The geometry does not fit the VRAM or is degenerate.
    #[error("framebuffer {width}x{height} does not fit in {vram} bytes of VRAM")]
    TooLarge { width: u32, height: u32, vram: u64 },
    /// The partition has no boot framebuffer.
    #[error("the partition has no framebuffer")]
    NoFramebuffer,
    /// The pixel buffer is shorter than the geometry needs.
    #[error("framebuffer buffer is {got} bytes, {need} needed")]
    ShortBuffer { got: usize, need: usize },
    /// PNG encoding or writing failed.
    #[error("cannot write screenshot {path}")]
    Png {
        path: String,
        #[source]
        source: image::ImageError,
    },
}

impl FbFormat {
    /// A packed XRGB surface.
    pub fn xrgb(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            stride: width * 4,
        }
    }

    /// Bytes the surface occupies.
    pub fn byte_len(&self) -> u64 {
        u64::from(self.stride) * u64::from(self.height)
    }

    /// Check the surface fits `vram` bytes and is usable by the guest's drivers.
    pub fn validate(&self, vram: u64) -> Result<(), FbError> {
        let ok = self.width >= 64
            && self.height >= 64
            && self.width <= 8192
            && self.height <= 8192
            && self.stride >= self.width * 4
            && self.byte_len() <= vram;
        if ok {
            Ok(())
        } else {
            Err(FbError::TooLarge {
                width: self.width,
                height: self.height,
                vram,
            })
        }
    }

    /// Convert raw XRGB memory (at least `byte_len()` bytes) into packed RGB8.
    pub fn to_rgb(&self, raw: &[u8]) -> Result<Vec<u8>, FbError> {
        let need = usize::try_from(self.byte_len()).unwrap_or(usize::MAX);
        if raw.len() < need {
            return Err(FbError::ShortBuffer {
                got: raw.len(),
                need,
            });
        }
        let mut rgb = Vec::with_capacity(self.width as usize * self.height as usize * 3);
        for row in raw.chunks(self.stride as usize).take(self.height as usize) {
            for px in row[..self.width as usize * 4].chunks_exact(4) {
                rgb.extend_from_slice(&[px[2], px[1], px[0]]);
            }
        }
        Ok(rgb)
    }

    /// Write raw XRGB memory as a PNG file.
    pub fn save_png(&self, raw: &[u8], path: &Path) -> Result<(), FbError> {
        let rgb = self.to_rgb(raw)?;
        image::save_buffer_with_format(
            path,
            &rgb,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .map_err(|source| FbError::Png {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_geometry_against_vram() {
        assert!(FbFormat::xrgb(1024, 768).validate(16 << 20).is_ok());
        assert!(FbFormat::xrgb(2560, 1600).validate(16 << 20).is_ok());
        assert!(FbFormat::xrgb(4096, 4096).validate(16 << 20).is_err());
        assert!(FbFormat::xrgb(10, 10).validate(16 << 20).is_err());
        let bad_stride = FbFormat {
            width: 100,
            height: 100,
            stride: 200,
        };
        assert!(bad_stride.validate(16 << 20).is_err());
    }

    #[test]
    fn png_round_trip_keeps_colours_and_respects_stride() {
        let f = FbFormat {
            width: 64,
            height: 64,
            stride: 64 * 4 + 32,
        };
        let mut raw = vec![0u8; f.byte_len() as usize];
        for y in 0..64usize {
            for x in 0..64usize {
                let px: u32 = if y < 32 { 0x00ff_0000 } else { 0x0000_00ff } | (x as u32) << 8;
                let o = y * f.stride as usize + x * 4;
                raw[o..o + 4].copy_from_slice(&px.to_le_bytes());
            }
            // Padding bytes past the visible width must be ignored.
            let o = y * f.stride as usize + 256;
            raw[o..o + 32].fill(0x77);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shot.png");
        f.save_png(&raw, &p).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        assert_eq!(img.get_pixel(5, 3).0, [0xff, 5, 0]);
        assert_eq!(img.get_pixel(63, 40).0, [0, 63, 0xff]);
        assert!(f.to_rgb(&raw[..100]).is_err());
    }
}
