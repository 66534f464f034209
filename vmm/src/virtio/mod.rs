//! virtio devices: the modern virtio-pci transport ([`pci`]) in front of a device back-end
//! ([`VirtioBackend`]), which for baton is always a vhost-user connection.

pub mod common;
pub mod drain;
pub mod pci;

use vmm_sys_util::eventfd::EventFd;

/// Feature bit: virtio 1.0 or later.
pub const F_VERSION_1: u64 = 1 << 32;
/// Feature bit: indirect descriptors.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// Feature bit: used/avail event index.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
/// Transport features baton passes through from a back-end to the guest.
pub const TRANSPORT_FEATURES: u64 = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX;

/// Device status bits.
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// Guest has a driver.
    pub const DRIVER: u8 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u8 = 8;
    /// Device hit an error; the driver must reset it.
    pub const NEEDS_RESET: u8 = 0x40;
    /// Driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// A queue as the driver set it up, handed to the back-end at DRIVER_OK.
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

/// What the transport needs from a device back-end.
pub trait VirtioBackend: Send {
    /// virtio device type (1 = net, 2 = block).
    fn device_type(&self) -> u16;
    /// Number of queues the guest sees.
    fn queue_count(&self) -> u16;
    /// Largest queue size offered.
    fn max_queue_size(&self) -> u16;
    /// Feature bits offered to the guest.
    fn features(&self) -> u64;
    /// Reads device configuration space.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the negotiated `features` and `queues`.
    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), String>;
    /// Stops the device (guest-driven reset).
    fn reset(&mut self);
    /// Stops every started ring (live update) and adds where each stopped to `bases`, also
    /// those stopped before a failure. The back-end may still complete requests it had taken
    /// (see [`drain`]); the connection stays until [`VirtioBackend::release`].
    fn stop_rings(&mut self, bases: &mut Vec<crate::vhost_user::RingBase>) -> Result<(), String>;
    /// Lets go of the back-end (live update): it then accepts its next front-end, the new
    /// VMM, or this one again on rollback.
    fn release(&mut self);
    /// Reconnects if needed and configures `queues` at `bases` (one per queue, in order);
    /// the rings are enabled now if `enable`, else by [`VirtioBackend::enable_rings`].
    fn resume(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
        bases: &[u16],
        enable: bool,
    ) -> Result<(), String>;
    /// Enables every configured ring.
    fn enable_rings(&mut self) -> Result<(), String>;
    /// The inflight region shared with the back-end, if any.
    fn inflight(
        &self,
    ) -> Option<(
        vhost::vhost_user::message::VhostUserInflight,
        &std::fs::File,
    )>;
    /// Adopts an inflight region (received from the previous VMM).
    fn set_inflight(
        &mut self,
        info: vhost::vhost_user::message::VhostUserInflight,
        file: std::fs::File,
    );
    /// A duplicate of the back-end connection's fd, to watch for a hang-up.
    fn watch_fd(&self) -> Option<std::os::fd::OwnedFd>;
    /// The back-end went away (crash, restart): drop the connection, keep what survives.
    fn lost(&mut self);
    /// One connection attempt with the full handshake (no rings).
    fn reconnect_once(&mut self) -> Result<(), String>;
    /// Features acknowledged to the back-end.
    fn acked_features(&self) -> u64;
    /// Negotiated protocol features.
    fn protocol_features(&self) -> u64;
    /// The back-end's socket.
    fn socket(&self) -> &std::path::Path;
    /// How long to keep reconnecting after the back-end went away (`None`: forever).
    fn reconnect_limit(&self) -> Option<std::time::Duration>;
}
