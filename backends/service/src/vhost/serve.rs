//! [`serve_connection`]: one front-end connection, message by message.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, recv};
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use super::{Frontend, VhostUserDevice};
use crate::access::SocketPolicy;
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

/// One front-end connection: its negotiation state and its socket.
struct Conn<D: VhostUserDevice> {
    frontend: Arc<Mutex<Frontend<D>>>,
    req: BackendReqHandler<Mutex<Frontend<D>>>,
    /// A duplicate of the socket, to poll and peek at.
    peek: UnixStream,
}

impl<D: VhostUserDevice> Conn<D> {
    fn new(dev: &Arc<D>, stream: UnixStream) -> Option<Self> {
        let frontend = Arc::new(Mutex::new(Frontend::new(Arc::clone(dev))));
        let peek = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot clone the connection: {e}");
                return None;
            }
        };
        let req = BackendReqHandler::from_stream(stream, Arc::clone(&frontend));
        Some(Conn {
            frontend,
            req,
            peek,
        })
    }

    /// Serves the message that has started to arrive; false once the connection is over.
    fn step(&mut self) -> bool {
        if let Err(e) = await_message(&self.peek, MESSAGE_DEADLINE) {
            tracing::warn!("{e}");
            return false;
        }
        if let Err(e) = unread_replies(&self.peek) {
            tracing::warn!("{e}");
            return false;
        }
        match early_enable(&self.peek, &self.frontend) {
            Early::Handled => return true,
            Early::Closed => return false,
            Early::Pass => {}
        }
        match self.req.handle_request() {
            Ok(()) => true,
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
            ) => {
                tracing::warn!("front-end request refused: {e}");
                true
            }
            Err(VuError::Disconnected | VuError::PartialMessage) => false,
            Err(e) => {
                tracing::warn!("dropping the front-end: {e}");
                false
            }
        }
    }

    /// The request code of the next message, `None` once the peer hung up (or the socket
    /// broke), `Some(None)` while not even its header has arrived.
    fn next_request(&self) -> Option<Option<u32>> {
        let mut hdr = [0u8; 4];
        match recv(
            self.peek.as_raw_fd(),
            &mut hdr,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => None,
            Ok(4) => Some(Some(u32::from_le_bytes(hdr))),
            Ok(_) | Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Some(None),
            Err(_) => None,
        }
    }

    /// The front-end went away: the device's rings stop and it forgets this front-end.
    fn end(&self) {
        self.frontend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .disconnect();
    }
}

/// What a standby front-end may have served while another one runs the device: only what
/// does not touch the device (GET_FEATURES, SET_OWNER, GET/SET_PROTOCOL_FEATURES,
/// GET_QUEUE_NUM, GET_CONFIG, GET_MAX_MEM_SLOTS). Its first other message waits, unread,
/// until the running front-end goes.
const STANDBY_REQUESTS: [FrontendReq; 7] = [
    FrontendReq::GET_FEATURES,
    FrontendReq::SET_OWNER,
    FrontendReq::GET_PROTOCOL_FEATURES,
    FrontendReq::SET_PROTOCOL_FEATURES,
    FrontendReq::GET_QUEUE_NUM,
    FrontendReq::GET_CONFIG,
    FrontendReq::GET_MAX_MEM_SLOTS,
];

/// Serves a connected front-end until it goes away, then stops the device's rings.
///
/// - Each message must arrive whole within [`MESSAGE_DEADLINE`] once it has started, and the
///   front-end must read our replies ([`crate::conn`]): otherwise it is dropped.
/// - QEMU 10 sends SET_VRING_ENABLE before SET_FEATURES; the vhost crate's dispatcher rejects
///   that (PROTOCOL_FEATURES not acked yet) without the reply QEMU waits for. So each header is
///   peeked at first, and such a message is served here (answered when it asks for a reply);
///   every other message goes through the crate's dispatcher (parsing, size checks, fds).
/// - A request refused by the handler keeps the connection (the dispatcher acks it with an
///   error when asked); a broken socket or message ends it.
/// - With `listener` (and the policy its peers must pass), a second front-end connecting
///   meanwhile is kept in *standby* (the next VMM of a live update, connecting while the guest
///   still runs on the old one): it is served the messages that do not touch the device
///   (`STANDBY_REQUESTS`: its connection handshake), and its first other message waits
///   unread until the running front-end goes; then it runs the device, and this function
///   serves it, and so on. A third front-end is accepted and closed at once (once the running
///   connection has nothing pending, so that a front-end that hangs up and reconnects finds
///   its EOF processed first). A standby front-end that goes away first leaves the device
///   alone. With `signals`, a readable signal fd ends everything with [`End::Shutdown`].
pub fn serve_connection<D: VhostUserDevice>(
    dev: &Arc<D>,
    stream: UnixStream,
    listener: Option<(&UnixListener, &SocketPolicy)>,
    signals: Option<BorrowedFd<'_>>,
) -> End {
    let Some(mut active) = Conn::new(dev, stream) else {
        return End::Disconnected;
    };
    let mut standby: Option<Conn<D>> = None;
    // The standby's next message waits for the device.
    let mut parked = false;
    let end = loop {
        let mut fds = vec![PollFd::new(active.peek.as_fd(), PollFlags::POLLIN)];
        let standby_at = standby.as_ref().filter(|_| !parked).map(|s| {
            fds.push(PollFd::new(s.peek.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let listener_at = listener.map(|(l, _)| {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let signals_at = signals.map(|s| {
            fds.push(PollFd::new(s, PollFlags::POLLIN));
            fds.len() - 1
        });
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!("poll: {e}");
                break End::Disconnected;
            }
        }
        let ready = |at: Option<usize>| at.and_then(|i| fds.get(i)).is_some_and(readable);
        let (conn, stby, lst) = (
            fds.first().is_some_and(readable),
            ready(standby_at),
            ready(listener_at),
        );
        if ready(signals_at) {
            break End::Shutdown;
        }
        drop(fds);
        if conn {
            if !active.step() {
                let Some(next) = standby.take() else {
                    break End::Disconnected;
                };
                active.end();
                tracing::info!("front-end gone; the standby front-end takes the device over");
                active = next;
                parked = false;
            }
            continue;
        }
        if stby {
            if let Some(s) = standby.as_mut() {
                match s.next_request() {
                    None => {
                        tracing::info!("the standby front-end went away");
                        // Dropped, not ended: the device belongs to the running front-end.
                        standby = None;
                    }
                    Some(Some(code)) if !STANDBY_REQUESTS.iter().any(|r| u32::from(*r) == code) => {
                        parked = true
                    }
                    Some(_) => {
                        if !s.step() {
                            tracing::info!("the standby front-end went away");
                            standby = None;
                        }
                    }
                }
            }
            continue;
        }
        if let (true, Some((l, peers))) = (lst, listener) {
            if let Ok((s, _)) = l.accept() {
                if standby.is_some() {
                    tracing::warn!("refusing a third front-end while one runs and one waits");
                } else if peers.admit(&s) {
                    tracing::info!(
                        "a second front-end connected: in standby until the running one goes"
                    );
                    standby = Conn::new(dev, s);
                    parked = false;
                }
            }
        }
    };
    active.end();
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
