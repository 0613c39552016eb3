//! Disk image backends for Parvis.
//!
//! Every image format (raw files today; VHD and VHDX later) implements [`BlockDevice`], a
//! positional, thread-safe interface: all methods take `&self`, so one image can be shared by
//! several queues or threads behind an `Arc<dyn BlockDevice>`.
//!
//! Offsets and lengths are in bytes. Callers (the virtio-blk device) only issue requests that
//! are multiples of 512 bytes at 512-byte aligned offsets; a backend may reject anything else
//! with [`DiskError::Misaligned`], and must reject anything past [`BlockDevice::size`] with
//! [`DiskError::OutOfRange`].

//!
//! May depend on: no workspace crate (images are hostile input: no `unsafe`, fuzzed).

#![forbid(unsafe_code)]

pub mod convert;
pub mod counters;
pub mod image;
mod raw;
pub mod storage;
pub mod vhd;
pub mod vhdx;

use std::io;

pub use raw::{RawFile, RawFileOptions};

/// An image container format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// The file is the disk.
    Raw,
    /// VHD (Virtual PC / Hyper-V generation 1).
    Vhd,
    /// VHDX.
    Vhdx,
}

/// What `parvis disk info` shows about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Container format.
    pub format: ImageFormat,
    /// "fixed", "dynamic" or "differencing" (raw: "raw").
    pub variant: &'static str,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Size of the image file in bytes.
    pub file_size: u64,
    /// Bytes of the virtual disk backed by data in this file (not counting parents).
    pub allocated: u64,
    /// Block size of dynamic/differencing images.
    pub block_size: Option<u32>,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// Parent path of a differencing image, as resolved.
    pub parent: Option<std::path::PathBuf>,
    /// Format-specific facts (creator, disk id, log state, ...), for display.
    pub details: Vec<(String, String)>,
}

/// The result of a consistency check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that make (parts of) the image unreadable or wrong.
    pub errors: Vec<String>,
    /// Harmless oddities (leaked clusters, unusual but valid values).
    pub warnings: Vec<String>,
}

/// The smallest logical sector size, and the unit of virtio-blk sector numbers.
pub const SECTOR_SIZE: u32 = 512;

/// Errors from a disk backend. Each carries enough context (offset, length) to be logged
/// without the caller adding more.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The request reaches past the end of the virtual disk (or its end overflows `u64`).
    #[error("request at offset {offset:#x} of {len:#x} bytes is outside the {size:#x}-byte disk")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Virtual size of the disk in bytes.
        size: u64,
    },
    /// A write or discard on a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// The request is not aligned the way the backend requires.
    #[error("request at offset {offset:#x} of {len:#x} bytes is not aligned to {align} bytes")]
    Misaligned {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Required alignment in bytes.
        align: u32,
    },
    /// A sector size other than 512 or 4096, or a physical sector smaller than the logical one.
    #[error("unsupported sector sizes: logical {logical}, physical {physical}")]
    InvalidSectorSize {
        /// Requested logical sector size.
        logical: u32,
        /// Requested physical sector size.
        physical: u32,
    },
    /// The image size is not a whole number of logical sectors.
    #[error("disk size {size:#x} is not a multiple of the {sector_size}-byte sector size")]
    UnalignedSize {
        /// Size of the image in bytes.
        size: u64,
        /// Logical sector size in bytes.
        sector_size: u32,
    },
    /// An image structure is damaged or hostile: names the structure and where it is.
    #[error("corrupt {structure} at offset {offset:#x}: {reason}")]
    Corrupt {
        /// The structure ("VHD footer", "VHDX BAT entry 12", ...).
        structure: String,
        /// Byte offset of the structure in the image file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A valid image using a feature Parvis does not implement.
    #[error("unsupported {what}")]
    Unsupported {
        /// The feature.
        what: String,
    },
    /// The image needs its log replayed and the caller did not allow writing to it.
    #[error("the image has an unreplayed log; open it writable (or replay on a copy) to use it")]
    NeedsLogReplay,
    /// A differencing image's parent could not be opened.
    #[error("parent image {path} of a differencing disk")]
    Parent {
        /// The parent path that was tried.
        path: String,
        /// Why it failed.
        #[source]
        source: Box<DiskError>,
    },
    /// A differencing chain refers back to itself or is deeper than the limit.
    #[error("differencing chain loops or is deeper than {limit} images at {path}")]
    ParentChain {
        /// Where the loop was detected.
        path: String,
        /// The depth limit.
        limit: usize,
    },
    /// An I/O error from the host.
    #[error("{op} at offset {offset:#x} failed: {source}")]
    Io {
        /// What was being done ("read", "write", "flush", "open", ...).
        op: &'static str,
        /// Byte offset of the request (0 where it does not apply).
        offset: u64,
        /// The host error.
        #[source]
        source: io::Error,
    },
}

/// What backs a range of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocationState {
    /// Stored data (which may happen to be zeros).
    Data,
    /// Known to read as zeros, with storage allocated.
    Zero,
    /// Not allocated; reads as zeros (or from a parent image, for differencing formats).
    Unallocated,
}

/// The status of one extent of the virtual disk, as returned by
/// [`BlockDevice::allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// What backs the extent.
    pub state: AllocationState,
    /// Length of the extent in bytes, starting at the queried offset; never 0 for a
    /// non-empty query, never more than the queried length.
    pub len: u64,
}

/// A virtual disk. Implementations must be usable from several threads at once.
pub trait BlockDevice: Send + Sync {
    /// Virtual size in bytes (a multiple of [`BlockDevice::logical_sector_size`]).
    fn size(&self) -> u64;

    /// Logical sector size in bytes: 512 or 4096.
    fn logical_sector_size(&self) -> u32;

    /// Physical sector size in bytes: at least the logical sector size.
    fn physical_sector_size(&self) -> u32;

    /// Whether writes and discards are refused.
    fn read_only(&self) -> bool;

    /// Fill all of `buf` from the disk at `offset`. A request past the end is an error; a short
    /// read never happens.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;

    /// Write all of `buf` to the disk at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError>;

    /// Make every completed write durable.
    fn flush(&self) -> Result<(), DiskError>;

    /// Tell the backend that `len` bytes at `offset` are no longer needed. The contents of the
    /// range are unspecified afterwards. Backends that cannot free space treat this as a
    /// successful no-op.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;

    /// The allocation status of the first extent starting at `offset`, at most `len` bytes long.
    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation, DiskError>;

    /// A hint that `len` bytes at `offset` were just written and will not be read soon:
    /// start writing them back to the host's storage without waiting, so that a later
    /// [`BlockDevice::flush`] has less to do. Long sequential writers (conversion) call it
    /// as they go. Not a durability guarantee; the default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// A hint that `len` bytes at `offset` will be read soon: start reading them into the
    /// host's cache without waiting. Sequential readers (conversion) call it ahead of
    /// themselves. The default does nothing.
    fn prefetch(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
}

/// Check that a request is whole 512-byte sectors at a 512-byte offset, as the image
/// formats require.
pub fn check_sector_aligned(offset: u64, len: u64) -> Result<(), DiskError> {
    let a = u64::from(SECTOR_SIZE);
    if !offset.is_multiple_of(a) || !len.is_multiple_of(a) {
        return Err(DiskError::Misaligned {
            offset,
            len,
            align: SECTOR_SIZE,
        });
    }
    Ok(())
}

/// Check that `len` bytes at `offset` lie within a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(check_range(0, 512, 512).is_ok());
        assert!(check_range(512, 0, 512).is_ok());
        assert!(matches!(
            check_range(1, 512, 512),
            Err(DiskError::OutOfRange {
                offset: 1,
                len: 512,
                size: 512
            })
        ));
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}
