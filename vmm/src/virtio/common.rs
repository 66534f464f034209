//! The virtio-pci common configuration structure: the registers through which a driver
//! negotiates features, sets device status and describes its queues.

use baton_protocol::state::{VirtioPciState, VirtioQueueState};

/// Offsets of the common configuration fields.
mod off {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
}

/// Size of the common configuration structure.
pub const SIZE: u64 = 0x40;
/// MSI-X "no vector" (the live-update state checks vectors against the same value).
pub use baton_protocol::state::NO_VECTOR;

/// One queue's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegs {
    /// Size chosen by the driver (starts at the maximum).
    pub size: u16,
    /// MSI-X vector, or [`NO_VECTOR`].
    pub msix_vector: u16,
    /// Enabled by the driver.
    pub enabled: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (avail) ring address.
    pub avail: u64,
    /// Device (used) ring address.
    pub used: u64,
}

impl QueueRegs {
    fn new(max: u16) -> Self {
        QueueRegs {
            size: max,
            msix_vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// What a register write asks of the device beyond storing the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing more.
    None,
    /// The driver wrote the status register (value given).
    Status(u8),
    /// A queue's MSI-X vector changed.
    QueueVector(u16),
    /// The configuration-change vector changed.
    ConfigVector,
}

/// The common configuration registers of one device.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// Feature bits offered.
    pub device_features: u64,
    /// Feature bits the driver wrote.
    pub driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    /// Configuration-change MSI-X vector.
    pub config_msix_vector: u16,
    /// Device status.
    pub status: u8,
    /// Bumped when device configuration changes.
    pub config_generation: u8,
    queue_select: u16,
    /// The queues.
    pub queues: Vec<QueueRegs>,
    max_queue_size: u16,
    msix_vectors: u16,
}

fn set_half(v: &mut u64, hi: bool, val: u32) {
    if hi {
        *v = (*v & 0xffff_ffff) | (u64::from(val) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(val);
    }
}

impl CommonConfig {
    /// Registers for `queues` queues of at most `max_queue_size`, `msix_vectors` vectors.
    pub fn new(device_features: u64, queues: u16, max_queue_size: u16, msix_vectors: u16) -> Self {
        CommonConfig {
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: vec![QueueRegs::new(max_queue_size); usize::from(queues)],
            max_queue_size,
            msix_vectors,
        }
    }

    /// Back to the power-on state (guest-driven reset).
    pub fn reset(&mut self) {
        *self = CommonConfig::new(
            self.device_features,
            u16::try_from(self.queues.len()).unwrap_or(0),
            self.max_queue_size,
            self.msix_vectors,
        );
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Reads a register. Unknown offsets and sizes read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let q = self.selected();
        let v: u64 = match offset {
            off::DEVICE_FEATURE_SELECT => self.device_feature_select.into(),
            off::DEVICE_FEATURE => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            off::DRIVER_FEATURE_SELECT => self.driver_feature_select.into(),
            off::DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            off::CONFIG_MSIX_VECTOR => self.config_msix_vector.into(),
            off::NUM_QUEUES => self.queues.len() as u64,
            off::DEVICE_STATUS => self.status.into(),
            off::CONFIG_GENERATION => self.config_generation.into(),
            off::QUEUE_SELECT => self.queue_select.into(),
            off::QUEUE_SIZE => q.map_or(0, |q| q.size.into()),
            off::QUEUE_MSIX_VECTOR => q.map_or(NO_VECTOR, |q| q.msix_vector).into(),
            off::QUEUE_ENABLE => q.map_or(0, |q| q.enabled.into()),
            off::QUEUE_NOTIFY_OFF => self.queue_select.into(),
            off::QUEUE_DESC_LO => q.map_or(0, |q| q.desc & 0xffff_ffff),
            off::QUEUE_DESC_HI => q.map_or(0, |q| q.desc >> 32),
            off::QUEUE_DRIVER_LO => q.map_or(0, |q| q.avail & 0xffff_ffff),
            off::QUEUE_DRIVER_HI => q.map_or(0, |q| q.avail >> 32),
            off::QUEUE_DEVICE_LO => q.map_or(0, |q| q.used & 0xffff_ffff),
            off::QUEUE_DEVICE_HI => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// Writes a register and says what else the device must do.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Effect {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v32 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let v16 = u16::from_le_bytes([b[0], b[1]]);
        let driver_ok = self.status & super::status::DRIVER_OK != 0;
        let vectors = self.msix_vectors;
        let valid_vector = |v: u16| if v < vectors { v } else { NO_VECTOR };
        let qsel = usize::from(self.queue_select);
        match offset {
            off::DEVICE_FEATURE_SELECT => self.device_feature_select = v32,
            off::DRIVER_FEATURE_SELECT => self.driver_feature_select = v32,
            off::DRIVER_FEATURE if self.status & super::status::FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => set_half(&mut self.driver_features, false, v32),
                    1 => set_half(&mut self.driver_features, true, v32),
                    _ => {}
                }
            }
            off::CONFIG_MSIX_VECTOR => {
                self.config_msix_vector = valid_vector(v16);
                return Effect::ConfigVector;
            }
            off::DEVICE_STATUS => return Effect::Status(b[0]),
            off::QUEUE_SELECT => self.queue_select = v16,
            // Queue registers are frozen once the driver is running (spec 4.1.4.3.2).
            _ if driver_ok => {}
            _ => {
                let Some(q) = self.queues.get_mut(qsel) else {
                    return Effect::None;
                };
                match offset {
                    off::QUEUE_SIZE => q.size = v16,
                    off::QUEUE_MSIX_VECTOR => {
                        q.msix_vector = valid_vector(v16);
                        return Effect::QueueVector(self.queue_select);
                    }
                    off::QUEUE_ENABLE => q.enabled = v16 == 1,
                    off::QUEUE_DESC_LO => set_half(&mut q.desc, false, v32),
                    off::QUEUE_DESC_HI => set_half(&mut q.desc, true, v32),
                    off::QUEUE_DRIVER_LO => set_half(&mut q.avail, false, v32),
                    off::QUEUE_DRIVER_HI => set_half(&mut q.avail, true, v32),
                    off::QUEUE_DEVICE_LO => set_half(&mut q.used, false, v32),
                    off::QUEUE_DEVICE_HI => set_half(&mut q.used, true, v32),
                    _ => {}
                }
            }
        }
        Effect::None
    }
}

impl CommonConfig {
    /// The registers as the live-update state stream carries them.
    pub fn save(&self) -> VirtioPciState {
        VirtioPciState {
            device_features: self.device_features,
            driver_features: self.driver_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            config_msix_vector: self.config_msix_vector,
            status: self.status,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| VirtioQueueState {
                    size: q.size,
                    msix_vector: q.msix_vector,
                    enabled: q.enabled,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                })
                .collect(),
        }
    }

    /// Registers from a saved state (queue count and limits stay this device's own).
    pub fn restore(&mut self, s: &VirtioPciState) {
        self.device_features = s.device_features;
        self.driver_features = s.driver_features;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.config_msix_vector = s.config_msix_vector;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.queue_select = s.queue_select;
        for (q, saved) in self.queues.iter_mut().zip(&s.queues) {
            *q = QueueRegs {
                size: saved.size,
                msix_vector: saved.msix_vector,
                enabled: saved.enabled,
                desc: saved.desc,
                avail: saved.avail,
                used: saved.used,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(c: &CommonConfig, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn feature_negotiation_in_halves() {
        let mut c = CommonConfig::new((1 << 32) | 0x6, 2, 256, 3);
        c.write(off::DEVICE_FEATURE_SELECT, &1u32.to_le_bytes());
        assert_eq!(read32(&c, off::DEVICE_FEATURE), 1);
        c.write(off::DRIVER_FEATURE_SELECT, &0u32.to_le_bytes());
        c.write(off::DRIVER_FEATURE, &2u32.to_le_bytes());
        c.write(off::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        c.write(off::DRIVER_FEATURE, &1u32.to_le_bytes());
        assert_eq!(c.driver_features, (1 << 32) | 2);
    }

    #[test]
    fn queue_registers_and_vectors() {
        let mut c = CommonConfig::new(0, 2, 256, 3);
        assert_eq!(read32(&c, off::NUM_QUEUES) & 0xffff, 2);
        c.write(off::QUEUE_SELECT, &1u16.to_le_bytes());
        assert_eq!(read32(&c, off::QUEUE_SIZE) & 0xffff, 256);
        c.write(off::QUEUE_DESC_LO, &0x1000u32.to_le_bytes());
        c.write(off::QUEUE_DESC_HI, &0x1u32.to_le_bytes());
        assert_eq!(c.queues[1].desc, 0x1_0000_1000);
        assert_eq!(
            c.write(off::QUEUE_MSIX_VECTOR, &2u16.to_le_bytes()),
            Effect::QueueVector(1)
        );
        assert_eq!(c.queues[1].msix_vector, 2);
        // A vector beyond the table reads back as NO_VECTOR, as the spec requires.
        c.write(off::QUEUE_MSIX_VECTOR, &9u16.to_le_bytes());
        assert_eq!(
            read32(&c, off::QUEUE_MSIX_VECTOR) & 0xffff,
            u32::from(NO_VECTOR)
        );
        // Selecting a queue that does not exist reads size 0.
        c.write(off::QUEUE_SELECT, &7u16.to_le_bytes());
        assert_eq!(read32(&c, off::QUEUE_SIZE) & 0xffff, 0);
    }
}
