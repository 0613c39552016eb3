//! Guest RAM and VRAM, backed by one memfd so that another process (the agent) can map the
//! VRAM part later without copying.

use std::fs::File;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout::{MemoryLayout, VRAM_SIZE};

/// Errors while creating or resetting guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or sizing the file failed.
    #[error("cannot create the guest memory file ({size} bytes)")]
    CreateFile {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    /// Mapping a range failed.
    #[error("cannot map guest memory at {gpa:#x}")]
    Map {
        gpa: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Zeroing memory for a reset failed.
    #[error("cannot clear guest memory")]
    Clear(#[source] std::io::Error),
}

/// A partition's memory: RAM as a `GuestMemoryMmap` for loaders and devices, plus the VRAM
/// mapping for the boot framebuffer.
#[derive(Debug)]
pub struct GuestRam {
    file: Arc<File>,
    layout: MemoryLayout,
    mem: Arc<GuestMemoryMmap>,
    vram: MmapRegion,
}

impl GuestRam {
    /// Create the memfd and map RAM and VRAM as laid out by `layout`.
    pub fn new(layout: MemoryLayout) -> Result<Self, MemoryError> {
        let total = layout.vram_file_offset + VRAM_SIZE;
        let file = Arc::new(memfd("parvis-guest-memory", total)?);
        let regions = layout
            .ram
            .iter()
            .map(|r| {
                let len = usize::try_from(r.len).map_err(|e| MemoryError::Map {
                    gpa: r.gpa,
                    source: Box::new(e),
                })?;
                GuestRegionMmap::from_range(
                    GuestAddress(r.gpa),
                    len,
                    Some(FileOffset::from_arc(file.clone(), r.file_offset)),
                )
                .map_err(|e| MemoryError::Map {
                    gpa: r.gpa,
                    source: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
            gpa: 0,
            source: Box::new(e),
        })?;
        let vram = MmapRegion::from_file(
            FileOffset::from_arc(file.clone(), layout.vram_file_offset),
            VRAM_SIZE as usize,
        )
        .map_err(|e| MemoryError::Map {
            gpa: crate::layout::VRAM_ADDR,
            source: Box::new(e),
        })?;
        Ok(Self {
            file,
            layout,
            mem: Arc::new(mem),
            vram,
        })
    }

    /// The RAM as guest memory.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// The layout this memory was built from.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The VRAM mapping.
    pub fn vram(&self) -> &MmapRegion {
        &self.vram
    }

    /// The memory file (RAM then VRAM), for sharing with another process.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Zero all RAM and VRAM (for a partition reset) by punching out the file's pages.
    pub fn clear(&self) -> Result<(), MemoryError> {
        let len = self.layout.vram_file_offset + VRAM_SIZE;
        // Punching holes in a shared memfd makes the kernel drop the pages, and every mapping
        // (ours and KVM's) then reads zeroes.
        rustix::fs::fallocate(
            &*self.file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            len,
        )
        .map_err(|e| MemoryError::Clear(e.into()))?;
        Ok(())
    }
}

/// Create a sealed-size-free memfd of `size` bytes.
fn memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let err = |source| MemoryError::CreateFile { size, source };
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| err(e.into()))?;
    let file = File::from(fd);
    file.set_len(size).map_err(err)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, VolatileMemory};

    #[test]
    fn ram_and_vram_share_one_file_and_clear_zeroes_both() {
        let ram = GuestRam::new(MemoryLayout::new(64 << 20)).unwrap();
        let mem = ram.memory();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x100000))
            .unwrap();
        ram.vram()
            .as_volatile_slice()
            .write_obj(0x55aa_u16, 0)
            .unwrap();
        // The VRAM lives after RAM in the same file.
        let meta = ram.file().metadata().unwrap();
        assert_eq!(meta.len(), (64 << 20) + VRAM_SIZE);
        let mut buf = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(&**ram.file(), &mut buf, 64 << 20).unwrap();
        assert_eq!(u16::from_le_bytes(buf), 0x55aa);
        ram.clear().unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x100000)).unwrap(), 0);
        assert_eq!(
            ram.vram().as_volatile_slice().read_obj::<u16>(0).unwrap(),
            0
        );
    }
}
