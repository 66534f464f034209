//! Consistency checks on a received [`VmState`], run before any of it is used.

use std::collections::HashSet;
use std::path::PathBuf;

use super::{
    DeviceConfigState, DeviceKindState, DeviceState, PassthroughState, VcpuState, VmConfigState,
    VmState,
};
use crate::frame::Validate;

/// Most vCPUs a state may carry (8-bit xAPIC ids, 255 is broadcast).
pub const MAX_VCPUS: u32 = 254;
/// Most MSRs per vCPU.
pub const MAX_MSRS: usize = 1024;
/// Smallest XSAVE area (`struct kvm_xsave`).
pub const MIN_XSAVE_LEN: usize = 4096;
/// Largest XSAVE area accepted (`KVM_GET_XSAVE2` with every feature is ~11 KiB).
pub const MAX_XSAVE_LEN: usize = 64 << 10;
/// Largest virtio ring size (virtio 1.x split rings).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest MSI-X table (PCI spec).
pub const MAX_MSIX_VECTORS: usize = 2048;
/// Most devices (slots on PCI bus 0).
pub const MAX_DEVICES: usize = 32;
/// Most bytes waiting in the serial receive buffer.
pub const MAX_SERIAL_BUFFER: usize = 64 << 10;
/// Most console output carried over for the next client.
pub const MAX_CONSOLE_UNREAD: usize = 64 << 10;
/// Size of PCI configuration space.
pub const PCI_CONFIG_LEN: usize = 256;
/// "No vector" in virtio-pci MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// Largest `KVM_MP_STATE_*` value (`KVM_MP_STATE_AP_RESET_HOLD`).
const MAX_MP_STATE: u32 = 9;

/// Why a [`VmState`] is inconsistent; each names the vCPU, device or ring concerned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// vCPU count out of range.
    #[error("config has {0} vCPUs: must be between 1 and {MAX_VCPUS}")]
    CpuRange(u32),
    /// The vCPU list does not match the configuration.
    #[error("config has {config} vCPUs but the state carries {vcpus}")]
    CpuCount {
        /// `config.cpus`.
        config: u32,
        /// `vcpus.len()`.
        vcpus: usize,
    },
    /// vCPUs out of order or duplicated.
    #[error("vCPU entry {position} has id {id}: entries must be in id order from 0")]
    VcpuId {
        /// Position in the list.
        position: usize,
        /// Id found.
        id: u32,
    },
    /// Memory size zero or not page aligned.
    #[error("memory size {0} is zero or not a multiple of 4 KiB")]
    MemorySize(u64),
    /// No RAM file to map.
    #[error("memory path is empty: the new VMM maps guest RAM by path")]
    NoMemoryPath,
    /// XSAVE area of the wrong size.
    #[error(
        "vCPU {vcpu}: XSAVE area of {len} bytes (must be {MIN_XSAVE_LEN}..={MAX_XSAVE_LEN}, a multiple of 4)"
    )]
    XsaveSize {
        /// vCPU id.
        vcpu: u32,
        /// Length found.
        len: usize,
    },
    /// Too many MSRs.
    #[error("vCPU {vcpu}: {count} MSRs (at most {MAX_MSRS})")]
    TooManyMsrs {
        /// vCPU id.
        vcpu: u32,
        /// Count found.
        count: usize,
    },
    /// The same MSR twice.
    #[error("vCPU {vcpu}: MSR {index:#x} appears twice")]
    DuplicateMsr {
        /// vCPU id.
        vcpu: u32,
        /// MSR index.
        index: u32,
    },
    /// Unknown multiprocessing state.
    #[error("vCPU {vcpu}: unknown mp_state {value}")]
    MpState {
        /// vCPU id.
        vcpu: u32,
        /// Value found.
        value: u32,
    },
    /// An irqchip blob carries the wrong chip id.
    #[error("irqchip {chip}: chip id {found}, expected {expected}")]
    IrqchipId {
        /// Which field.
        chip: &'static str,
        /// Chip id expected.
        expected: u32,
        /// Chip id found.
        found: u32,
    },
    /// More devices than PCI slots.
    #[error("{0} devices: at most {MAX_DEVICES}")]
    TooManyDevices(usize),
    /// Two devices name the same back-end socket.
    #[error("two devices use the vhost-user socket {0:?}")]
    DuplicateSocket(PathBuf),
    /// Two devices sit in the same PCI slot.
    #[error("two devices in PCI slot {0}")]
    DuplicateSlot(u8),
    /// The same host function passed through twice.
    #[error("{0:?} is passed through twice")]
    DuplicatePassthrough(PathBuf),
    /// Passed-through function state list does not match the configuration.
    #[error("config has {config} passed-through functions but the state carries {state}")]
    PassthroughCount {
        /// `config.passthrough.len()`.
        config: usize,
        /// `passthrough.len()`.
        state: usize,
    },
    /// A passed-through function's state is inconsistent.
    #[error("passed-through function {index}: {what}")]
    Passthrough {
        /// Position in `config.passthrough`.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// Device state list does not match the configuration.
    #[error("config has {config} devices but the state carries {state}")]
    DeviceCount {
        /// `config.devices.len()`.
        config: usize,
        /// `devices.len()`.
        state: usize,
    },
    /// A device's state names a different socket than its configuration.
    #[error("device {device}: state is for socket {state:?} but config says {config:?}")]
    DeviceSocket {
        /// Device position.
        device: usize,
        /// Socket in the configuration.
        config: PathBuf,
        /// Socket in the state.
        state: PathBuf,
    },
    /// A device configured with no queues.
    #[error("{socket:?}: no queues")]
    NoQueues {
        /// Device socket.
        socket: PathBuf,
    },
    /// A ring size that is not a power of two or too large.
    #[error("{socket:?}: {what} size {size} must be a power of two no larger than {max}")]
    QueueSize {
        /// Device socket.
        socket: PathBuf,
        /// `"configured"`, `"virtqueue N"` or `"vring N"`.
        what: String,
        /// Size found.
        size: u16,
        /// Largest allowed.
        max: u16,
    },
    /// Number of virtqueues does not fit the device kind.
    #[error("{socket:?}: {found} virtqueues, expected {expected}")]
    VirtqueueCount {
        /// Device socket.
        socket: PathBuf,
        /// Count found.
        found: usize,
        /// What fits the configuration.
        expected: String,
    },
    /// PCI configuration space of the wrong size.
    #[error("{socket:?}: PCI config space of {len} bytes (must be {PCI_CONFIG_LEN})")]
    PciConfigLen {
        /// Device socket.
        socket: PathBuf,
        /// Length found.
        len: usize,
    },
    /// MSI-X table empty or too large.
    #[error("{socket:?}: MSI-X table of {len} entries (must be 1..={MAX_MSIX_VECTORS})")]
    MsixTableSize {
        /// Device socket.
        socket: PathBuf,
        /// Entries found.
        len: usize,
    },
    /// PBA size does not match the table.
    #[error("{socket:?}: MSI-X PBA of {len} words, expected {expected}")]
    MsixPbaSize {
        /// Device socket.
        socket: PathBuf,
        /// Words found.
        len: usize,
        /// `ceil(table / 64)`.
        expected: usize,
    },
    /// A virtio MSI-X vector register points past the table.
    #[error("{socket:?}: {what} uses MSI-X vector {vector} but the table has {table} entries")]
    MsixVector {
        /// Device socket.
        socket: PathBuf,
        /// `"config"` or `"virtqueue N"`.
        what: String,
        /// Vector found.
        vector: u16,
        /// Table size.
        table: usize,
    },
    /// A ring index past the device's virtqueues.
    #[error("{socket:?}: vring {index} but the device has {queues} virtqueues")]
    RingIndex {
        /// Device socket.
        socket: PathBuf,
        /// Ring index.
        index: u16,
        /// Virtqueue count.
        queues: usize,
    },
    /// The same ring twice.
    #[error("{socket:?}: vring {0} appears twice", .index)]
    DuplicateRing {
        /// Device socket.
        socket: PathBuf,
        /// Ring index.
        index: u16,
    },
    /// A ring whose size or addresses differ from the virtqueue the driver programmed.
    #[error("{socket:?}: vring {index} does not match virtqueue {index} (size or addresses)")]
    RingMismatch {
        /// Device socket.
        socket: PathBuf,
        /// Ring index.
        index: u16,
    },
    /// A split-ring base index above 16 bits.
    #[error("{socket:?}: vring {index} base {value:#x} does not fit a split ring (16 bits)")]
    RingBase {
        /// Device socket.
        socket: PathBuf,
        /// Ring index.
        index: u16,
        /// Value found.
        value: u32,
    },
    /// Inconsistent inflight region description.
    #[error("{socket:?}: inflight region: {detail}")]
    Inflight {
        /// Device socket.
        socket: PathBuf,
        /// What is wrong.
        detail: &'static str,
    },
    /// Serial receive buffer too large.
    #[error("serial receive buffer of {0} bytes (at most {MAX_SERIAL_BUFFER})")]
    SerialBuffer(usize),
    /// Too much console output carried over.
    #[error("{0} bytes of undelivered console output (at most {MAX_CONSOLE_UNREAD})")]
    ConsoleUnread(usize),
}

fn pow2_within(size: u16, max: u16) -> bool {
    size.is_power_of_two() && size <= max
}

fn check_vcpu(v: &VcpuState) -> Result<(), StateError> {
    let vcpu = v.id;
    let len = v.xsave.len();
    if !(MIN_XSAVE_LEN..=MAX_XSAVE_LEN).contains(&len) || len % 4 != 0 {
        return Err(StateError::XsaveSize { vcpu, len });
    }
    if v.msrs.len() > MAX_MSRS {
        return Err(StateError::TooManyMsrs {
            vcpu,
            count: v.msrs.len(),
        });
    }
    let mut seen = HashSet::new();
    if let Some(m) = v.msrs.iter().find(|m| !seen.insert(m.index)) {
        return Err(StateError::DuplicateMsr {
            vcpu,
            index: m.index,
        });
    }
    if v.mp_state > MAX_MP_STATE {
        return Err(StateError::MpState {
            vcpu,
            value: v.mp_state,
        });
    }
    Ok(())
}

fn chip_id(raw: &super::Raw<kvm_bindings::kvm_irqchip>) -> u32 {
    match raw.as_bytes() {
        [a, b, c, d, ..] => u32::from_le_bytes([*a, *b, *c, *d]),
        _ => u32::MAX,
    }
}

/// Virtqueue counts that fit a device's configuration.
fn expected_virtqueues(cfg: &DeviceConfigState) -> (usize, usize, String) {
    let q = usize::from(cfg.queues);
    match cfg.kind {
        DeviceKindState::Block => (q, q, q.to_string()),
        DeviceKindState::Net { .. } => (2 * q, 2 * q + 1, format!("{} or {}", 2 * q, 2 * q + 1)),
    }
}

fn check_device(cfg: &DeviceConfigState, dev: &DeviceState) -> Result<(), StateError> {
    let socket = || cfg.socket.clone();
    let max = cfg.queue_size;
    let v = &dev.virtio;
    let (lo, hi, expected) = expected_virtqueues(cfg);
    if !(lo..=hi).contains(&v.queues.len()) {
        return Err(StateError::VirtqueueCount {
            socket: socket(),
            found: v.queues.len(),
            expected,
        });
    }
    let pci = &dev.pci;
    if pci.config.len() != PCI_CONFIG_LEN {
        return Err(StateError::PciConfigLen {
            socket: socket(),
            len: pci.config.len(),
        });
    }
    let table = pci.msix.table.len();
    if !(1..=MAX_MSIX_VECTORS).contains(&table) {
        return Err(StateError::MsixTableSize {
            socket: socket(),
            len: table,
        });
    }
    if pci.msix.pba.len() != table.div_ceil(64) {
        return Err(StateError::MsixPbaSize {
            socket: socket(),
            len: pci.msix.pba.len(),
            expected: table.div_ceil(64),
        });
    }
    let vector_ok = |vec: u16| vec == NO_VECTOR || usize::from(vec) < table;
    if !vector_ok(v.config_msix_vector) {
        return Err(StateError::MsixVector {
            socket: socket(),
            what: "config".into(),
            vector: v.config_msix_vector,
            table,
        });
    }
    for (i, q) in v.queues.iter().enumerate() {
        // Registers of a queue the driver never enabled are whatever it last wrote.
        if !q.enabled {
            continue;
        }
        if !pow2_within(q.size, max) {
            return Err(StateError::QueueSize {
                socket: socket(),
                what: format!("virtqueue {i}"),
                size: q.size,
                max,
            });
        }
        if !vector_ok(q.msix_vector) {
            return Err(StateError::MsixVector {
                socket: socket(),
                what: format!("virtqueue {i}"),
                vector: q.msix_vector,
                table,
            });
        }
    }
    let vu = &dev.vhost_user;
    let mut seen = HashSet::new();
    for r in &vu.rings {
        let Some(q) = v.queues.get(usize::from(r.index)) else {
            return Err(StateError::RingIndex {
                socket: socket(),
                index: r.index,
                queues: v.queues.len(),
            });
        };
        if !seen.insert(r.index) {
            return Err(StateError::DuplicateRing {
                socket: socket(),
                index: r.index,
            });
        }
        if !pow2_within(r.size, max) {
            return Err(StateError::QueueSize {
                socket: socket(),
                what: format!("vring {}", r.index),
                size: r.size,
                max,
            });
        }
        if (q.size, q.desc, q.avail, q.used) != (r.size, r.desc, r.avail, r.used) {
            return Err(StateError::RingMismatch {
                socket: socket(),
                index: r.index,
            });
        }
        if r.next_avail > u32::from(u16::MAX) {
            return Err(StateError::RingBase {
                socket: socket(),
                index: r.index,
                value: r.next_avail,
            });
        }
    }
    if let Some(inf) = &vu.inflight {
        let bad = |detail| {
            Err(StateError::Inflight {
                socket: socket(),
                detail,
            })
        };
        if inf.mmap_size == 0 {
            return bad("mmap_size is zero");
        }
        if usize::from(inf.num_queues) < v.queues.len().min(usize::from(u16::MAX)) {
            return bad("covers fewer queues than the device has");
        }
        if !pow2_within(inf.queue_size, MAX_QUEUE_SIZE) {
            return bad("queue_size is not a power of two up to 32768");
        }
        if inf.fd_name.is_empty() {
            return bad("fd_name is empty");
        }
    }
    Ok(())
}

impl Validate for VmConfigState {
    type Error = StateError;

    /// Checks the configuration on its own: vCPU count, memory, sockets, queue sizes.
    fn validate(&self) -> Result<(), StateError> {
        if !(1..=MAX_VCPUS).contains(&self.cpus) {
            return Err(StateError::CpuRange(self.cpus));
        }
        if self.memory.size == 0 || self.memory.size % 4096 != 0 {
            return Err(StateError::MemorySize(self.memory.size));
        }
        if self.memory.path.as_os_str().is_empty() {
            return Err(StateError::NoMemoryPath);
        }
        let functions = self.devices.len() + self.passthrough.len();
        if functions > MAX_DEVICES {
            return Err(StateError::TooManyDevices(functions));
        }
        let mut paths = HashSet::new();
        for p in &self.passthrough {
            if !paths.insert(&p.path) {
                return Err(StateError::DuplicatePassthrough(p.path.clone()));
            }
        }
        let mut sockets = HashSet::new();
        for cfg in &self.devices {
            if !sockets.insert(&cfg.socket) {
                return Err(StateError::DuplicateSocket(cfg.socket.clone()));
            }
            if cfg.queues == 0 {
                return Err(StateError::NoQueues {
                    socket: cfg.socket.clone(),
                });
            }
            if !pow2_within(cfg.queue_size, MAX_QUEUE_SIZE) {
                return Err(StateError::QueueSize {
                    socket: cfg.socket.clone(),
                    what: "configured".into(),
                    size: cfg.queue_size,
                    max: MAX_QUEUE_SIZE,
                });
            }
        }
        Ok(())
    }
}

/// Checks `devices` against an already validated `config`: one state per configured device,
/// in order, distinct slots, and each device's PCI, MSI-X, virtio and ring state consistent.
pub fn validate_devices(config: &VmConfigState, devices: &[DeviceState]) -> Result<(), StateError> {
    if config.devices.len() != devices.len() {
        return Err(StateError::DeviceCount {
            config: config.devices.len(),
            state: devices.len(),
        });
    }
    let mut slots = HashSet::new();
    for (device, (cfg, dev)) in config.devices.iter().zip(devices).enumerate() {
        if !slots.insert(dev.pci.slot) {
            return Err(StateError::DuplicateSlot(dev.pci.slot));
        }
        if dev.vhost_user.socket != cfg.socket {
            return Err(StateError::DeviceSocket {
                device,
                config: cfg.socket.clone(),
                state: dev.vhost_user.socket.clone(),
            });
        }
        check_device(cfg, dev)?;
    }
    Ok(())
}

impl Validate for VmState {
    type Error = StateError;

    fn validate(&self) -> Result<(), StateError> {
        let c = &self.config;
        c.validate()?;
        if usize::try_from(c.cpus) != Ok(self.vcpus.len()) {
            return Err(StateError::CpuCount {
                config: c.cpus,
                vcpus: self.vcpus.len(),
            });
        }
        for (position, v) in self.vcpus.iter().enumerate() {
            if usize::try_from(v.id) != Ok(position) {
                return Err(StateError::VcpuId { position, id: v.id });
            }
            check_vcpu(v)?;
        }
        for (chip, expected, raw) in [
            ("pic_master", 0, &self.irqchip.pic_master),
            ("pic_slave", 1, &self.irqchip.pic_slave),
            ("ioapic", 2, &self.irqchip.ioapic),
        ] {
            let found = chip_id(raw);
            if found != expected {
                return Err(StateError::IrqchipId {
                    chip,
                    expected,
                    found,
                });
            }
        }
        validate_devices(c, &self.devices)?;
        validate_passthrough(self)?;
        if self.serial.in_buffer.len() > MAX_SERIAL_BUFFER {
            return Err(StateError::SerialBuffer(self.serial.in_buffer.len()));
        }
        if self.serial.console_unread.len() > MAX_CONSOLE_UNREAD {
            return Err(StateError::ConsoleUnread(self.serial.console_unread.len()));
        }
        Ok(())
    }
}

/// Checks the passed-through functions' state against `state.config`: one per function, in
/// slots no other device uses, each with a whole configuration space, at most six BARs and a
/// well-formed MSI-X table.
fn validate_passthrough(state: &VmState) -> Result<(), StateError> {
    let (config, found) = (state.config.passthrough.len(), state.passthrough.len());
    if config != found {
        return Err(StateError::PassthroughCount {
            config,
            state: found,
        });
    }
    let mut slots: HashSet<u8> = state.devices.iter().map(|d| d.pci.slot).collect();
    for (index, p) in state.passthrough.iter().enumerate() {
        if !slots.insert(p.slot) {
            return Err(StateError::DuplicateSlot(p.slot));
        }
        check_passthrough(p).map_err(|what| StateError::Passthrough {
            index,
            what: what.into(),
        })?;
    }
    Ok(())
}

fn check_passthrough(p: &PassthroughState) -> Result<(), &'static str> {
    if p.config.len() != PCI_CONFIG_LEN {
        return Err("configuration space is not 256 bytes");
    }
    if p.bars.len() > 6 {
        return Err("more than six BARs");
    }
    let table = p.msix.table.len();
    if !(1..=MAX_MSIX_VECTORS).contains(&table) {
        return Err("MSI-X table size out of range");
    }
    if p.msix.pba.len() != table.div_ceil(64) {
        return Err("MSI-X pending-bit array does not match the table");
    }
    Ok(())
}
