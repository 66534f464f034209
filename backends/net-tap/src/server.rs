//! Accepting front-ends: one at a time, in a loop, on the same socket (bound from `--socket` or
//! inherited through systemd socket activation), plus readiness notification and SIGTERM.

use baton_service::access::SocketPolicy;
use baton_service::sandbox::Sandbox;
use baton_service::vhost::serve_connection;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SigSet, Signal};

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
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGUSR1);
    set.thread_block().map_err(io::Error::from)?;
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
            if let Some(p) = socket {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(0);
        })
        .map(drop)
        .map_err(io::Error::other)
}

/// Accepts front-ends forever, one at a time; a second one while one is connected is closed
/// at once without touching the first.
pub fn serve(dev: Arc<Device>, listener: UnixListener, peers: SocketPolicy) -> io::Result<()> {
    let busy = Arc::new(AtomicBool::new(false));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EOPNOTSUPP)
                ) =>
            {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if !peers.admit(&stream) {
            continue;
        }
        if busy.swap(true, Ordering::AcqRel) {
            tracing::warn!("refusing a second front-end while one is connected");
            drop(stream);
            continue;
        }
        tracing::info!("front-end connected");
        let dev = Arc::clone(&dev);
        let busy = Arc::clone(&busy);
        std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                // This thread runs under the control filter it inherited from this one.
                baton_service::sandbox::inherit("control");
                serve_connection(&dev, stream, None, None);
                // Free for the next front-end before saying so.
                busy.store(false, Ordering::Release);
                tracing::info!(
                    "front-end gone; rings stopped, TAP kept open, waiting for the next one"
                );
            })?;
    }
}

/// Serves one front-end until it goes away (public for the fuzz targets): the framework's
/// connection loop (`baton_service::vhost::serve_connection`), which stops every ring at the end.
pub fn connection(dev: &Arc<Device>, stream: UnixStream) -> io::Result<()> {
    serve_connection(dev, stream, None, None);
    Ok(())
}
