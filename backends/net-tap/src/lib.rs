//! baton-net-tap: a vhost-user-net back-end over a TAP device that outlives its front-ends.
//!
//! Layout: [`tap`] opens and configures the TAP queues, [`virtio`] holds the virtio-net wire
//! constants and the negotiated-feature logic, [`datapath`] moves frames between the rings and the
//! TAP, [`device`] is the device core (rings, workers, control queue) that lives for the whole
//! process, [`vhost`] makes it a `baton_service::vhost` device (the framework serves the
//! vhost-user protocol), and [`server`] runs the framework's accept loop (one front-end at a
//! time on the same socket) beside the signal thread. [`stats`] holds the device's counters.
//! [`store`] keeps the TAP queues in the service manager's fd store across restarts.
//! [`seccomp`] lists each thread kind's system calls for the sandbox (`baton_service::sandbox`).

pub mod cli;
pub mod datapath;
pub mod device;
pub mod seccomp;
pub mod server;
pub mod stats;
pub mod store;
pub mod tap;
pub mod vhost;
pub mod virtio;
