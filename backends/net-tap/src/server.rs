//! Serving front-ends: the framework's accept loop (`baton_service::vhost::serve_frontends`:
//! one front-end at a time, in a loop, on the same socket, bound from `--socket` or inherited
//! through socket activation), plus baton-net-tap's signal thread (counters on SIGUSR1; on
//! SIGTERM, stop and remove the socket file).

use baton_service::access::SocketPolicy;
use baton_service::sandbox::Sandbox;
use baton_service::vhost::{AcceptError, block_stop_signals, serve_connection, serve_frontends};
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::sys::signal::Signal;

use crate::device::Device;

/// Blocks SIGTERM/SIGINT/SIGUSR1 in this thread (and every thread spawned after) and starts a
/// thread that logs the counters on SIGUSR1 and, on SIGTERM/SIGINT, stops all rings, removes the
/// socket file we bound, and exits 0. A TAP that existed before (persistent) stays; one we
/// created goes with our last fd. The thread is in the sandbox before this returns.
pub fn handle_signals(
    dev: Arc<Device>,
    socket: Option<PathBuf>,
    sandbox: &Arc<Sandbox>,
) -> io::Result<()> {
    let set = block_stop_signals(&[Signal::SIGUSR1]).map_err(io::Error::other)?;
    let kind = crate::seccomp::signals();
    sandbox
        .spawn("signals".into(), None, kind, move |gate| {
            if !gate.enter() {
                return;
            }
            let sig = loop {
                match set.wait() {
                    Ok(Signal::SIGUSR1) => tracing::info!("stats: {}", dev.stats.summary()),
                    other => break other,
                }
            };
            tracing::info!("{sig:?}: stopping rings and exiting");
            dev.shutdown.store(true, Ordering::Release);
            dev.stop_all();
            // Each worker lets go of its TAP queue's io_uring on the way out; then the TAP
            // (if we created it) is gone when this process is.
            if !dev.wait_workers_gone(std::time::Duration::from_millis(500)) {
                tracing::warn!("a queue worker did not stop within 500 ms");
            }
            if let Some(p) = socket {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(0);
        })
        .map(drop)
        .map_err(io::Error::other)
}

/// Accepts front-ends forever, one at a time (the signal thread ends the process); a second one
/// while one is connected is closed at once without touching the first.
pub fn serve(
    dev: Arc<Device>,
    listener: UnixListener,
    peers: SocketPolicy,
) -> Result<(), AcceptError> {
    serve_frontends(&dev, &listener, &peers, None)
}

/// Serves one front-end until it goes away (public for the fuzz targets): the framework's
/// connection loop (`baton_service::vhost::serve_connection`), which stops every ring at the end.
pub fn connection(dev: &Arc<Device>, stream: UnixStream) -> io::Result<()> {
    serve_connection(dev, stream, None, None);
    Ok(())
}
