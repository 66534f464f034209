//! Host-side vhost-user driver: a vhost-user front-end and a virtio driver in one process,
//! over shared memfd memory. It connects to any vhost-user back-end (baton-blk,
//! qemu-storage-daemon, ...), negotiates, fills split rings, kicks and reaps completions.
//!
//! - [`memory::SharedMemory`]: the "guest" RAM (a memfd mapped here and sent to the back-end),
//!   with a bump allocator for rings and buffers. Guest physical address = offset in the memfd.
//! - [`virtq::SplitQueue`]: one split virtqueue (descriptor table, avail and used rings, kick
//!   and call eventfds). `add_chain` builds well-formed chains; `alloc_descs` + `write_desc` +
//!   `publish` build arbitrary (hostile) ones.
//! - [`frontend::Connection`]: the vhost-user control path (feature and protocol negotiation
//!   with REPLY_ACK, SET_MEM_TABLE, ring setup, GET_VRING_BASE, config, inflight fd).
//! - [`blk`]: a virtio-blk driver on top (requests, slots, synchronous helpers, queues that can
//!   be moved to threads). A `net` module can reuse the first three the same way.

pub mod blk;
pub mod frontend;
pub mod memory;
pub mod net;
pub mod virtq;

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A vhost-user request failed.
    #[error("vhost-user {step} failed: {source}")]
    Vhost {
        /// Which step.
        step: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// Guest memory set-up or access failed.
    #[error("shared memory: {0}")]
    Memory(String),
    /// Out of shared memory, descriptors or slots.
    #[error("out of {0}")]
    Exhausted(&'static str),
    /// The back-end did not complete in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// System call failure.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of the driver.
pub type Result<T> = std::result::Result<T, DriverError>;

pub(crate) fn vh<T>(step: &'static str, r: std::result::Result<T, vhost::Error>) -> Result<T> {
    r.map_err(|source| DriverError::Vhost { step, source })
}
