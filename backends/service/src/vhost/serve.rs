//! [`serve_connection`]: one front-end connection, message by message.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, recv};
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use super::{Frontend, VhostUserDevice};
use crate::conn::{MESSAGE_DEADLINE, await_message, unread_replies};

/// How serving one front-end ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The front-end hung up, broke the protocol or missed the message deadline: wait for
    /// the next one.
    Disconnected,
    /// The signal fd became readable (SIGTERM/SIGINT).
    Shutdown,
}

fn readable(f: &PollFd<'_>) -> bool {
    f.revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// Serves one connected front-end until it goes away, then stops the device's rings
/// ([`Frontend::disconnect`]).
///
/// - Each message must arrive whole within [`MESSAGE_DEADLINE`] once it has started, and the
///   front-end must read our replies ([`crate::conn`]): otherwise it is dropped.
/// - QEMU 10 sends SET_VRING_ENABLE before SET_FEATURES; the vhost crate's dispatcher rejects
///   that (PROTOCOL_FEATURES not acked yet) without the reply QEMU waits for. So each header is
///   peeked at first, and such a message is served here (answered when it asks for a reply);
///   every other message goes through the crate's dispatcher (parsing, size checks, fds).
/// - A request refused by the handler keeps the connection (the dispatcher acks it with an
///   error when asked); a broken socket or message ends it.
/// - With `listener`, a second front-end connecting meanwhile is accepted and closed at once
///   (once the current connection has nothing pending, so that a front-end that hangs up and
///   reconnects finds its EOF processed first); with `signals`, a readable signal fd ends the
///   connection with [`End::Shutdown`].
pub fn serve_connection<D: VhostUserDevice>(
    dev: &Arc<D>,
    stream: UnixStream,
    listener: Option<&UnixListener>,
    signals: Option<BorrowedFd<'_>>,
) -> End {
    let frontend = Arc::new(Mutex::new(Frontend::new(Arc::clone(dev))));
    let peek = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot clone the connection: {e}");
            return End::Disconnected;
        }
    };
    let mut req = BackendReqHandler::from_stream(stream, Arc::clone(&frontend));
    let end = loop {
        let mut fds = vec![PollFd::new(peek.as_fd(), PollFlags::POLLIN)];
        if let Some(l) = listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        if let Some(s) = signals {
            fds.push(PollFd::new(s, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!("poll: {e}");
                break End::Disconnected;
            }
        }
        let conn = fds.first().is_some_and(readable);
        let lst = listener.is_some() && fds.get(1).is_some_and(readable);
        let sig_at = 1 + usize::from(listener.is_some());
        if signals.is_some() && fds.get(sig_at).is_some_and(readable) {
            break End::Shutdown;
        }
        drop(fds);
        if !conn {
            if let (true, Some(l)) = (lst, listener) {
                if let Ok((s, _)) = l.accept() {
                    tracing::warn!("refusing a second front-end while one is connected");
                    drop(s);
                }
            }
            continue;
        }
        if let Err(e) = await_message(&peek, MESSAGE_DEADLINE) {
            tracing::warn!("{e}");
            break End::Disconnected;
        }
        if let Err(e) = unread_replies(&peek) {
            tracing::warn!("{e}");
            break End::Disconnected;
        }
        match early_enable(&peek, &frontend) {
            Early::Handled => continue,
            Early::Closed => break End::Disconnected,
            Early::Pass => {}
        }
        match req.handle_request() {
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
            Err(VuError::Disconnected | VuError::PartialMessage) => break End::Disconnected,
            Err(e) => {
                tracing::warn!("dropping the front-end: {e}");
                break End::Disconnected;
            }
        }
    };
    frontend
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .disconnect();
    end
}

enum Early {
    Pass,
    Handled,
    Closed,
}

const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Serves SET_VRING_ENABLE that arrives before SET_FEATURES acked PROTOCOL_FEATURES.
fn early_enable<D: VhostUserDevice>(sock: &UnixStream, frontend: &Mutex<Frontend<D>>) -> Early {
    let mut hdr = [0u8; 12];
    match recv(
        sock.as_raw_fd(),
        &mut hdr,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => return Early::Closed,
        Ok(12) => {}
        Ok(_) | Err(_) => return Early::Pass,
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8));
    let mut f = frontend.lock().unwrap_or_else(|e| e.into_inner());
    if code != SET_VRING_ENABLE || size != 8 || f.protocol_features_acked() {
        return Early::Pass;
    }
    let mut msg = [0u8; 20];
    let mut s = sock;
    if s.read_exact(&mut msg).is_err() {
        return Early::Closed;
    }
    let index = u32::from_le_bytes([msg[12], msg[13], msg[14], msg[15]]);
    let num = u32::from_le_bytes([msg[16], msg[17], msg[18], msg[19]]);
    let res = match num {
        0 | 1 => f.enable_ring(index, num == 1),
        _ => Err(VuError::InvalidParam),
    };
    if let Err(e) = &res {
        tracing::warn!("SET_VRING_ENABLE {index} {num} refused: {e}");
    }
    tracing::debug!(
        index,
        num,
        ok = res.is_ok(),
        "SET_VRING_ENABLE before SET_FEATURES"
    );
    if flags & FLAG_NEED_REPLY != 0 {
        let mut reply = [0u8; 20];
        reply[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
        reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&u64::from(res.is_err()).to_le_bytes());
        if s.write_all(&reply).is_err() {
            return Early::Closed;
        }
    }
    Early::Handled
}
