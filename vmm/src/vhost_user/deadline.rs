//! Deadlines on back-end handshakes: one thread for the whole VMM ends every connection whose
//! handshake runs past its deadline.
//!
//! The vhost crate retries a read that times out (it treats EAGAIN as "try again"), so a
//! socket timeout cannot bound a step; shutting the socket down makes the pending read return
//! end-of-file, which the crate reports as an error. One thread for all connections, started
//! with the VMM, rather than one per connect: the threads that connect to back-ends (the
//! back-end watchers, both sides of a live update) then need not be allowed to start threads
//! (see [`crate::sandbox::kinds`]).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sandbox::{Sandbox, SandboxError, kinds};

struct Entry {
    id: u64,
    deadline: Instant,
    /// A duplicate of the connection, to shut it down.
    sock: UnixStream,
}

static ENTRIES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static CHANGED: Condvar = Condvar::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static STARTED: AtomicBool = AtomicBool::new(false);

/// A connection under a deadline; dropping it (the handshake is over) disarms the deadline.
#[derive(Debug)]
pub struct Armed {
    id: u64,
}

/// Starts the deadline thread inside `sandbox` (as a `watchdog` thread). Call once at
/// start-up, before any back-end is connected; without it, the first [`arm`] starts the thread
/// outside any sandbox (tests, library use).
pub fn start(sandbox: &Arc<Sandbox>) -> Result<(), SandboxError> {
    if STARTED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    sandbox.spawn("vu-watchdog".into(), None, kinds::watchdog(), |gate| {
        if gate.enter() {
            run();
        }
    })?;
    Ok(())
}

/// Ends `stream` (shutdown(2), both directions) unless the returned guard is dropped within
/// `timeout`.
pub fn arm(stream: &UnixStream, timeout: Duration) -> std::io::Result<Armed> {
    if !STARTED.swap(true, Ordering::AcqRel) {
        std::thread::Builder::new()
            .name("vu-watchdog".into())
            .spawn(run)?;
    }
    let sock = stream.try_clone()?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut entries = ENTRIES.lock().unwrap_or_else(|e| e.into_inner());
    entries.push(Entry {
        id,
        deadline: Instant::now() + timeout,
        sock,
    });
    CHANGED.notify_all();
    Ok(Armed { id })
}

impl Drop for Armed {
    fn drop(&mut self) {
        // Under the lock: once this returns, the thread can no longer shut the connection down.
        let mut entries = ENTRIES.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|e| e.id != self.id);
    }
}

/// The deadline thread: shuts down each connection whose deadline passed.
fn run() {
    let mut entries = ENTRIES.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        entries.retain(|e| {
            let due = e.deadline <= now;
            if due {
                let _ = e.sock.shutdown(std::net::Shutdown::Both);
            }
            !due
        });
        let next = entries.iter().map(|e| e.deadline).min();
        entries = match next {
            Some(d) => {
                CHANGED
                    .wait_timeout(entries, d.saturating_duration_since(now))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => CHANGED.wait(entries).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_late_handshake_is_ended_and_a_finished_one_is_not() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let late = arm(&a, Duration::from_millis(20)).unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        let done = arm(&c, Duration::from_millis(30)).unwrap();
        drop(done);
        // The peer of the late one sees end-of-file once the deadline passed.
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(b.read(&mut buf).unwrap(), 0);
        drop(late);
        // The disarmed one stays open.
        d.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let e = d.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        drop(c);
    }
}
