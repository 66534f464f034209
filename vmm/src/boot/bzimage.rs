//! bzImage boot, as distributions ship kernels (`/boot/vmlinuz-*`): the Linux x86 boot
//! protocol's 64-bit entry (Documentation/arch/x86/boot.rst). The protected-mode part is
//! loaded at 1 MiB by linux-loader; baton writes the zero page (`struct boot_params`: the
//! kernel's setup header, command line, initrd, e820 map, RSDP), a GDT with `__BOOT_CS` and
//! `__BOOT_DS`, and identity-mapped page tables for the first 4 GiB; the boot vCPU enters in
//! long mode at load address + 0x200 with RSI = the zero page.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootData, BootError, BootInfo, Entry};
use crate::layout;

/// End of the setup header in the file (0x1f1 + its size): all [`check`] reads.
pub(super) const HEADER_END: usize = 0x26c;
const OFF_SETUP_SECTS: usize = 0x1f1;
const OFF_SYSSIZE: usize = 0x1f4;
const OFF_MAGIC: usize = 0x202;
const OFF_VERSION: usize = 0x206;
const OFF_XLOADFLAGS: usize = 0x236;
/// The 64-bit entry is at this offset from the load address.
const ENTRY_64: u64 = 0x200;
/// `xloadflags`: the kernel has the 64-bit entry.
const XLF_KERNEL_64: u16 = 1;
/// Boot protocol 2.12 introduced `xloadflags`.
const MIN_VERSION: u16 = 0x020c;
/// `type_of_loader` for a boot loader without an assigned id.
const LOADER_OTHER: u8 = 0xff;
/// Command line limit of protocols that have no `cmdline_size` field.
const OLD_CMDLINE_MAX: usize = 255;

/// Whether `head` (the file's first bytes) carries the boot protocol's "HdrS" magic.
pub(super) fn is_bzimage(head: &[u8]) -> bool {
    head.get(OFF_MAGIC..OFF_MAGIC + 4) == Some(b"HdrS")
}

/// An address or size below 4 GiB, as the 32-bit header fields hold it.
fn low32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn u16_at(head: &[u8], off: usize) -> u16 {
    head.get(off..off + 2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(head: &[u8], off: usize) -> u32 {
    head.get(off..off + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Checks a recognised bzImage before anything is created: a 64-bit entry, and a file as long
/// as its header says.
pub(super) fn check(path: &Path, head: &[u8], size: u64) -> Result<(), BootError> {
    let version = u16_at(head, OFF_VERSION);
    if version < MIN_VERSION || u16_at(head, OFF_XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(BootError::BzImageTooOld {
            path: path.to_path_buf(),
            major: version >> 8,
            minor: version & 0xff,
        });
    }
    let sects = match head.get(OFF_SETUP_SECTS).copied().unwrap_or(0) {
        0 => 4,
        n => u64::from(n),
    };
    let needed = (sects + 1) * 512 + u64::from(u32_at(head, OFF_SYSSIZE)) * 16;
    if size < needed || head.len() < HEADER_END {
        return Err(BootError::Truncated {
            path: path.to_path_buf(),
            size,
            needed: needed.max(HEADER_END as u64),
        });
    }
    Ok(())
}

pub(super) fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    path: &Path,
    mut kernel: File,
    data: BootData<'_>,
) -> Result<BootInfo, BootError> {
    let loaded = BzImage::load(
        mem,
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|source| BootError::BzImage {
        path: path.to_path_buf(),
        source,
    })?;
    let Some(mut hdr) = loaded.setup_header else {
        return Err(BootError::UnknownFormat(path.to_path_buf()));
    };
    let load_addr = loaded.kernel_load.0;
    let low_end = ram_size.min(layout::MMIO_HOLE_START);
    // The kernel decompresses in place: it owns `init_size` bytes from its load address.
    let needed = u64::from(hdr.init_size).max(loaded.kernel_end - load_addr);
    let kernel_top = load_addr + needed;
    if kernel_top > low_end {
        return Err(BootError::KernelTooBig {
            path: path.to_path_buf(),
            needed,
            available: low_end.saturating_sub(load_addr),
        });
    }

    let cmdline_max = if hdr.version >= 0x0206 {
        usize::try_from(hdr.cmdline_size).unwrap_or(usize::MAX)
    } else {
        OLD_CMDLINE_MAX
    }
    .min(layout::CMDLINE_MAX - 1);
    let cmdline_len = super::write_cmdline(mem, data.cmdline, cmdline_max + 1)?;

    hdr.type_of_loader = LOADER_OTHER;
    hdr.cmd_line_ptr = low32(layout::CMDLINE);
    hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(u32::MAX);
    if let Some((p, f)) = data.initramfs {
        let limit = low_end.min(u64::from(hdr.initrd_addr_max) + 1);
        let floor = (kernel_top + 0xfff) & !0xfff;
        let (addr, size) = super::load_initramfs(mem, p, f, floor, limit)?;
        // Both below 4 GiB: `limit` is at most the start of the MMIO hole.
        hdr.ramdisk_image = low32(addr);
        hdr.ramdisk_size = low32(size);
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: data.rsdp,
        ..Default::default()
    };
    let map = super::memory_map(ram_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = u8::try_from(map.len().min(params.e820_table.len())).unwrap_or(0);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(BootError::BootParams)?;

    write_gdt(mem)?;
    write_identity_page_tables(mem)?;
    Ok(BootInfo {
        entry: Entry::Linux64 {
            rip: load_addr + ENTRY_64,
            zero_page: layout::ZERO_PAGE,
        },
    })
}

/// The boot GDT: null, null, `__BOOT_CS` (0x10, 64-bit code), `__BOOT_DS` (0x18), a TSS (0x20).
/// The selectors are the ones the boot protocol names; Linux loads its own GDT right away.
const GDT: [u64; (GDT_LIMIT as usize + 1) / 8] = [
    0,
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_0067,
];

/// The GDT limit the boot vCPU's GDTR gets.
pub const GDT_LIMIT: u16 = 5 * 8 - 1;

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        super::write_obj(mem, "the boot GDT", *entry, layout::BOOT_GDT + i as u64 * 8)?;
    }
    Ok(())
}

/// PML4 → one PDPT → four page directories of 2 MiB pages: the first 4 GiB identity-mapped,
/// which covers the kernel with its `init_size`, the zero page and the command line.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let pml4 = layout::BOOT_PML4;
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000;
    super::write_obj(mem, "the boot page tables", pdpt | PRESENT_RW, pml4)?;
    for g in 0..4u64 {
        let dir = pd + g * 0x1000;
        super::write_obj(mem, "the boot page tables", dir | PRESENT_RW, pdpt + g * 8)?;
        for i in 0..512u64 {
            let page = (g << 30) | (i << 21);
            super::write_obj(
                mem,
                "the boot page tables",
                page | PRESENT_RW | HUGE,
                dir + i * 8,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u16, xloadflags: u16, setup_sects: u8, syssize: u32) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_END];
        h[OFF_SETUP_SECTS] = setup_sects;
        h[OFF_SYSSIZE..OFF_SYSSIZE + 4].copy_from_slice(&syssize.to_le_bytes());
        h[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(b"HdrS");
        h[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&version.to_le_bytes());
        h[OFF_XLOADFLAGS..OFF_XLOADFLAGS + 2].copy_from_slice(&xloadflags.to_le_bytes());
        h
    }

    #[test]
    fn a_64_bit_bzimage_of_the_announced_size_passes() {
        let h = header(0x020f, XLF_KERNEL_64, 27, 0x1000);
        assert!(is_bzimage(&h));
        check(Path::new("k"), &h, 28 * 512 + 0x10000).unwrap();
    }

    #[test]
    fn an_old_protocol_or_a_32_bit_kernel_is_refused() {
        for h in [header(0x020b, 0, 27, 1), header(0x020f, 0, 27, 1)] {
            let e = check(Path::new("k"), &h, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("64-bit entry") && e.contains("2.12"), "{e}");
        }
        let e = check(Path::new("k"), &header(0x0204, 0, 4, 1), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("protocol 2.04"), "{e}");
    }

    #[test]
    fn a_truncated_bzimage_is_refused_with_both_sizes() {
        let h = header(0x020f, XLF_KERNEL_64, 27, 0x1000);
        let e = check(Path::new("k"), &h, 28 * 512 + 0xffff)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("truncated") && e.contains(&(28 * 512 + 0x10000).to_string()),
            "{e}"
        );
        // A header cut short is truncated too.
        let e = check(Path::new("k"), &h[..0x240], 0x240)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn the_page_tables_identity_map_4_gib_with_2_mib_pages() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_page_tables(&mem).unwrap();
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        // Walk a few addresses the way the MMU would.
        for va in [0u64, 0x10_0000, 0x3fff_ffff, 0xbfe0_0000, 0xffff_ffff] {
            let pdpt = read(layout::BOOT_PML4) & !0xfff;
            let pd = read(pdpt + ((va >> 30) & 511) * 8) & !0xfff;
            let pde = read(pd + ((va >> 21) & 511) * 8);
            assert_eq!(pde & 0x83, 0x83, "{va:#x}");
            assert_eq!(
                (pde & !0x1f_ffff & !0xfff) | (va & 0x1f_ffff),
                va,
                "{va:#x}"
            );
        }
    }
}
