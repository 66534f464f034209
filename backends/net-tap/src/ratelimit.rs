//! Error counters and rate-limited logging for errors that a guest or peer can trigger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// One counted, rate-limited error site: every occurrence is counted; at most one log line per
/// second is written, carrying the total and how many occurrences were not logged.
#[derive(Debug, Default)]
pub struct ErrorSite {
    total: AtomicU64,
    last_log_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl ErrorSite {
    /// Counts one occurrence and logs `what` (with `detail`) unless a line was logged for this
    /// site less than a second ago.
    pub fn hit(&self, what: &str, detail: &dyn std::fmt::Display) {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if (total == 1 || now.saturating_sub(last) >= 1000)
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!("{what}: {detail} (total {total}, {suppressed} not logged)");
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many times this error happened.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_hit() {
        let s = ErrorSite::default();
        for _ in 0..100 {
            s.hit("test", &"x");
        }
        assert_eq!(s.total(), 100);
        assert!(s.suppressed.load(Ordering::Relaxed) >= 98);
    }
}
