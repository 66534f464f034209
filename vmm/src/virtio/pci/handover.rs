//! The parts of a virtio-pci device that outlive one back-end connection or one VMM: its
//! state for a live update (save, restore, suspend, resume) and the back-end restart path
//! (watch, lost, reconnect).

use baton_protocol::api::{BackendState, DeviceInfo};
use baton_protocol::state::{
    Blob, InflightState, MsixEntryState, MsixState, PciDeviceState, VirtioPciState,
};
use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::{Bytes, GuestAddress};

use super::{VirtioBackend, VirtioPciDevice, enabled_queues, msix, status};
use crate::vhost_user::RingBase;

impl VirtioPciDevice {
    /// The transport state for a live update: PCI config, MSI-X, virtio registers.
    pub fn save(&self, slot: u8) -> (PciDeviceState, VirtioPciState) {
        let pci = PciDeviceState {
            slot,
            config: Blob(self.config.bytes(0, 256).to_vec()),
            bar_base: self.bar_base,
            msix: MsixState {
                table: self
                    .msix
                    .table
                    .iter()
                    .map(|e| MsixEntryState {
                        addr_lo: e.addr_lo,
                        addr_hi: e.addr_hi,
                        data: e.data,
                        control: e.control,
                    })
                    .collect(),
                pba: self.msix.pba.clone(),
                control: self.msix.control,
            },
        };
        (pci, self.common.save())
    }

    /// Loads transport state saved by another VMM; routes and irqfds follow it.
    pub fn restore(&mut self, pci: &PciDeviceState, virtio: &VirtioPciState) {
        self.config.set_bytes(0, pci.config.as_bytes());
        for (e, s) in self.msix.table.iter_mut().zip(&pci.msix.table) {
            *e = msix::MsixEntry {
                addr_lo: s.addr_lo,
                addr_hi: s.addr_hi,
                data: s.data,
                control: s.control,
            };
        }
        self.msix.control = pci.msix.control;
        self.common.restore(virtio);
        for slot in 0..self.registered.len() {
            self.rewire(slot);
        }
        let n = u16::try_from(self.msix.table.len()).unwrap_or(0);
        self.update_routes(0..n);
    }

    /// Whether the guest has the device running (DRIVER_OK without NEEDS_RESET).
    pub fn running(&self) -> bool {
        self.common.status & status::DRIVER_OK != 0 && self.common.status & status::NEEDS_RESET == 0
    }

    /// Stops the back-end's rings and disconnects from it (live update).
    pub fn suspend(&mut self) -> Result<Vec<RingBase>, String> {
        // Hang up even if the guest has not started the device yet: the back-end serves one
        // front-end at a time, and the next one is the new VMM.
        self.activated = false;
        self.backend_state = BackendState::HandedOver;
        self.backend.suspend()
    }

    /// Reconnects the back-end and configures the guest's rings at `bases`. With `enable` the
    /// rings start now (see [`VirtioPciDevice::enable_rings`]); without, they wait for it.
    pub fn resume(&mut self, bases: &[RingBase], enable: bool) -> Result<(), String> {
        let (active, starts) = if self.running() {
            enabled_queues(&self.common.queues, &self.kicks, &self.calls, |i, _| {
                Ok(bases
                    .iter()
                    .find(|b| b.index == i)
                    .map_or(0, |b| b.next_avail))
            })?
        } else {
            (Vec::new(), Vec::new())
        };
        self.backend
            .resume(self.common.driver_features, &active, &starts, enable)?;
        self.activated = !active.is_empty();
        self.backend_state = BackendState::Connected;
        self.generation += 1;
        if enable {
            self.signal_queues();
        }
        Ok(())
    }

    /// Enables the configured rings and interrupts the guest once per ring: a spurious
    /// interrupt is harmless, a lost one is not.
    pub fn enable_rings(&mut self) -> Result<(), String> {
        if !self.activated {
            return Ok(());
        }
        self.backend.enable_rings()?;
        self.signal_queues();
        Ok(())
    }

    fn signal_queues(&self) {
        for (q, call) in self.common.queues.iter().zip(&self.calls) {
            if q.enabled {
                let _ = call.write(1);
            }
        }
    }

    /// The inflight region description, if the back-end uses one.
    pub fn inflight(&self) -> Option<VhostUserInflight> {
        self.backend.inflight().map(|(i, _)| i)
    }

    /// The inflight region's file (for the cpr channel).
    pub fn inflight_file(&self) -> Option<&std::fs::File> {
        self.backend.inflight().map(|(_, f)| f)
    }

    /// Adopts the inflight region of the previous VMM.
    pub fn set_inflight(&mut self, s: &InflightState, file: std::fs::File) {
        self.backend.set_inflight(
            VhostUserInflight {
                mmap_size: s.mmap_size,
                mmap_offset: s.mmap_offset,
                num_queues: s.num_queues,
                queue_size: s.queue_size,
            },
            file,
        );
    }

    /// What `vm.info` says about this device.
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.name.clone(),
            socket: self.backend.socket().display().to_string(),
            backend: self.backend_state,
            started: self.activated,
            reconnects: self.reconnects,
        }
    }

    /// A duplicate of the back-end socket to watch for a hang-up, and the connection's
    /// generation; `None` while not connected.
    pub fn watch(&self) -> Option<(std::os::fd::OwnedFd, u64)> {
        if self.backend_state != BackendState::Connected {
            return None;
        }
        self.backend.watch_fd().map(|fd| (fd, self.generation))
    }

    /// The connection of `generation` hung up. Unless it was meant (live update) or already
    /// replaced, the device goes to "reconnecting". Returns whether it did.
    pub fn backend_lost(&mut self, generation: u64) -> bool {
        if generation != self.generation || self.backend_state != BackendState::Connected {
            return false;
        }
        tracing::warn!(device = %self.name, socket = %self.backend.socket().display(),
            "vhost-user back-end went away; reconnecting");
        self.backend.lost();
        self.backend_state = BackendState::Reconnecting;
        true
    }

    /// How long to keep reconnecting (`None`: forever).
    pub fn reconnect_limit(&self) -> Option<std::time::Duration> {
        self.backend.reconnect_limit()
    }

    /// Stops waiting for the back-end: the device goes to NEEDS_RESET.
    pub fn give_up(&mut self) {
        tracing::error!(device = %self.name, socket = %self.backend.socket().display(),
            "vhost-user back-end did not come back in time; device needs reset");
        self.backend_state = BackendState::Failed;
        self.needs_reset();
    }

    /// Whether the device waits for its back-end to come back.
    pub fn reconnecting(&self) -> bool {
        self.backend_state == BackendState::Reconnecting
    }

    /// One reconnect attempt: the whole handshake, then the rings restart where the guest's
    /// used rings say the dead back-end stopped (a back-end with an inflight region
    /// resubmits the requests it had taken and not completed). Every ring is kicked and
    /// every vector signalled once.
    pub fn try_reconnect(&mut self) -> Result<(), String> {
        self.backend.reconnect_once()?;
        let mem = &self.mem;
        let (active, starts) = if self.activated {
            enabled_queues(&self.common.queues, &self.kicks, &self.calls, |i, q| {
                mem.read_obj::<u16>(GuestAddress(q.used + 2))
                    .map_err(|e| format!("reading the used index of queue {i}: {e}"))
            })?
        } else {
            (Vec::new(), Vec::new())
        };
        if let Err(e) = self
            .backend
            .resume(self.common.driver_features, &active, &starts, true)
        {
            self.backend.lost();
            return Err(e);
        }
        for q in &active {
            let _ = q.kick.write(1);
        }
        self.signal_queues();
        self.backend_state = BackendState::Connected;
        self.generation += 1;
        self.reconnects += 1;
        tracing::info!(device = %self.name, reconnects = self.reconnects,
            "vhost-user back-end reconnected; rings restored");
        Ok(())
    }

    /// The back-end's negotiated features and socket, for the state stream.
    pub fn backend(&self) -> &dyn VirtioBackend {
        self.backend.as_ref()
    }
}
