//! PCI configuration space through ports 0xcf8/0xcfc (bus 0), enumeration, capabilities and
//! memory BARs.

use super::sys::{inl, outl};

const ADDRESS: u16 = 0xcf8;
const DATA: u16 = 0xcfc;
/// Command register bits: memory space, bus master.
const CMD_MEM: u16 = 0x2;
const CMD_MASTER: u16 = 0x4;
/// Where BARs that the firmware left above 4 GiB (or unassigned) are moved: the identity map
/// covers only 4 GiB, and this range is free on baton-vmm and on QEMU `pc` with < 3 GiB RAM.
const REASSIGN_BASE: u64 = 0xd000_0000;
const REASSIGN_END: u64 = 0xdf00_0000;
static NEXT_BAR: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(REASSIGN_BASE);

/// A PCI function on bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Device (slot) number.
    pub dev: u8,
    /// Function number.
    pub func: u8,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
}

fn address(dev: u8, func: u8, off: u8) -> u32 {
    0x8000_0000 | (u32::from(dev) << 11) | (u32::from(func) << 8) | u32::from(off & 0xfc)
}

impl Function {
    /// Reads the 32-bit config register containing `off`.
    pub fn read32(&self, off: u8) -> u32 {
        outl(ADDRESS, address(self.dev, self.func, off));
        inl(DATA)
    }

    /// Writes the 32-bit config register at `off` (aligned).
    pub fn write32(&self, off: u8, value: u32) {
        outl(ADDRESS, address(self.dev, self.func, off));
        outl(DATA, value);
    }

    /// Reads a 16-bit field.
    pub fn read16(&self, off: u8) -> u16 {
        let b = self.read32(off).to_le_bytes();
        let i = usize::from(off & 2);
        u16::from_le_bytes([b[i], b[i + 1]])
    }

    /// Reads an 8-bit field.
    pub fn read8(&self, off: u8) -> u8 {
        self.read32(off).to_le_bytes()[usize::from(off & 3)]
    }

    /// Writes a 16-bit field (read-modify-write of its dword).
    pub fn write16(&self, off: u8, value: u16) {
        let shift = u32::from(off & 2) * 8;
        let old = self.read32(off);
        let new = (old & !(0xffff << shift)) | (u32::from(value) << shift);
        // The command/status dword: do not write back status bits (they are RW1C).
        let new = if off & 0xfc == 4 && shift == 0 {
            new & 0xffff
        } else {
            new
        };
        self.write32(off & 0xfc, new);
    }

    /// Enables memory decoding and bus mastering.
    pub fn enable(&self) {
        let cmd = self.read16(4);
        self.write16(4, cmd | CMD_MEM | CMD_MASTER);
    }

    /// Capability offsets with id `id`, in list order (up to 16).
    pub fn capabilities(&self, id: u8) -> ([u8; 16], usize) {
        let mut out = [0u8; 16];
        let mut n = 0;
        if self.read16(6) & 0x10 == 0 {
            return (out, 0);
        }
        let mut p = self.read8(0x34) & 0xfc;
        for _ in 0..48 {
            if p < 0x40 {
                break;
            }
            if self.read8(p) == id && n < out.len() {
                out[n] = p;
                n += 1;
            }
            p = self.read8(p + 1) & 0xfc;
        }
        (out, n)
    }

    /// Physical address of memory BAR `bar` (0..5), moved below 4 GiB if the firmware put it
    /// above (or did not assign it). `None` for I/O BARs.
    pub fn bar(&self, bar: u8) -> Option<u64> {
        let off = 0x10 + 4 * bar;
        let lo = self.read32(off);
        if lo & 1 != 0 {
            return None;
        }
        let is64 = lo & 0x6 == 0x4;
        let hi = if is64 { self.read32(off + 4) } else { 0 };
        let addr = (u64::from(hi) << 32) | u64::from(lo & !0xf);
        if addr != 0 && addr + 0x1000 <= 1 << 32 {
            return Some(addr);
        }
        // Size it, then place it in the reassignment window.
        let cmd = self.read16(4);
        self.write16(4, cmd & !CMD_MEM);
        self.write32(off, 0xffff_ffff);
        let mask = self.read32(off) & !0xf;
        let size = u64::from((!mask).wrapping_add(1)).max(0x1000);
        let next = NEXT_BAR.load(core::sync::atomic::Ordering::Relaxed);
        let base = (next + size - 1) & !(size - 1);
        if base + size > REASSIGN_END {
            self.write32(off, lo);
            self.write16(4, cmd);
            return None;
        }
        NEXT_BAR.store(base + size, core::sync::atomic::Ordering::Relaxed);
        self.write32(off, u32::try_from(base).unwrap_or(0) | (lo & 0xf));
        if is64 {
            self.write32(off + 4, 0);
        }
        self.write16(4, cmd);
        Some(base)
    }
}

/// Every function on bus 0 (up to 32).
pub fn enumerate() -> ([Option<Function>; 32], usize) {
    let mut out = [None; 32];
    let mut n = 0;
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let probe = Function {
                dev,
                func,
                vendor: 0,
                device: 0,
            };
            let id = probe.read32(0);
            let [v0, v1, d0, d1] = id.to_le_bytes();
            let vendor = u16::from_le_bytes([v0, v1]);
            if vendor == 0xffff || vendor == 0 {
                if func == 0 {
                    break;
                }
                continue;
            }
            if n < out.len() {
                out[n] = Some(Function {
                    dev,
                    func,
                    vendor,
                    device: u16::from_le_bytes([d0, d1]),
                });
                n += 1;
            }
            // Single-function device: skip functions 1..7.
            if func == 0 && probe.read8(0x0e) & 0x80 == 0 {
                break;
            }
        }
    }
    (out, n)
}
