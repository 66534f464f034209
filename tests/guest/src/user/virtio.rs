//! The virtio-pci modern transport: capabilities, common configuration, feature
//! negotiation, queue set-up, MSI-X vectors and notification addresses.

use super::pci::Function;
use super::sys::{self, mmio_read, mmio_write};
use super::virtq::Virtq;
use crate::kernel::{DEV_VECTOR_COUNT, DEV_VECTOR_FIRST};

/// Device status bits.
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// Guest has a driver.
    pub const DRIVER: u8 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and must be reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// MSI-X "no vector".
pub const NO_VECTOR: u16 = 0xffff;

/// Common configuration offsets.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Low and high 32 bits of a 64-bit register value.
fn halves(v: u64) -> [u32; 2] {
    let b = v.to_le_bytes();
    [
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    ]
}

/// Next free device vector (each queue of each device gets its own).
static NEXT_VECTOR: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

/// Why a device could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioError {
    /// A required capability or BAR is missing.
    NoCapability(&'static str),
    /// The device refused FEATURES_OK.
    FeaturesRefused,
    /// The device lacks VERSION_1.
    NoVersion1,
    /// Queue index beyond the device's queues, or size 0.
    NoQueue(u16),
    /// Out of memory for rings.
    NoMemory,
    /// MSI-X vector could not be assigned.
    NoVector(u16),
    /// The device set NEEDS_RESET (or did not accept DRIVER_OK).
    NeedsReset(u8),
}

/// A virtio-pci device during and after initialisation.
pub struct VirtioPci {
    /// The PCI function.
    pub pci: Function,
    common: u64,
    /// Device-specific configuration address.
    pub device_cfg: u64,
    notify_base: u64,
    notify_mult: u32,
    msix_cap: u8,
    msix_table: u64,
    msix_vectors: u16,
    /// Features the device offers.
    pub device_features: u64,
    /// Features negotiated.
    pub features: u64,
    /// APIC id interrupts go to.
    apic_id: u32,
}

impl VirtioPci {
    /// Finds the capabilities and BARs of `pci` and enables it on the bus.
    pub fn new(pci: Function) -> Result<VirtioPci, VirtioError> {
        pci.enable();
        let (caps, n) = pci.capabilities(0x09);
        let mut common = None;
        let mut device_cfg = None;
        let mut notify = None;
        for &cap in &caps[..n] {
            let cfg_type = pci.read8(cap + 3);
            let bar = pci.read8(cap + 4);
            let offset = u64::from(pci.read32(cap + 8));
            let Some(base) = (bar < 6).then(|| pci.bar(bar)).flatten() else {
                continue;
            };
            match cfg_type {
                1 if common.is_none() => common = Some(base + offset),
                2 if notify.is_none() => notify = Some((base + offset, pci.read32(cap + 16))),
                4 if device_cfg.is_none() => device_cfg = Some(base + offset),
                _ => {}
            }
        }
        let common = common.ok_or(VirtioError::NoCapability("common cfg"))?;
        let (notify_base, notify_mult) = notify.ok_or(VirtioError::NoCapability("notify"))?;
        let (msix, m) = pci.capabilities(0x11);
        if m == 0 {
            return Err(VirtioError::NoCapability("msi-x"));
        }
        let msix_cap = msix[0];
        let control = pci.read16(msix_cap + 2);
        let table = pci.read32(msix_cap + 4);
        let table_bar = pci
            .bar((table & 7) as u8)
            .ok_or(VirtioError::NoCapability("msi-x bar"))?;
        // BARs may have moved while sizing: enable decoding again.
        pci.enable();
        Ok(VirtioPci {
            pci,
            common,
            device_cfg: device_cfg.unwrap_or(0),
            notify_base,
            notify_mult,
            msix_cap,
            msix_table: table_bar + u64::from(table & !7),
            msix_vectors: (control & 0x7ff) + 1,
            device_features: 0,
            features: 0,
            apic_id: sys::apic_id(),
        })
    }

    fn rd<T: Copy>(&self, off: u64) -> T {
        // SAFETY: `common` is the common configuration structure inside the device's BAR,
        // mapped uncached; `off` is one of its fields.
        unsafe { mmio_read(self.common + off) }
    }

    fn wr<T: Copy>(&self, off: u64, v: T) {
        // SAFETY: as in `rd`.
        unsafe { mmio_write(self.common + off, v) }
    }

    /// Reads the device status.
    pub fn status(&self) -> u8 {
        self.rd(common::DEVICE_STATUS)
    }

    /// Writes the device status.
    pub fn set_status(&self, s: u8) {
        self.wr(common::DEVICE_STATUS, s);
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> u16 {
        self.rd(common::NUM_QUEUES)
    }

    /// Resets the device (status 0, waits until it reads back 0) and acknowledges it.
    pub fn reset(&mut self) {
        self.set_status(0);
        for _ in 0..1_000_000 {
            if self.status() == 0 {
                break;
            }
        }
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
    }

    /// Reads the offered features, acks `VERSION_1 | (offered & wanted)`, sets FEATURES_OK.
    pub fn negotiate(&mut self, wanted: u64) -> Result<u64, VirtioError> {
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.wr(common::DEVICE_FEATURE_SELECT, sel);
            offered |= u64::from(self.rd::<u32>(common::DEVICE_FEATURE)) << (32 * sel);
        }
        self.device_features = offered;
        if offered & F_VERSION_1 == 0 {
            self.set_status(status::FAILED);
            return Err(VirtioError::NoVersion1);
        }
        let f = offered & (wanted | F_VERSION_1);
        for (sel, half) in (0u32..).zip(halves(f)) {
            self.wr(common::DRIVER_FEATURE_SELECT, sel);
            self.wr(common::DRIVER_FEATURE, half);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(s);
        if self.status() & status::FEATURES_OK == 0 {
            self.set_status(status::FAILED);
            return Err(VirtioError::FeaturesRefused);
        }
        self.features = f;
        // MSI-X on, function not masked; configuration changes get no vector.
        let control = self.pci.read16(self.msix_cap + 2);
        self.pci
            .write16(self.msix_cap + 2, (control | 0x8000) & !0x4000);
        self.wr(common::CONFIG_MSIX_VECTOR, NO_VECTOR);
        Ok(f)
    }

    /// Programs MSI-X table entry `entry` to send `vector` to this CPU.
    fn program_vector(&self, entry: u16, vector: u8) {
        let e = self.msix_table + 16 * u64::from(entry);
        // SAFETY: entry `entry < msix_vectors` of the MSI-X table in the device's BAR.
        unsafe {
            mmio_write(e, 0xfee0_0000u32 | (self.apic_id << 12));
            mmio_write(e + 4, 0u32);
            mmio_write(e + 8, u32::from(vector));
            mmio_write(e + 12, 0u32);
        }
    }

    /// Sets up queue `index` with `size` descriptors (at most the device's maximum; `raw`
    /// writes exactly `size`, even if invalid, for the bad-driver test) and its own MSI-X
    /// vector (`interrupts`; otherwise no vector at all: back-ends built on virtio-queue
    /// signal every completion without EVENT_IDX, whatever the avail flags say); enables it.
    pub fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        raw: bool,
        interrupts: bool,
    ) -> Result<Virtq, VirtioError> {
        if index >= self.num_queues() {
            return Err(VirtioError::NoQueue(index));
        }
        self.wr(common::QUEUE_SELECT, index);
        let max: u16 = self.rd(common::QUEUE_SIZE);
        if max == 0 {
            return Err(VirtioError::NoQueue(index));
        }
        let size = if raw { size } else { size.min(max) };
        let mut q = Virtq::new(index, size.max(1)).ok_or(VirtioError::NoMemory)?;
        self.wr(common::QUEUE_SIZE, size);
        if interrupts {
            let slot = NEXT_VECTOR.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            let entry = index;
            if slot >= DEV_VECTOR_COUNT || entry >= self.msix_vectors {
                return Err(VirtioError::NoVector(index));
            }
            self.program_vector(entry, DEV_VECTOR_FIRST + slot);
            self.wr(common::QUEUE_MSIX_VECTOR, entry);
            if self.rd::<u16>(common::QUEUE_MSIX_VECTOR) != entry {
                return Err(VirtioError::NoVector(index));
            }
        } else {
            self.wr(common::QUEUE_MSIX_VECTOR, NO_VECTOR);
        }
        // 64-bit fields as two 32-bit writes (the spec allows it; some devices need it).
        for (off, addr) in [
            (common::QUEUE_DESC, q.desc),
            (common::QUEUE_DRIVER, q.avail),
            (common::QUEUE_DEVICE, q.used),
        ] {
            let [lo, hi] = halves(addr);
            self.wr(off, lo);
            self.wr(off + 4, hi);
        }
        let off: u16 = self.rd(common::QUEUE_NOTIFY_OFF);
        q.notify = self.notify_base + u64::from(off) * u64::from(self.notify_mult);
        self.wr(common::QUEUE_ENABLE, 1u16);
        Ok(q)
    }

    /// Rewrites queue `index`'s descriptor table address (for the bad-driver test).
    pub fn set_queue_desc(&self, index: u16, addr: u64) {
        self.wr(common::QUEUE_SELECT, index);
        let [lo, hi] = halves(addr);
        self.wr(common::QUEUE_DESC, lo);
        self.wr(common::QUEUE_DESC + 4, hi);
    }

    /// Sets DRIVER_OK and checks the device accepted it.
    pub fn driver_ok(&self) -> Result<(), VirtioError> {
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let s = self.status();
        if s & (status::NEEDS_RESET | status::FAILED) != 0 || s & status::DRIVER_OK == 0 {
            return Err(VirtioError::NeedsReset(s));
        }
        Ok(())
    }

    /// Reads device configuration at `off`.
    pub fn config<T: Copy>(&self, off: u64) -> T {
        // SAFETY: the device-specific configuration region inside the BAR.
        unsafe { mmio_read(self.device_cfg + off) }
    }
}
