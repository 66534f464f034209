//! A deadline on each vhost-user message.
//!
//! The vhost crate reads a message's header and then its body with blocking reads, retrying on
//! EAGAIN, so neither a read timeout nor a non-blocking socket helps: a front-end that sends a
//! header and half a body would hold the back-end's connection thread forever (and with it the
//! rings' control path and SIGTERM). So the message is waited for here first: idle time
//! between messages is unlimited, but once a message's first byte has arrived, all of it
//! (header, and the body the header announces) must be queued within the deadline, or the
//! connection is dropped. Written by hand: no crate offers it.
//!
//! Writing has the same trap: the vhost crate retries a reply whose send would block (EAGAIN)
//! for ever, so a front-end that sends requests and never reads the replies would, once its
//! receive queue is full, hold the connection thread in a busy loop. [`unread_replies`] lets
//! the caller drop such a front-end before that: on a UNIX stream socket, what we sent and the
//! peer has not read yet stays charged to our send buffer (SIOCOUTQ).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long a started message may take to arrive whole.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(1);

const HEADER: usize = 12;

/// A message that did not arrive whole in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "a front-end message stayed incomplete for {limit:?} ({queued} of {want} bytes): dropping the front-end"
)]
pub struct Incomplete {
    /// Bytes queued when the deadline passed.
    pub queued: usize,
    /// Bytes the message needs (the header's size, then header + body).
    pub want: usize,
    /// The deadline.
    pub limit: Duration,
}

/// Waits (without limit) for the next message to start, then (within `limit`) for all of it to
/// be queued. Returns Ok also when the peer hung up: the reader then sees the end.
pub fn await_message(sock: &UnixStream, limit: Duration) -> Result<(), Incomplete> {
    // libc's poll: nix's `revents()` drops every flag when one it does not name (POLLRDHUP) is set.
    let readable = |timeout_ms: libc::c_int| {
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&raw mut p, 1, timeout_ms) };
        if n < 0 { 0 } else { p.revents }
    };
    while readable(-1) == 0 {}
    let start = Instant::now();
    loop {
        let queued = queued(sock);
        let want = match peek_header(sock) {
            // A body larger than any valid message: let the vhost crate refuse the header.
            Some(size) if size > vhost::vhost_user::message::MAX_MSG_SIZE => return Ok(()),
            Some(size) => HEADER + size,
            None => HEADER,
        };
        if queued >= want {
            return Ok(());
        }
        if readable(0) & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
            return Ok(());
        }
        if start.elapsed() >= limit {
            return Err(Incomplete {
                queued,
                want,
                limit,
            });
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// A front-end that leaves too many replies unread.
#[derive(Debug, thiserror::Error)]
#[error(
    "the front-end left {unread} bytes of replies unread (send buffer {sndbuf}): it does not read them; dropping it"
)]
pub struct NotReading {
    /// Bytes sent and not read by the peer (with the kernel's per-message overhead).
    pub unread: usize,
    /// Our send buffer.
    pub sndbuf: usize,
}

/// Checks, before serving the next message, that the front-end reads our replies: fails when
/// what it left unread fills half of our send buffer (a front-end waits for each reply it asks
/// for; replies are a few hundred bytes).
pub fn unread_replies(sock: &UnixStream) -> Result<(), NotReading> {
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to the pointer we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) } != 0 {
        return Ok(());
    }
    let mut sndbuf: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: getsockopt writes at most `len` bytes to the int we pass, and its length to len.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw mut sndbuf).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Ok(());
    }
    let (unread, sndbuf) = (
        usize::try_from(outq).unwrap_or(0),
        usize::try_from(sndbuf).unwrap_or(usize::MAX),
    );
    if unread > sndbuf / 2 {
        return Err(NotReading { unread, sndbuf });
    }
    Ok(())
}

/// Bytes queued on the socket (all of them, across sends: FIONREAD on a UNIX stream socket).
fn queued(sock: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer we pass.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    if r != 0 {
        return 0;
    }
    usize::try_from(n).unwrap_or(0)
}

/// The body size of the queued message's header, once its 12 bytes are there.
fn peek_header(sock: &UnixStream) -> Option<usize> {
    let mut hdr = [0u8; HEADER];
    // SAFETY: recv writes at most hdr.len() bytes into hdr.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if usize::try_from(n).ok()? < HEADER {
        return None;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    usize::try_from(size).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn header(size: u32) -> Vec<u8> {
        let mut h = vec![1, 0, 0, 0, 1, 0, 0, 0];
        h.extend_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn whole_messages_pass_and_half_messages_time_out() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&header(8)).unwrap();
        a.write_all(&[0; 8]).unwrap();
        assert!(await_message(&b, Duration::from_millis(50)).is_ok());
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&header(40)).unwrap();
        a.write_all(&[0; 10]).unwrap();
        let t = Instant::now();
        let e = await_message(&b, Duration::from_millis(100)).unwrap_err();
        assert_eq!((e.queued, e.want), (22, 52));
        assert!(t.elapsed() < Duration::from_secs(1));
        // Half a header times out too.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[1, 0, 0]).unwrap();
        assert!(await_message(&b, Duration::from_millis(50)).is_err());
        // A hang-up mid-message is left to the reader.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&header(40)).unwrap();
        drop(a);
        assert!(await_message(&b, Duration::from_millis(50)).is_ok());
    }

    #[test]
    fn a_peer_that_does_not_read_is_noticed_before_our_sends_block() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let reply = [0u8; 256];
        let mut sent = 0;
        let err = loop {
            if let Err(e) = unread_replies(&ours) {
                break e;
            }
            // A send that would block means the check came too late.
            ours.write_all(&reply)
                .expect("the check fires before the buffer is full");
            sent += reply.len();
        };
        assert!(err.unread > err.sndbuf / 2 && sent > 0, "{err}");
        // Once the peer reads, it passes again.
        let mut theirs = theirs;
        theirs.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while std::io::Read::read(&mut theirs, &mut buf).is_ok() {}
        assert!(unread_replies(&ours).is_ok());
    }
}
