//! The PVH `hvm_start_info` the loader passes in EBX: command line, memory map, modules and
//! the RSDP address.

use super::sys::peek;

/// Reads a start-info field (or a byte of the memory map, module list or command line).
fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: callers pass addresses below 4 GiB (checked) inside the structures the PVH
    // loader placed in RAM, which is identity-mapped; the fields are plain integers.
    unsafe { peek(addr) }
}

/// `hvm_start_info.magic`.
const MAGIC: u32 = 0x336e_c578;
/// Longest command line kept.
const CMDLINE_MAX: usize = 1024;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;

/// What the guest takes from the start info.
pub struct BootInfo {
    /// Physical address of the RSDP, or 0 when the loader did not pass one.
    pub rsdp: u64,
    /// Bytes of usable RAM in the memory map.
    pub ram_bytes: u64,
    /// Number of memory-map entries.
    pub memmap_entries: u32,
    /// Start-info version.
    pub version: u32,
    /// First module (the initramfs): (physical address, size).
    pub module: Option<(u64, u64)>,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
}

impl BootInfo {
    /// Parses the start info at physical address `addr`; `None` if the magic is wrong.
    pub fn parse(addr: u64) -> Option<BootInfo> {
        if addr == 0 || addr >= 1 << 32 {
            return None;
        }
        let magic: u32 = rd(addr);
        if magic != MAGIC {
            return None;
        }
        let version: u32 = rd(addr + 4);
        let nr_modules: u32 = rd(addr + 12);
        let modlist: u64 = rd(addr + 16);
        let cmdline_paddr: u64 = rd(addr + 24);
        let rsdp: u64 = rd(addr + 32);
        let (memmap, memmap_entries): (u64, u32) = if version >= 1 {
            (rd(addr + 40), rd(addr + 48))
        } else {
            (0, 0)
        };

        let mut info = BootInfo {
            rsdp,
            ram_bytes: 0,
            memmap_entries,
            version,
            module: None,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
        };
        if memmap != 0 && memmap < 1 << 32 {
            for i in 0..u64::from(memmap_entries.min(128)) {
                let entry = memmap + i * 24;
                let size: u64 = rd(entry + 8);
                let kind: u32 = rd(entry + 16);
                if kind == E820_RAM {
                    info.ram_bytes += size;
                }
            }
        }
        if nr_modules > 0 && modlist != 0 && modlist < 1 << 32 {
            let (paddr, size): (u64, u64) = (rd(modlist), rd(modlist + 8));
            info.module = Some((paddr, size));
        }
        if cmdline_paddr != 0 && cmdline_paddr < 1 << 32 {
            while info.cmdline_len < CMDLINE_MAX {
                let b: u8 = rd(cmdline_paddr + info.cmdline_len as u64);
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
        }
        Some(info)
    }

    /// The command line (empty if absent or not UTF-8).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// Usable RAM in MiB, rounded to the nearest MiB (the 640 KiB..1 MiB hole is not RAM).
    pub fn mem_mib(&self) -> u64 {
        (self.ram_bytes + (1 << 19)) >> 20
    }
}

/// Value of `key=value` on the command line, if present.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}
