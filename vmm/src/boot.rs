//! PVH direct boot: the kernel ELF, its command line, an optional initramfs module, and the
//! `hvm_start_info` with the memory map, all written into guest RAM before the first vCPU runs.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a loadable ELF.
    #[error("kernel {path} is not a loadable x86-64 ELF: {source}")]
    NotElf {
        /// The path given.
        path: PathBuf,
        /// What the loader said.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The ELF carries no XEN_ELFNOTE_PHYS32_ENTRY note.
    #[error(
        "kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): baton-vmm boots PVH ELF kernels only"
    )]
    NoPvhNote(PathBuf),
    /// The initramfs file cannot be read.
    #[error("cannot read initramfs {path}: {source}")]
    Initramfs {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit in low RAM above the kernel.
    #[error("initramfs {0} does not fit in guest RAM")]
    InitramfsTooBig(PathBuf),
    /// The command line is too long or has invalid characters.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write boot data into guest memory: {0}")]
    Write(String),
}

/// What the vCPU setup needs to know about the loaded guest.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 32-bit PVH entry point.
    pub entry: u64,
    /// Address of the `hvm_start_info` (passed in EBX).
    pub start_info: u64,
}

/// Opens the kernel and checks it is a PVH ELF without touching guest memory, so that a bad
/// kernel is reported before anything (RAM file, KVM VM) is created.
pub fn check_kernel(path: &Path) -> Result<File, BootError> {
    let mut f = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let mut magic = [0u8; 4];
    use std::io::Read;
    let n = f.read(&mut magic).unwrap_or(0);
    if n < 4 || magic != *b"\x7fELF" {
        return Err(BootError::NotElf {
            path: path.to_path_buf(),
            source: linux_loader::loader::Error::Elf(
                linux_loader::loader::elf::Error::InvalidElfMagicNumber,
            ),
        });
    }
    Ok(f)
}

/// Loads kernel, command line and initramfs and writes the PVH start info.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel_path: &Path,
    mut kernel: File,
    cmdline: &str,
    initramfs: Option<(&Path, File)>,
    rsdp: u64,
) -> Result<BootInfo, BootError> {
    let loaded = Elf::load(
        mem,
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|source| BootError::NotElf {
        path: kernel_path.to_path_buf(),
        source,
    })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.0,
        _ => return Err(BootError::NoPvhNote(kernel_path.to_path_buf())),
    };

    let mut cl = Cmdline::new(layout::CMDLINE_MAX).map_err(BootError::Cmdline)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &cl)
        .map_err(|e| BootError::Write(e.to_string()))?;

    let low_end = ram_size.min(layout::MMIO_HOLE_START);
    let module = match initramfs {
        Some((p, f)) => Some(load_initramfs(mem, p, f, loaded.kernel_end, low_end)?),
        None => None,
    };

    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::MEMMAP,
        ..Default::default()
    };
    let map = memory_map(ram_size);
    start.memmap_entries = u32::try_from(map.len()).unwrap_or(0);
    let mut params = BootParams::new(&start, GuestAddress(layout::START_INFO));
    if let Some(m) = module {
        start.nr_modules = 1;
        start.modlist_paddr = layout::MODLIST;
        params = BootParams::new(&start, GuestAddress(layout::START_INFO));
        params.set_modules(&[m], GuestAddress(layout::MODLIST));
    }
    params.set_sections(&map, GuestAddress(layout::MEMMAP));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::Write(e.to_string()))?;
    Ok(BootInfo {
        entry,
        start_info: layout::START_INFO,
    })
}

/// Opens the initramfs (before anything is created, and before `--user` drops privileges).
pub fn open_initramfs(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Initramfs {
        path: path.to_path_buf(),
        source,
    })
}

fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    mut f: File,
    kernel_end: u64,
    low_end: u64,
) -> Result<hvm_modlist_entry, BootError> {
    let err = |source| BootError::Initramfs {
        path: path.to_path_buf(),
        source,
    };
    let size = f.metadata().map_err(err)?.len();
    // Top of low RAM, page aligned, and above the kernel.
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| BootError::InitramfsTooBig(path.to_path_buf()))?;
    let len = usize::try_from(size).map_err(|_| BootError::InitramfsTooBig(path.to_path_buf()))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| BootError::Write(e.to_string()))?;
    Ok(hvm_modlist_entry {
        paddr: addr,
        size,
        ..Default::default()
    })
}

/// The e820-style map the guest sees: RAM, the legacy hole, and RAM above 4 GiB.
pub fn memory_map(ram_size: u64) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr, size, type_| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(
            layout::EBDA_START,
            layout::HIMEM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for (gpa, len, _) in layout::ram_ranges(ram_size) {
        let (start, len) = if gpa == 0 {
            (layout::HIMEM_START, len.saturating_sub(layout::HIMEM_START))
        } else {
            (gpa, len)
        };
        if len > 0 {
            map.push(entry(start, len, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_and_reserves_legacy() {
        let m = memory_map(256 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].addr, m[0].size, m[0].type_), (0, 0x9_fc00, E820_RAM));
        assert_eq!(m[1].type_, E820_RESERVED);
        assert_eq!(m[2].addr + m[2].size, 256 << 20);
    }

    #[test]
    fn non_elf_kernel_is_named() {
        let p = std::env::temp_dir().join(format!("baton-notelf-{}", std::process::id()));
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        let e = check_kernel(&p).unwrap_err().to_string();
        assert!(e.contains(p.to_str().unwrap()) && e.contains("ELF"), "{e}");
        std::fs::remove_file(&p).unwrap();
        let e = check_kernel(Path::new("/nonexistent/k"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/k"), "{e}");
    }
}
