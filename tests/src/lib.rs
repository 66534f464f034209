//! Support for baton's integration tests: locating the built binaries and the test guest,
//! running processes against a deadline, and (later) the host-side vhost-user driver.

pub mod bench;
pub mod blk;
pub mod boot;
pub mod dpdk;
pub mod harness;
pub mod hostile;
pub mod linux_guest;
pub mod local_users;
pub mod nested;
pub mod net;
pub mod netns;
pub mod services;
pub mod slowfs;
pub mod udp;
pub mod vhost_user;
