//! The configuration space of a passed-through function: what the guest sees is the device's own
//! configuration space, except for the registers baton must own:
//!
//! - the BARs (and the expansion ROM BAR, hidden): the guest places them in baton's MMIO window,
//!   which has nothing to do with where the host put the device;
//! - the command register: kept here for reads and written through to the device (bus mastering
//!   and memory decoding must reach it), always with INTx disabled;
//! - the interrupt pin (0: INTx is not offered) and line (scratch for the OS);
//! - the MSI-X capability: its enable and function-mask bits are delivered by
//!   `VFIO_DEVICE_SET_IRQS` and GSI routes, never by the device's own register;
//! - the capability chain: an MSI capability is unlinked, so the guest only finds MSI-X.
//!
//! Everything else is read from and written to the device. The logic here is pure: the device
//! is reached through [`ConfigAccess`], which the tests fake.

use crate::pci::config::{BarMove, ConfigSpace, PciId};
use crate::pci::msix;

/// Offset of the command register.
const COMMAND: usize = 0x04;
/// Command register: INTx disable.
const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Offset of the first BAR register.
const BAR0: usize = 0x10;
/// Offset of the expansion ROM BAR.
const ROM_BAR: usize = 0x30;
/// Offset of the capabilities pointer.
const CAP_PTR: usize = 0x34;
/// Offset of the interrupt line register (the pin follows).
const INTERRUPT_LINE: usize = 0x3c;
/// Status register bit: a capability list is present.
const STATUS_CAP_LIST: u8 = 1 << 4;
/// Capability id of MSI.
const CAP_ID_MSI: u8 = 0x05;
/// Length of the MSI-X capability.
const MSIX_CAP_LEN: usize = 12;
/// Bytes of configuration space on the bus (no extended space).
pub const CONFIG_SIZE: usize = 256;

/// The device's configuration space, as the hardware answers it.
pub trait ConfigAccess {
    /// Reads `data.len()` bytes at `off`.
    fn read(&self, off: usize, data: &mut [u8]);
    /// Writes `data` at `off`.
    fn write(&self, off: usize, data: &[u8]);
}

/// Errors in what the device's configuration space says.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The device has no MSI-X capability: INTx and MSI are not supported.
    #[error(
        "it has no MSI-X capability; baton passes through MSI-X devices only (INTx and MSI are not supported)"
    )]
    NoMsix,
    /// The header is not a type-0 (endpoint) header.
    #[error("it is not a PCI endpoint (header type {0:#x}); bridges cannot be passed through")]
    NotEndpoint(u8),
}

/// A guest-visible memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBar {
    /// BAR index (0..6).
    pub index: usize,
    /// Where the guest first sees it.
    pub addr: u64,
    /// Its size (a power of two, at least 4 KiB).
    pub size: u64,
    /// A 64-bit BAR (takes two registers).
    pub is_64bit: bool,
}

/// Where the MSI-X capability and its table and pending-bit array are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    /// Offset of the capability in configuration space.
    pub offset: usize,
    /// Number of vectors.
    pub vectors: u16,
    /// BAR of the table.
    pub table_bar: usize,
    /// Offset of the table in its BAR.
    pub table_offset: u64,
    /// BAR of the pending-bit array.
    pub pba_bar: usize,
    /// Offset of the pending-bit array in its BAR.
    pub pba_offset: u64,
}

impl MsixCap {
    /// Bytes of the table.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * msix::ENTRY_SIZE
    }

    /// Bytes of the pending-bit array.
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    /// Whether `[offset, offset + len)` of BAR `bar` touches the table or the pending bits.
    pub fn overlaps(&self, bar: usize, offset: u64, len: u64) -> bool {
        let hit =
            |b: usize, start: u64, l: u64| b == bar && offset < start + l && start < offset + len;
        hit(self.table_bar, self.table_offset, self.table_len())
            || hit(self.pba_bar, self.pba_offset, self.pba_len())
    }
}

/// What a configuration write changed that the device model must act on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteEffect {
    /// A BAR moved (memory decoding on).
    pub bar_move: Option<BarMove>,
    /// The MSI-X message control word changed: its new value.
    pub msix_control: Option<u16>,
}

/// The virtualised configuration space of one passed-through function.
pub struct VirtualConfig {
    space: ConfigSpace,
    virt: [bool; CONFIG_SIZE],
    msix: MsixCap,
}

fn byte(raw: &[u8; CONFIG_SIZE], off: usize) -> u8 {
    raw.get(off).copied().unwrap_or(0)
}

fn word(raw: &[u8; CONFIG_SIZE], off: usize) -> u16 {
    u16::from_le_bytes([byte(raw, off), byte(raw, off + 1)])
}

fn dword(raw: &[u8; CONFIG_SIZE], off: usize) -> u32 {
    u32::from_le_bytes([
        byte(raw, off),
        byte(raw, off + 1),
        byte(raw, off + 2),
        byte(raw, off + 3),
    ])
}

/// The capabilities of `raw` as (id, offset), in chain order (loops and bad pointers end it).
pub fn capabilities(raw: &[u8; CONFIG_SIZE]) -> Vec<(u8, usize)> {
    let mut caps = Vec::new();
    if byte(raw, 0x06) & STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut p = usize::from(byte(raw, CAP_PTR) & !3);
    while p >= 0x40 && p + 2 <= CONFIG_SIZE && caps.len() < 48 {
        if caps.iter().any(|&(_, o)| o == p) {
            break;
        }
        caps.push((byte(raw, p), p));
        p = usize::from(byte(raw, p + 1) & !3);
    }
    caps
}

impl VirtualConfig {
    /// The guest's view of the device whose configuration space is `raw`, with `bars` placed
    /// in the guest's MMIO window.
    pub fn new(raw: &[u8; CONFIG_SIZE], bars: &[GuestBar]) -> Result<Self, ConfigError> {
        let header = byte(raw, 0x0e) & 0x7f;
        if header != 0 {
            return Err(ConfigError::NotEndpoint(header));
        }
        let caps = capabilities(raw);
        let &(_, offset) = caps
            .iter()
            .find(|&&(id, _)| id == msix::CAP_ID)
            .ok_or(ConfigError::NoMsix)?;
        let vectors = (word(raw, offset + 2) & 0x7ff) + 1;
        let (table, pba) = (dword(raw, offset + 4), dword(raw, offset + 8));
        let msix = MsixCap {
            offset,
            vectors,
            table_bar: usize::try_from(table & 7).unwrap_or(7),
            table_offset: u64::from(table & !7),
            pba_bar: usize::try_from(pba & 7).unwrap_or(7),
            pba_offset: u64::from(pba & !7),
        };
        let mut space = ConfigSpace::new(PciId {
            vendor: word(raw, 0),
            device: word(raw, 2),
            class: dword(raw, 0x08) >> 8,
            revision: byte(raw, 0x08),
            subsystem_vendor: word(raw, 0x2c),
            subsystem: word(raw, 0x2e),
        });
        let mut virt = [false; CONFIG_SIZE];
        let mut own = |off: usize, len: usize| {
            for v in virt.iter_mut().skip(off).take(len) {
                *v = true;
            }
        };
        // Command (starts with decoding off: the device was just reset), BARs, ROM BAR (0:
        // no ROM), interrupt line and pin (0: no INTx).
        own(COMMAND, 2);
        own(BAR0, 24);
        own(ROM_BAR, 4);
        own(INTERRUPT_LINE, 2);
        for b in bars {
            space.add_mem_bar(b.index, b.addr, b.size, b.is_64bit);
        }
        // The capability chain without MSI: every next pointer is ours.
        let kept: Vec<usize> = caps
            .iter()
            .filter(|&&(id, _)| id != CAP_ID_MSI)
            .map(|&(_, o)| o)
            .collect();
        own(CAP_PTR, 1);
        let ptr = |o: Option<&usize>| o.and_then(|&o| u8::try_from(o).ok()).unwrap_or(0);
        space.set_bytes(CAP_PTR, &[ptr(kept.first())]);
        for (i, &o) in kept.iter().enumerate() {
            own(o + 1, 1);
            space.set_bytes(o + 1, &[ptr(kept.get(i + 1))]);
        }
        // MSI (unlinked) reads as it is but is never written; MSI-X is ours entirely.
        for &(id, o) in &caps {
            if id == CAP_ID_MSI {
                own(o, 2);
                space.set_bytes(o, &[byte(raw, o)]);
            }
        }
        own(offset, MSIX_CAP_LEN);
        let mut body = [0u8; MSIX_CAP_LEN];
        for (i, b) in body.iter_mut().enumerate() {
            *b = byte(raw, offset + i);
        }
        body[1] = space.bytes(offset + 1, 1).first().copied().unwrap_or(0);
        // Message control starts disabled and unmasked; only those two bits are writable.
        body[3] &= !0xc0;
        space.set_bytes(offset, &body);
        space.set_wmask(offset, &msix::Msix::capability_wmask());
        Ok(VirtualConfig { space, virt, msix })
    }

    /// The virtual registers (BARs, command), as the bus needs them.
    pub fn space(&self) -> &ConfigSpace {
        &self.space
    }

    /// Takes the guest's view saved by another VMM (the 256 bytes of [`Self::space`]).
    pub fn restore(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(CONFIG_SIZE);
        self.space.set_bytes(0, &bytes[..n]);
    }

    /// Where MSI-X lives.
    pub fn msix(&self) -> MsixCap {
        self.msix
    }

    /// The MSI-X message control word as the guest set it.
    pub fn msix_control(&self) -> u16 {
        let b = self.space.bytes(self.msix.offset + 2, 2);
        match b {
            [lo, hi] => u16::from_le_bytes([*lo, *hi]),
            _ => 0,
        }
    }

    fn is_virtual(&self, off: usize) -> bool {
        self.virt.get(off).copied().unwrap_or(true)
    }

    /// A guest read: virtual bytes from here, the rest from the device.
    pub fn read(&self, dev: &dyn ConfigAccess, off: usize, data: &mut [u8]) {
        let len = data.len();
        if off >= CONFIG_SIZE || off + len > CONFIG_SIZE {
            data.fill(0xff);
            return;
        }
        if (off..off + len).any(|o| !self.is_virtual(o)) {
            dev.read(off, data);
        }
        for (i, d) in data.iter_mut().enumerate() {
            if self.is_virtual(off + i) {
                *d = self
                    .space
                    .bytes(off + i, 1)
                    .first()
                    .copied()
                    .unwrap_or(0xff);
            }
        }
    }

    /// A guest write: virtual bytes here (through their write masks), the rest to the device;
    /// the command register also goes to the device, with INTx disabled.
    pub fn write(&mut self, dev: &dyn ConfigAccess, off: usize, data: &[u8]) -> WriteEffect {
        let len = data.len();
        if off >= CONFIG_SIZE || off + len > CONFIG_SIZE {
            return WriteEffect::default();
        }
        let control = self.msix_control();
        // Bytes that are not virtual have a zero write mask here: this leaves them alone.
        let bar_move = self.space.write(off, data);
        let mut i = 0;
        while i < len {
            if self.is_virtual(off + i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < len && !self.is_virtual(off + i) {
                i += 1;
            }
            dev.write(off + start, &data[start..i]);
        }
        if off < COMMAND + 2 && COMMAND < off + len {
            let b = self.space.bytes(COMMAND, 2);
            if let [lo, hi] = b {
                let cmd = u16::from_le_bytes([*lo, *hi]) | CMD_INTX_DISABLE;
                dev.write(COMMAND, &cmd.to_le_bytes());
            }
        }
        let now = self.msix_control();
        WriteEffect {
            bar_move,
            msix_control: (now != control).then_some(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A device's configuration space in memory, with a log of writes.
    struct Fake {
        bytes: RefCell<[u8; CONFIG_SIZE]>,
        writes: RefCell<Vec<(usize, Vec<u8>)>>,
    }

    impl ConfigAccess for Fake {
        fn read(&self, off: usize, data: &mut [u8]) {
            data.copy_from_slice(&self.bytes.borrow()[off..off + data.len()]);
        }
        fn write(&self, off: usize, data: &[u8]) {
            self.bytes.borrow_mut()[off..off + data.len()].copy_from_slice(data);
            self.writes.borrow_mut().push((off, data.to_vec()));
        }
    }

    /// An NVMe-like function: PM at 0x40, MSI at 0x50, MSI-X (64 vectors, table at BAR0
    /// 0x2000, PBA at BAR0 0x3000) at 0x70, PCIe at 0x80; a 64-bit BAR0 at a host address.
    fn raw() -> [u8; CONFIG_SIZE] {
        let mut r = [0u8; CONFIG_SIZE];
        r[0..4].copy_from_slice(&0x0010_1b36u32.to_le_bytes());
        r[0x04..0x06].copy_from_slice(&0x0406u16.to_le_bytes());
        r[0x06] = STATUS_CAP_LIST;
        r[0x08..0x0c].copy_from_slice(&0x0108_0202u32.to_le_bytes());
        r[0x10..0x14].copy_from_slice(&0xfebd_0004u32.to_le_bytes());
        r[0x3d] = 1; // INTA
        r[CAP_PTR] = 0x40;
        r[0x40..0x42].copy_from_slice(&[0x01, 0x50]);
        r[0x50..0x52].copy_from_slice(&[CAP_ID_MSI, 0x70]);
        r[0x70..0x72].copy_from_slice(&[msix::CAP_ID, 0x80]);
        r[0x72..0x74].copy_from_slice(&63u16.to_le_bytes());
        r[0x74..0x78].copy_from_slice(&0x2000u32.to_le_bytes());
        r[0x78..0x7c].copy_from_slice(&0x3000u32.to_le_bytes());
        r[0x80..0x82].copy_from_slice(&[0x10, 0x00]);
        r
    }

    fn setup() -> (Fake, VirtualConfig) {
        let r = raw();
        let bars = [GuestBar {
            index: 0,
            addr: 0xc000_0000,
            size: 0x4000,
            is_64bit: true,
        }];
        let c = VirtualConfig::new(&r, &bars).unwrap();
        let f = Fake {
            bytes: RefCell::new(r),
            writes: RefCell::new(Vec::new()),
        };
        (f, c)
    }

    fn read32(c: &VirtualConfig, f: &Fake, off: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(f, off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn identity_comes_from_the_device_bars_from_the_guest() {
        let (f, c) = setup();
        assert_eq!(read32(&c, &f, 0), 0x0010_1b36);
        assert_eq!(read32(&c, &f, 0x08), 0x0108_0202);
        // The guest's BAR, not the host's address.
        assert_eq!(read32(&c, &f, 0x10), 0xc000_0004);
        assert_eq!(read32(&c, &f, 0x14), 0);
        // Command starts with decoding off; no ROM; no INTx pin.
        assert_eq!(read32(&c, &f, 0x04) & 0xffff, 0);
        assert_eq!(read32(&c, &f, 0x30), 0);
        assert_eq!(read32(&c, &f, 0x3c) >> 8 & 0xff, 0);
        assert_eq!(c.msix().vectors, 64);
        assert_eq!(c.msix().table_bar, 0);
        assert_eq!(c.msix().table_offset, 0x2000);
        assert!(c.msix().overlaps(0, 0x2000, 4));
        assert!(c.msix().overlaps(0, 0x3000, 8));
        assert!(!c.msix().overlaps(0, 0x1000, 0x1000));
        assert!(!c.msix().overlaps(1, 0x2000, 4));
    }

    #[test]
    fn bar_sizing_and_moves_stay_virtual() {
        let (f, mut c) = setup();
        assert_eq!(c.write(&f, 0x10, &[0xff; 4]), WriteEffect::default());
        assert_eq!(read32(&c, &f, 0x10), 0xffff_c004);
        c.write(&f, 0x10, &0xd000_0000u32.to_le_bytes());
        let e = c.write(&f, 0x04, &0x0006u16.to_le_bytes());
        assert_eq!(
            e.bar_move,
            Some(BarMove {
                bar: 0,
                from: 0xc000_0000,
                to: 0xd000_0000
            })
        );
        // The device's own BAR was never written; the command was, with INTx disabled.
        let writes = f.writes.borrow();
        assert!(writes.iter().all(|(o, _)| *o == 0x04), "{writes:?}");
        assert_eq!(
            writes.last(),
            Some(&(0x04, 0x0406u16.to_le_bytes().to_vec()))
        );
    }

    #[test]
    fn msi_is_unlinked_and_msix_control_is_virtual() {
        let (f, mut c) = setup();
        let chain = capabilities(&{
            let mut v = [0u8; CONFIG_SIZE];
            c.read(&f, 0, &mut v);
            v
        });
        assert_eq!(
            chain,
            vec![(0x01, 0x40), (msix::CAP_ID, 0x70), (0x10, 0x80)]
        );
        // Enable + function mask: reported, not written to the device.
        let e = c.write(&f, 0x72, &0xc03fu16.to_le_bytes());
        assert_eq!(e.msix_control, Some(0xc03f));
        assert!(f.writes.borrow().is_empty());
        // The table size and offsets are read-only.
        c.write(&f, 0x74, &0u32.to_le_bytes());
        assert_eq!(read32(&c, &f, 0x74), 0x2000);
        assert_eq!(c.msix_control() & 0x7ff, 63);
        assert_eq!(
            c.write(&f, 0x72, &0xc03fu16.to_le_bytes()).msix_control,
            None
        );
    }

    #[test]
    fn other_registers_pass_through() {
        let (f, mut c) = setup();
        // PCIe device control (cap at 0x80 + 8): written to the device, read back from it.
        c.write(&f, 0x88, &0x2810u16.to_le_bytes());
        assert_eq!(f.writes.borrow().as_slice(), &[(0x88, vec![0x10, 0x28])]);
        assert_eq!(read32(&c, &f, 0x88) & 0xffff, 0x2810);
        // A dword spanning the PCIe header: the next pointer is ours, the rest the device's.
        f.bytes.borrow_mut()[0x81] = 0x99;
        assert_eq!(read32(&c, &f, 0x80) & 0xffff, 0x0010);
        // Out of range.
        let mut d = [0u8; 4];
        c.read(&f, 254, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn devices_without_msix_or_bridges_are_refused() {
        let mut r = raw();
        r[0x70] = 0x09;
        assert_eq!(VirtualConfig::new(&r, &[]).err(), Some(ConfigError::NoMsix));
        let mut r = raw();
        r[0x0e] = 1;
        assert_eq!(
            VirtualConfig::new(&r, &[]).err(),
            Some(ConfigError::NotEndpoint(1))
        );
    }
}
