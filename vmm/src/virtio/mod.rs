//! virtio devices: the modern virtio-pci transport ([`pci`]) in front of a vhost-user
//! back-end ([`crate::vhost_user::VhostUserDevice`]). The dependency points one way: the
//! transport drives the back-end, which knows nothing of the transport.

pub mod common;
pub mod drain;
pub mod pci;

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
