//! Architectural vCPU state for a Linux 64-bit direct boot: CPUID, MSRs, registers, segment
//! state, identity page tables and the GDT. Everything here is a pure function of the
//! partition's shape, so it is unit-tested without KVM.

use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// MSR indices set at boot.
pub mod msr {
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// IA32_MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MTRR_DEF_TYPE.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SFMASK.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// MSR values every vCPU starts with, as firmware would leave them: MTRRs enabled with
/// write-back default (otherwise Linux maps RAM uncached), fast strings on. The TSC is left
/// alone: KVM synchronises new vCPUs' TSCs, and writing it per vCPU makes them drift apart.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    const MTRR_ENABLE: u64 = 1 << 11;
    const MEM_TYPE_WB: u64 = 6;
    vec![
        (msr::SYSENTER_CS, 0),
        (msr::SYSENTER_ESP, 0),
        (msr::SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::CSTAR, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::SYSCALL_MASK, 0),
        (msr::LSTAR, 0),
        (msr::MISC_ENABLE, 1),
        (msr::MTRR_DEF_TYPE, MTRR_ENABLE | MEM_TYPE_WB),
    ]
}

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjust the host-supported CPUID for vCPU `index` of a `cpus`-vCPU partition: one package
/// with `cpus` cores of one thread, APIC id = index, hypervisor bit set.
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], index: u32, cpus: u32) {
    let apic_id = index;
    let bits = id_bits(cpus);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ecx |= 1 << 31; // hypervisor present
                e.ebx = (e.ebx & 0x0000_ffff) | (cpus.min(255) << 16) | (apic_id << 24);
                e.edx |= 1 << 28; // HTT: the logical-count field is valid
            }
            0x4 => {
                // Deterministic cache parameters: cores per package, threads per cache.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((cpus - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: all vCPUs in one package.
                        e.eax = bits;
                        e.ebx = cpus;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            0x8000_0001 if cpus > 1 => {
                e.ecx |= 1 << 1; // CmpLegacy
            }
            0x8000_0008 => {
                // AMD: number of cores and APIC-id bits for cores.
                e.ecx = (e.ecx & !0xf0ff) | (bits << 12) | (cpus - 1).min(255);
            }
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | (apic_id & 0xff); // one thread per compute unit
                e.ecx = 0; // node 0, one node
            }
            _ => {}
        }
    }
}

/// The GDT: null, 64-bit code, data, TSS.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Encode a GDT descriptor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// The KVM segment for GDT entry `index`.
pub fn segment(index: u16) -> kvm_segment {
    let e = GDT[usize::from(index)];
    let base = ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000);
    let mut limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let flags = (e >> 40) & 0xf0ff;
    let g = ((flags >> 15) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((flags >> 7) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g,
        avl: ((flags >> 12) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Write the GDT, an empty IDT and identity page tables for the low 4 GiB (2 MiB pages).
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))?;
    mem.write_obj(layout::PDPT_ADDR | 0x3, GuestAddress(layout::PML4_ADDR))?;
    for pd in 0..layout::PD_COUNT {
        let pd_addr = layout::PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | 0x3, GuestAddress(layout::PDPT_ADDR + pd * 8))?;
        for i in 0..512u64 {
            let page = ((pd * 512 + i) << 21) | 0x83; // present, writable, 2 MiB
            mem.write_obj(page, GuestAddress(pd_addr + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers for the boot vCPU: long mode, paging on our tables, flat segments.
pub fn boot_sregs(mut s: kvm_sregs) -> kvm_sregs {
    let code = segment(1);
    let data = segment(2);
    let tss = segment(3);
    s.gdt.base = layout::GDT_ADDR;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.idt.base = layout::IDT_ADDR;
    s.idt.limit = 7;
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = tss;
    s.cr0 |= CR0_PE | CR0_PG | CR0_ET;
    s.cr3 = layout::PML4_ADDR;
    s.cr4 |= CR4_PAE;
    s.efer |= EFER_LME | EFER_LMA;
    s
}

/// General registers for the boot vCPU.
pub fn boot_regs(entry: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK_TOP,
        rbp: layout::BOOT_STACK_TOP,
        rsi: zero_page,
        ..Default::default()
    }
}

/// FPU state after reset (x87 control word and MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Local APIC register offsets and the LINT programming firmware leaves behind: LINT0 as
/// ExtINT (the PIC), LINT1 as NMI.
pub fn set_lint(lapic: &mut [u8]) {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const MODE_EXTINT: u32 = 7 << 8;
    const MODE_NMI: u32 = 4 << 8;
    for (off, mode) in [(LVT_LINT0, MODE_EXTINT), (LVT_LINT1, MODE_NMI)] {
        let Some(reg) = lapic.get_mut(off..off + 4) else {
            continue;
        };
        let v = u32::from_le_bytes([reg[0], reg[1], reg[2], reg[3]]);
        let v = (v & !0x700) | mode;
        reg.copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0x0000_0800,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_gives_each_vcpu_its_apic_id_and_the_hypervisor_bit() {
        for (index, cpus) in [(0u32, 1u32), (1, 2), (5, 8), (3, 4)] {
            let mut e = vec![
                leaf(1, 0),
                leaf(0xb, 0),
                leaf(0xb, 1),
                leaf(0xb, 2),
                leaf(0x8000_001e, 0),
            ];
            patch_cpuid(&mut e, index, cpus);
            assert_eq!(e[0].ecx >> 31, 1);
            assert_eq!(e[0].ebx >> 24, index);
            assert_eq!((e[0].ebx >> 16) & 0xff, cpus);
            assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            for x in &e[1..4] {
                assert_eq!(x.edx, index);
            }
            assert_eq!(e[2].ebx, cpus);
            assert!(1u32 << e[2].eax >= cpus);
            assert_eq!((e[3].ecx >> 8) & 0xff, 0, "invalid level ends enumeration");
            assert_eq!(e[4].eax, index);
        }
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn gdt_segments_decode_to_flat_long_mode() {
        let cs = segment(1);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        let ds = segment(2);
        assert_eq!((ds.db, ds.l, ds.type_, ds.selector), (1, 0, 3, 16));
        let tr = segment(3);
        assert_eq!((tr.s, tr.type_, tr.selector), (0, 0xb, 24));
        assert_eq!(segment(0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let walk = |va: u64| -> u64 {
            let pml4: u64 = mem
                .read_obj(GuestAddress(layout::PML4_ADDR + ((va >> 39) & 511) * 8))
                .unwrap();
            let pdpt: u64 = mem
                .read_obj(GuestAddress((pml4 & !0xfff) + ((va >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpt & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x81, 0x81, "present 2 MiB page at {va:#x}");
            (pde & !0x1f_ffff & !(1 << 63) & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff)
        };
        for va in [
            0u64,
            0x7000,
            0x100_0000,
            0x3fff_ffff,
            0xbfff_f000,
            0xffff_ffff,
        ] {
            assert_eq!(walk(va), va);
        }
        let gdt1: u64 = mem.read_obj(GuestAddress(layout::GDT_ADDR + 8)).unwrap();
        assert_eq!(gdt1, GDT[1]);
    }

    #[test]
    fn boot_registers() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::PML4_ADDR);
        assert_eq!(s.cs.l, 1);
        let r = boot_regs(0x100_0200, layout::ZERO_PAGE_ADDR);
        assert_eq!(
            (r.rip, r.rsi, r.rflags),
            (0x100_0200, layout::ZERO_PAGE_ADDR, 2)
        );
        let msrs = boot_msrs();
        let mtrr = msrs
            .iter()
            .find(|(i, _)| *i == msr::MTRR_DEF_TYPE)
            .unwrap()
            .1;
        assert_eq!(mtrr, 0x806);
    }

    #[test]
    fn lint_programming() {
        let mut regs = vec![0u8; 0x400];
        regs[0x350..0x354].copy_from_slice(&0x0001_0700u32.to_le_bytes());
        set_lint(&mut regs);
        assert_eq!(
            u32::from_le_bytes(regs[0x350..0x354].try_into().unwrap()),
            0x0001_0700
        );
        assert_eq!(
            u32::from_le_bytes(regs[0x360..0x364].try_into().unwrap()),
            0x400
        );
        set_lint(&mut [0u8; 4]);
    }
}
