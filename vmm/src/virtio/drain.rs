//! Waiting for requests a vhost-user back-end had taken from a ring to complete, before the
//! old VMM of a live update hangs up.
//!
//! GET_VRING_BASE stops a ring and answers with the next avail index the back-end would
//! process: the ring's base B. The specification stops the ring there, but it does not say
//! that the requests the back-end took before (avail entries below B) are complete when it
//! answers; they are complete once the guest's used index has reached B. baton-blk completes
//! them before it answers; qemu-storage-daemon does not, and any back-end that follows only
//! the specification may not. Hanging up before they complete loses them: the new VMM
//! restarts the ring at B, and nobody completes what lies below it (with qemu-storage-daemon
//! the guest saw requests that never completed, and a stalled disk).
//!
//! So the old VMM waits until each stopped ring's used index reaches its base
//! ([`wait_used`]); past [`DRAIN_TIMEOUT`] the step fails and the live update rolls back.
//!
//! That wait alone does not save qemu-storage-daemon's requests: its GET_VRING_BASE closes the
//! ring's call fd, so the first request completing afterwards fails to notify, which marks
//! its whole connection broken (`vu_panic: Error writing eventfd`), and the requests
//! completing after that one never reach the used ring. So for a blk device the old VMM
//! first lets the running rings go idle ([`wait_idle`]): the vCPUs are paused, so the avail
//! index no longer moves, and a blk back-end takes and completes every request made
//! available; once the used index has reached the avail index, GET_VRING_BASE finds nothing
//! in flight. (Not for net: its receive rings hold buffers until packets arrive.)

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How long a back-end may take to complete the requests it had taken when its rings were
/// stopped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// First pause between two looks at the used index; it doubles up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_micros(50);
/// Longest pause between two looks at the used index.
const MAX_POLL: Duration = Duration::from_millis(1);

/// One stopped ring: where its used index lives and the base it must reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoppedRing {
    /// Queue index.
    pub index: u16,
    /// Ring size (entries).
    pub size: u16,
    /// Guest address of the used ring.
    pub used_addr: u64,
    /// The base GET_VRING_BASE returned: the next avail index the back-end would process.
    pub base: u16,
}

/// Why a stopped ring's requests cannot be accounted for.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The base is further ahead of the used index than the ring has entries.
    #[error(
        "vhost-user back-end {socket}: ring {ring} stopped at base {base} with used index \
         {used}: more than the ring's {size} entries would be in flight"
    )]
    ImpossibleBase {
        /// The back-end's socket.
        socket: PathBuf,
        /// Queue index.
        ring: u16,
        /// The guest's used index.
        used: u16,
        /// The base GET_VRING_BASE returned.
        base: u16,
        /// Ring size.
        size: u16,
    },
    /// Requests taken before GET_VRING_BASE did not complete in time.
    #[error(
        "vhost-user back-end {socket}: ring {ring}: requests taken before GET_VRING_BASE did \
         not complete within {timeout:?} (used index {used}, ring base {base})"
    )]
    Timeout {
        /// The back-end's socket.
        socket: PathBuf,
        /// Queue index.
        ring: u16,
        /// The guest's used index at the deadline.
        used: u16,
        /// The base GET_VRING_BASE returned.
        base: u16,
        /// The time allowed.
        timeout: Duration,
    },
    /// The used index is not in guest RAM.
    #[error(
        "vhost-user back-end {socket}: ring {ring}: reading the used index at {addr:#x}: {source}"
    )]
    Memory {
        /// The back-end's socket.
        socket: PathBuf,
        /// Queue index.
        ring: u16,
        /// Guest address of the used index.
        addr: u64,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// One running ring of a blk device: where its avail and used indices live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningRing {
    /// Queue index.
    pub index: u16,
    /// Ring size (entries).
    pub size: u16,
    /// Guest address of the avail ring.
    pub avail_addr: u64,
    /// Guest address of the used ring.
    pub used_addr: u64,
}

/// Waits, with the guest paused and the rings still running, until each ring's used index
/// has reached its avail index: the back-end has then completed every request the guest
/// made available. Best effort: stops waiting at `since + timeout`, and skips a ring whose
/// indices cannot be read or are further apart than it has entries (the guest's doing);
/// [`wait_used`] after GET_VRING_BASE has the last word. Returns how long it waited.
pub fn wait_idle(
    mem: &GuestMemoryMmap,
    socket: &Path,
    rings: &[RunningRing],
    since: Instant,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    let targets: Vec<StoppedRing> = rings
        .iter()
        .filter_map(|r| {
            let avail = load_index(mem, socket, r.index, r.avail_addr).ok()?;
            Some(StoppedRing {
                index: r.index,
                size: r.size,
                used_addr: r.used_addr,
                base: avail,
            })
        })
        .collect();
    match wait_used(mem, socket, &targets, since, timeout) {
        Ok(waited) => waited,
        Err(e) => {
            tracing::debug!("waiting for the rings to go idle: {e}");
            start.elapsed()
        }
    }
}

/// The 16-bit index after the flags of an avail or used ring at `ring_addr`.
fn load_index(
    mem: &GuestMemoryMmap,
    socket: &Path,
    ring: u16,
    ring_addr: u64,
) -> Result<u16, DrainError> {
    let addr = ring_addr.wrapping_add(2);
    mem.load::<u16>(GuestAddress(addr), Ordering::Acquire)
        .map_err(|source| DrainError::Memory {
            socket: socket.to_path_buf(),
            ring,
            addr,
            source,
        })
}

/// Waits until the used index of every ring in `rings` equals its base, polling with short,
/// growing pauses until `since + timeout`. Returns how long it waited (zero when every ring
/// was already there, as with baton-blk, which completes its requests before it answers).
pub fn wait_used(
    mem: &GuestMemoryMmap,
    socket: &Path,
    rings: &[StoppedRing],
    since: Instant,
    timeout: Duration,
) -> Result<Duration, DrainError> {
    let start = Instant::now();
    let deadline = since + timeout;
    let mut pause = FIRST_POLL;
    let mut waited = false;
    for r in rings {
        loop {
            let used = load_index(mem, socket, r.index, r.used_addr)?;
            if used == r.base {
                break;
            }
            // Requests in flight: base - used (wrapping). A ring cannot hold more than its
            // size, and a used index past the base would mean completions of requests the
            // back-end says it never took.
            if r.base.wrapping_sub(used) > r.size {
                return Err(DrainError::ImpossibleBase {
                    socket: socket.to_path_buf(),
                    ring: r.index,
                    used,
                    base: r.base,
                    size: r.size,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DrainError::Timeout {
                    socket: socket.to_path_buf(),
                    ring: r.index,
                    used,
                    base: r.base,
                    timeout,
                });
            }
            waited = true;
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(MAX_POLL);
        }
    }
    Ok(if waited {
        start.elapsed()
    } else {
        Duration::ZERO
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn memory(used_idx: u16) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        mem.store(used_idx, GuestAddress(USED + 2), Ordering::Release)
            .unwrap();
        mem
    }

    fn ring(base: u16) -> StoppedRing {
        StoppedRing {
            index: 0,
            size: 128,
            used_addr: USED,
            base,
        }
    }

    #[test]
    fn no_wait_when_the_used_index_is_at_the_base() {
        let mem = memory(7);
        let waited = wait_used(
            &mem,
            Path::new("s"),
            &[ring(7)],
            Instant::now(),
            DRAIN_TIMEOUT,
        )
        .unwrap();
        assert_eq!(waited, Duration::ZERO);
    }

    #[test]
    fn waits_until_late_completions_reach_the_base() {
        // 65534 → 2 wraps: four requests in flight, completed one by one by a "back-end".
        let mem = memory(65534);
        let backend = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                for used in [65535u16, 0, 1, 2] {
                    std::thread::sleep(Duration::from_millis(5));
                    mem.store(used, GuestAddress(USED + 2), Ordering::Release)
                        .unwrap();
                }
            })
        };
        let waited = wait_used(
            &mem,
            Path::new("s"),
            &[ring(2)],
            Instant::now(),
            DRAIN_TIMEOUT,
        )
        .unwrap();
        backend.join().unwrap();
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        assert!(waited < DRAIN_TIMEOUT, "{waited:?}");
    }

    #[test]
    fn times_out_naming_the_socket_ring_used_index_and_base() {
        let mem = memory(10);
        let t0 = Instant::now();
        let e = wait_used(
            &mem,
            Path::new("/run/qsd.sock"),
            &[ring(13)],
            t0,
            Duration::from_millis(30),
        )
        .unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert!(
            matches!(
                e,
                DrainError::Timeout {
                    ring: 0,
                    used: 10,
                    base: 13,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        for part in ["/run/qsd.sock", "ring 0", "used index 10", "ring base 13"] {
            assert!(msg.contains(part), "{msg}");
        }
    }

    #[test]
    fn an_impossible_base_fails_at_once() {
        // 200 in flight on a ring of 128; and a used index past the base.
        for (used, base) in [(0u16, 200u16), (11, 10)] {
            let mem = memory(used);
            let t0 = Instant::now();
            let e = wait_used(
                &mem,
                Path::new("s"),
                &[ring(base)],
                Instant::now(),
                DRAIN_TIMEOUT,
            )
            .unwrap_err();
            assert!(t0.elapsed() < Duration::from_millis(100));
            assert!(
                matches!(e, DrainError::ImpossibleBase { used: u, base: b, size: 128, .. } if u == used && b == base),
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_used_ring_outside_guest_memory_is_an_error() {
        let mem = memory(0);
        let mut r = ring(1);
        r.used_addr = 0x10_0000;
        let e = wait_used(&mem, Path::new("s"), &[r], Instant::now(), DRAIN_TIMEOUT).unwrap_err();
        assert!(matches!(e, DrainError::Memory { .. }), "{e:?}");
    }

    fn running() -> RunningRing {
        RunningRing {
            index: 0,
            size: 128,
            avail_addr: AVAIL,
            used_addr: USED,
        }
    }

    #[test]
    fn idle_waits_until_the_used_index_reaches_the_avail_index() {
        let mem = memory(3);
        mem.store(5u16, GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
        let backend = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                for used in [4u16, 5] {
                    std::thread::sleep(Duration::from_millis(10));
                    mem.store(used, GuestAddress(USED + 2), Ordering::Release)
                        .unwrap();
                }
            })
        };
        let waited = wait_idle(
            &mem,
            Path::new("s"),
            &[running()],
            Instant::now(),
            DRAIN_TIMEOUT,
        );
        backend.join().unwrap();
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        assert!(waited < DRAIN_TIMEOUT, "{waited:?}");
    }

    #[test]
    fn idle_gives_up_on_garbage_at_once_and_on_a_slow_back_end_at_the_deadline() {
        // An avail index 1000 ahead of the used index on a ring of 128: the guest's doing.
        let mem = memory(0);
        mem.store(1000u16, GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
        let t0 = Instant::now();
        wait_idle(&mem, Path::new("s"), &[running()], t0, DRAIN_TIMEOUT);
        assert!(t0.elapsed() < Duration::from_millis(100));
        // Two requests that never complete.
        mem.store(2u16, GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
        let t0 = Instant::now();
        let waited = wait_idle(
            &mem,
            Path::new("s"),
            &[running()],
            t0,
            Duration::from_millis(30),
        );
        assert!(waited >= Duration::from_millis(29), "{waited:?}");
        assert!(waited < Duration::from_millis(500), "{waited:?}");
    }
}
