//! Serving front-ends until SIGTERM/SIGINT: the framework's accept loop
//! (`baton_service::vhost::serve_frontends`: one front-end at a time, a second one in standby,
//! SIGTERM noticed also mid-connection through a signalfd), then baton-blk's own shutdown: stop
//! the rings (in-flight requests complete), fdatasync.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use nix::sys::signalfd::SignalFd;

use baton_service::access::SocketPolicy;
pub use baton_service::vhost::End;
use baton_service::vhost::{AcceptError, serve_connection, serve_frontends};

use crate::device::Device;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The accept loop failed.
    #[error(transparent)]
    Accept(#[from] AcceptError),
    /// The final flush failed.
    #[error("cannot flush the image at shutdown: {0}")]
    Quiesce(#[source] std::io::Error),
}

/// Blocks SIGTERM/SIGINT (call before spawning threads) and returns a signalfd for them.
pub fn signals() -> Result<SignalFd, ServerError> {
    Ok(baton_service::vhost::stop_signals()?)
}

/// Serves front-ends one after the other until SIGTERM/SIGINT, then stops the rings and
/// flushes the image.
pub fn run(
    dev: Arc<Device>,
    listener: UnixListener,
    sig: SignalFd,
    peers: &SocketPolicy,
) -> Result<(), ServerError> {
    serve_frontends(&dev, &listener, peers, Some(sig.as_fd()))?;
    tracing::info!("shutting down: stopping rings, completing in-flight requests, fdatasync");
    dev.quiesce().map_err(ServerError::Quiesce)?;
    for q in dev.queues() {
        q.quit();
    }
    Ok(())
}

/// Serves one connected front-end until it goes away (public for the fuzz targets): the
/// framework's connection loop, which also keeps a second front-end (of `peers`) in standby,
/// refuses a third and notices SIGTERM.
pub fn serve(
    dev: &Arc<Device>,
    stream: UnixStream,
    listener: &UnixListener,
    peers: &SocketPolicy,
    sig: &SignalFd,
) -> End {
    serve_connection(dev, stream, Some((listener, peers)), Some(sig.as_fd()))
}
