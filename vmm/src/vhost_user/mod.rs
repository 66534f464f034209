//! The vhost-user front-end of one device: connects to a back-end's socket, negotiates, and
//! hands it the rings, kick (ioeventfd) and call (irqfd) eventfds when the guest starts the
//! device. The virtio-pci transport ([`crate::virtio::pci`]) drives it; this module knows
//! nothing of the transport.
//!
//! By job: [`features`] (feature bits and configuration space), `handshake` (connect and
//! reconnect), `rings` (start and stop the rings), [`deadline`] (the watchdog that ends a
//! handshake that stalls), [`error`] (one variant per step, each classified).

pub mod deadline;
pub mod error;
pub mod features;
mod handshake;
mod rings;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use error::{ErrorClass, VhostUserError};
pub use features::{blk, net};

use crate::config::{DeviceConfig, DeviceKind};

/// How long the VMM waits for any one answer of a back-end before giving up on the step.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the incoming VMM of a live update waits for each answer of a back-end it connects
/// to in standby (while the old VMM still runs it); past that it connects at the switch.
pub const STANDBY_TIMEOUT: Duration = Duration::from_millis(100);

/// How long a reconnect keeps retrying a back-end that refuses us.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(3);

/// virtio device type of a network device.
pub const TYPE_NET: u16 = 1;
/// virtio device type of a block device.
pub const TYPE_BLOCK: u16 = 2;

/// A queue as the driver set it up, handed to the back-end when the rings start.
#[derive(Debug)]
pub struct ActiveQueue<'a> {
    /// Queue index.
    pub index: u16,
    /// Ring size.
    pub size: u16,
    /// Descriptor table guest address.
    pub desc: u64,
    /// Available (driver) ring guest address.
    pub avail: u64,
    /// Used (device) ring guest address.
    pub used: u64,
    /// Eventfd the guest's notifications land in (an ioeventfd).
    pub kick: &'a EventFd,
    /// Eventfd that interrupts the guest (an irqfd).
    pub call: &'a EventFd,
}

/// Ring position of a started queue, as GET_VRING_BASE returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingBase {
    /// Queue index.
    pub index: u16,
    /// Next available-ring index the back-end would process.
    pub next_avail: u16,
}

/// A vhost-user back-end: connected while the VM runs, disconnected while its rings are
/// handed over to another VMM (live update).
pub struct VhostUserDevice {
    fe: Option<Frontend>,
    cfg: DeviceConfig,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    offered: u64,
    queue_count: u16,
    config_space: Vec<u8>,
    mem: GuestMemoryMmap,
    inflight: Option<(VhostUserInflight, File)>,
    started: Vec<u16>,
    /// Virtio features the guest acknowledged, as sent with SET_FEATURES.
    acked: u64,
    /// `fe` was connected in standby ([`VhostUserDevice::handed_over`]) and not used yet.
    standby: bool,
}

impl VhostUserDevice {
    /// virtio device type ([`TYPE_NET`] or [`TYPE_BLOCK`]).
    pub fn device_type(&self) -> u16 {
        match self.cfg.kind {
            DeviceKind::Block => TYPE_BLOCK,
            DeviceKind::Net { .. } => TYPE_NET,
        }
    }

    /// Number of queues the guest sees.
    pub fn queue_count(&self) -> u16 {
        self.queue_count
    }

    /// Largest queue size offered.
    pub fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    /// Feature bits offered to the guest.
    pub fn features(&self) -> u64 {
        self.offered
    }

    /// The device's configuration space as the guest sees it.
    pub fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    /// Reads device configuration space.
    pub fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.config_space.get(start + i).copied().unwrap_or(0);
        }
    }

    /// Writes device configuration space: only virtio-blk's writeback byte is writable; it is
    /// passed on to the back-end.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.cfg.kind == DeviceKind::Block
            && self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
        {
            let Ok(off) = u32::try_from(offset) else {
                return;
            };
            let Some(fe) = self.fe.as_mut() else {
                return;
            };
            if let Err(e) = fe.set_config(off, VhostUserConfigFlags::WRITABLE, data) {
                tracing::warn!(socket = %self.cfg.socket.display(), "SET_CONFIG: {e}");
                return;
            }
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            if let Some(dst) = self.config_space.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
    }

    /// Starts the device with the negotiated `features` and `queues`.
    pub fn activate(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
    ) -> Result<(), VhostUserError> {
        self.start_rings(features, queues, &[], true)?;
        tracing::info!(socket = %self.cfg.socket.display(), queues = queues.len(), "device started");
        Ok(())
    }

    /// Lets go of the back-end (live update): it then accepts its next front-end, the new
    /// VMM, or this one again on rollback.
    pub fn release(&mut self) {
        // shutdown() ends the connection even while the monitor thread holds a duplicate of
        // the fd. The inflight region stays: it goes to the new VMM, or back to the back-end
        // on rollback.
        self.started.clear();
        self.hang_up();
    }

    /// Reconnects if needed and configures `queues` at `bases` (one per queue, in order);
    /// the rings are enabled now if `enable`, else by [`VhostUserDevice::enable_rings`].
    pub fn resume(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
        bases: &[u16],
        enable: bool,
    ) -> Result<(), VhostUserError> {
        let standby = std::mem::take(&mut self.standby) && self.fe.is_some();
        if self.fe.is_none() {
            self.reconnect(RECONNECT_WINDOW)?;
        }
        if queues.is_empty() {
            return Ok(());
        }
        match self.start_rings(features, queues, bases, enable) {
            // The standby connection went away meanwhile (the back-end restarted, say):
            // connect again, as without one.
            Err(e) if standby => {
                tracing::warn!(socket = %self.cfg.socket.display(),
                    "the standby connection failed ({e}): reconnecting");
                self.started.clear();
                self.hang_up();
                self.reconnect(RECONNECT_WINDOW)?;
                self.start_rings(features, queues, bases, enable)
            }
            r => r,
        }
    }

    /// One connection attempt with the full handshake (no rings).
    pub fn reconnect_once(&mut self) -> Result<(), VhostUserError> {
        self.reconnect(Duration::ZERO)
    }

    /// The back-end went away (crash, restart): its rings stopped with it. Keep the inflight
    /// region (the next back-end resubmits what it lists) and forget the connection.
    pub fn lost(&mut self) {
        self.started.clear();
        self.hang_up();
    }

    /// The inflight region shared with the back-end, if any.
    pub fn inflight(&self) -> Option<(VhostUserInflight, &File)> {
        self.inflight.as_ref().map(|(i, f)| (*i, f))
    }

    /// Adopts an inflight region (received from the previous VMM).
    pub fn set_inflight(&mut self, info: VhostUserInflight, file: File) {
        self.inflight = Some((info, file));
    }

    /// Whether GET_VRING_BASE suspends the rings instead of draining them: the back-end
    /// negotiated VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT and has an inflight region to
    /// record the requests left in flight in (they go to the next front-end with the region).
    pub fn suspends(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT)
            && self.inflight.is_some()
    }

    /// Features acknowledged to the back-end.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Negotiated protocol features.
    pub fn protocol_features(&self) -> u64 {
        self.protocol.bits()
    }

    /// The back-end's socket.
    pub fn socket(&self) -> &Path {
        &self.cfg.socket
    }

    /// How long to keep reconnecting after the back-end went away (`None`: forever).
    pub fn reconnect_limit(&self) -> Option<Duration> {
        self.cfg.reconnect_limit
    }

    /// A duplicate of the back-end connection's fd, to watch for a hang-up.
    pub fn watch_fd(&self) -> Option<std::os::fd::OwnedFd> {
        let fe = self.fe.as_ref()?;
        // SAFETY: the fd is the Frontend's open socket; BorrowedFd lives only for this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fe.as_raw_fd()) };
        fd.try_clone_to_owned().ok()
    }

    /// Ends the connection (if any) at once, whoever else holds the fd.
    fn hang_up(&mut self) {
        if let Some(fe) = self.fe.take() {
            // SAFETY: shutdown(2) on the Frontend's own open socket fd.
            unsafe { libc::shutdown(fe.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    fn fe(&mut self) -> Result<&mut Frontend, VhostUserError> {
        match self.fe.as_mut() {
            Some(fe) => Ok(fe),
            None => Err(VhostUserError::NotConnected(self.cfg.socket.clone())),
        }
    }
}
