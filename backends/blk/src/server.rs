//! Accept loop: one front-end at a time on one listening socket, for the life of the process.
//!
//! - Socket activation (LISTEN_PID/LISTEN_FDS: fd 3) or bind `--socket`; sd_notify READY=1.
//! - While a front-end is connected, further connections are accepted and closed at once
//!   (refused) without touching the active one.
//! - QEMU 10 sends SET_VRING_ENABLE before SET_FEATURES; the vhost crate's dispatcher rejects
//!   that without a reply. We peek at each header and handle that case here.
//! - SIGTERM/SIGINT (signalfd): stop the rings (in-flight requests complete), fdatasync, exit.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::socket::{MsgFlags, recv};
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use baton_service::PeerPolicy;
use baton_service::conn::MESSAGE_DEADLINE;

use crate::device::Device;
use crate::handler::ConnHandler;

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

/// How serving one front-end ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The front-end hung up or broke the protocol: wait for the next one.
    Disconnected,
    /// SIGTERM/SIGINT arrived.
    Shutdown,
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
    peers: &PeerPolicy,
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
        if let Err(e) = peers.admit(&stream) {
            tracing::warn!("{e}");
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

/// Serves one connected front-end until it goes away (public for the fuzz targets).
pub fn serve(
    dev: &Arc<Device>,
    stream: UnixStream,
    listener: &UnixListener,
    sig: &SignalFd,
) -> End {
    let handler = Arc::new(Mutex::new(ConnHandler::new(dev.clone())));
    let peek = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot clone the connection: {e}");
            return End::Disconnected;
        }
    };
    let mut req = BackendReqHandler::from_stream(stream, handler.clone());
    let end = loop {
        let mut fds = [
            PollFd::new(peek.as_fd(), PollFlags::POLLIN),
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(sig.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!("poll: {e}");
                break End::Disconnected;
            }
        }
        let (conn, lst, sg) = (readable(&fds[0]), readable(&fds[1]), readable(&fds[2]));
        if sg {
            break End::Shutdown;
        }
        if !conn {
            // Only refuse when the current connection has nothing pending: a front-end that
            // hangs up and reconnects at once must find its EOF processed first.
            if lst {
                if let Ok((s, _)) = listener.accept() {
                    tracing::warn!("refusing a second front-end while one is connected");
                    drop(s);
                }
            }
            continue;
        }
        if let Err(e) = baton_service::conn::await_message(&peek, MESSAGE_DEADLINE) {
            tracing::warn!("{e}");
            break End::Disconnected;
        }
        match intercept(&peek, &handler) {
            Intercept::Handled => continue,
            Intercept::Closed => break End::Disconnected,
            Intercept::Pass => {}
        }
        if let Err(e) = req.handle_request() {
            match e {
                VuError::ReqHandlerError(_)
                | VuError::InvalidParam
                | VuError::InvalidOperation(_)
                | VuError::InactiveFeature(_)
                | VuError::InactiveOperation(_) => tracing::warn!("request failed: {e}"),
                VuError::Disconnected | VuError::PartialMessage => break End::Disconnected,
                e => {
                    tracing::warn!("dropping the connection: {e}");
                    break End::Disconnected;
                }
            }
        }
    };
    handler
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .disconnect();
    end
}

enum Intercept {
    Pass,
    Handled,
    Closed,
}

const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Handles SET_VRING_ENABLE that arrives before SET_FEATURES acked PROTOCOL_FEATURES.
fn intercept(sock: &UnixStream, handler: &Mutex<ConnHandler>) -> Intercept {
    let mut hdr = [0u8; 12];
    match recv(
        sock.as_raw_fd(),
        &mut hdr,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => return Intercept::Closed,
        Ok(12) => {}
        Ok(_) | Err(_) => return Intercept::Pass,
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8));
    let mut h = handler.lock().unwrap_or_else(|e| e.into_inner());
    if code != SET_VRING_ENABLE || size != 8 || h.protocol_features_acked() {
        return Intercept::Pass;
    }
    let mut msg = [0u8; 20];
    let mut s = sock;
    if s.read_exact(&mut msg).is_err() {
        return Intercept::Closed;
    }
    let index = u32::from_le_bytes([msg[12], msg[13], msg[14], msg[15]]);
    let num = u32::from_le_bytes([msg[16], msg[17], msg[18], msg[19]]);
    let ok = num <= 1 && h.enable_ring(index, num == 1).is_ok();
    tracing::debug!(index, num, ok, "SET_VRING_ENABLE before SET_FEATURES");
    if flags & FLAG_NEED_REPLY != 0 {
        let mut reply = Vec::with_capacity(20);
        reply.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
        reply.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&u64::from(!ok).to_le_bytes());
        if s.write_all(&reply).is_err() {
            return Intercept::Closed;
        }
    }
    Intercept::Handled
}
