//! The vhost-user back-end framework: one implementation of the vhost-user request handler
//! ([`Frontend`], the vhost crate's `VhostUserBackendReqHandlerMut`) and of the loop serving
//! one front-end connection ([`serve_connection`]), over a device core that outlives its
//! front-ends ([`VhostUserDevice`]).
//!
//! How to use it: a back-end implements [`VhostUserDevice`] for its device core (offered
//! features and protocol features, config space, queue count and size, and the ring
//! operations: [`VhostUserDevice::start_queue`] when the kick fd arrives,
//! [`VhostUserDevice::stop_queue`] at GET_VRING_BASE, [`VhostUserDevice::disconnect`] when the
//! front-end goes) and runs [`serve_frontends`], which accepts front-ends one at a time (peer
//! checked with [`crate::access::SocketPolicy`]) and serves each with [`serve_connection`].
//!
//! Why not vhost-user-backend's `VhostUserDaemon`: its handler keeps an `owned` flag that a
//! disconnect never clears (a second front-end's SET_OWNER is refused), it does not implement
//! GET/SET_INFLIGHT_FD, and its `serve()` handles one connection. Here the negotiation state is
//! per connection ([`Frontend`]) and the device core lives for the whole process.
//!
//! What the framework owns, per connection: SET_OWNER, the acked features (checked against the
//! offer) and protocol features, the memory table (ring addresses are translated to guest
//! addresses before the device sees them), bounds of config-space reads, the refusal of every
//! message nobody offers, the inflight region's lifetime (a device opts in by offering
//! INFLIGHT_SHMFD and implementing [`VhostUserDevice::get_inflight_fd`] and
//! [`VhostUserDevice::set_inflight_fd`]), and the message-order quirk of QEMU 10 (see
//! [`serve_connection`]).

mod accept;
mod handler;
mod serve;

use std::fs::File;
use std::io;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use accept::{ACCEPT_BACKOFF, AcceptError, block_stop_signals, serve_frontends, stop_signals};
pub use handler::Frontend;
pub use serve::{End, serve_connection};

/// The virtio feature bit VHOST_USER_F_PROTOCOL_FEATURES.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;

/// An error for a request the device does not support.
pub fn unsupported(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, what.to_string())
}

/// A device core served over vhost-user: it outlives every front-end connection. Queue indices
/// passed in are below [`VhostUserDevice::num_queues`] (the framework checks them first).
pub trait VhostUserDevice: Send + Sync + std::fmt::Debug {
    /// What keeps a front-end's inflight region alive for as long as its connection lasts
    /// (`()` for a device without INFLIGHT_SHMFD).
    type Inflight: Send + std::fmt::Debug;

    /// The virtio features offered (with [`PROTOCOL_FEATURES`] if protocol features are).
    fn features(&self) -> u64;
    /// The vhost-user protocol features offered.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// How many queues the device has.
    fn num_queues(&self) -> usize;
    /// The largest queue size it accepts.
    fn max_queue_size(&self) -> u16;
    /// The config space.
    fn config(&self) -> Vec<u8>;
    /// A write to the config space (read-only unless overridden).
    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(unsupported("the config space is read-only"))
    }
    /// SET_FEATURES with `features` (already checked against the offer).
    fn set_features(&self, features: u64) -> io::Result<()>;
    /// SET_MEM_TABLE: the guest memory the rings live in from now on.
    fn set_memory(&self, mem: GuestMemoryMmap) -> io::Result<()>;
    /// SET_VRING_NUM (`size` is in 1..=[`VhostUserDevice::max_queue_size`]).
    fn set_queue_size(&self, index: usize, size: u16) -> io::Result<()>;
    /// SET_VRING_ADDR, translated to guest addresses.
    fn set_queue_addr(
        &self,
        index: usize,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    ) -> io::Result<()>;
    /// SET_VRING_BASE.
    fn set_queue_base(&self, index: usize, base: u16) -> io::Result<()>;
    /// SET_VRING_KICK: the ring starts (it runs once also enabled).
    fn start_queue(&self, index: usize, kick: File) -> io::Result<()>;
    /// GET_VRING_BASE: the ring stops; returns where the front-end resumes it (next avail).
    /// Requests the device had taken from the ring are completed first.
    fn stop_queue(&self, index: usize) -> io::Result<u16>;
    /// GET_VRING_BASE from a front-end that negotiated
    /// VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT and set an inflight region: the ring
    /// stops at once, and requests still in flight stay recorded in the region, to be
    /// completed or resubmitted once a front-end restarts the ring (vhost-user spec as
    /// extended by "vhost-user: introduce protocol feature for skip drain on GET_VRING_BASE",
    /// v6 of the series, January 2026, merged for QEMU 11.0; protocol feature bit 20). The
    /// spec lets a back-end drain anyway, which is what this default does.
    fn suspend_queue(&self, index: usize) -> io::Result<u16> {
        self.stop_queue(index)
    }
    /// SET_VRING_CALL (also while the ring runs).
    fn set_queue_call(&self, index: usize, call: Option<File>) -> io::Result<()>;
    /// SET_VRING_ENABLE (and the implicit enable of a front-end without protocol features).
    fn enable_queue(&self, index: usize, enable: bool) -> io::Result<()>;
    /// RESET_DEVICE: stop and reset every ring.
    fn reset(&self);
    /// The front-end went away (or sent RESET_OWNER): stop every ring and forget its memory
    /// and fds; the device keeps its own state for the next one.
    fn disconnect(&self);
    /// GET_INFLIGHT_FD: a new zeroed region for `num_queues` queues of `queue_size` (both
    /// checked against the device). Returns its keeper, its fd and its size.
    fn get_inflight_fd(
        &self,
        _num_queues: u16,
        _queue_size: u16,
    ) -> io::Result<(Self::Inflight, File, u64)> {
        Err(unsupported("INFLIGHT_SHMFD not offered"))
    }
    /// SET_INFLIGHT_FD: the region a previous back-end (or front-end) kept.
    fn set_inflight_fd(
        &self,
        _file: File,
        _offset: u64,
        _size: u64,
        _num_queues: u16,
        _queue_size: u16,
    ) -> io::Result<Self::Inflight> {
        Err(unsupported("INFLIGHT_SHMFD not offered"))
    }
}
