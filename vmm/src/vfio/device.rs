//! A passed-through PCI function on baton's bus: configuration accesses through
//! [`VirtualConfig`], trapped BAR accesses forwarded to the device's regions, and MSI-X.
//!
//! MSI-X: the guest programs baton's copy of the table (the device's own is never written);
//! each vector has an eventfd that VFIO signals (`VFIO_DEVICE_SET_IRQS`, set when the guest
//! enables MSI-X) and that KVM takes as the irqfd of the vector's GSI, whose MSI route follows
//! the guest's table entry and mask bits (the same routing helpers as virtio-pci). Interrupts
//! never pass through this process.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use baton_protocol::api::PassthroughInfo;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::bars::Bar;
use super::config::{ConfigAccess, MsixCap, VirtualConfig};
use super::sys::Device;
use crate::interrupts::IrqRouting;
use crate::pci::PciDevice;
use crate::pci::config::{BarMove, ConfigSpace};
use crate::pci::msix::Msix;

/// VFIO's region index of the configuration space.
pub const CONFIG_REGION: u32 = 7;
/// Message control: MSI-X enable.
const MSIX_ENABLE: u16 = 1 << 15;

/// The device's configuration region, for [`VirtualConfig`].
struct Hw<'a>(&'a Device);

impl ConfigAccess for Hw<'_> {
    fn read(&self, off: usize, data: &mut [u8]) {
        data.fill(0xff);
        self.0.region_read(CONFIG_REGION, data, off as u64);
    }
    fn write(&self, off: usize, data: &[u8]) {
        self.0.region_write(CONFIG_REGION, data, off as u64);
    }
}

/// A passed-through function.
pub struct VfioPciDevice {
    pub(super) name: String,
    pub(super) path: PathBuf,
    pub(super) dev: Arc<Device>,
    pub(super) config: VirtualConfig,
    pub(super) bars: Vec<Bar>,
    pub(super) msix: Msix,
    pub(super) msix_cap: MsixCap,
    /// Whether VFIO currently has our eventfds for MSI-X.
    pub(super) msix_on_device: bool,
    pub(super) vm: Arc<VmFd>,
    pub(super) irq: Arc<IrqRouting>,
    pub(super) gsi_base: u32,
    pub(super) vectors: Vec<EventFd>,
    /// Per vector: its eventfd is a KVM irqfd of this VM (in a live update, only the other
    /// VM's until the switch).
    pub(super) irqfds: Vec<bool>,
}

impl VfioPciDevice {
    /// Name in `vm.info` (`vfio0`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sysfs path it was given as.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// MSI-X vectors.
    pub fn vector_count(&self) -> u16 {
        self.msix_cap.vectors
    }

    /// What `vm.info` says about it, at PCI slot `slot`.
    pub fn info(&self, slot: u8) -> PassthroughInfo {
        let trapped = self.bars.iter().filter(|b| b.trapped()).count();
        let n = |c: usize| u32::try_from(c).unwrap_or(u32::MAX);
        PassthroughInfo {
            name: self.name.clone(),
            path: self.path.display().to_string(),
            guest_address: format!("0000:00:{slot:02x}.0"),
            vectors: self.msix_cap.vectors,
            msix_enabled: self.msix_on_device,
            mapped_bars: n(self.bars.len() - trapped),
            trapped_bars: n(trapped),
        }
    }

    /// Whether the guest enabled MSI-X.
    pub fn msix_enabled(&self) -> bool {
        self.msix_on_device
    }

    /// Resets the device (`VFIO_DEVICE_RESET`, if it supports one).
    pub fn reset(&self) {
        self.dev.reset();
    }

    fn bar(&self, index: usize) -> Option<&Bar> {
        self.bars.iter().find(|b| b.guest.index == index)
    }

    /// Gives VFIO the vectors' eventfds when the guest enables MSI-X, takes them back when it
    /// disables it; then re-installs every route.
    fn msix_control_changed(&mut self, control: u16) {
        self.msix.control = control;
        let enable = control & MSIX_ENABLE != 0;
        if enable && !self.msix_on_device {
            let fds: Vec<_> = self.vectors.iter().map(AsRawFd::as_raw_fd).collect();
            match self.dev.enable_msix(&fds) {
                Ok(()) => self.msix_on_device = true,
                Err(e) => tracing::error!(device = %self.name, "enabling MSI-X: {e}"),
            }
        } else if !enable && self.msix_on_device {
            if let Err(e) = self.dev.disable_msix() {
                tracing::warn!(device = %self.name, "disabling MSI-X: {e}");
            }
            self.msix_on_device = false;
        }
        self.update_routes(0..self.msix_cap.vectors);
    }

    /// Re-installs the MSI routes of `vectors`; a vector that can be delivered gets one
    /// interrupt, since one may have come while it was masked (the driver checks its queues).
    fn update_routes(&self, vectors: impl Iterator<Item = u16>) {
        for v in vectors {
            let msg = self.msix.message(v);
            if let Err(e) = self.irq.set_msi(self.gsi_base + u32::from(v), msg) {
                tracing::warn!(device = %self.name, "vector {v}: {e}");
            }
            if msg.is_some() && self.msix_on_device {
                if let Some(evt) = self.vectors.get(usize::from(v)) {
                    let _ = evt.write(1);
                }
            }
        }
    }

    /// Whether `offset..offset+len` of BAR `bar` is in the MSI-X table; its offset there.
    fn in_table(&self, bar: usize, offset: u64, len: usize) -> Option<u64> {
        let c = &self.msix_cap;
        let rel = offset.checked_sub(c.table_offset)?;
        (bar == c.table_bar && rel + len as u64 <= c.table_len()).then_some(rel)
    }
}

impl PciDevice for VfioPciDevice {
    fn config(&self) -> &ConfigSpace {
        self.config.space()
    }

    fn read_config(&self, off: usize, data: &mut [u8]) {
        self.config.read(&Hw(&self.dev), off, data);
    }

    fn write_config(&mut self, off: usize, data: &[u8]) -> Option<BarMove> {
        let effect = self.config.write(&Hw(&self.dev), off, data);
        if let Some(control) = effect.msix_control {
            self.msix_control_changed(control);
        }
        effect.bar_move
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(rel) = self.in_table(bar, offset, data.len()) {
            self.msix.read_table(rel, data);
            return;
        }
        let Some(b) = self.bar(bar) else { return };
        if offset + data.len() as u64 <= b.region_size {
            // The pending bits come from the device as they are.
            self.dev
                .region_read(u32::try_from(bar).unwrap_or(0), data, offset);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(rel) = self.in_table(bar, offset, data.len()) {
            if let Some(v) = self.msix.write_table(rel, data) {
                self.update_routes(std::iter::once(v));
            }
            return;
        }
        let c = self.msix_cap;
        if c.overlaps(bar, offset, data.len() as u64) {
            return; // the pending bits are read-only
        }
        let Some(b) = self.bar(bar) else { return };
        if offset + data.len() as u64 <= b.region_size {
            self.dev
                .region_write(u32::try_from(bar).unwrap_or(0), data, offset);
        }
    }

    fn bar_moved(&mut self, mv: BarMove) {
        let vm = self.vm.clone();
        if let Some(b) = self.bars.iter_mut().find(|b| b.guest.index == mv.bar) {
            if let Err(e) = b.moved(&vm, mv.to) {
                tracing::error!(device = %self.name, "moving BAR{} to {:#x}: {e}", mv.bar, mv.to);
            }
        }
    }
}
