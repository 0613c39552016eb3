//! Opening, creating and describing an image of any supported format.

use std::path::{Path, PathBuf};

use crate::storage::{FileStorage, Storage};
use crate::vhd::{Vhd, VhdCreateOptions, VhdKind};
use crate::vhdx::{Vhdx, VhdxCreateOptions, VhdxKind, VhdxOpenOptions};
use crate::{
    AllocationState, BlockDevice, CheckReport, DiskError, ImageFormat, ImageInfo, RawFile,
    RawFileOptions,
};

/// How to open an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Refuse writes (and never modify the file).
    pub read_only: bool,
    /// Let a writable open replay a VHDX log in place.
    pub allow_replay: bool,
    /// Skip detection.
    pub format: Option<ImageFormat>,
    /// Logical sector size for raw images (512 or 4096).
    pub raw_sector_size: Option<u32>,
}

/// The disk variant to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Variant {
    /// All space allocated up front (sparse on the host where possible).
    Fixed,
    /// Allocated on write.
    Dynamic,
    /// Changes on top of a parent image.
    Differencing {
        /// The parent image.
        parent: PathBuf,
    },
}

/// How to create an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Container format.
    pub format: ImageFormat,
    /// Fixed, dynamic or differencing (raw is always "fixed").
    pub variant: Variant,
    /// Virtual size in bytes (ignored for differencing: the parent's).
    pub size: u64,
    /// Block size for dynamic/differencing images; `None` for the format's default.
    pub block_size: Option<u32>,
    /// Logical sector size (VHDX and raw: 512 or 4096; VHD: 512 only).
    pub logical_sector_size: u32,
}

/// An open image.
#[derive(Debug)]
pub enum Image {
    /// A raw file.
    Raw(RawFile),
    /// A VHD.
    Vhd(Box<Vhd>),
    /// A VHDX.
    Vhdx(Box<Vhdx>),
}

/// Detect the format of the file at `path` from its contents.
pub fn detect(path: &Path) -> Result<ImageFormat, DiskError> {
    let file = std::fs::File::open(path).map_err(|source| DiskError::Io {
        op: "open",
        offset: 0,
        source,
    })?;
    detect_storage(&FileStorage(file))
}

/// Detect the format of `storage`.
pub fn detect_storage(storage: &dyn Storage) -> Result<ImageFormat, DiskError> {
    if Vhdx::detect(storage)? {
        Ok(ImageFormat::Vhdx)
    } else if Vhd::detect(storage)? {
        Ok(ImageFormat::Vhd)
    } else {
        Ok(ImageFormat::Raw)
    }
}

/// Open an image, detecting its format unless one is given.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image, DiskError> {
    let format = match opts.format {
        Some(f) => f,
        None => detect(path)?,
    };
    Ok(match format {
        ImageFormat::Raw => Image::Raw(RawFile::open_with(
            path,
            &RawFileOptions {
                read_only: opts.read_only,
                logical_sector_size: opts.raw_sector_size.unwrap_or(512),
                physical_sector_size: None,
            },
        )?),
        ImageFormat::Vhd => Image::Vhd(Box::new(Vhd::open(path, opts.read_only)?)),
        ImageFormat::Vhdx => Image::Vhdx(Box::new(Vhdx::open(
            path,
            &VhdxOpenOptions {
                read_only: opts.read_only,
                allow_replay: opts.allow_replay,
            },
        )?)),
    })
}

/// Open an image from a file already open (a confined process that was handed only the
/// file descriptor), detecting its format. Read-only; a differencing image's parents cannot
/// be found this way, so a differencing VHDX fails to open and a differencing VHD reads
/// zeros where its parent would have data.
pub fn open_file(file: std::fs::File, raw_sector_size: Option<u32>) -> Result<Image, DiskError> {
    let storage = FileStorage(file);
    Ok(match detect_storage(&storage)? {
        ImageFormat::Raw => Image::Raw(RawFile::from_file(
            storage.0,
            &RawFileOptions {
                read_only: true,
                logical_sector_size: raw_sector_size.unwrap_or(512),
                physical_sector_size: None,
            },
        )?),
        ImageFormat::Vhd => Image::Vhd(Box::new(Vhd::open_storage(Box::new(storage), true, None)?)),
        ImageFormat::Vhdx => Image::Vhdx(Box::new(Vhdx::open_storage(
            Box::new(storage),
            &VhdxOpenOptions {
                read_only: true,
                allow_replay: false,
            },
            None,
        )?)),
    })
}

/// Create a new image; an existing file is never overwritten.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<Image, DiskError> {
    if path.exists() {
        return Err(DiskError::Io {
            op: "create",
            offset: 0,
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
        });
    }
    Ok(match opts.format {
        ImageFormat::Raw => {
            if opts.variant != Variant::Fixed {
                return Err(DiskError::Unsupported {
                    what: "raw images are always fixed".into(),
                });
            }
            Image::Raw(RawFile::create_with(
                path,
                opts.size,
                &RawFileOptions {
                    read_only: false,
                    logical_sector_size: opts.logical_sector_size,
                    physical_sector_size: None,
                },
            )?)
        }
        ImageFormat::Vhd => {
            if opts.logical_sector_size != 512 {
                return Err(DiskError::Unsupported {
                    what: "VHD images have 512-byte sectors only".into(),
                });
            }
            let kind = match &opts.variant {
                Variant::Fixed => VhdKind::Fixed,
                Variant::Dynamic => VhdKind::Dynamic,
                Variant::Differencing { parent } => VhdKind::Differencing {
                    parent: parent.clone(),
                },
            };
            let mut o = VhdCreateOptions::new(kind, opts.size);
            if let Some(b) = opts.block_size {
                o.block_size = b;
            }
            Image::Vhd(Box::new(Vhd::create(path, &o)?))
        }
        ImageFormat::Vhdx => {
            let kind = match &opts.variant {
                Variant::Fixed => VhdxKind::Fixed,
                Variant::Dynamic => VhdxKind::Dynamic,
                Variant::Differencing { parent } => VhdxKind::Differencing {
                    parent: parent.clone(),
                },
            };
            let mut o = VhdxCreateOptions::new(kind, opts.size);
            if let Some(b) = opts.block_size {
                o.block_size = b;
            }
            o.logical_sector_size = opts.logical_sector_size;
            Image::Vhdx(Box::new(Vhdx::create(path, &o)?))
        }
    })
}

impl Image {
    /// The image as a block device.
    pub fn device(&self) -> &dyn BlockDevice {
        match self {
            Image::Raw(d) => d,
            Image::Vhd(d) => &**d,
            Image::Vhdx(d) => &**d,
        }
    }

    /// Describe the image.
    pub fn info(&self, path: &Path) -> ImageInfo {
        match self {
            Image::Raw(d) => {
                let file_size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                ImageInfo {
                    format: ImageFormat::Raw,
                    variant: "raw",
                    virtual_size: d.size(),
                    file_size,
                    allocated: allocated_bytes(d).unwrap_or(d.size()),
                    block_size: None,
                    logical_sector_size: d.logical_sector_size(),
                    physical_sector_size: d.physical_sector_size(),
                    parent: None,
                    details: Vec::new(),
                }
            }
            Image::Vhd(d) => d.info(),
            Image::Vhdx(d) => d.info(),
        }
    }

    /// Check the image's metadata.
    pub fn check(&self) -> Result<CheckReport, DiskError> {
        match self {
            Image::Raw(_) => Ok(CheckReport::default()),
            Image::Vhd(d) => d.check(),
            Image::Vhdx(d) => d.check(),
        }
    }

    /// Change the virtual size.
    pub fn resize(&self, new_size: u64) -> Result<(), DiskError> {
        match self {
            Image::Raw(_) => Err(DiskError::Unsupported {
                what: "resizing raw images here (use truncate)".into(),
            }),
            Image::Vhd(d) => d.resize(new_size),
            Image::Vhdx(d) => d.resize(new_size),
        }
    }
}

/// Bytes of `dev` that are not unallocated.
pub fn allocated_bytes(dev: &dyn BlockDevice) -> Result<u64, DiskError> {
    let size = dev.size();
    let mut off = 0;
    let mut total = 0;
    while off < size {
        let e = dev.allocation(off, size - off)?;
        let len = e.len.max(1);
        if e.state != AllocationState::Unallocated {
            total += len;
        }
        off += len;
    }
    Ok(total)
}

/// Parse a format name.
pub fn parse_format(s: &str) -> Option<ImageFormat> {
    match s.to_ascii_lowercase().as_str() {
        "raw" | "img" => Some(ImageFormat::Raw),
        "vhd" | "vpc" => Some(ImageFormat::Vhd),
        "vhdx" => Some(ImageFormat::Vhdx),
        _ => None,
    }
}

/// The conventional format for a file name's extension.
pub fn format_from_extension(path: &Path) -> Option<ImageFormat> {
    parse_format(path.extension()?.to_str()?)
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Vhdx => "vhdx",
        })
    }
}

impl BlockDevice for Image {
    fn size(&self) -> u64 {
        self.device().size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.device().logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.device().physical_sector_size()
    }
    fn read_only(&self) -> bool {
        self.device().read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.device().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.device().write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.device().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.device().discard(offset, len)
    }
    fn allocation(&self, offset: u64, len: u64) -> Result<crate::Allocation, DiskError> {
        self.device().allocation(offset, len)
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        self.device().start_writeback(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) {
        self.device().prefetch(offset, len)
    }
}
