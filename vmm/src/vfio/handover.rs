//! A live update with passed-through devices. The devices are never closed, reset or
//! reprogrammed; what moves is who holds them:
//!
//! 1. With the prepare, while the guest runs: the container, group and device fds and every
//!    vector's eventfd go to the new VMM on the cpr channel ([`Passthrough::fds`]); it builds
//!    its device models over them ([`Received`]), mapping the BARs into its own VM, but leaves
//!    the eventfds alone: they are still the old VM's irqfds.
//! 2. After the pause, on the old side ([`Passthrough::detach_interrupts`],
//!    [`Passthrough::release_ram`]): the eventfds of the vectors that can deliver stop being
//!    irqfds (an interrupt the device raises now stays counted in its eventfd) and the DMA
//!    mappings lose the old process's addresses (`VFIO_DMA_UNMAP_FLAG_VADDR`: the IOMMU
//!    mappings and the pinned pages stay, and the device keeps doing DMA).
//! 3. On the new side, before it reports ready ([`Passthrough::restore`]): the guest's view
//!    (configuration space, BAR addresses, MSI-X table) from the state, the mappings take the
//!    new process's addresses of the same RAM file (`VFIO_DMA_MAP_FLAG_VADDR`), and the
//!    eventfds become this VM's irqfds: KVM delivers at once an interrupt counted meanwhile.
//! 4. On rollback the old VMM does 3 with its own state ([`Passthrough::reclaim`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use baton_protocol::cpr;
use baton_protocol::state::passthrough::{
    CONTAINER_FD, device_fd_name, group_fd_name, vector_fd_name,
};
use baton_protocol::state::{Blob, PassthroughConfigState, PassthroughState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device::VfioPciDevice;
use super::{Passthrough, VfioError};

/// The fds of another VMM's passed-through devices, received on the cpr channel.
pub struct Received {
    /// The container.
    pub container: OwnedFd,
    /// Each group, with its number.
    pub groups: Vec<(u32, OwnedFd)>,
    /// Each device, in configuration order, with its vectors' eventfds in vector order.
    pub devices: Vec<(OwnedFd, Vec<OwnedFd>)>,
}

impl Received {
    /// Takes the fds of the functions of `config` out of `fds`.
    pub fn take(
        fds: &mut Vec<(String, OwnedFd)>,
        config: &[PassthroughConfigState],
    ) -> Result<Self, VfioError> {
        fn take(fds: &mut Vec<(String, OwnedFd)>, name: &str) -> Result<OwnedFd, VfioError> {
            cpr::take_fd(fds, name)
                .ok_or_else(|| VfioError::Handover(format!("no fd {name:?} on the cpr channel")))
        }
        let container = take(fds, CONTAINER_FD)?;
        let mut groups: Vec<(u32, OwnedFd)> = Vec::new();
        let mut devices = Vec::new();
        for (i, p) in config.iter().enumerate() {
            if !groups.iter().any(|(g, _)| *g == p.group) {
                groups.push((p.group, take(fds, &group_fd_name(p.group))?));
            }
            let dev = take(fds, &device_fd_name(i))?;
            let mut vectors = Vec::new();
            while let Ok(v) = u16::try_from(vectors.len()) {
                match cpr::take_fd(fds, &vector_fd_name(i, v)) {
                    Some(fd) => vectors.push(fd),
                    None => break,
                }
            }
            devices.push((dev, vectors));
        }
        Ok(Received {
            container,
            groups,
            devices,
        })
    }
}

/// An eventfd received from another process.
pub(super) fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: `fd` is an eventfd (VFIO signals it) that we own; EventFd takes it over.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

impl Passthrough {
    /// Whether the devices can go to a new VMM: the kernel must let DMA mappings change
    /// process (`VFIO_UPDATE_VADDR`). Checked before anything is sent.
    pub fn can_hand_over(&self) -> bool {
        self.container
            .as_ref()
            .is_none_or(super::Container::can_hand_over)
    }

    /// Every fd the new VMM needs, named for the cpr channel (duplicates: this VMM keeps
    /// its own until it exits).
    pub fn fds(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        let Some(c) = &self.container else {
            return Ok(Vec::new());
        };
        let mut out = c.fds()?;
        for (i, (_, d)) in self.devices.iter().enumerate() {
            let d = d.lock().unwrap_or_else(|e| e.into_inner());
            out.push((device_fd_name(i), d.dev.as_fd().try_clone_to_owned()?));
            for (v, evt) in d.vectors.iter().enumerate() {
                let v = u16::try_from(v).unwrap_or(u16::MAX);
                // SAFETY: the eventfd is open (owned by the device model) for the borrow.
                let fd = unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) };
                out.push((vector_fd_name(i, v), fd.try_clone_to_owned()?));
            }
        }
        Ok(out)
    }

    /// Old side, after the pause: interrupts stop reaching this VM; they wait in their
    /// eventfds.
    pub fn detach_interrupts(&self) {
        for (_, d) in &self.devices {
            d.lock().unwrap_or_else(|e| e.into_inner()).detach_irqfds();
        }
    }

    /// Old side, after the pause: the DMA mappings lose this process's addresses.
    pub fn release_ram(&self, mem: &GuestMemoryMmap) -> Result<(), VfioError> {
        match &self.container {
            Some(c) => c.release_ram(mem),
            None => Ok(()),
        }
    }

    /// The guest's view of each device, for the state.
    pub fn save(&self) -> Vec<PassthroughState> {
        self.devices
            .iter()
            .map(|(slot, d)| d.lock().unwrap_or_else(|e| e.into_inner()).save(*slot))
            .collect()
    }

    /// New side, before ready: the guest's view from `state`, then [`Passthrough::reclaim`].
    pub fn restore(
        &self,
        state: &[PassthroughState],
        mem: &GuestMemoryMmap,
    ) -> Result<(), VfioError> {
        if state.len() != self.devices.len() {
            return Err(VfioError::Handover(format!(
                "state for {} passed-through functions, {} configured",
                state.len(),
                self.devices.len()
            )));
        }
        for ((_, d), s) in self.devices.iter().zip(state) {
            d.lock().unwrap_or_else(|e| e.into_inner()).restore(s)?;
        }
        self.reclaim(mem)
    }

    /// The DMA mappings take this process's addresses of guest RAM and the vectors' eventfds
    /// become this VM's irqfds again (new side before ready; old side on rollback).
    pub fn reclaim(&self, mem: &GuestMemoryMmap) -> Result<(), VfioError> {
        if let Some(c) = &self.container {
            c.claim_ram(mem)?;
        }
        for (_, d) in &self.devices {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .attach_irqfds()?;
        }
        Ok(())
    }
}

impl VfioPciDevice {
    /// Makes the vectors' eventfds KVM irqfds of this VM and installs their routes; KVM
    /// delivers an interrupt an eventfd counted while it was not one.
    pub(super) fn attach_irqfds(&mut self) -> Result<(), VfioError> {
        for (v, evt) in self.vectors.iter().enumerate() {
            if self.irqfds[v] {
                continue;
            }
            let gsi = self.gsi_base + u32::try_from(v).unwrap_or(0);
            self.vm
                .register_irqfd(evt, gsi)
                .map_err(|e| VfioError::EventFd(std::io::Error::from_raw_os_error(e.errno())))?;
            self.irqfds[v] = true;
        }
        for v in 0..self.msix_cap.vectors {
            if let Err(e) = self
                .irq
                .set_msi(self.gsi_base + u32::from(v), self.msix.message(v))
            {
                tracing::warn!(device = %self.name, "vector {v}: {e}");
            }
        }
        Ok(())
    }

    /// The eventfds of the vectors that can deliver an interrupt (MSI-X on, vector unmasked)
    /// stop being irqfds of this VM, so that what the device raises waits in them. The
    /// others keep theirs: an interrupt on a masked vector has no route and is not delivered
    /// in any case (the unmask sends one, see `update_routes`), and each irqfd removed costs
    /// KVM an SRCU grace period, which a device with many vectors would add to the blackout.
    fn detach_irqfds(&mut self) {
        for v in 0..self.msix_cap.vectors {
            let i = usize::from(v);
            if !self.irqfds[i] || !self.msix_on_device || self.msix.message(v).is_none() {
                continue;
            }
            let gsi = self.gsi_base + u32::from(v);
            if let Err(e) = self.vm.unregister_irqfd(&self.vectors[i], gsi) {
                tracing::warn!(device = %self.name, "vector {v}: removing its irqfd: {e}");
            }
            self.irqfds[i] = false;
        }
    }

    /// The guest's view of the device.
    fn save(&self, slot: u8) -> PassthroughState {
        PassthroughState {
            slot,
            config: Blob(self.config.space().bytes(0, 256).to_vec()),
            bars: self.bars.iter().map(|b| b.guest.addr).collect(),
            msix: self.msix.save(),
            msix_on_device: self.msix_on_device,
        }
    }

    /// Takes the guest's view saved by another VMM: configuration space, BAR placement
    /// (mapped BARs move their KVM slots), MSI-X table. The device itself is not touched.
    fn restore(&mut self, s: &PassthroughState) -> Result<(), VfioError> {
        let bad = |what: &str| VfioError::Handover(format!("{}: {what}", self.name));
        if s.bars.len() != self.bars.len() {
            return Err(bad("BAR count differs"));
        }
        if s.msix.table.len() != self.msix.table.len() {
            return Err(bad("MSI-X table size differs"));
        }
        self.config.restore(s.config.as_bytes());
        let vm = self.vm.clone();
        for (b, &addr) in self.bars.iter_mut().zip(&s.bars) {
            if b.guest.addr != addr {
                b.moved(&vm, addr).map_err(|e| {
                    VfioError::MapBar(b.guest.index, std::io::Error::from_raw_os_error(e.errno()))
                })?;
            }
        }
        self.msix.restore(&s.msix);
        self.msix_on_device = s.msix_on_device;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
    }

    fn config(groups: &[u32]) -> Vec<PassthroughConfigState> {
        groups
            .iter()
            .enumerate()
            .map(|(i, &group)| PassthroughConfigState {
                path: format!("/sys/bus/pci/devices/0000:00:0{i}.0").into(),
                group,
            })
            .collect()
    }

    #[test]
    fn received_fds_are_paired_with_their_devices_by_name() {
        // Two functions sharing group 5; the first has 3 vectors, the second 1.
        let mut fds: Vec<(String, OwnedFd)> = [
            vector_fd_name(0, 2),
            CONTAINER_FD.to_string(),
            device_fd_name(1),
            vector_fd_name(0, 0),
            group_fd_name(5),
            device_fd_name(0),
            vector_fd_name(1, 0),
            vector_fd_name(0, 1),
        ]
        .into_iter()
        .map(|n| (n, fd()))
        .collect();
        let r = Received::take(&mut fds, &config(&[5, 5])).unwrap();
        assert!(fds.is_empty());
        assert_eq!(r.groups.len(), 1);
        assert_eq!(r.groups[0].0, 5);
        let vectors: Vec<usize> = r.devices.iter().map(|(_, v)| v.len()).collect();
        assert_eq!(vectors, [3, 1]);
    }

    #[test]
    fn a_missing_fd_is_an_error_naming_it() {
        let mut fds = vec![(CONTAINER_FD.to_string(), fd()), (group_fd_name(5), fd())];
        match Received::take(&mut fds, &config(&[5])) {
            Err(VfioError::Handover(m)) => assert!(m.contains("vfio-device-0"), "{m}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("taken without a device fd"),
        }
        let mut fds = vec![(group_fd_name(5), fd())];
        assert!(Received::take(&mut fds, &config(&[5])).is_err());
    }
}
