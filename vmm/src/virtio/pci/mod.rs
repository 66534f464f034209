//! The virtio-pci modern transport: one 64-bit memory BAR holding the common configuration,
//! ISR, device configuration, notification area and MSI-X table/PBA.
//!
//! Notifications and interrupts never pass through this process: each queue's notify address
//! is an ioeventfd (the back-end's kick fd) and each queue's MSI-X vector a GSI with an irqfd
//! (the back-end's call fd). This code only runs for configuration accesses.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use baton_protocol::api::BackendState;

use super::common::{CommonConfig, Effect, NO_VECTOR, QueueRegs};
use super::status;
use crate::interrupts::IrqRouting;
use crate::pci::config::{BarMove, ConfigSpace, PciId};
use crate::pci::msix::{self, Msix};
use crate::pci::{PciDevice, lo32};
use crate::vhost_user::features::F_VERSION_1;
use crate::vhost_user::{
    ActiveQueue, ErrorClass, TYPE_BLOCK, TYPE_NET, VhostUserDevice, VhostUserError,
};

mod handover;

pub use handover::{SuspendError, Suspended};

/// BAR layout.
pub mod layout {
    /// Common configuration.
    pub const COMMON: u64 = 0x0000;
    /// ISR status.
    pub const ISR: u64 = 0x1000;
    /// Device-specific configuration.
    pub const DEVICE: u64 = 0x2000;
    /// Notification area; queue `n` notifies at `NOTIFY + n * NOTIFY_MULTIPLIER`.
    pub const NOTIFY: u64 = 0x3000;
    /// Bytes between queue notify addresses.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    /// MSI-X table.
    pub const MSIX_TABLE: u64 = 0x4000;
    /// MSI-X pending-bit array.
    pub const MSIX_PBA: u64 = 0x6000;
    /// BAR size.
    pub const SIZE: u64 = 0x8000;
    /// Each region's length.
    pub const REGION: u64 = 0x1000;
}

const BAR: usize = 0;
const VIRTIO_VENDOR: u16 = 0x1af4;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// eventfd creation or KVM registration failed.
    #[error("{0}: {1}")]
    Setup(&'static str, #[source] std::io::Error),
    /// GSI allocation.
    #[error(transparent)]
    Irq(#[from] crate::interrupts::IrqError),
}

/// Why a device's rings cannot be handed to its back-end.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A vhost-user step failed.
    #[error(transparent)]
    Backend(#[from] VhostUserError),
    /// The driver set a queue size the device does not support.
    #[error("queue {index}: size {size} is not a power of two up to {max}")]
    QueueSize {
        /// Queue index.
        index: u16,
        /// Size the driver set.
        size: u16,
        /// Largest size offered.
        max: u16,
    },
    /// A ring the driver set up is not in guest RAM or misaligned.
    #[error("queue {index}: {what} at {addr:#x} is outside guest RAM or misaligned")]
    RingOutsideRam {
        /// Queue index.
        index: u16,
        /// Which part of the ring.
        what: &'static str,
        /// Its guest address.
        addr: u64,
    },
    /// A queue index beyond what the device has.
    #[error("queue {0} has no eventfds")]
    NoEventFds(usize),
    /// The guest's used index could not be read.
    #[error("reading the used index of queue {index}: {source}")]
    UsedIndex {
        /// Queue index.
        index: u16,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl DeviceError {
    /// What to do about this error: a back-end error says so itself; the guest's rings do not
    /// get better by trying again.
    pub fn class(&self) -> ErrorClass {
        match self {
            DeviceError::Backend(e) => e.class(),
            _ => ErrorClass::Fatal,
        }
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: ConfigSpace,
    msix: Msix,
    common: CommonConfig,
    backend: VhostUserDevice,
    vm: Arc<VmFd>,
    irq: Arc<IrqRouting>,
    mem: GuestMemoryMmap,
    gsi_base: u32,
    bar_base: u64,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    config_call: EventFd,
    /// GSI each queue's call fd is registered with (plus the config vector's last).
    registered: Vec<Option<u32>>,
    activated: bool,
    name: String,
    backend_state: BackendState,
    /// Bumped on every new back-end connection, so a watcher of an old one stands down.
    generation: u64,
    reconnects: u64,
}

fn io(step: &'static str) -> impl Fn(kvm_ioctls::Error) -> VirtioPciError {
    move |e| VirtioPciError::Setup(step, std::io::Error::from_raw_os_error(e.errno()))
}

impl VirtioPciDevice {
    /// A device for `backend` whose BAR sits at `bar_base`.
    pub fn new(
        name: String,
        backend: VhostUserDevice,
        vm: Arc<VmFd>,
        irq: Arc<IrqRouting>,
        mem: GuestMemoryMmap,
        bar_base: u64,
    ) -> Result<Self, VirtioPciError> {
        let nq = backend.queue_count();
        let vectors = nq + 1;
        let device_type = backend.device_type();
        let class = match device_type {
            TYPE_NET => 0x02_00_00,   // network controller
            TYPE_BLOCK => 0x01_80_00, // mass storage, other
            _ => 0xff_00_00,
        };
        let mut config = ConfigSpace::new(PciId {
            vendor: VIRTIO_VENDOR,
            device: 0x1040 + device_type,
            class,
            revision: 1,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        });
        config.add_mem_bar(BAR, bar_base, layout::SIZE, true);
        let cap = |cfg_type: u8, offset: u64, length: u64| {
            let mut c = vec![CAP_VENDOR, 0, 16, cfg_type, 0, 0, 0, 0];
            c.extend_from_slice(&lo32(offset).to_le_bytes());
            c.extend_from_slice(&lo32(length).to_le_bytes());
            c
        };
        config.add_capability(&cap(CFG_COMMON, layout::COMMON, super::common::SIZE), &[]);
        config.add_capability(&cap(CFG_ISR, layout::ISR, 1), &[]);
        config.add_capability(&cap(CFG_DEVICE, layout::DEVICE, layout::REGION), &[]);
        let mut notify = cap(CFG_NOTIFY, layout::NOTIFY, layout::REGION);
        notify[2] = 20;
        notify.extend_from_slice(&layout::NOTIFY_MULTIPLIER.to_le_bytes());
        config.add_capability(&notify, &[]);
        let msix = Msix::new(vectors);
        config.add_capability(
            &msix.capability(0, lo32(layout::MSIX_TABLE), lo32(layout::MSIX_PBA)),
            &Msix::capability_wmask(),
        );

        let gsi_base = irq.allocate(u32::from(vectors))?;
        let new_evt =
            || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VirtioPciError::Setup("eventfd", e));
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for _ in 0..nq {
            kicks.push(new_evt()?);
            calls.push(new_evt()?);
        }
        let dev = VirtioPciDevice {
            config,
            msix,
            common: CommonConfig::new(backend.features(), nq, backend.max_queue_size(), vectors),
            backend,
            vm,
            irq,
            mem,
            gsi_base,
            bar_base,
            kicks,
            calls,
            config_call: new_evt()?,
            registered: vec![None; usize::from(nq) + 1],
            activated: false,
            name,
            backend_state: BackendState::Connected,
            generation: 0,
            reconnects: 0,
        };
        dev.register_ioeventfds(bar_base, true)?;
        Ok(dev)
    }

    fn register_ioeventfds(&self, base: u64, add: bool) -> Result<(), VirtioPciError> {
        for (q, kick) in (0u64..).zip(&self.kicks) {
            let addr = IoEventAddress::Mmio(
                base + layout::NOTIFY + q * u64::from(layout::NOTIFY_MULTIPLIER),
            );
            if add {
                self.vm
                    .register_ioevent(kick, &addr, NoDatamatch)
                    .map_err(io("KVM_IOEVENTFD"))?;
            } else {
                self.vm
                    .unregister_ioevent(kick, &addr, NoDatamatch)
                    .map_err(io("KVM_IOEVENTFD (deassign)"))?;
            }
        }
        Ok(())
    }

    /// Which vector a call slot uses: queue `i`, or the config vector for the last slot.
    fn slot_vector(&self, slot: usize) -> u16 {
        match self.common.queues.get(slot) {
            Some(q) => q.msix_vector,
            None => self.common.config_msix_vector,
        }
    }

    fn slot_evt(&self, slot: usize) -> &EventFd {
        self.calls.get(slot).unwrap_or(&self.config_call)
    }

    /// Registers call slot `slot`'s eventfd as irqfd for the GSI of its current vector.
    fn rewire(&mut self, slot: usize) {
        let vector = self.slot_vector(slot);
        let want = (vector != NO_VECTOR).then(|| self.gsi_base + u32::from(vector));
        let Some(have) = self.registered.get(slot).copied() else {
            return;
        };
        if have == want {
            return;
        }
        if let Some(g) = have {
            let _ = self.vm.unregister_irqfd(self.slot_evt(slot), g);
        }
        let mut now = None;
        if let Some(g) = want {
            match self.vm.register_irqfd(self.slot_evt(slot), g) {
                Ok(()) => now = Some(g),
                Err(e) => tracing::warn!(device = %self.name, "KVM_IRQFD gsi {g}: {e}"),
            }
        }
        self.registered[slot] = now;
    }

    /// Re-installs MSI routes after the table or the enable bits changed; vectors that became
    /// deliverable get one interrupt per user, since one may have been lost while masked.
    fn update_routes(&mut self, vectors: impl Iterator<Item = u16>) {
        for v in vectors {
            let msg = self.msix.message(v);
            if let Err(e) = self.irq.set_msi(self.gsi_base + u32::from(v), msg) {
                tracing::warn!(device = %self.name, "vector {v}: {e}");
            }
            if msg.is_some() && self.activated {
                for slot in 0..self.registered.len() {
                    if self.slot_vector(slot) == v {
                        let _ = self.slot_evt(slot).write(1);
                    }
                }
            }
        }
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            if self.activated {
                self.backend.reset();
                self.activated = false;
            }
            self.common.reset();
            for slot in 0..self.registered.len() {
                self.rewire(slot);
            }
            return;
        }
        let old = self.common.status;
        let mut new = value;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let f = self.common.driver_features;
            if f & !self.common.device_features != 0 || f & F_VERSION_1 == 0 {
                tracing::warn!(device = %self.name, "driver features {f:#x} refused");
                new &= !status::FEATURES_OK;
            }
        }
        self.common.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 && !self.activated {
            if let Err(e) = self.activate() {
                tracing::error!(device = %self.name, "cannot start: {e}; device needs reset");
                self.needs_reset();
            }
        }
    }

    /// Marks the device broken; the driver sees NEEDS_RESET and a config interrupt.
    pub(super) fn needs_reset(&mut self) {
        self.common.status |= status::NEEDS_RESET;
        self.common.config_generation = self.common.config_generation.wrapping_add(1);
        let _ = self.config_call.write(1);
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        let max = self.backend.max_queue_size();
        let mem = &self.mem;
        let (active, _) = enabled_queues(&self.common.queues, &self.kicks, &self.calls, |i, q| {
            check_ring(mem, i, q.size, max, q.desc, q.avail, q.used).map(|()| 0)
        })?;
        if self.reconnecting() {
            // The back-end is restarting: the rings start when it is back (the reconnect
            // starts an activated device's rings where its used rings say: here, at 0), or
            // the device goes to NEEDS_RESET if the configured limit passes first.
            tracing::info!(device = %self.name,
                "driver started the device while its back-end is away; rings start when it is back");
            self.activated = true;
            return Ok(());
        }
        self.backend
            .activate(self.common.driver_features, &active)?;
        self.activated = true;
        Ok(())
    }
}

/// The rings the driver enabled, as the back-end gets them, each with its starting available
/// index from `start(queue index, registers)`.
fn enabled_queues<'a>(
    queues: &[QueueRegs],
    kicks: &'a [EventFd],
    calls: &'a [EventFd],
    mut start: impl FnMut(u16, &QueueRegs) -> Result<u16, DeviceError>,
) -> Result<(Vec<ActiveQueue<'a>>, Vec<u16>), DeviceError> {
    let mut active = Vec::new();
    let mut starts = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        if !q.enabled {
            continue;
        }
        let (Ok(index), Some(kick), Some(call)) = (u16::try_from(i), kicks.get(i), calls.get(i))
        else {
            return Err(DeviceError::NoEventFds(i));
        };
        starts.push(start(index, q)?);
        active.push(ActiveQueue {
            index,
            size: q.size,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
            kick,
            call,
        });
    }
    Ok((active, starts))
}

/// Checks a queue's size and ring addresses against guest RAM.
fn check_ring(
    mem: &GuestMemoryMmap,
    index: u16,
    size: u16,
    max: u16,
    desc: u64,
    avail: u64,
    used: u64,
) -> Result<(), DeviceError> {
    if size == 0 || !size.is_power_of_two() || size > max {
        return Err(DeviceError::QueueSize { index, size, max });
    }
    let n = u64::from(size);
    for (what, addr, len, align) in [
        ("descriptor table", desc, 16 * n, 16),
        ("available ring", avail, 6 + 2 * n, 2),
        ("used ring", used, 6 + 8 * n, 4),
    ] {
        let in_ram = mem.check_range(
            GuestAddress(addr),
            usize::try_from(len).unwrap_or(usize::MAX),
        );
        if addr % align != 0 || !in_ram || GuestAddress(addr).checked_add(len).is_none() {
            return Err(DeviceError::RingOutsideRam { index, what, addr });
        }
    }
    Ok(())
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn write_config(&mut self, off: usize, data: &[u8]) -> Option<BarMove> {
        let was = self.msix.control;
        let mv = self.config.write(off, data);
        // The MSI-X message control word lives in our capability: mirror it.
        if let Some(cap) = find_msix_cap(&self.config) {
            let b = self.config.bytes(cap + 2, 2);
            if b.len() == 2 {
                self.msix.control = u16::from_le_bytes([b[0], b[1]]);
            }
        }
        if self.msix.control != was {
            let n = u16::try_from(self.msix.table.len()).unwrap_or(0);
            self.update_routes(0..n);
        }
        mv
    }

    fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let region = offset & !(layout::REGION - 1);
        let within = offset - region;
        match region {
            layout::COMMON => self.common.read(within, data),
            layout::ISR => {} // MSI-X only: the ISR stays 0.
            layout::DEVICE => self.backend.read_config(within, data),
            layout::MSIX_TABLE | 0x5000 => self.msix.read_table(offset - layout::MSIX_TABLE, data),
            layout::MSIX_PBA => self.msix.read_pba(within, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        let region = offset & !(layout::REGION - 1);
        let within = offset - region;
        match region {
            layout::COMMON => match self.common.write(within, data) {
                Effect::None => {}
                Effect::Status(v) => self.set_status(v),
                Effect::QueueVector(q) => self.rewire(usize::from(q)),
                Effect::ConfigVector => self.rewire(self.registered.len() - 1),
            },
            layout::DEVICE => self.backend.write_config(within, data),
            layout::NOTIFY => {
                // Normally caught by the ioeventfd; an access KVM did not match lands here.
                let q = within / u64::from(layout::NOTIFY_MULTIPLIER);
                if let Some(k) = usize::try_from(q).ok().and_then(|q| self.kicks.get(q)) {
                    let _ = k.write(1);
                }
            }
            layout::MSIX_TABLE | 0x5000 => {
                if let Some(v) = self.msix.write_table(offset - layout::MSIX_TABLE, data) {
                    self.update_routes(std::iter::once(v));
                }
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, mv: BarMove) {
        if mv.bar != BAR {
            return;
        }
        if let Err(e) = self
            .register_ioeventfds(mv.from, false)
            .and_then(|()| self.register_ioeventfds(mv.to, true))
        {
            tracing::error!(device = %self.name, "moving notify ioeventfds: {e}");
        }
        self.bar_base = mv.to;
    }
}

fn find_msix_cap(c: &ConfigSpace) -> Option<usize> {
    let mut p = usize::from(*c.bytes(0x34, 1).first()?);
    for _ in 0..48 {
        if p == 0 {
            return None;
        }
        let hdr = c.bytes(p, 2);
        if hdr.first() == Some(&msix::CAP_ID) {
            return Some(p);
        }
        p = usize::from(*hdr.get(1)?);
    }
    None
}
