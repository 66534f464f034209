//! baton-blk as a library: the modules behind the `baton-blk` binary (`main.rs`), exposed so
//! that the fuzz targets (`fuzz/`, a workspace of its own) can drive request parsing, ring
//! processing and the vhost-user handler in-process. See `main.rs` for the structure.

pub mod chain;
pub mod cli;
pub mod device;
pub mod disk;
pub mod engine;
pub mod handler;
pub mod request;
pub mod seccomp;
pub mod server;
pub mod vring;

/// The inflight region (INFLIGHT_SHMFD), the framework's: re-exported for the fuzz targets.
pub use baton_service::inflight;
