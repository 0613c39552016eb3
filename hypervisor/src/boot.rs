//! Linux 64-bit direct boot: load a bzImage or an ELF vmlinux, the initramfs and the command
//! line, and build `boot_params` (the "zero page") with the e820 map, the boot framebuffer and
//! the ACPI RSDP address.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::framebuffer::FbFormat;
use crate::layout::{self, MemoryLayout};

/// Errors while loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A boot file could not be opened or read.
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a bzImage nor an x86-64 ELF.
    #[error("kernel {path} is not a bzImage or an x86-64 ELF vmlinux")]
    UnknownKernelFormat { path: PathBuf },
    /// linux-loader rejected the kernel.
    #[error("cannot load kernel {path}")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The bzImage does not support the 64-bit entry point.
    #[error("kernel {path} has no 64-bit entry point (boot protocol too old)")]
    No64BitEntry { path: PathBuf },
    /// The initramfs does not fit below the kernel's limit.
    #[error("initramfs of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Writing to guest memory failed (the image does not fit).
    #[error("cannot write {what} to guest memory at {gpa:#x}")]
    GuestWrite { what: &'static str, gpa: u64 },
}

/// What the boot vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// 64-bit entry point.
    pub entry: u64,
    /// Address of boot_params (passed in RSI).
    pub zero_page: u64,
}

/// The boot framebuffer as the guest sees it in screen_info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootFramebuffer {
    /// Guest-physical base.
    pub base: u64,
    /// Size of the VRAM window in bytes.
    pub size: u64,
    /// Pixel format and geometry.
    pub format: FbFormat,
}

/// Inputs to a boot.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    /// bzImage or ELF vmlinux.
    pub kernel: &'a Path,
    /// Optional initramfs.
    pub initrd: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// The boot framebuffer, if any.
    pub framebuffer: Option<BootFramebuffer>,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const HDRS_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1;
const VIDEO_TYPE_EFI: u8 = 0x70;
/// Used for ELF kernels, which carry no setup header: the 2 GiB limit every x86-64 kernel honours.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

fn read_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    move |source| BootError::Read {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Load the kernel, initramfs and command line into `mem` and write boot_params.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    spec: &BootSpec<'_>,
) -> Result<BootEntry, BootError> {
    let path = spec.kernel;
    let mut kernel = File::open(path).map_err(read_err("kernel", path))?;
    let mut magic = [0u8; 4];
    kernel
        .read_exact(&mut magic)
        .map_err(read_err("kernel", path))?;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(read_err("kernel", path))?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let load_err = |source| BootError::LoadKernel {
        path: path.to_owned(),
        source,
    };

    let (entry, kernel_end, mut params) = if magic == ELF_MAGIC {
        let r = Elf::load(mem, None, &mut kernel, himem).map_err(load_err)?;
        let mut params = boot_params::default();
        params.hdr.boot_flag = KERNEL_BOOT_FLAG;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = 0x100_0000;
        (r.kernel_load.0, r.kernel_end, params)
    } else {
        let r = match BzImage::load(mem, None, &mut kernel, himem) {
            Ok(r) => r,
            Err(linux_loader::loader::Error::Bzimage(_)) => {
                return Err(BootError::UnknownKernelFormat {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(load_err(e)),
        };
        let hdr: setup_header = r
            .setup_header
            .ok_or_else(|| BootError::UnknownKernelFormat {
                path: path.to_owned(),
            })?;
        if hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::No64BitEntry {
                path: path.to_owned(),
            });
        }
        let params = boot_params {
            hdr,
            ..Default::default()
        };
        // The 64-bit entry point sits 0x200 bytes into the protected-mode code.
        (r.kernel_load.0 + 0x200, r.kernel_end, params)
    };

    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.vid_mode = 0xffff;

    let cmdline = spec.cmdline.as_bytes();
    if cmdline.contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    if cmdline.len() + 1 > layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX - 1,
        });
    }
    let mut with_nul = cmdline.to_vec();
    with_nul.push(0);
    mem.write_slice(&with_nul, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|_| BootError::GuestWrite {
            what: "command line",
            gpa: layout::CMDLINE_ADDR,
        })?;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;

    if let Some(initrd) = spec.initrd {
        let limit = if params.hdr.initrd_addr_max != 0 {
            u64::from(params.hdr.initrd_addr_max)
        } else {
            DEFAULT_INITRD_ADDR_MAX
        };
        let (addr, size) = load_initrd(mem, layout, initrd, kernel_end, limit)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    fill_boot_params(&mut params, layout, spec.framebuffer);
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))
        .map_err(|_| BootError::GuestWrite {
            what: "boot parameters",
            gpa: layout::ZERO_PAGE_ADDR,
        })?;
    Ok(BootEntry {
        entry,
        zero_page: layout::ZERO_PAGE_ADDR,
    })
}

/// Place the initramfs at the top of low RAM (page-aligned, below `addr_max`, above the
/// kernel). Returns its address and size.
fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(read_err("initramfs", path))?;
    let size = file.metadata().map_err(read_err("initramfs", path))?.len();
    let top = layout.low_ram_end().min(addr_max.saturating_add(1));
    let addr = initrd_address(top, size, kernel_end)
        .ok_or(BootError::InitrdTooLarge { size, limit: top })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, limit: top })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|_| BootError::GuestWrite {
            what: "initramfs",
            gpa: addr,
        })?;
    Ok((addr, size))
}

/// Highest page-aligned address where `size` bytes end at or below `top` without touching
/// the kernel; `None` if there is no room.
fn initrd_address(top: u64, size: u64, kernel_end: u64) -> Option<u64> {
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= kernel_end.max(layout::HIMEM_START) && size <= u64::from(u32::MAX)).then_some(addr)
}

/// Fill the e820 map, framebuffer and RSDP pointer of `params`.
pub fn fill_boot_params(
    params: &mut boot_params,
    layout: &MemoryLayout,
    fb: Option<BootFramebuffer>,
) {
    let e820 = layout.e820();
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind as u32;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    params.acpi_rsdp_addr = layout::ACPI_START;
    if let Some(fb) = fb {
        let si = &mut params.screen_info;
        si.orig_video_isVGA = VIDEO_TYPE_EFI;
        si.lfb_base = fb.base as u32;
        si.ext_lfb_base = (fb.base >> 32) as u32;
        si.lfb_size = fb.size as u32;
        si.lfb_width = fb.format.width as u16;
        si.lfb_height = fb.format.height as u16;
        si.lfb_depth = 32;
        si.lfb_linelength = fb.format.stride as u16;
        // x8r8g8b8: blue in the low byte.
        si.red_size = 8;
        si.red_pos = 16;
        si.green_size = 8;
        si.green_pos = 8;
        si.blue_size = 8;
        si.blue_pos = 0;
        si.rsvd_size = 8;
        si.rsvd_pos = 24;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fb() -> BootFramebuffer {
        BootFramebuffer {
            base: layout::VRAM_ADDR,
            size: layout::VRAM_SIZE,
            format: FbFormat::xrgb(1024, 768),
        }
    }

    #[test]
    fn boot_params_carry_e820_rsdp_and_framebuffer() {
        let l = MemoryLayout::new(5 << 30);
        let mut p = boot_params::default();
        fill_boot_params(&mut p, &l, Some(fb()));
        assert_eq!(p.e820_entries, 4);
        let e = p.e820_table;
        assert_eq!((e[0].addr, e[0].size, e[0].r#type), (0, 0x9fc00, 1));
        assert_eq!({ e[1].r#type }, 2);
        assert_eq!((e[2].addr, e[2].r#type), (0x100000, 1));
        assert_eq!(e[2].addr + e[2].size, layout::MMIO_HOLE_START);
        assert_eq!(
            (e[3].addr, e[3].size),
            (layout::FOUR_GIB, (5 << 30) - layout::MMIO_HOLE_START)
        );
        assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_START);
        let si = p.screen_info;
        assert_eq!(si.orig_video_isVGA, VIDEO_TYPE_EFI);
        assert_eq!({ si.lfb_base }, layout::VRAM_ADDR as u32);
        assert_eq!(
            ({ si.lfb_width }, { si.lfb_height }, { si.lfb_linelength }),
            (1024, 768, 4096)
        );
        assert_eq!((si.red_pos, si.green_pos, si.blue_pos), (16, 8, 0));
    }

    #[test]
    fn no_framebuffer_leaves_screen_info_empty() {
        let mut p = boot_params::default();
        fill_boot_params(&mut p, &MemoryLayout::new(256 << 20), None);
        assert_eq!(p.screen_info.orig_video_isVGA, 0);
        assert_eq!({ p.screen_info.lfb_base }, 0);
    }

    #[test]
    fn initrd_goes_high_and_aligned_but_never_over_the_kernel() {
        assert_eq!(
            initrd_address(0x2000_0000, 0x1234, 0x200_0000),
            Some(0x1fff_e000)
        );
        assert_eq!(
            initrd_address(0x2000_0000, 0x1000, 0x200_0000),
            Some(0x1fff_f000)
        );
        assert_eq!(initrd_address(0x300_0000, 0x200_0000, 0x200_0000), None);
        assert_eq!(initrd_address(0x1000, 0x2000, 0), None);
    }

    fn guest(size: u64) -> (GuestMemoryMmap, MemoryLayout) {
        let l = MemoryLayout::new(size);
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        (m, l)
    }

    /// A minimal ELF64 x86-64 executable with one PT_LOAD segment at 16 MiB.
    fn tiny_elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..4].copy_from_slice(&ELF_MAGIC);
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&0x800u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&0x100_0000u64.to_le_bytes()); // vaddr
        ph[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // paddr
        ph[32..40].copy_from_slice(&0x10u64.to_le_bytes()); // filesz
        ph[40..48].copy_from_slice(&0x10u64.to_le_bytes()); // memsz
        f[0x800..0x810].copy_from_slice(b"PARVIS-TEST-CODE");
        f
    }

    #[test]
    fn loads_elf_kernel_initrd_and_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, tiny_elf()).unwrap();
        let i = dir.path().join("initrd");
        std::fs::File::create(&i)
            .unwrap()
            .write_all(&[0xab; 5000])
            .unwrap();
        let (mem, l) = guest(64 << 20);
        let spec = BootSpec {
            kernel: &k,
            initrd: Some(&i),
            cmdline: "console=ttyS0 quiet",
            framebuffer: Some(fb()),
        };
        let e = load(&mem, &l, &spec).unwrap();
        assert_eq!(e.entry, 0x100_0000);
        let mut code = [0u8; 16];
        mem.read_slice(&mut code, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(&code, b"PARVIS-TEST-CODE");
        let p: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        let (rd, rs) = ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size });
        assert_eq!(rs, 5000);
        assert_eq!(rd % 4096, 0);
        assert!(u64::from(rd) + 5000 <= 64 << 20);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(u64::from(rd) + 4999))
                .unwrap(),
            0xab
        );
        let mut cl = [0u8; 20];
        mem.read_slice(&mut cl, GuestAddress({ p.hdr.cmd_line_ptr }.into()))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0 quiet\0");
        assert_eq!({ p.hdr.cmdline_size }, 19);
    }

    #[test]
    fn rejects_garbage_kernel_and_bad_cmdlines() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("junk");
        std::fs::write(&k, vec![0x42u8; 8192]).unwrap();
        let (mem, l) = guest(64 << 20);
        let mut spec = BootSpec {
            kernel: &k,
            initrd: None,
            cmdline: "",
            framebuffer: None,
        };
        assert!(matches!(
            load(&mem, &l, &spec),
            Err(BootError::UnknownKernelFormat { .. })
        ));
        let missing = dir.path().join("missing");
        spec.kernel = &missing;
        assert!(matches!(load(&mem, &l, &spec), Err(BootError::Read { .. })));
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, tiny_elf()).unwrap();
        spec.kernel = &elf;
        let long = "x".repeat(layout::CMDLINE_MAX);
        spec.cmdline = &long;
        assert!(matches!(
            load(&mem, &l, &spec),
            Err(BootError::CmdlineTooLong { .. })
        ));
        spec.cmdline = "a\0b";
        assert!(matches!(load(&mem, &l, &spec), Err(BootError::CmdlineNul)));
    }

    #[test]
    fn initrd_too_large_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, tiny_elf()).unwrap();
        let i = dir.path().join("initrd");
        let f = std::fs::File::create(&i).unwrap();
        f.set_len(80 << 20).unwrap();
        let (mem, l) = guest(64 << 20);
        let spec = BootSpec {
            kernel: &k,
            initrd: Some(&i),
            cmdline: "",
            framebuffer: None,
        };
        assert!(matches!(
            load(&mem, &l, &spec),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }
}
