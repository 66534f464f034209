//! The device's counters (logged on SIGUSR1): its frame counters, and its error counters, each
//! a rate-limited log site of the framework's ([`baton_service::ratelimit::ErrorSite`]).

use std::sync::atomic::{AtomicU64, Ordering};

use baton_service::ratelimit::ErrorSite;

/// The error counters of the device.
#[derive(Debug, Default)]
pub struct Stats {
    /// A descriptor chain with a bad address, direction, length or a loop.
    pub bad_chain: ErrorSite,
    /// A frame from the TAP larger than the buffers the guest offered.
    pub rx_too_large: ErrorSite,
    /// A TX virtio-net header with flags or a GSO type that was not negotiated or is unknown.
    pub bad_tx_header: ErrorSite,
    /// A read or write on the TAP failed.
    pub tap_io: ErrorSite,
    /// A bad control-queue command.
    pub bad_ctrl: ErrorSite,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames sent to the TAP.
    pub tx_frames: AtomicU64,
}

impl Stats {
    /// One line with every counter (logged on SIGUSR1).
    pub fn summary(&self) -> String {
        format!(
            "rx_frames={} tx_frames={} bad_chain={} rx_too_large={} bad_tx_header={} tap_io={} bad_ctrl={}",
            self.rx_frames.load(Ordering::Relaxed),
            self.tx_frames.load(Ordering::Relaxed),
            self.bad_chain.total(),
            self.rx_too_large.total(),
            self.bad_tx_header.total(),
            self.tap_io.total(),
            self.bad_ctrl.total(),
        )
    }
}
