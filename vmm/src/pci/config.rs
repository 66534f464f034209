//! A type-0 PCI configuration space: 256 bytes of registers with per-bit write masks, BAR
//! sizing, and a capability list.

/// Offset of the first BAR register.
const BAR0: usize = 0x10;
/// Offset of the capabilities pointer.
const CAP_PTR: usize = 0x34;
/// First byte available for capabilities.
const CAP_START: usize = 0x40;
/// Status register bit: a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Command register bit: memory space decoding.
const CMD_MEMORY: u32 = 1 << 1;

use super::{hi32, lo32};

/// Capabilities live below 256 bytes, so their offsets fit a byte.
fn cap_ptr(off: usize) -> u8 {
    u8::try_from(off).unwrap_or(0)
}

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy)]
pub struct PciId {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code (class, subclass, prog-if) in the low 24 bits.
    pub class: u32,
    /// Revision.
    pub revision: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
}

/// A BAR that moved because the guest reprogrammed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index.
    pub bar: usize,
    /// Old base address.
    pub from: u64,
    /// New base address.
    pub to: u64,
}

/// The configuration space of one function.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    wmask: [u8; 256],
    /// (size, is_64bit) of each BAR in use.
    bars: [Option<(u64, bool)>; 6],
    /// The address each BAR decodes at, as last seen with memory decoding enabled.
    committed: [u64; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl ConfigSpace {
    /// A header with `id`; the command register is writable, everything else read-only.
    pub fn new(id: PciId) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; 256],
            wmask: [0; 256],
            bars: [None; 6],
            committed: [0; 6],
            next_cap: CAP_START,
            last_cap: None,
        };
        c.set_u16(0x00, id.vendor);
        c.set_u16(0x02, id.device);
        c.set_u32(0x08, (id.class << 8) | u32::from(id.revision));
        c.set_u16(0x2c, id.subsystem_vendor);
        c.set_u16(0x2e, id.subsystem);
        // Command: I/O, memory, bus master, INTx disable.
        c.wmask[0x04] = 0x07;
        c.wmask[0x05] = 0x04;
        // Interrupt line is scratch for the OS.
        c.wmask[0x3c] = 0xff;
        c
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Reads the 32-bit register at `reg` (a dword index, 0..64).
    pub fn read_reg(&self, reg: usize) -> u32 {
        let off = reg * 4;
        match self.bytes.get(off..off + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0xffff_ffff,
        }
    }

    /// Reads `data.len()` bytes at byte offset `off` (out of range reads float high).
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.bytes.get(off + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes bytes at `off` through the write mask; returns a BAR move if one happened.
    ///
    /// A BAR counts as moved only while memory decoding is enabled in the command register:
    /// an OS sizes BARs (writing all ones) with decoding off, and the address it leaves when it
    /// turns decoding back on is the one that matters.
    pub fn write(&mut self, off: usize, data: &[u8]) -> Option<BarMove> {
        for (i, &d) in data.iter().enumerate() {
            let o = off + i;
            if let (Some(b), Some(&m)) = (self.bytes.get(o).copied(), self.wmask.get(o)) {
                self.bytes[o] = (b & !m) | (d & m);
            }
        }
        if self.read_reg(1) & CMD_MEMORY == 0 {
            return None;
        }
        (0..6).find_map(|bar| {
            self.bars[bar]?;
            let to = self.bar_addr(bar);
            let from = std::mem::replace(&mut self.committed[bar], to);
            (from != to).then_some(BarMove { bar, from, to })
        })
    }

    /// Declares BAR `bar` as a memory BAR of `size` (a power of two ≥ 4 KiB) at `addr`.
    pub fn add_mem_bar(&mut self, bar: usize, addr: u64, size: u64, is_64bit: bool) {
        let off = BAR0 + bar * 4;
        let low_flags: u32 = if is_64bit { 0x4 } else { 0 };
        self.set_u32(off, (lo32(addr) & !0xf) | low_flags);
        let mask = !(size - 1);
        self.wmask[off..off + 4].copy_from_slice(&(lo32(mask) & !0xf).to_le_bytes());
        if is_64bit {
            self.set_u32(off + 4, hi32(addr));
            self.wmask[off + 4..off + 8].copy_from_slice(&hi32(mask).to_le_bytes());
        }
        self.bars[bar] = Some((size, is_64bit));
        self.committed[bar] = addr;
    }

    /// Current base address of `bar` (0 if unused).
    pub fn bar_addr(&self, bar: usize) -> u64 {
        let Some((_, is_64bit)) = self.bars.get(bar).copied().flatten() else {
            return 0;
        };
        let lo = u64::from(self.read_reg(BAR0 / 4 + bar) & !0xf);
        let hi = if is_64bit {
            u64::from(self.read_reg(BAR0 / 4 + bar + 1))
        } else {
            0
        };
        (hi << 32) | lo
    }

    /// Size of `bar` (0 if unused).
    pub fn bar_size(&self, bar: usize) -> u64 {
        self.bars.get(bar).copied().flatten().map_or(0, |b| b.0)
    }

    /// Appends a capability (`body` starts with the capability id; the next pointer is filled
    /// in) with `wmask` for its bytes; returns its offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> usize {
        let off = self.next_cap;
        let len = body.len();
        self.bytes[off..off + len].copy_from_slice(body);
        self.bytes[off + 1] = 0;
        for (i, m) in wmask.iter().enumerate().take(len) {
            self.wmask[off + i] = *m;
        }
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = cap_ptr(off),
            None => {
                self.bytes[CAP_PTR] = cap_ptr(off);
                let status = self.read_reg(1) | STATUS_CAP_LIST;
                self.set_u32(4, status);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        off
    }

    /// Overwrites bytes the device itself controls (ignoring the write mask).
    pub fn set_bytes(&mut self, off: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(off..off + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// Sets the write mask of the bytes at `off` (for registers a device model virtualises).
    pub fn set_wmask(&mut self, off: usize, mask: &[u8]) {
        if let Some(dst) = self.wmask.get_mut(off..off + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Raw bytes at `off`.
    pub fn bytes(&self, off: usize, len: usize) -> &[u8] {
        self.bytes.get(off..off + len).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let mut c = ConfigSpace::new(PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x018000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        c.add_mem_bar(0, 0xc000_0000, 0x8000, true);
        c
    }

    #[test]
    fn header_and_bar_sizing() {
        let mut c = space();
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.bar_addr(0), 0xc000_0000);
        // Sizing: write all ones, read the mask back, restore.
        assert_eq!(c.write(0x10, &[0xff; 4]), None);
        assert_eq!(c.read_reg(4), 0xffff_8004);
        assert_eq!(c.write(0x14, &[0xff; 4]), None);
        assert_eq!(c.read_reg(5), 0xffff_ffff);
        c.write(0x10, &0xc000_0000u32.to_le_bytes());
        c.write(0x14, &0u32.to_le_bytes());
        assert_eq!(c.bar_addr(0), 0xc000_0000);
    }

    #[test]
    fn moving_a_bar_is_reported() {
        let mut c = space();
        // With decoding off nothing moves, however the BAR is written.
        assert_eq!(c.write(0x10, &0xd000_0000u32.to_le_bytes()), None);
        // Turning decoding on commits the new address.
        let mv = c.write(0x04, &[0x06, 0]);
        assert_eq!(
            mv,
            Some(BarMove {
                bar: 0,
                from: 0xc000_0000,
                to: 0xd000_0000
            })
        );
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = space();
        let a = c.add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        let b = c.add_capability(&[0x09, 0, 4], &[]);
        assert_eq!(c.bytes(0x34, 1), &[cap_ptr(a)]);
        assert_eq!(c.bytes(a + 1, 1), &[cap_ptr(b)]);
        assert_eq!(c.bytes(b + 1, 1), &[0]);
        assert_ne!(c.read_reg(1) & STATUS_CAP_LIST, 0);
        // Read-only: writes to the vendor id are ignored.
        c.write(0, &[0, 0]);
        assert_eq!(c.read_reg(0) & 0xffff, 0x1af4);
    }
}
