//! PVH direct boot: a `vmlinux` ELF with the Xen PVH entry note, entered in 32-bit protected
//! mode with EBX pointing at an `hvm_start_info` (memory map, command line, initramfs module).

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootData, BootError, BootInfo, Entry};
use crate::layout;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

pub(super) fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    path: &Path,
    mut kernel: File,
    data: BootData<'_>,
) -> Result<BootInfo, BootError> {
    let loaded = Elf::load(
        mem,
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|source| BootError::NotElf {
        path: path.to_path_buf(),
        source,
    })?;
    let rip = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.0,
        _ => return Err(BootError::NoPvhNote(path.to_path_buf())),
    };
    super::write_cmdline(mem, data.cmdline, layout::CMDLINE_MAX)?;

    let low_end = ram_size.min(layout::MMIO_HOLE_START);
    let module = match data.initramfs {
        Some((p, f)) => {
            let (paddr, size) = super::load_initramfs(mem, p, f, loaded.kernel_end, low_end)?;
            Some(hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            })
        }
        None => None,
    };

    let map: Vec<hvm_memmap_table_entry> = super::memory_map(ram_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: data.rsdp,
        memmap_paddr: layout::MEMMAP,
        memmap_entries: u32::try_from(map.len()).unwrap_or(0),
        ..Default::default()
    };
    if module.is_some() {
        start.nr_modules = 1;
        start.modlist_paddr = layout::MODLIST;
    }
    let mut params = BootParams::new(&start, GuestAddress(layout::START_INFO));
    if let Some(m) = module {
        params.set_modules(&[m], GuestAddress(layout::MODLIST));
    }
    params.set_sections(&map, GuestAddress(layout::MEMMAP));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::BootParams)?;
    Ok(BootInfo {
        entry: Entry::Pvh {
            rip,
            start_info: layout::START_INFO,
        },
    })
}
