//! Accept loop: one front-end at a time on one listening socket, for the life of the process.
//!
//! - Socket activation (LISTEN_PID/LISTEN_FDS: fd 3) or bind `--socket`; sd_notify READY=1.
//! - While a front-end is connected, further connections are accepted and closed at once
//!   (refused) without touching the active one.
//! - Each connection is served by the framework (`baton_service::vhost::serve_connection`:
//!   message deadline, QEMU 10's SET_VRING_ENABLE before SET_FEATURES, disconnect).
//! - SIGTERM/SIGINT (signalfd): stop the rings (in-flight requests complete), fdatasync, exit.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;

use baton_service::access::SocketPolicy;
pub use baton_service::vhost::End;
use baton_service::vhost::serve_connection;

use crate::device::Device;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Signal set-up failed.
    #[error("cannot set up signal handling: {0}")]
    Signals(#[source] nix::Error),
    /// poll/accept failed.
    #[error("I/O error in the accept loop: {0}")]
    Io(#[from] std::io::Error),
}

/// Blocks SIGTERM/SIGINT (call before spawning threads) and returns a signalfd for them.
pub fn signals() -> Result<SignalFd, ServerError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(ServerError::Signals)?;
    SignalFd::new(&set).map_err(ServerError::Signals)
}

fn readable(f: &PollFd<'_>) -> bool {
    f.revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// Serves front-ends one after the other until SIGTERM/SIGINT.
pub fn run(
    dev: Arc<Device>,
    listener: UnixListener,
    sig: SignalFd,
    peers: &SocketPolicy,
) -> Result<(), ServerError> {
    let mut generation = 0u64;
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(sig.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(ServerError::Io(e.into())),
        }
        if readable(&fds[1]) {
            break;
        }
        if !readable(&fds[0]) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
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
        match serve(&dev, stream, &listener, &sig) {
            End::Disconnected => tracing::info!("front-end disconnected; waiting for the next one"),
            End::Shutdown => break,
        }
    }
    tracing::info!("shutting down: stopping rings, completing in-flight requests, fdatasync");
    dev.quiesce()?;
    for q in dev.queues() {
        q.quit();
    }
    Ok(())
}

/// Serves one connected front-end until it goes away (public for the fuzz targets): the
/// framework's connection loop, which also refuses a second front-end and notices SIGTERM.
pub fn serve(
    dev: &Arc<Device>,
    stream: UnixStream,
    listener: &UnixListener,
    sig: &SignalFd,
) -> End {
    serve_connection(dev, stream, Some(listener), Some(sig.as_fd()))
}
