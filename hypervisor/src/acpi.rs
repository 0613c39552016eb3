//! ACPI tables: RSDP, XSDT, FADT (+FACS), MADT and DSDT, placed in the BIOS area where a
//! non-EFI Linux finds the RSDP (and boot_params.acpi_rsdp_addr points at it).
//!
//! The platform is a classic (not hardware-reduced) ACPI PC without SMM: ACPI mode is always
//! on (SMI_CMD = 0), PM1a event/control blocks in I/O space drive power-off (S5) and the fixed
//! power button, and a reset register at 0xcf9 reboots. The DSDT declares COM1 and every
//! virtio-mmio device (`LNRO0005`: Debian kernels find virtio-mmio only through ACPI).

use acpi_tables::Aml;
use acpi_tables::aml;

use crate::layout;

/// OEM id in every table.
pub const OEM_ID: [u8; 6] = *b"PARVIS";
/// pvpanic's I/O port.
pub const PVPANIC_PORT: u16 = 0x505;
/// I/O port of the PM1a event block (status u16, enable u16).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// I/O port of the PM1a control block (u16).
pub const PM1A_CNT_PORT: u16 = 0x604;
/// Reset register port and value.
pub const RESET_PORT: u16 = 0xcf9;
/// Value written to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 0x06;
/// SLP_TYP value our `\_S5` object declares.
pub const S5_SLP_TYP: u8 = 5;
/// The SCI's ISA IRQ.
pub const SCI_IRQ: u8 = 9;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u8 = 4;
/// The IOAPIC's id.
pub const IOAPIC_ID: u8 = 0;

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC ids 0..n).
    pub cpus: u8,
    /// The platform devices' `\_SB` entries (encoded AML), in order (see
    /// [`crate::devices::platform::PlatformDevice::aml`]).
    pub devices: Vec<Vec<u8>>,
}

/// Built tables: each entry is a guest-physical address and the bytes to place there.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// Tables in placement order; the RSDP comes first at [`layout::ACPI_START`].
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// Errors while building tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The tables do not fit the BIOS area.
    #[error("ACPI tables need {need} bytes, the BIOS area has {have}")]
    TooLarge { need: u64, have: u64 },
}

fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// A system description table with the standard 36-byte header.
struct Table(Vec<u8>);

impl Table {
    fn new(sig: &[u8; 4], revision: u8) -> Self {
        let mut d = Vec::with_capacity(256);
        d.extend_from_slice(sig);
        d.extend_from_slice(&0u32.to_le_bytes()); // length, patched in finish()
        d.push(revision);
        d.push(0); // checksum
        d.extend_from_slice(&OEM_ID);
        let mut table_id = [b' '; 8];
        table_id[..6].copy_from_slice(b"PARVIS");
        table_id[6..].copy_from_slice(&sig[..2]);
        d.extend_from_slice(&table_id);
        d.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        d.extend_from_slice(b"PRVS"); // creator id
        d.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Self(d)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// Generic Address Structure for an I/O port register.
    fn gas_io(&mut self, port: u16, bit_width: u8, access_size: u8) -> &mut Self {
        self.u8(1)
            .u8(bit_width)
            .u8(0)
            .u8(access_size)
            .u64(u64::from(port))
    }
    fn gas_none(&mut self) -> &mut Self {
        self.bytes(&[0; 12])
    }
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity(36);
    d.extend_from_slice(b"RSD PTR ");
    d.push(0); // checksum of the first 20 bytes
    d.extend_from_slice(&OEM_ID);
    d.push(2); // revision: ACPI 2.0+
    d.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    d.extend_from_slice(&36u32.to_le_bytes());
    d.extend_from_slice(&xsdt.to_le_bytes());
    d.push(0); // extended checksum
    d.extend_from_slice(&[0; 3]);
    d[8] = checksum(&d[..20]);
    d[32] = checksum(&d);
    d
}

fn facs() -> Vec<u8> {
    let mut d = vec![0u8; 64];
    d[..4].copy_from_slice(b"FACS");
    d[4..8].copy_from_slice(&64u32.to_le_bytes());
    d[32] = 2; // version
    d
}

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    // FADT flags.
    const WBINVD: u32 = 1 << 0;
    const PROC_C1: u32 = 1 << 2;
    const SLP_BUTTON: u32 = 1 << 5; // no sleep button; the power button is a fixed feature
    const RESET_REG_SUP: u32 = 1 << 10;
    // IA-PC boot architecture flags: no VGA, no CMOS RTC; no 8042 (so Linux does not probe
    // one; the reset command at 0x64 still works).
    const VGA_NOT_PRESENT: u16 = 1 << 2;
    const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

    let mut t = Table::new(b"FACP", 6);
    t.u32(facs as u32) // FIRMWARE_CTRL
        .u32(dsdt as u32) // DSDT
        .u8(0) // reserved
        .u8(0) // preferred PM profile: unspecified
        .u16(u16::from(SCI_IRQ))
        .u32(0) // SMI_CMD: none, ACPI mode always on
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0) // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        .u32(u32::from(PM1A_EVT_PORT))
        .u32(0)
        .u32(u32::from(PM1A_CNT_PORT))
        .u32(0)
        .u32(0) // PM2_CNT
        .u32(0) // PM_TMR
        .u32(0)
        .u32(0) // GPE0, GPE1
        .u8(4)
        .u8(2)
        .u8(0)
        .u8(0) // PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0) // GPE0_LEN, GPE1_LEN, GPE1_BASE, CST_CNT
        .u16(101) // P_LVL2_LAT: C2 unsupported
        .u16(1001) // P_LVL3_LAT: C3 unsupported
        .u16(0)
        .u16(0) // FLUSH_SIZE, FLUSH_STRIDE
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0) // DUTY_OFFSET, DUTY_WIDTH, DAY_ALRM, MON_ALRM, CENTURY
        .u16(VGA_NOT_PRESENT | CMOS_RTC_NOT_PRESENT)
        .u8(0)
        .u32(WBINVD | PROC_C1 | SLP_BUTTON | RESET_REG_SUP)
        .gas_io(RESET_PORT, 8, 1)
        .u8(RESET_VALUE)
        .u16(0) // ARM_BOOT_ARCH
        .u8(0) // minor version
        .u64(facs)
        .u64(dsdt)
        .gas_io(PM1A_EVT_PORT, 32, 2)
        .gas_none()
        .gas_io(PM1A_CNT_PORT, 16, 2)
        .gas_none()
        .gas_none() // X_PM2_CNT
        .gas_none() // X_PM_TMR
        .gas_none()
        .gas_none() // X_GPE0, X_GPE1
        .gas_none()
        .gas_none() // sleep control / status
        .bytes(b"PARVIS\0\0"); // hypervisor vendor identity
    t.finish()
}

fn madt(cpus: u8) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut t = Table::new(b"APIC", 5);
    t.u32(layout::LAPIC_ADDR as u32).u32(PCAT_COMPAT);
    for id in 0..cpus {
        // Processor Local APIC: uid, APIC id, enabled.
        t.u8(0).u8(8).u8(id).u8(id).u32(1);
    }
    // IOAPIC with GSI base 0.
    t.u8(1)
        .u8(12)
        .u8(IOAPIC_ID)
        .u8(0)
        .u32(layout::IOAPIC_ADDR as u32)
        .u32(0);
    // SCI: level-triggered, active high (flags: polarity 01, trigger 11).
    t.u8(2)
        .u8(10)
        .u8(0)
        .u8(SCI_IRQ)
        .u32(u32::from(SCI_IRQ))
        .u16(0x000d);
    // LINT1 of every processor is NMI.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}

/// Already-encoded AML.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Encode `Device(name) { _HID, _UID, _CRS }`, for a platform device's DSDT entry.
pub fn aml_device(name: &str, hid: &dyn Aml, uid: u32, resources: Vec<&dyn Aml>) -> Vec<u8> {
    let crs = aml::ResourceTemplate::new(resources);
    let hid = aml::Name::new("_HID".into(), hid);
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut out = Vec::new();
    aml::Device::new(name.into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut out);
    out
}

/// `\_SB.PCI0` (PNP0A03: PCI bus 0 through configuration ports 0xcf8..0xcff; its windows
/// are the VRAM, where the legacy video device's BAR 0 and the boot framebuffer sit, and the
/// VMBus MMIO window) containing `VMBS` (`_HID "VMBus"`), as Hyper-V Generation 1 lays it
/// out. Linux 6.1 finds VMBus only through ACPI, needs a `_CRS` on the device itself (empty
/// is fine on x86) and takes its MMIO pool (from which `hyperv_drm` and `hyperv_fb` carve
/// VRAM) from the first ancestor with DWord/QWord address descriptors: the bridge. Both
/// windows are below 4 GiB.
pub fn vmbus_aml(vram: (u64, u64), window: (u64, u64)) -> Vec<u8> {
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let memory = |(base, size): (u64, u64)| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            base as u32,
            (base + size - 1) as u32,
            None,
        )
    };
    let (vram, window) = (memory(vram), memory(window));
    let crs = aml::ResourceTemplate::new(vec![&bus, &ports, &vram, &window]);
    let empty = aml::ResourceTemplate::new(vec![]);
    let vmbs_hid = aml::Name::new("_HID".into(), &"VMBus");
    let vmbs_uid = aml::Name::new("_UID".into(), &0u32);
    let vmbs_ddn = aml::Name::new("_DDN".into(), &"VMBUS");
    let vmbs_crs = aml::Name::new("_CRS".into(), &empty);
    let vmbs = aml::Device::new(
        "VMBS".into(),
        vec![&vmbs_hid, &vmbs_uid, &vmbs_ddn, &vmbs_crs],
    );
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03"));
    let uid = aml::Name::new("_UID".into(), &0u32);
    let adr = aml::Name::new("_ADR".into(), &0u32);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut out = Vec::new();
    aml::Device::new("PCI0".into(), vec![&hid, &uid, &adr, &crs, &vmbs]).to_aml_bytes(&mut out);
    out
}

fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body: Vec<u8> = Vec::new();
    // \_S5: SLP_TYPa, SLP_TYPb.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let devices: Vec<Raw> = cfg.devices.iter().map(|d| Raw(d.clone())).collect();
    aml::Scope::new(
        "\\_SB_".into(),
        devices.iter().map(|d| d as &dyn Aml).collect(),
    )
    .to_aml_bytes(&mut body);

    let mut t = Table::new(b"DSDT", 2);
    t.bytes(&body);
    t.finish()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Table::new(b"XSDT", 1);
    for e in entries {
        t.u64(*e);
    }
    t.finish()
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl AcpiTables {
    /// Build every table and assign addresses in the BIOS area.
    pub fn build(cfg: &AcpiConfig) -> Result<Self, AcpiError> {
        let rsdp_addr = layout::ACPI_START;
        let facs_addr = align(rsdp_addr + 36, 64);
        let dsdt_addr = align(facs_addr + 64, 16);
        let dsdt = dsdt(cfg);
        let fadt_addr = align(dsdt_addr + dsdt.len() as u64, 16);
        let fadt = fadt(dsdt_addr, facs_addr);
        let madt_addr = align(fadt_addr + fadt.len() as u64, 16);
        let madt = madt(cfg.cpus);
        let xsdt_addr = align(madt_addr + madt.len() as u64, 16);
        let xsdt = xsdt(&[fadt_addr, madt_addr]);
        let end = xsdt_addr + xsdt.len() as u64;
        if end > layout::ACPI_END {
            return Err(AcpiError::TooLarge {
                need: end - layout::ACPI_START,
                have: layout::ACPI_END - layout::ACPI_START,
            });
        }
        Ok(Self {
            blobs: vec![
                (rsdp_addr, rsdp(xsdt_addr)),
                (facs_addr, facs()),
                (dsdt_addr, dsdt),
                (fadt_addr, fadt),
                (madt_addr, madt),
                (xsdt_addr, xsdt),
            ],
        })
    }

    /// The table whose signature is `sig`, if built.
    pub fn find(&self, sig: &[u8]) -> Option<(u64, &[u8])> {
        self.blobs
            .iter()
            .find(|(_, b)| b.starts_with(sig))
            .map(|(a, b)| (*a, b.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::devices::platform::PlatformDevice;

    /// The tables of a partition with `virtio` disks, built from the devices' own entries as
    /// the partition builds them.
    fn cfg(cpus: u8, virtio: usize) -> AcpiConfig {
        let dir = tempfile::tempdir().unwrap();
        let disk: std::sync::Arc<dyn parvis_disk::BlockDevice> = std::sync::Arc::new(
            parvis_disk::RawFile::create(dir.path().join("d.img"), 1 << 20).unwrap(),
        );
        let mut devices: Vec<Box<dyn PlatformDevice>> = vec![
            Box::new(crate::devices::serial::Com1::new(Default::default())),
            Box::new(crate::devices::pvpanic::PvPanicPort),
        ];
        for i in 0..virtio {
            devices.push(Box::new(crate::devices::virtio_blk::VirtioBlkSlot::new(
                i,
                disk.clone(),
                Default::default(),
            )));
        }
        AcpiConfig {
            cpus,
            devices: devices.iter().filter_map(|d| d.aml()).collect(),
        }
    }

    #[test]
    fn vmbus_device_has_its_window_and_an_empty_crs() {
        let mut c = cfg(2, 1);
        c.devices.push(vmbus_aml(
            (layout::VRAM_ADDR, layout::VRAM_SIZE),
            (layout::VMBUS_MMIO_BASE, layout::VMBUS_MMIO_SIZE),
        ));
        let t = AcpiTables::build(&c).unwrap();
        let (_, dsdt) = t.find(b"DSDT").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dsdt.aml");
        std::fs::write(&path, dsdt).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .expect("iasl (Debian package acpica-tools) is needed for this test");
        assert!(out.status.success());
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        assert!(
            dsl.contains("Device (PCI0)") && dsl.contains("Device (VMBS)"),
            "{dsl}"
        );
        assert!(
            dsl.contains("EisaId (\"PNP0A03\")") && dsl.contains("\"VMBus\""),
            "{dsl}"
        );
        assert!(
            dsl.contains("WordBusNumber") && dsl.contains("0x0CF8") && dsl.contains("DWordMemory"),
            "{dsl}"
        );
        assert!(
            dsl.contains("0xF8000000") && dsl.contains("0xFBFFFFFF"),
            "{dsl}"
        );
        assert!(
            dsl.contains("0xC0000000") && dsl.contains("0xC0FFFFFF"),
            "{dsl}"
        );
        // VMBS sits inside the bridge, the first ancestor with an address descriptor.
        let pci = dsl.find("Device (PCI0)").unwrap();
        let vmbs = dsl.find("Device (VMBS)").unwrap();
        assert!(pci < vmbs, "{dsl}");
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn every_table_checksums_to_zero_and_has_its_length() {
        let t = AcpiTables::build(&cfg(4, 2)).unwrap();
        for (_, b) in &t.blobs {
            if b.starts_with(b"RSD PTR ") {
                assert_eq!(b.len(), 36);
                assert_eq!(checksum(&b[..20]), 0, "RSDP v1 checksum");
                assert_eq!(checksum(b), 0, "RSDP extended checksum");
            } else if b.starts_with(b"FACS") {
                assert_eq!(u32_at(b, 4), 64);
            } else {
                assert_eq!(u32_at(b, 4) as usize, b.len());
                assert_eq!(checksum(b), 0, "{}", String::from_utf8_lossy(&b[..4]));
            }
        }
        assert_eq!(t.blobs[0].0, layout::ACPI_START);
    }

    #[test]
    fn pointers_chain_from_rsdp_to_every_table() {
        let t = AcpiTables::build(&cfg(2, 1)).unwrap();
        let (_, rsdp) = t.find(b"RSD PTR ").unwrap();
        let (xsdt_addr, xsdt) = t.find(b"XSDT").unwrap();
        assert_eq!(u64_at(rsdp, 24), xsdt_addr);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(
            entries,
            vec![t.find(b"FACP").unwrap().0, t.find(b"APIC").unwrap().0]
        );
        let (_, fadt) = t.find(b"FACP").unwrap();
        assert_eq!(fadt.len(), 276);
        assert_eq!(u64_at(fadt, 140), t.find(b"DSDT").unwrap().0);
        assert_eq!(u64_at(fadt, 132), t.find(b"FACS").unwrap().0);
        assert_eq!(u32_at(fadt, 56), u32::from(PM1A_EVT_PORT));
        assert_eq!(u32_at(fadt, 64), u32::from(PM1A_CNT_PORT));
        // Tables do not overlap and stay in the BIOS area.
        let mut spans: Vec<(u64, u64)> = t
            .blobs
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
        assert!(spans.last().unwrap().1 <= layout::ACPI_END);
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        for cpus in [1u8, 2, 8, 64] {
            let t = AcpiTables::build(&cfg(cpus, 0)).unwrap();
            let (_, madt) = t.find(b"APIC").unwrap();
            let mut o = 44;
            let (mut lapics, mut ioapics) = (Vec::new(), 0);
            while o < madt.len() {
                let (ty, len) = (madt[o], madt[o + 1] as usize);
                assert!(len >= 2);
                match ty {
                    0 => {
                        assert_eq!(u32_at(madt, o + 4), 1, "enabled");
                        lapics.push(madt[o + 3]);
                    }
                    1 => {
                        ioapics += 1;
                        assert_eq!(u32_at(madt, o + 4), layout::IOAPIC_ADDR as u32);
                    }
                    _ => {}
                }
                o += len;
            }
            assert_eq!(o, madt.len());
            assert_eq!(lapics, (0..cpus).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }

    /// Disassemble the DSDT with ACPICA's iasl (installed by .ci/run) and check what the guest
    /// will see.
    #[test]
    fn dsdt_disassembles_with_iasl_and_declares_devices() {
        let t = AcpiTables::build(&cfg(1, 2)).unwrap();
        let (_, dsdt) = t.find(b"DSDT").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dsdt.aml");
        std::fs::write(&path, dsdt).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .expect(
                "iasl (Debian package acpica-tools) is needed for this test; .ci/run installs it",
            );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        assert!(dsl.contains("Name (_S5, Package"), "{dsl}");
        assert!(dsl.contains("\"LNRO0005\""), "{dsl}");
        assert!(
            dsl.contains("Device (V000)") && dsl.contains("Device (V001)"),
            "{dsl}"
        );
        assert!(
            dsl.contains("0xD0000000") && dsl.contains("0xD0001000"),
            "{dsl}"
        );
        assert!(dsl.contains("EisaId (\"PNP0501\")"), "{dsl}");
        assert!(
            dsl.contains("0x00000005") && dsl.contains("0x00000006"),
            "{dsl}"
        );
        assert!(
            dsl.contains("\"QEMU0001\"") && dsl.contains("0x0505"),
            "{dsl}"
        );
    }

    #[test]
    fn too_many_devices_is_an_error_not_an_overflow() {
        assert!(matches!(
            AcpiTables::build(&cfg(255, 4000)),
            Err(AcpiError::TooLarge { .. })
        ));
    }
}
