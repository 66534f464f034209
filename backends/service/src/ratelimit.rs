//! Rate-limited logging for errors that a guest or peer can trigger: every occurrence is
//! counted, at most one line per second per site is written.

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

/// Logs to stderr through `tracing` (`RUST_LOG` filter, default `info`; colours only on a
/// terminal). Call once, first thing in `main`.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
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
