//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) built with `acpi_tables`.
//!
//! The platform is HW-reduced ACPI: no PM timer, no SCI; power-off is the FADT's sleep control
//! register (an I/O port baton-vmm implements) with the S5 sleep type named in the DSDT.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::layout;

const OEM_ID: [u8; 6] = *b"BATON ";
const OEM_TABLE_ID: [u8; 8] = *b"BATONVMM";

/// Errors building the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the reserved area.
    #[error("ACPI tables need {0} bytes, more than the area reserved for them")]
    TooBig(u64),
    /// Writing to guest memory failed.
    #[error("cannot write ACPI tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
    /// Too many vCPUs for xAPIC ids in the MADT.
    #[error("{0} vCPUs do not fit in 8-bit APIC ids")]
    TooManyCpus(u32),
}

/// MADT type 2: Interrupt Source Override (ISA IRQ → GSI), which acpi_tables does not provide.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The DSDT: CPU devices, COM1, and the S5 sleep type.
fn dsdt(cpus: u8) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    let s5 = aml::Package::new(vec![&layout::S5_SLEEP_TYPE]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut dsdt);

    let uids: Vec<u8> = (0..cpus).collect();
    let names: Vec<String> = uids.iter().map(|i| format!("C{i:03X}")).collect();
    let hid = aml::Name::new("_HID".into(), &"ACPI0007");
    let uid_names: Vec<aml::Name> = uids
        .iter()
        .map(|u| aml::Name::new("_UID".into(), u))
        .collect();
    let cpu_devs: Vec<aml::Device> = names
        .iter()
        .zip(&uid_names)
        .map(|(n, u)| aml::Device::new(n.as_str().into(), vec![&hid, u]))
        .collect();
    let cpu_refs: Vec<&dyn Aml> = cpu_devs.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("_SB_".into(), cpu_refs).to_aml_bytes(&mut dsdt);

    dsdt.append_slice(&pci_root());
    dsdt.append_slice(&motherboard_resources());

    let com_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(layout::PORT_COM1, layout::PORT_COM1, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, layout::COM1_GSI);
    let crs_tpl = aml::ResourceTemplate::new(vec![&io, &irq]);
    let crs = aml::Name::new("_CRS".into(), &crs_tpl);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&com_hid, &com_uid, &crs]);
    com1.to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    dsdt
}

/// The PCI root bridge (bus 0 only) with its I/O and memory windows.
fn pci_root() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_hi = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        u32::try_from(layout::PCI_MMIO_START).unwrap_or(0),
        u32::try_from(layout::PCI_MMIO_END - 1).unwrap_or(0),
        None,
    );
    let crs_tpl = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_lo, &io_hi, &mmio]);
    let crs = aml::Name::new("_CRS".into(), &crs_tpl);
    let dev = aml::Device::new("_SB_.PCI0".into(), vec![&hid, &cid, &seg, &bbn, &uid, &crs]);
    bytes(&dev)
}

/// Motherboard resources (PNP0C02) claiming the ECAM window: Linux uses the MCFG's window
/// only when it is reserved here (otherwise "not reserved in ACPI motherboard resources",
/// and no extended configuration space).
fn motherboard_resources() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ecam = aml::Memory32Fixed::new(
        false,
        u32::try_from(layout::PCI_ECAM).unwrap_or(0),
        u32::try_from(layout::PCI_ECAM_SIZE).unwrap_or(0),
    );
    let crs_tpl = aml::ResourceTemplate::new(vec![&ecam]);
    let crs = aml::Name::new("_CRS".into(), &crs_tpl);
    bytes(&aml::Device::new(
        "_SB_.MRES".into(),
        vec![&hid, &uid, &crs],
    ))
}

fn mcfg() -> MCFG {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, 1);
    m.add_ecam(layout::PCI_ECAM, 0, 0, 0);
    m
}

fn fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    let port = |p: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            p.into(),
        )
    };
    f.sleep_control_reg = port(layout::PORT_SLEEP_CONTROL);
    f.sleep_status_reg = port(layout::PORT_SLEEP_CONTROL);
    f.reset_reg = port(layout::PORT_RESET);
    f.reset_value = layout::RESET_VALUE;
    // No VGA, no CMOS RTC: the guest must not probe for them.
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"BATONVMM").into();
    f.finalize()
}

fn madt(cpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(layout::LAPIC_BASE),
    );
    for i in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_BASE, 0));
    // The PIT's IRQ 0 arrives on IOAPIC pin 2 (KVM's in-kernel irqchip routes it there).
    madt.add_structure(InterruptSourceOverride {
        kind: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    madt
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Writes all tables into guest memory and returns the RSDP's address.
pub fn create_tables(mem: &GuestMemoryMmap, cpus: u32) -> Result<u64, AcpiError> {
    let cpus = u8::try_from(cpus)
        .ok()
        .filter(|c| *c < 255)
        .ok_or(AcpiError::TooManyCpus(cpus))?;
    let rsdp_addr = layout::ACPI_START;
    let mut next = rsdp_addr + 64;
    let mut place = |data: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        mem.write_slice(data, GuestAddress(at))?;
        next = (at + data.len() as u64 + 15) & !15;
        if next > layout::ACPI_START + layout::ACPI_SIZE {
            return Err(AcpiError::TooBig(next - layout::ACPI_START));
        }
        Ok(at)
    };
    let dsdt_addr = place(dsdt(cpus).as_slice())?;
    let fadt_addr = place(&bytes(&fadt(dsdt_addr)))?;
    let madt_addr = place(&bytes(&madt(cpus)))?;
    let mcfg_addr = place(&bytes(&mcfg()))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt_addr = place(&bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&bytes(&rsdp), GuestAddress(rsdp_addr))?;
    Ok(rsdp_addr)
}

/// Each table as `(signature, bytes)`, for tests and for `iasl -d`.
pub fn tables_for_inspection(cpus: u8) -> Vec<(String, Vec<u8>)> {
    vec![
        ("DSDT".into(), dsdt(cpus).as_slice().to_vec()),
        ("FACP".into(), bytes(&fadt(0x1000))),
        ("APIC".into(), bytes(&madt(cpus))),
        ("MCFG".into(), bytes(&mcfg())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        for (sig, t) in tables_for_inspection(4) {
            assert_eq!(&t[..4], sig.as_bytes());
            let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.len(), "{sig} length");
            assert!(checksum_ok(&t), "{sig} checksum");
        }
    }

    #[test]
    fn madt_lists_every_cpu() {
        let t = bytes(&madt(3));
        let mut off = 44;
        let mut lapics = 0;
        while off < t.len() {
            if t[off] == 0 {
                lapics += 1;
            }
            off += t[off + 1] as usize;
        }
        assert_eq!(lapics, 3);
    }

    #[test]
    fn dsdt_names_s5() {
        let t = dsdt(1);
        let s = t.as_slice();
        let i = s.windows(4).position(|w| w == b"_S5_").unwrap();
        // NameOp precedes; then PackageOp, PkgLength, NumElements=1, BytePrefix 5.
        assert_eq!(s[i - 1], 0x08);
        assert_eq!(
            &s[i + 4..i + 9],
            &[0x12, 0x04, 0x01, 0x0a, layout::S5_SLEEP_TYPE]
        );
    }
}
