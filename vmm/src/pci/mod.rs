//! PCI: one root bus (segment 0, bus 0) reached through ports 0xCF8/0xCFC and through ECAM,
//! a host bridge at 00:00.0, and memory BARs dispatched to their devices.

pub mod config;
pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use config::{BarMove, ConfigSpace, PciId};

/// Config address port.
pub const PORT_CONFIG_ADDRESS: u16 = 0xcf8;
/// Config data ports (0xcfc..=0xcff).
pub const PORT_CONFIG_DATA: u16 = 0xcfc;
/// Devices per bus.
pub const SLOTS: usize = 32;

/// Low half of a 64-bit value.
#[allow(clippy::cast_possible_truncation)] // Truncation is the point.
pub(crate) fn lo32(x: u64) -> u32 {
    x as u32
}

/// High half of a 64-bit value.
pub(crate) fn hi32(x: u64) -> u32 {
    lo32(x >> 32)
}

/// A PCI function on the bus.
pub trait PciDevice: Send {
    /// The configuration space (for reads).
    fn config(&self) -> &ConfigSpace;
    /// Handles a configuration read; the default reads [`PciDevice::config`]. A passed-through
    /// device reads what it does not virtualise from the hardware.
    fn read_config(&self, off: usize, data: &mut [u8]) {
        self.config().read(off, data);
    }
    /// Handles a configuration write (after the bus checked the offset).
    fn write_config(&mut self, off: usize, data: &[u8]) -> Option<BarMove>;
    /// Handles a read from BAR `bar` at `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Handles a write to BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Called after a BAR moved, so the device can move what it registered at the old address.
    fn bar_moved(&mut self, _mv: BarMove) {}
}

/// A device slot shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn PciDevice>>;

/// The host bridge at 00:00.0.
pub struct HostBridge(ConfigSpace);

impl HostBridge {
    /// A plain host bridge.
    pub fn new() -> Self {
        HostBridge(ConfigSpace::new(PciId {
            vendor: 0x8086,
            device: 0x0d57,
            class: 0x06_00_00,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        }))
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn write_config(&mut self, off: usize, data: &[u8]) -> Option<BarMove> {
        self.0.write(off, data)
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
}

#[derive(Default)]
struct Inner {
    address: u32,
    /// BAR base → (length, slot, bar index).
    bars: BTreeMap<u64, (u64, usize, usize)>,
}

/// The root bus.
pub struct PciBus {
    slots: Vec<Option<SharedDevice>>,
    inner: Mutex<Inner>,
    ecam_base: u64,
}

impl PciBus {
    /// A bus with the host bridge in slot 0; ECAM at `ecam_base` (bus 0 only: 1 MiB).
    pub fn new(ecam_base: u64) -> Self {
        let mut slots: Vec<Option<SharedDevice>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciBus {
            slots,
            inner: Mutex::new(Inner::default()),
            ecam_base,
        }
    }

    /// Size of the ECAM window for bus 0.
    pub const ECAM_SIZE: u64 = 1 << 20;

    /// Puts `dev` in the first free slot and returns the slot number.
    pub fn add(&mut self, dev: SharedDevice) -> Option<usize> {
        let slot = self.slots.iter().position(Option::is_none)?;
        {
            let d = dev.lock().unwrap_or_else(|e| e.into_inner());
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            for bar in 0..6 {
                let (addr, size) = (d.config().bar_addr(bar), d.config().bar_size(bar));
                if size > 0 {
                    inner.bars.insert(addr, (size, slot, bar));
                }
            }
        }
        self.slots[slot] = Some(dev);
        Some(slot)
    }

    fn device(&self, slot: usize) -> Option<&SharedDevice> {
        self.slots.get(slot)?.as_ref()
    }

    /// Reads configuration space of `slot` (function 0 only) at byte offset `off`.
    fn config_read(&self, slot: usize, function: u32, off: usize, data: &mut [u8]) {
        data.fill(0xff);
        if function != 0 {
            return;
        }
        if let Some(d) = self.device(slot) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_config(off, data);
        }
    }

    fn config_write(&self, slot: usize, function: u32, off: usize, data: &[u8]) {
        if function != 0 {
            return;
        }
        let Some(d) = self.device(slot) else { return };
        let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mv) = d.write_config(off, data) {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = inner.bars.remove(&mv.from) {
                inner.bars.insert(mv.to, entry);
            }
            drop(inner);
            d.bar_moved(mv);
        }
    }

    /// Port I/O on 0xCF8..=0xCFF. Returns false if the port is not the bus's.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        if port == PORT_CONFIG_ADDRESS && data.len() == 4 {
            let a = self.inner.lock().unwrap_or_else(|e| e.into_inner()).address;
            data.copy_from_slice(&a.to_le_bytes());
            return true;
        }
        if (PORT_CONFIG_DATA..PORT_CONFIG_DATA + 4).contains(&port) {
            let a = self.inner.lock().unwrap_or_else(|e| e.into_inner()).address;
            match decode_cf8(a, port) {
                Some((slot, f, off)) => self.config_read(slot, f, off, data),
                None => data.fill(0xff),
            }
            return true;
        }
        false
    }

    /// See [`PciBus::pio_read`].
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        if port == PORT_CONFIG_ADDRESS {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.inner.lock().unwrap_or_else(|e| e.into_inner()).address =
                    u32::from_le_bytes(b);
            }
            return true;
        }
        if (PORT_CONFIG_DATA..PORT_CONFIG_DATA + 4).contains(&port) {
            let a = self.inner.lock().unwrap_or_else(|e| e.into_inner()).address;
            if let Some((slot, f, off)) = decode_cf8(a, port) {
                self.config_write(slot, f, off, data);
            }
            return true;
        }
        false
    }

    /// MMIO read; returns false if nothing on the bus decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some((slot, f, off)) = self.decode_ecam(addr) {
            self.config_read(slot, f, off, data);
            return true;
        }
        let Some((slot, bar, offset)) = self.find_bar(addr) else {
            return false;
        };
        if let Some(d) = self.device(slot) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_bar(bar, offset, data);
        }
        true
    }

    /// MMIO write; returns false if nothing on the bus decodes `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some((slot, f, off)) = self.decode_ecam(addr) {
            self.config_write(slot, f, off, data);
            return true;
        }
        let Some((slot, bar, offset)) = self.find_bar(addr) else {
            return false;
        };
        if let Some(d) = self.device(slot) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_bar(bar, offset, data);
        }
        true
    }

    fn find_bar(&self, addr: u64) -> Option<(usize, usize, u64)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (&base, &(len, slot, bar)) = inner.bars.range(..=addr).next_back()?;
        (addr - base < len).then_some((slot, bar, addr - base))
    }

    fn decode_ecam(&self, addr: u64) -> Option<(usize, u32, usize)> {
        let off = addr.checked_sub(self.ecam_base)?;
        if off >= Self::ECAM_SIZE {
            return None;
        }
        let slot = usize::try_from((off >> 15) & 0x1f).ok()?;
        let function = u32::try_from((off >> 12) & 7).ok()?;
        let reg = usize::try_from(off & 0xfff).ok()?;
        // Only the first 256 bytes exist (no extended config space).
        (reg < 256).then_some((slot, function, reg))
    }
}

/// (slot, function, byte offset) addressed by CONFIG_ADDRESS `a` for an access at `port`.
fn decode_cf8(a: u32, port: u16) -> Option<(usize, u32, usize)> {
    if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
        return None; // disabled, or a bus other than 0
    }
    let slot = usize::try_from((a >> 11) & 0x1f).ok()?;
    let function = (a >> 8) & 7;
    let off = usize::try_from(a & 0xfc).ok()? + usize::from(port - PORT_CONFIG_DATA);
    Some((slot, function, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cf8(slot: u32, off: u32) -> [u8; 4] {
        (0x8000_0000 | (slot << 11) | off).to_le_bytes()
    }

    #[test]
    fn host_bridge_through_ports_and_ecam() {
        let bus = PciBus::new(0xe000_0000);
        assert!(bus.pio_write(PORT_CONFIG_ADDRESS, &cf8(0, 0)));
        let mut d = [0u8; 4];
        assert!(bus.pio_read(PORT_CONFIG_DATA, &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        // Empty slot reads all ones.
        bus.pio_write(PORT_CONFIG_ADDRESS, &cf8(5, 0));
        bus.pio_read(PORT_CONFIG_DATA, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Byte access at an offset within the dword.
        bus.pio_write(PORT_CONFIG_ADDRESS, &cf8(0, 0x08));
        let mut b = [0u8; 1];
        bus.pio_read(PORT_CONFIG_DATA + 3, &mut b);
        assert_eq!(b[0], 0x06, "class code: bridge");
        let mut e = [0u8; 2];
        assert!(bus.mmio_read(0xe000_0000, &mut e));
        assert_eq!(u16::from_le_bytes(e), 0x8086);
        assert!(!bus.mmio_read(0xd000_0000, &mut e));
    }
}
