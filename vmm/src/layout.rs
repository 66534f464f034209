//! The guest physical address map that baton-vmm builds for a VM.
//!
//! ```text
//! 0x0000_0000  RAM (low)            boot GDT 0x500; PVH: start info 0x6000, memory map 0x7000;
//!                                   bzImage: zero page 0x8000, page tables 0x9000; cmdline 0x20000
//! 0x0009_fc00  reserved             EBDA, legacy VGA and ROM area
//! 0x000e_0000  ACPI tables          RSDP first, then XSDT, FADT, MADT, DSDT (64 KiB at most)
//! 0x000f_fff0  reset vector         a stub that writes the ACPI reset register
//! 0x0010_0000  RAM                  kernel (ELF load address, or a bzImage at 1 MiB), initramfs at the top of low RAM
//! 0xc000_0000  MMIO hole            PCI BARs up to 0xe000_0000, ECAM at 0xe000_0000,
//!                                   IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM (high)          whatever does not fit below the hole
//! ```

/// The boot GDT for a bzImage's 64-bit entry (five descriptors).
pub const BOOT_GDT: u64 = 0x500;
/// Where the PVH `hvm_start_info` structure goes.
pub const START_INFO: u64 = 0x6000;
/// Where the PVH memory map (e820-style entries) goes.
pub const MEMMAP: u64 = 0x7000;
/// Where the PVH module list (the initramfs) goes.
pub const MODLIST: u64 = 0x7800;
/// A bzImage's zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x8000;
/// A bzImage's boot page tables: PML4, PDPT, then four page directories (to 0xf000).
pub const BOOT_PML4: u64 = 0x9000;
/// Where the kernel command line goes.
pub const CMDLINE: u64 = 0x2_0000;
/// Longest command line accepted (including the terminating NUL).
pub const CMDLINE_MAX: usize = 0x1_0000;
/// End of the first RAM range (start of the EBDA).
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the ACPI tables; the RSDP sits here, inside the BIOS area Linux scans.
pub const ACPI_START: u64 = 0xe_0000;
/// Size reserved for the ACPI tables.
pub const ACPI_SIZE: u64 = 0x1_0000;
/// The x86 reset vector (F000:FFF0), where a guest that restarts through its "BIOS" jumps.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// Where RAM resumes above the legacy area.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; low RAM never reaches past it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Where RAM continues above the MMIO hole.
pub const RAM_ABOVE_4G: u64 = 0x1_0000_0000;
/// PCI memory BARs are allocated from here up to [`PCI_MMIO_END`].
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the 32-bit PCI BAR window; ECAM follows.
pub const PCI_MMIO_END: u64 = 0xe000_0000;
/// PCI Express enhanced configuration (ECAM) for bus 0.
pub const PCI_ECAM: u64 = 0xe000_0000;
/// Size of the ECAM window: bus 0, 32 devices × 8 functions × 4 KiB.
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// Local APIC base (default, per vCPU).
pub const LAPIC_BASE: u32 = 0xfee0_0000;
/// IOAPIC base.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// Identity-map and TSS pages KVM needs on Intel hosts, placed at the top of the hole.
pub const KVM_TSS: u64 = 0xfffb_d000;
/// See [`KVM_TSS`].
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;

/// ACPI sleep control register (HW-reduced ACPI): writing SLP_EN with SLP_TYP 5 powers off.
pub const PORT_SLEEP_CONTROL: u16 = 0x600;
/// ACPI reset register: writing [`RESET_VALUE`] resets the VM.
pub const PORT_RESET: u16 = 0x601;
/// Value written to [`PORT_RESET`] to reset.
pub const RESET_VALUE: u8 = 0x1;
/// SLP_TYP value baton's DSDT gives for S5 (soft off).
pub const S5_SLEEP_TYPE: u8 = 5;
/// First COM port.
pub const PORT_COM1: u16 = 0x3f8;
/// IRQ (GSI) of COM1.
pub const COM1_GSI: u32 = 4;

/// The guest RAM ranges for a VM of `size` bytes: `(guest address, length, file offset)`.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low, 0)];
    if size > low {
        ranges.push((RAM_ABOVE_4G, size - low, low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_has_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20, 0)]);
    }

    #[test]
    fn large_vm_continues_above_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (0, MMIO_HOLE_START, 0));
        assert_eq!(
            r[1],
            (RAM_ABOVE_4G, (4 << 30) - MMIO_HOLE_START, MMIO_HOLE_START)
        );
    }
}
