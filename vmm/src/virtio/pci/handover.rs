//! The parts of a virtio-pci device that outlive one back-end connection or one VMM: its
//! state for a live update (save, restore, suspend, resume) and the back-end restart path
//! (watch, lost, reconnect).

use std::time::{Duration, Instant};

use baton_protocol::api::{BackendState, DeviceInfo};
use baton_protocol::state::{Blob, InflightState, PciDeviceState, VirtioPciState};
use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{DeviceError, VirtioPciDevice, enabled_queues, status};
use crate::vhost_user::{ErrorClass, RingBase, TYPE_BLOCK, VhostUserDevice, VhostUserError};
use crate::virtio::drain::{self, DRAIN_TIMEOUT, DrainError, RunningRing, StoppedRing};

/// What [`VirtioPciDevice::suspend`] leaves behind.
#[derive(Debug)]
pub struct Suspended {
    /// Where each stopped ring stopped, also when a later step failed: a rollback restarts
    /// the rings there.
    pub bases: Vec<RingBase>,
    /// How long the back-end took to complete the requests it had taken when its rings
    /// stopped, or why the device cannot be handed over.
    pub outcome: Result<Duration, SuspendError>,
    /// The rings stopped without draining: what they had in flight is in the inflight region.
    pub without_drain: bool,
}

/// Why a device cannot be handed over to another VMM.
#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    /// GET_VRING_BASE failed.
    #[error(transparent)]
    StopRings(VhostUserError),
    /// Requests taken before the rings stopped did not complete, or cannot be accounted for.
    #[error(transparent)]
    Drain(#[from] DrainError),
}

/// The guest's used index of queue `index`, whose used ring is at `used`.
fn used_index(mem: &GuestMemoryMmap, index: u16, used: u64) -> Result<u16, DeviceError> {
    mem.read_obj::<u16>(GuestAddress(used + 2))
        .map_err(|source| DeviceError::UsedIndex { index, source })
}

impl VirtioPciDevice {
    /// The transport state for a live update: PCI config, MSI-X, virtio registers.
    pub fn save(&self, slot: u8) -> (PciDeviceState, VirtioPciState) {
        let pci = PciDeviceState {
            slot,
            config: Blob(self.config.bytes(0, 256).to_vec()),
            bar_base: self.bar_base,
            msix: self.msix.save(),
        };
        (pci, self.common.save())
    }

    /// Loads transport state saved by another VMM; routes and irqfds follow it.
    pub fn restore(&mut self, pci: &PciDeviceState, virtio: &VirtioPciState) {
        self.config.set_bytes(0, pci.config.as_bytes());
        self.msix.restore(&pci.msix);
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

    /// Stops the back-end's rings, waits until the requests it had taken have completed, and
    /// disconnects from it (live update; the vCPUs are paused). See [`drain`] for why.
    ///
    /// A back-end that negotiated GET_VRING_BASE_INFLIGHT ([`VhostUserDevice::suspends`])
    /// is not waited for: its rings stop at once, and the requests it had taken stay in the
    /// inflight region, which goes to the next front-end. What it recorded is checked first
    /// (at least every request between the used index and the base must be marked); a
    /// back-end that did not record them is waited for as one that drains.
    ///
    /// [`VhostUserDevice::suspends`]: crate::vhost_user::VhostUserDevice::suspends
    pub fn suspend(&mut self) -> Suspended {
        let since = Instant::now();
        let suspends = self.activated && self.backend.suspends();
        let idle_wait = if self.activated && !suspends && self.backend.device_type() == TYPE_BLOCK {
            self.wait_idle(since)
        } else {
            Duration::ZERO
        };
        self.activated = false;
        self.backend_state = BackendState::HandedOver;
        let mut bases = Vec::new();
        let mut without_drain = false;
        let outcome = match self.backend.stop_rings(&mut bases) {
            Err(e) => Err(SuspendError::StopRings(e)),
            Ok(()) if suspends && self.recorded_inflight(&bases) => {
                without_drain = true;
                Ok(Duration::ZERO)
            }
            // Not recorded: wait as for a back-end that drains. One that does neither loses
            // them; the rollback cannot take them from the ring again, since completions come
            // out of order: the used index does not say which requests are missing.
            Ok(()) => self.wait_used(&bases, since).map_err(SuspendError::from),
        };
        // Hang up even if the guest has not started the device yet, and even if requests
        // are missing: the back-end serves one front-end at a time, and the next one is the
        // new VMM, or this one again on rollback.
        self.backend.release();
        let outcome = outcome.map(|used_wait| {
            let waited = idle_wait + used_wait;
            if !waited.is_zero() {
                let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
                tracing::info!(device = %self.name, socket = %self.backend.socket().display(),
                    idle_wait_us = us(idle_wait), used_wait_us = us(used_wait),
                    "waited for the back-end to complete requests in flight");
            }
            waited
        });
        Suspended {
            bases,
            outcome,
            without_drain,
        }
    }

    /// Whether the inflight region marks, for every stopped ring, at least as many requests
    /// as lie between its used index and its base (the ones a suspended ring left in flight).
    fn recorded_inflight(&self, bases: &[RingBase]) -> bool {
        let Some((info, file)) = self.backend.inflight() else {
            return false;
        };
        bases.iter().all(|b| {
            let Some(q) = self.common.queues.get(usize::from(b.index)) else {
                return false;
            };
            let Ok(used) = used_index(&self.mem, b.index, q.used) else {
                return false;
            };
            let in_flight = usize::from(b.next_avail.wrapping_sub(used));
            let recorded = baton_service::inflight::count_inflight(
                file,
                info.mmap_offset,
                info.queue_size,
                b.index,
            );
            match recorded {
                Ok(n) if n >= in_flight => {
                    if in_flight > 0 {
                        tracing::info!(device = %self.name, ring = b.index, in_flight,
                            "ring suspended with requests in flight: they go over in the inflight region");
                    }
                    true
                }
                r => {
                    tracing::warn!(device = %self.name, socket = %self.backend.socket().display(),
                        ring = b.index, in_flight, recorded = ?r,
                        "the back-end suspended the ring without recording its requests in flight: waiting for them instead");
                    false
                }
            }
        })
    }

    /// Kicks every enabled ring once, then waits until the back-end has completed every
    /// request the guest made available ([`drain::wait_idle`]). The kick takes in a request
    /// that the guest made available just before the pause without notifying yet; an extra
    /// kick is harmless.
    fn wait_idle(&self, since: Instant) -> Duration {
        let mut rings = Vec::new();
        for (i, q) in self.common.queues.iter().enumerate() {
            let (true, Ok(index), Some(kick)) = (q.enabled, u16::try_from(i), self.kicks.get(i))
            else {
                continue;
            };
            let _ = kick.write(1);
            rings.push(RunningRing {
                index,
                size: q.size,
                avail_addr: q.avail,
                used_addr: q.used,
            });
        }
        drain::wait_idle(
            &self.mem,
            self.backend.socket(),
            &rings,
            since,
            DRAIN_TIMEOUT,
        )
    }

    /// Waits until the used index of every stopped ring has reached its base: a back-end
    /// that follows the specification may complete the requests it had taken after it
    /// answered GET_VRING_BASE (see [`drain`]).
    fn wait_used(&self, bases: &[RingBase], since: Instant) -> Result<Duration, DrainError> {
        let rings: Vec<StoppedRing> = bases
            .iter()
            .filter_map(|b| {
                let q = self.common.queues.get(usize::from(b.index))?;
                Some(StoppedRing {
                    index: b.index,
                    size: q.size,
                    used_addr: q.used,
                    base: b.next_avail,
                })
            })
            .collect();
        drain::wait_used(
            &self.mem,
            self.backend.socket(),
            &rings,
            since,
            DRAIN_TIMEOUT,
        )
    }

    /// Reconnects the back-end and configures the guest's rings at `bases`. With `enable` the
    /// rings start now (see [`VirtioPciDevice::enable_rings`]); without, they wait for it.
    pub fn resume(&mut self, bases: &[RingBase], enable: bool) -> Result<(), DeviceError> {
        let mem = &self.mem;
        let (active, starts) = if self.running() {
            enabled_queues(&self.common.queues, &self.kicks, &self.calls, |i, q| {
                match bases.iter().find(|b| b.index == i) {
                    Some(b) => Ok(b.next_avail),
                    // A ring whose GET_VRING_BASE failed restarts where the used ring says, as
                    // after a back-end crash.
                    None => used_index(mem, i, q.used),
                }
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
    pub fn enable_rings(&mut self) -> Result<(), VhostUserError> {
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

    /// After a failed [`VirtioPciDevice::resume`] whose error is worth retrying (not
    /// [`ErrorClass::Fatal`]): the back-end watcher takes the device over and reconnects as
    /// after a crash, restarting the guest's rings where its used rings say.
    pub fn await_backend(&mut self, cause: &DeviceError) {
        debug_assert_ne!(cause.class(), ErrorClass::Fatal);
        tracing::warn!(device = %self.name, socket = %self.backend.socket().display(),
            "vhost-user back-end not back yet ({cause}); reconnecting in the background");
        self.backend.lost();
        self.activated = self.running();
        self.backend_state = BackendState::Reconnecting;
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
    pub fn try_reconnect(&mut self) -> Result<(), DeviceError> {
        self.backend.reconnect_once()?;
        let mem = &self.mem;
        let (active, starts) = if self.activated {
            enabled_queues(&self.common.queues, &self.kicks, &self.calls, |i, q| {
                used_index(mem, i, q.used)
            })?
        } else {
            (Vec::new(), Vec::new())
        };
        if let Err(e) = self
            .backend
            .resume(self.common.driver_features, &active, &starts, true)
        {
            self.backend.lost();
            return Err(e.into());
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
    pub fn backend(&self) -> &VhostUserDevice {
        &self.backend
    }
}
