//! The guest-physical memory map of a Parvis partition (x86-64, direct kernel boot).
//!
//! ```text
//! 0x0000_0000  RAM (real-mode area; boot structures below)
//!   0x0500       GDT                0x0520 IDT
//!   0x7000       boot_params ("zero page")
//!   0x8ff0       initial stack top  0x9000 PML4, 0xa000 PDPT, 0xb000.. 4 PDs
//!   0x2_0000     kernel command line (up to 64 KiB)
//! 0x0009_fc00  reserved: EBDA, legacy VGA hole, BIOS area
//!   0x000e_0000  ACPI tables (RSDP first), up to 0x000f_ffff
//! 0x0010_0000  RAM: the kernel (bzImage protected-mode part or vmlinux at 16 MiB) and
//!              the initramfs (placed at the top of low RAM)
//! 0xc000_0000  MMIO hole (1 GiB, below 4 GiB)
//!   0xc000_0000  boot framebuffer VRAM (memfd-backed, shareable)
//!   0xd000_0000  virtio-mmio devices, 4 KiB each
//!   0xf800_0000  reserved for the VMBus MMIO window
//!   0xfec0_0000  IOAPIC    0xfee0_0000 local APICs
//! 0x1_0000_0000 RAM above 4 GiB, when the partition has more than 3 GiB
//! ```

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty; the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// Linux boot_params.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Top-level page table; PDPT and page directories follow.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the page directories identity-mapping the low 4 GiB with 2 MiB pages.
pub const PD_ADDR: u64 = 0xb000;
/// Number of page directories (each maps 1 GiB).
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line, including the terminating NUL.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Start of the reserved area below 1 MiB.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables region (the RSDP is found by the guest's scan of 0xe0000..0xfffff).
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI region.
pub const ACPI_END: u64 = 0x10_0000;
/// 1 MiB: where the kernel's protected-mode code goes.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 4 GiB.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// Boot framebuffer VRAM base.
pub const VRAM_ADDR: u64 = 0xc000_0000;
/// VRAM size: enough for 2560x1600 at 32 bpp.
pub const VRAM_SIZE: u64 = 16 << 20;
/// First virtio-mmio device; each gets [`VIRTIO_MMIO_STRIDE`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Address space reserved per virtio-mmio device.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// Register window each virtio-mmio device decodes.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// The VMBus MMIO window (declared in ACPI; synthvid VRAM is placed in it by the guest).
pub const VMBUS_MMIO_BASE: u64 = 0xf800_0000;
/// Size of the VMBus MMIO window.
pub const VMBUS_MMIO_SIZE: u64 = 64 << 20;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (Intel only, three pages) inside the MMIO hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// Smallest partition we accept.
pub const MIN_MEMORY: u64 = 64 << 20;

/// A RAM range of guest-physical memory, with its offset in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of this range in the guest-memory file.
    pub file_offset: u64,
}

/// What an e820 entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (firmware, ACPI tables in the BIOS area).
    Reserved = 2,
}

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Kind,
}

/// The memory layout for one partition size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// RAM ranges (one below the MMIO hole, possibly one above 4 GiB).
    pub ram: Vec<RamRange>,
    /// Offset of the VRAM in the memory file (after all RAM).
    pub vram_file_offset: u64,
}

impl MemoryLayout {
    /// Lay out `ram_size` bytes of RAM (a multiple of 2 MiB is expected; callers round).
    pub fn new(ram_size: u64) -> Self {
        let low = ram_size.min(MMIO_HOLE_START);
        let mut ram = vec![RamRange {
            gpa: 0,
            len: low,
            file_offset: 0,
        }];
        if ram_size > low {
            ram.push(RamRange {
                gpa: FOUR_GIB,
                len: ram_size - low,
                file_offset: low,
            });
        }
        Self {
            ram_size,
            ram,
            vram_file_offset: ram_size,
        }
    }

    /// End of RAM below 4 GiB.
    pub fn low_ram_end(&self) -> u64 {
        self.ram[0].len
    }

    /// The e820 map the guest gets.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Kind::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                addr: HIMEM_START,
                size: self.low_ram_end() - HIMEM_START,
                kind: E820Kind::Ram,
            },
        ];
        if let Some(high) = self.ram.get(1) {
            map.push(E820Entry {
                addr: high.gpa,
                size: high.len,
                kind: E820Kind::Ram,
            });
        }
        map
    }
}

/// Guest-physical base of virtio-mmio device `index`.
pub fn virtio_mmio_base(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + VIRTIO_MMIO_STRIDE * index as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_partition_is_one_low_range() {
        let l = MemoryLayout::new(512 << 20);
        assert_eq!(
            l.ram,
            vec![RamRange {
                gpa: 0,
                len: 512 << 20,
                file_offset: 0
            }]
        );
        assert_eq!(l.vram_file_offset, 512 << 20);
        let e = l.e820();
        assert_eq!(e.len(), 3);
        assert_eq!(e[2].addr + e[2].size, 512 << 20);
        assert_eq!(e[1].kind, E820Kind::Reserved);
    }

    #[test]
    fn large_partition_splits_around_the_hole() {
        let l = MemoryLayout::new(6 << 30);
        assert_eq!(l.ram.len(), 2);
        assert_eq!(l.ram[0].len, MMIO_HOLE_START);
        assert_eq!(l.ram[1].gpa, FOUR_GIB);
        assert_eq!(l.ram[1].len, (6 << 30) - MMIO_HOLE_START);
        assert_eq!(l.ram[1].file_offset, MMIO_HOLE_START);
        let total: u64 = l.ram.iter().map(|r| r.len).sum();
        assert_eq!(total, 6 << 30);
        let e = l.e820();
        assert_eq!(e.last().unwrap().addr, FOUR_GIB);
    }

    #[test]
    fn e820_is_sorted_disjoint_and_avoids_the_mmio_hole() {
        for size in [MIN_MEMORY, 1 << 30, 3 << 30, (3 << 30) + (2 << 20), 8 << 30] {
            let e = MemoryLayout::new(size).e820();
            for w in e.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{size:#x}: {w:?}");
            }
            for x in &e {
                let end = x.addr + x.size;
                assert!(end <= MMIO_HOLE_START || x.addr >= FOUR_GIB, "{x:?}");
            }
            let ram: u64 = e
                .iter()
                .filter(|x| x.kind == E820Kind::Ram)
                .map(|x| x.size)
                .sum();
            // Only the reserved legacy area is taken from RAM.
            assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        }
    }

    #[test]
    fn fixed_regions_do_not_collide() {
        let mmio = [
            (VRAM_ADDR, VRAM_SIZE),
            (VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE * 32),
            (VMBUS_MMIO_BASE, VMBUS_MMIO_SIZE),
            (IOAPIC_ADDR, 0x1000),
            (LAPIC_ADDR, 0x1000),
            (KVM_TSS_ADDR, 0x3000),
        ];
        for (i, a) in mmio.iter().enumerate() {
            assert!(a.0 >= MMIO_HOLE_START && a.0 + a.1 <= FOUR_GIB);
            for b in &mmio[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:?} {b:?}");
            }
        }
        let boot = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 0x8),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x1000 * PD_COUNT),
            (CMDLINE_ADDR, CMDLINE_MAX as u64),
        ];
        for (i, a) in boot.iter().enumerate() {
            assert!(a.0 + a.1 <= EBDA_START);
            for b in &boot[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:?} {b:?}");
            }
        }
        const { assert!(BOOT_STACK_TOP < PML4_ADDR && BOOT_STACK_TOP > ZERO_PAGE_ADDR + 0x1000) };
    }
}
