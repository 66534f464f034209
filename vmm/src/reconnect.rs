//! Per-back-end restart: a thread per device watches its vhost-user connection; when the
//! back-end goes away (crash, upgrade) it reconnects with capped exponential backoff — first
//! try at once, then every 1 ms for the first 100 ms (a restarted service is usually back by
//! then), then doubling up to 1 s, never giving up — retrying the whole handshake on any
//! failure. An error that retrying cannot cure ([`ErrorClass::Fatal`]: the back-end came back
//! without a feature or queue the guest uses) skips the fast retries: the next attempt waits
//! [`MAX_BACKOFF`], for an operator to put the right back-end in place. The guest and the
//! other devices keep running meanwhile.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::vhost_user::ErrorClass;
use crate::virtio::pci::VirtioPciDevice;

/// First delay after a failed attempt.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(1);
/// Longest delay between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often an idle watcher looks for a new connection to watch.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// How long retries stay at [`FIRST_BACKOFF`] before the delay starts doubling.
pub const FAST_RETRIES: Duration = Duration::from_millis(100);

/// The delay after `delay`, `waited` into the outage: 1 ms while the outage is young, then
/// doubled, capped.
pub fn next_backoff(delay: Duration, waited: Duration) -> Duration {
    if waited < FAST_RETRIES {
        FIRST_BACKOFF
    } else {
        (delay * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF)
    }
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
    let since = std::time::Instant::now();
    loop {
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        if !d.reconnecting() {
            return;
        }
        if d.reconnect_limit().is_some_and(|l| since.elapsed() > l) {
            d.give_up();
            return;
        }
        attempts += 1;
        let class = match d.try_reconnect() {
            Ok(()) => return,
            Err(e) => {
                // Logged on the first failures and then every so often, not on every try.
                let class = e.class();
                if attempts <= 3 || attempts.is_power_of_two() {
                    match class {
                        ErrorClass::Fatal => tracing::error!(attempts, "reconnect failed: {e}"),
                        _ => tracing::warn!(attempts, "reconnect failed: {e}"),
                    }
                }
                class
            }
        };
        drop(d);
        delay = match class {
            // The same back-end gives the same answer: wait for another one, slowly.
            ErrorClass::Fatal => MAX_BACKOFF,
            // Nobody there yet, or the connection broke (already hung up): again, soon.
            ErrorClass::Retry | ErrorClass::Reconnect => next_backoff(delay, since.elapsed()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_small_and_caps() {
        assert_eq!(next_backoff(Duration::ZERO, Duration::ZERO), FIRST_BACKOFF);
        assert_eq!(
            next_backoff(FIRST_BACKOFF, Duration::from_millis(50)),
            FIRST_BACKOFF
        );
        let mut d = FIRST_BACKOFF;
        let mut seen = Vec::new();
        for _ in 0..15 {
            d = next_backoff(d, FAST_RETRIES);
            seen.push(d);
        }
        assert_eq!(seen[0], Duration::from_millis(2));
        assert_eq!(*seen.last().unwrap(), MAX_BACKOFF);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }
}
