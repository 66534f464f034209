//! Accepting front-ends: one at a time, in a loop, on the same socket (bound from `--socket` or
//! inherited through systemd socket activation), plus readiness notification and SIGTERM.

use baton_service::PeerPolicy;
use baton_service::conn::MESSAGE_DEADLINE;
use baton_service::sandbox::Sandbox;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{SigSet, Signal};
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::device::{Device, lock};
use crate::vhost::Adapter;

/// Logs to stderr (`RUST_LOG` filter, default info; colours only on a terminal).
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
pub fn serve(dev: Arc<Device>, listener: UnixListener, peers: PeerPolicy) -> io::Result<()> {
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
        if let Err(e) = peers.admit(&stream) {
            tracing::warn!("{e}");
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
                if let Err(e) = connection(&dev, stream) {
                    tracing::info!("front-end connection ended: {e}");
                }
                dev.stop_all();
                // Free for the next front-end before saying so.
                busy.store(false, Ordering::Release);
                tracing::info!(
                    "front-end gone; rings stopped, TAP kept open, waiting for the next one"
                );
            })?;
    }
}

const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes for the duration of the call.
    let r = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_WAITALL,
        )
    };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// Serves SET_VRING_ENABLE ourselves (see the module doc of [`crate::vhost`]). Returns whether
/// the next message was consumed here.
fn pre_filter(sock: &UnixStream, adapter: &Mutex<Adapter>) -> io::Result<bool> {
    let fd = sock.as_raw_fd();
    let mut hdr = [0u8; 12];
    if recv(fd, &mut hdr, libc::MSG_PEEK)? < hdr.len() {
        return Ok(false);
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8));
    if code != SET_VRING_ENABLE || size != 8 {
        return Ok(false);
    }
    let mut msg = [0u8; 20];
    if recv(fd, &mut msg, 0)? < msg.len() {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    let index = u32::from_le_bytes([msg[12], msg[13], msg[14], msg[15]]);
    let num = u32::from_le_bytes([msg[16], msg[17], msg[18], msg[19]]);
    let mut a = lock(adapter);
    let res = match num {
        0 | 1 => a.vring_enable(index, num == 1),
        _ => Err(VuError::InvalidParam),
    };
    if let Err(e) = &res {
        tracing::warn!("SET_VRING_ENABLE {index} {num} refused: {e}");
    }
    if flags & FLAG_NEED_REPLY != 0 && a.reply_ack() {
        let mut reply = [0u8; 20];
        reply[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
        reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&u64::from(res.is_err()).to_le_bytes());
        use std::io::Write;
        (&*sock).write_all(&reply)?;
    }
    Ok(true)
}

/// Serves one front-end until it goes away (public for the fuzz targets).
pub fn connection(dev: &Arc<Device>, stream: UnixStream) -> io::Result<()> {
    let adapter = Arc::new(Mutex::new(Adapter::new(Arc::clone(dev))));
    let peek = stream.try_clone()?;
    let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&adapter));
    loop {
        if let Err(e) = baton_service::conn::await_message(&peek, MESSAGE_DEADLINE) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, e));
        }
        if pre_filter(&peek, &adapter)? {
            continue;
        }
        match handler.handle_request() {
            Ok(()) => {}
            // The request was read whole and refused (acked with an error if asked): go on.
            Err(
                e @ (VuError::InvalidParam
                | VuError::InvalidOperation(_)
                | VuError::InactiveFeature(_)
                | VuError::InactiveOperation(_)
                | VuError::ReqHandlerError(_)
                | VuError::BackendInternalError
                | VuError::FeatureMismatch
                | VuError::SocketRetry(_)),
            ) => tracing::warn!("front-end request refused: {e}"),
            Err(VuError::Disconnected) => return Ok(()),
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
}
