//! [`serve_frontends`]: every back-end's accept loop. One front-end at a time on one listening
//! socket, for the life of the process, so that a new VMM can take over the same socket.
//!
//! - Each peer is checked before it is served ([`SocketPolicy::admit`]: SO_PEERCRED against
//!   the allowlist).
//! - While a front-end is connected, a second one waits in standby (a live update's next VMM
//!   connecting early: it is served its connection handshake, the rest waits until the first
//!   goes) and a third is accepted and closed at once, without touching either
//!   ([`serve_connection`] with the listener).
//! - With a signal fd ([`stop_signals`]), SIGTERM/SIGINT end the loop, also in the middle of a
//!   connection; the back-end then shuts its device down. A back-end that waits for its signals
//!   in a thread of its own ([`block_stop_signals`]) passes none.
//! - A failed accept is retried after [`ACCEPT_BACKOFF`] (a peer that reset, no fds left),
//!   unless the listening socket itself is unusable.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;

use super::{End, VhostUserDevice, serve_connection};
use crate::access::SocketPolicy;

/// How long the loop waits after a failed accept before it tries again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Errors of the accept loop.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// Blocking the signals or creating their signal fd failed.
    #[error("cannot set up signal handling: {0}")]
    Signals(#[source] nix::Error),
    /// Waiting on the listening socket failed.
    #[error("cannot wait for front-ends: {0}")]
    Poll(#[source] nix::Error),
    /// The listening socket cannot accept (not a socket, not listening, closed).
    #[error("cannot accept front-ends: {0}")]
    Accept(#[source] io::Error),
}

/// Blocks SIGTERM, SIGINT and `extra` in the calling thread and every thread it spawns after
/// (so call it before spawning any), and returns the set, to wait on or to make a signal fd of.
pub fn block_stop_signals(extra: &[Signal]) -> Result<SigSet, AcceptError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    for s in extra {
        set.add(*s);
    }
    set.thread_block().map_err(AcceptError::Signals)?;
    Ok(set)
}

/// Blocks SIGTERM/SIGINT (see [`block_stop_signals`]) and returns a signal fd for them, for
/// [`serve_frontends`].
pub fn stop_signals() -> Result<SignalFd, AcceptError> {
    let set = block_stop_signals(&[])?;
    SignalFd::new(&set).map_err(AcceptError::Signals)
}

fn ready(f: &PollFd<'_>) -> bool {
    f.revents().is_some_and(|r| {
        r.intersects(
            PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL,
        )
    })
}

/// Whether a failed accept means the listening socket itself is unusable.
fn unusable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

/// Serves front-ends one after the other, each through [`serve_connection`], until `signals`
/// (if given) becomes readable: returns `Ok` then, with the last front-end's rings stopped.
pub fn serve_frontends<D: VhostUserDevice>(
    dev: &Arc<D>,
    listener: &UnixListener,
    peers: &SocketPolicy,
    signals: Option<BorrowedFd<'_>>,
) -> Result<(), AcceptError> {
    let mut generation = 0u64;
    loop {
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if let Some(s) = signals {
            fds.push(PollFd::new(s, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(AcceptError::Poll(e)),
        }
        if fds.get(1).is_some_and(ready) {
            return Ok(());
        }
        if !fds.first().is_some_and(ready) {
            continue;
        }
        drop(fds);
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if unusable(&e) => return Err(AcceptError::Accept(e)),
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if !peers.admit(&stream) {
            continue;
        }
        generation += 1;
        let span = tracing::info_span!("frontend", n = generation);
        let _e = span.enter();
        tracing::info!("front-end connected");
        match serve_connection(dev, stream, Some((listener, peers)), signals) {
            End::Disconnected => {
                tracing::info!("front-end gone; rings stopped, waiting for the next one");
            }
            End::Shutdown => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broken_listening_socket_ends_the_loop() {
        for errno in [libc::EBADF, libc::ENOTSOCK, libc::EINVAL, libc::EOPNOTSUPP] {
            assert!(unusable(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ECONNABORTED,
            libc::ENOBUFS,
        ] {
            assert!(!unusable(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
    }
}
