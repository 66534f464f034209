//! Per-back-end restart: a thread per device watches its vhost-user connection; when the
//! back-end goes away (crash, upgrade) it reconnects with capped exponential backoff — first
//! try at once, then 1 ms doubling up to 1 s, never giving up — retrying the whole handshake
//! on any failure. The guest and the other devices keep running meanwhile.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::virtio::pci::VirtioPciDevice;

/// First delay after a failed attempt.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(1);
/// Longest delay between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often an idle watcher looks for a new connection to watch.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// The backoff after `delay`: doubled, capped.
pub fn next_backoff(delay: Duration) -> Duration {
    (delay * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF)
}

/// Whether `fd` reported a hang-up within `timeout`.
fn hung_up(fd: &std::os::fd::OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Watches `dev`'s back-end forever (the thread ends with the process).
pub fn watch(dev: &Arc<Mutex<VirtioPciDevice>>) {
    let lock = || dev.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let watched = lock().watch();
        let Some((fd, generation)) = watched else {
            if lock().reconnecting() {
                reconnect(dev);
            } else {
                std::thread::sleep(IDLE_POLL);
            }
            continue;
        };
        if hung_up(&fd, IDLE_POLL) && lock().backend_lost(generation) {
            drop(fd);
            reconnect(dev);
        }
    }
}

/// Retries until the back-end is back (or the device stops waiting for it: handed over).
fn reconnect(dev: &Arc<Mutex<VirtioPciDevice>>) {
    let mut delay = Duration::ZERO;
    let mut attempts = 0u64;
    loop {
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        if !d.reconnecting() {
            return;
        }
        attempts += 1;
        match d.try_reconnect() {
            Ok(()) => return,
            Err(e) => {
                // Logged on the first failures and then every so often, not on every try.
                if attempts <= 3 || attempts.is_power_of_two() {
                    tracing::warn!(attempts, "reconnect failed: {e}");
                }
            }
        }
        drop(d);
        delay = next_backoff(delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_small_and_caps() {
        let mut d = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..15 {
            d = next_backoff(d);
            seen.push(d);
        }
        assert_eq!(seen[0], FIRST_BACKOFF);
        assert_eq!(seen[1], Duration::from_millis(2));
        assert_eq!(*seen.last().unwrap(), MAX_BACKOFF);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }
}
