//! Direct kernel boot: the kernel, its command line, an optional initramfs and the boot
//! structures, all written into guest RAM before the first vCPU runs.
//!
//! Two kernel formats, told apart by content: a PVH ELF (a `vmlinux` carrying the Xen PVH entry
//! note; `pvh`) and a bzImage as distributions ship it in `/boot/vmlinuz-*` (`bzimage`: the
//! Linux x86 boot protocol's 64-bit entry with a zero page).

mod bzimage;
mod pvh;

pub use bzimage::GDT_LIMIT;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::Cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

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
    /// Neither an ELF nor a bzImage.
    #[error(
        "kernel {0} is neither a PVH ELF (vmlinux) nor a bzImage (vmlinuz): baton-vmm boots those two"
    )]
    UnknownFormat(PathBuf),
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
        "kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): boot its bzImage instead, or build it with CONFIG_PVH=y"
    )]
    NoPvhNote(PathBuf),
    /// A bzImage whose boot protocol has no 64-bit entry.
    #[error(
        "kernel {path} is a bzImage with boot protocol {major}.{minor:02} and no 64-bit entry: baton-vmm needs protocol 2.12 or later with XLF_KERNEL_64 (Linux 3.8 or later, 64-bit)"
    )]
    BzImageTooOld {
        /// The path given.
        path: PathBuf,
        /// Boot protocol major version.
        major: u16,
        /// Boot protocol minor version.
        minor: u16,
    },
    /// A bzImage shorter than its own header says.
    #[error("kernel {path} is a truncated bzImage: {size} bytes, its header needs {needed}")]
    Truncated {
        /// The path given.
        path: PathBuf,
        /// The file's size.
        size: u64,
        /// The size its setup header announces.
        needed: u64,
    },
    /// The bzImage loader failed.
    #[error("cannot load bzImage {path}: {source}")]
    BzImage {
        /// The path given.
        path: PathBuf,
        /// What the loader said.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The decompressed kernel would not fit in low RAM.
    #[error(
        "kernel {path} needs {needed} bytes of RAM above 1 MiB to decompress; the VM has {available}"
    )]
    KernelTooBig {
        /// The path given.
        path: PathBuf,
        /// Bytes the kernel needs from its load address.
        needed: u64,
        /// Bytes of low RAM above its load address.
        available: u64,
    },
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
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest RAM between the kernel and {limit:#x}"
    )]
    InitramfsTooBig {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may reach.
        limit: u64,
    },
    /// The command line is too long or has invalid characters.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The boot configurator refused the boot parameters.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, EBX = the `hvm_start_info`.
    Pvh {
        /// Entry point.
        rip: u64,
        /// Address of the start info.
        start_info: u64,
    },
    /// The Linux 64-bit boot protocol: long mode on identity-mapped page tables, RSI = the
    /// zero page, CS = `__BOOT_CS`, data segments `__BOOT_DS`.
    Linux64 {
        /// Entry point (load address + 0x200).
        rip: u64,
        /// Address of the zero page (`struct boot_params`).
        zero_page: u64,
    },
}

/// What the vCPU setup needs to know about the loaded guest.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// How to enter the kernel.
    pub entry: Entry,
}

/// A kernel file, opened and recognised.
#[derive(Debug)]
pub struct Kernel {
    file: File,
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    PvhElf,
    BzImage,
}

/// Opens the kernel and recognises its format without touching guest memory, so that a bad
/// kernel is reported before anything (RAM file, KVM VM) is created.
pub fn check_kernel(path: &Path) -> Result<Kernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let mut head = [0u8; bzimage::HEADER_END];
    let n = read_up_to(&mut file, &mut head).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let format = if head[..n].starts_with(b"\x7fELF") {
        Format::PvhElf
    } else if bzimage::is_bzimage(&head[..n]) {
        bzimage::check(path, &head[..n], size)?;
        Format::BzImage
    } else {
        return Err(BootError::UnknownFormat(path.to_path_buf()));
    };
    Ok(Kernel { file, format })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// What [`load`] writes, besides the kernel.
pub struct BootData<'a> {
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The initramfs, opened.
    pub initramfs: Option<(&'a Path, File)>,
    /// Guest address of the ACPI RSDP.
    pub rsdp: u64,
}

/// Loads kernel, command line and initramfs, and writes the format's boot structures.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel_path: &Path,
    kernel: Kernel,
    data: BootData<'_>,
) -> Result<BootInfo, BootError> {
    write_obj(mem, "the reset vector", RESET_STUB, layout::RESET_VECTOR)?;
    match kernel.format {
        Format::PvhElf => pvh::load(mem, ram_size, kernel_path, kernel.file, data),
        Format::BzImage => bzimage::load(mem, ram_size, kernel_path, kernel.file, data),
    }
}

/// What sits at the reset vector: real-mode code that writes the ACPI reset register, as a
/// firmware's reset would. With HW-reduced ACPI and no EFI, Linux restarts by jumping there
/// (`reboot_type` becomes EFI, then BIOS: `machine_real_restart`); with nothing there it would
/// run off into zeroed memory and never reset.
/// ```text
/// mov dx, 0x601 ; mov al, 1 ; out dx, al ; hlt ; jmp $-1
/// ```
const RESET_STUB: [u8; 10] = [0xba, 0x01, 0x06, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd, 0x90];

/// Writes the command line at [`layout::CMDLINE`]; returns its length without the NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<usize, BootError> {
    if cmdline.len() >= max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max.saturating_sub(1),
        });
    }
    let mut cl = Cmdline::new(max).map_err(BootError::Cmdline)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &cl).map_err(|_| {
        BootError::Write {
            what: "the command line",
            source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(layout::CMDLINE)),
        }
    })?;
    Ok(cmdline.len())
}

/// Opens the initramfs (before anything is created, and before `--user` drops privileges).
pub fn open_initramfs(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Initramfs {
        path: path.to_path_buf(),
        source,
    })
}

/// Copies the initramfs to the top of RAM below `limit`, page aligned and above `floor`;
/// returns `(address, size)`.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    mut f: File,
    floor: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let size = f
        .metadata()
        .map_err(|source| BootError::Initramfs {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let too_big = || BootError::InitramfsTooBig {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= floor)
        .ok_or_else(too_big)?;
    let len = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|source| BootError::Write {
            what: "the initramfs",
            source,
        })?;
    Ok((addr, size))
}

/// Writes a plain-old-data boot structure into guest memory.
fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    value: T,
    addr: u64,
) -> Result<(), BootError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| BootError::Write { what, source })
}

/// One entry of the memory map the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// E820 type: 1 RAM, 2 reserved.
    pub kind: u32,
}

/// The e820-style map the guest sees: RAM, the legacy hole, RAM above 4 GiB, and the PCI
/// ECAM window reserved (as firmware does, so that Linux trusts the MCFG).
pub fn memory_map(ram_size: u64) -> Vec<MapEntry> {
    let entry = |addr, size, kind| MapEntry { addr, size, kind };
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
    map.push(entry(
        layout::PCI_ECAM,
        layout::PCI_ECAM_SIZE,
        E820_RESERVED,
    ));
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_and_reserves_legacy() {
        let m = memory_map(256 << 20);
        assert_eq!(m.len(), 4);
        assert_eq!((m[0].addr, m[0].size, m[0].kind), (0, 0x9_fc00, E820_RAM));
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(m[2].addr + m[2].size, 256 << 20);
        assert_eq!((m[3].addr, m[3].kind), (layout::PCI_ECAM, E820_RESERVED));
        // Above 3 GiB of RAM the high part follows the hole, after the ECAM window.
        let m = memory_map(4 << 30);
        assert_eq!(m.last().map(|e| e.addr), Some(layout::RAM_ABOVE_4G));
    }

    #[test]
    fn unknown_kernel_format_is_named() {
        let p = std::env::temp_dir().join(format!("baton-notelf-{}", std::process::id()));
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        let e = check_kernel(&p).unwrap_err().to_string();
        assert!(
            e.contains(p.to_str().unwrap()) && e.contains("ELF") && e.contains("bzImage"),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
        let e = check_kernel(Path::new("/nonexistent/k"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/k"), "{e}");
    }
}
