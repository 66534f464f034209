//! The **cpr channel**: named file descriptors passed from the old VMM to the new one.
//!
//! Only fds that cannot be re-opened travel here: VFIO container/group/device fds, and the
//! vhost-user inflight region (`inflight-<device>`), whose contents the back-end and the new
//! VMM must share. Guest RAM is re-mapped by path and back-ends are reconnected by socket
//! path, so neither needs this channel.
//!
//! On a connected `UnixStream` the sender writes, for each batch of at most [`MAX_FDS`] fds:
//!
//! 1. a [`Manifest`] frame (magic `BCPR`, version 1) naming the batch's fds in order, and
//!    whether another batch follows (`more`), then
//! 2. one byte carrying the batch's fds as a single `SCM_RIGHTS` control message.
//!
//! The receiver reads batches until one says no more follows, and pairs names with fds in
//! order; at most [`MAX_TOTAL_FDS`] fds in all, no name twice. If the number of fds that arrive
//! differs from the number of names, every fd that did arrive is closed and
//! [`CprError::CountMismatch`] is returned.
//! Received fds are close-on-exec. Before trusting either side of the channel, call
//! [`check_peer`]: only a peer with the same uid, or root, is accepted.
//!
//! ```
//! use std::io::{Read, Write};
//! use std::os::fd::AsFd;
//! use std::os::unix::net::UnixStream;
//! use baton_protocol::cpr::{check_peer, recv_fds, send_fds};
//!
//! let (old, new) = UnixStream::pair().unwrap();
//! check_peer(&new).unwrap();
//! let (mut here, there) = UnixStream::pair().unwrap();
//! send_fds(&old, &[("vfio-container", there.as_fd())]).unwrap();
//! let mut fds = recv_fds(&new).unwrap();
//! assert_eq!(fds[0].0, "vfio-container");
//! let mut received = UnixStream::from(fds.remove(0).1);
//! received.write_all(b"hi").unwrap();
//! let mut buf = [0; 2];
//! here.read_exact(&mut buf).unwrap();
//! assert_eq!(&buf, b"hi");
//! ```

use std::collections::HashSet;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::frame::{FrameError, FrameKind, Validate, read_frame, write_frame};

mod peer;

pub use peer::{PeerCred, check_credentials, check_peer, peer_cred};

/// Frame kind of the fd manifest: magic `BCPR`, version 1.
pub const MANIFEST_KIND: FrameKind = FrameKind::new("cpr fd manifest", *b"BCPR", 1);
/// Most fds in one batch (one `SCM_RIGHTS` message).
pub const MAX_FDS: usize = 64;
/// Most fds in all (a passed-through device brings one per MSI-X vector).
pub const MAX_TOTAL_FDS: usize = 1024;
/// Longest fd name in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Largest manifest frame a reader accepts.
pub const MAX_MANIFEST_LEN: usize = 64 << 10;
/// The kernel's per-message limit (`SCM_MAX_FD`); the receive buffer has room for this many,
/// so a sender that exceeds [`MAX_FDS`] cannot truncate the control message and leak fds.
const SCM_MAX_FD: usize = 253;
/// The byte that carries the fds.
const MARKER: u8 = b'F';

/// Names of the fds that follow, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// One name per fd, e.g. `vfio-container`, `inflight-disk0`.
    pub names: Vec<String>,
    /// Another batch follows (absent: no).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// Why a manifest is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// More names than [`MAX_FDS`].
    #[error("{0} fds named (at most {MAX_FDS})")]
    TooMany(usize),
    /// An empty name.
    #[error("fd {0} has an empty name")]
    EmptyName(usize),
    /// A name that is too long or has control characters.
    #[error("fd {0} has a name over {MAX_NAME_LEN} bytes or with control characters")]
    BadName(usize),
    /// The same name twice.
    #[error("fd name {0:?} appears twice")]
    Duplicate(String),
}

impl Validate for Manifest {
    type Error = ManifestError;
    fn validate(&self) -> Result<(), ManifestError> {
        if self.names.len() > MAX_FDS {
            return Err(ManifestError::TooMany(self.names.len()));
        }
        let mut seen = HashSet::new();
        for (i, n) in self.names.iter().enumerate() {
            if n.is_empty() {
                return Err(ManifestError::EmptyName(i));
            }
            if n.len() > MAX_NAME_LEN || n.chars().any(char::is_control) {
                return Err(ManifestError::BadName(i));
            }
            if !seen.insert(n.as_str()) {
                return Err(ManifestError::Duplicate(n.clone()));
            }
        }
        Ok(())
    }
}

/// Errors on the cpr channel, one per step.
#[derive(Debug, thiserror::Error)]
pub enum CprError {
    /// The manifest could not be written, read or validated.
    #[error("fd manifest: {0}")]
    Manifest(#[from] FrameError),
    /// The caller asked to send more fds than allowed.
    #[error("{count} fds to send (at most {MAX_TOTAL_FDS})")]
    TooManyFds {
        /// Fds given.
        count: usize,
    },
    /// `sendmsg` with the fds failed.
    #[error("sending {count} fds with SCM_RIGHTS: {source}")]
    Send {
        /// Fds being sent.
        count: usize,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// `recvmsg` for the fds failed (EAGAIN: the socket's read timeout expired).
    #[error("receiving fds with SCM_RIGHTS: {0}")]
    Recv(#[source] Errno),
    /// The peer closed the channel after the manifest, before the fds.
    #[error("peer closed the cpr channel before sending the {0} fds it named")]
    Closed(usize),
    /// The control message was truncated (more fds than the kernel allows per message).
    #[error("SCM_RIGHTS control message truncated")]
    Truncated,
    /// The fds that arrived do not match the manifest; all were closed.
    #[error("manifest names {named} fds but {received} arrived (all closed)")]
    CountMismatch {
        /// Names in the manifest.
        named: usize,
        /// Fds that arrived.
        received: usize,
    },
    /// SO_PEERCRED could not be read.
    #[error("reading SO_PEERCRED: {0}")]
    PeerCred(#[source] Errno),
    /// The peer runs as another, non-root user.
    #[error("peer pid {pid} runs as uid {uid}; only uid {ours} or root may take part")]
    PeerRejected {
        /// Peer's pid.
        pid: i32,
        /// Peer's uid.
        uid: u32,
        /// Our effective uid.
        ours: u32,
    },
}

impl CprError {
    /// True when the peer went away or timed out rather than sending something wrong.
    pub fn is_disconnect(&self) -> bool {
        match self {
            CprError::Manifest(f) => f.is_disconnect(),
            CprError::Closed(_) | CprError::Recv(_) => true,
            CprError::Send { source, .. } => matches!(source, Errno::EPIPE | Errno::ECONNRESET),
            _ => false,
        }
    }
}

/// Sends `fds` with their names, in batches of at most [`MAX_FDS`]: each a manifest frame,
/// then one byte with `SCM_RIGHTS`.
pub fn send_fds(stream: &UnixStream, fds: &[(&str, BorrowedFd<'_>)]) -> Result<(), CprError> {
    if fds.len() > MAX_TOTAL_FDS {
        return Err(CprError::TooManyFds { count: fds.len() });
    }
    let mut batches = fds.chunks(MAX_FDS).peekable();
    if batches.peek().is_none() {
        return send_batch(stream, &[], false);
    }
    while let Some(batch) = batches.next() {
        send_batch(stream, batch, batches.peek().is_some())?;
    }
    Ok(())
}

fn send_batch(
    stream: &UnixStream,
    fds: &[(&str, BorrowedFd<'_>)],
    more: bool,
) -> Result<(), CprError> {
    let manifest = Manifest {
        names: fds.iter().map(|(n, _)| (*n).to_string()).collect(),
        more,
    };
    // Check locally what the receiver will check, so a bad name fails here.
    manifest.validate().map_err(|e| FrameError::Invalid {
        kind: MANIFEST_KIND.name,
        source: Box::new(e),
    })?;
    let mut w = stream;
    write_frame(&mut w, &MANIFEST_KIND, &manifest)?;
    let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(&[MARKER])];
    let count = raw.len();
    loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(1) => return Ok(()),
            Ok(_) => {
                return Err(CprError::Send {
                    count,
                    source: Errno::EPIPE,
                });
            }
            Err(Errno::EINTR) => {}
            Err(source) => return Err(CprError::Send { count, source }),
        }
    }
}

/// Receives the batches [`send_fds`] sent; returns the fds paired with their names, in order.
pub fn recv_fds(stream: &UnixStream) -> Result<Vec<(String, OwnedFd)>, CprError> {
    let mut all: Vec<(String, OwnedFd)> = Vec::new();
    loop {
        let (batch, more) = recv_batch(stream)?;
        all.extend(batch);
        if all.len() > MAX_TOTAL_FDS {
            // `all` is dropped here, closing every fd that arrived.
            return Err(CprError::TooManyFds { count: all.len() });
        }
        let mut seen = HashSet::new();
        if let Some((dup, _)) = all.iter().find(|(n, _)| !seen.insert(n.as_str())) {
            let e = ManifestError::Duplicate(dup.clone());
            return Err(CprError::Manifest(FrameError::Invalid {
                kind: MANIFEST_KIND.name,
                source: Box::new(e),
            }));
        }
        if !more {
            return Ok(all);
        }
    }
}

/// One batch: its fds with their names, and whether another follows.
fn recv_batch(stream: &UnixStream) -> Result<(Vec<(String, OwnedFd)>, bool), CprError> {
    let mut r = stream;
    let manifest: Manifest = read_frame(&mut r, &MANIFEST_KIND, MAX_MANIFEST_LEN)?;
    let named = manifest.names.len();
    let mut byte = [0u8; 1];
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let (bytes, truncated, received) = loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                let mut received = Vec::new();
                // With MSG_CTRUNC nix refuses to iterate; the buffer holds SCM_MAX_FD fds,
                // which the kernel never exceeds, so that only happens for other cmsg types.
                for c in msg.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for fd in fds {
                            // SAFETY: the kernel just installed `fd` in this process for this
                            // SCM_RIGHTS message; nothing else refers to it, so it is owned here.
                            received.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                break (msg.bytes, truncated, received);
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(CprError::Recv(e)),
        }
    };
    if truncated {
        return Err(CprError::Truncated);
    }
    if bytes == 0 && received.is_empty() {
        return Err(CprError::Closed(named));
    }
    if received.len() != named {
        // `received` is dropped here, closing every fd that arrived.
        return Err(CprError::CountMismatch {
            named,
            received: received.len(),
        });
    }
    let more = manifest.more;
    Ok((manifest.names.into_iter().zip(received).collect(), more))
}

/// Removes the fd called `name` from a received list.
pub fn take_fd(fds: &mut Vec<(String, OwnedFd)>, name: &str) -> Option<OwnedFd> {
    let i = fds.iter().position(|(n, _)| n == name)?;
    Some(fds.swap_remove(i).1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    use nix::sys::eventfd::EventFd;
    use nix::sys::memfd::{MFdFlags, memfd_create};

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    /// Sends a manifest naming `names`, then `fds`, bypassing `send_fds`'s checks.
    fn send_raw(s: &UnixStream, names: &[&str], fds: &[RawFd]) {
        let m = Manifest {
            names: names.iter().map(|n| n.to_string()).collect(),
            more: false,
        };
        write_frame(&mut &*s, &MANIFEST_KIND, &m).unwrap();
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(
            s.as_raw_fd(),
            &[IoSlice::new(b"F")],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    /// True once every copy of the far end of `near` is closed.
    fn far_end_closed(near: &mut UnixStream) -> bool {
        near.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match near.read(&mut [0u8; 1]) {
            Ok(0) => true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn memfd_pipe_and_eventfd_work_through_the_channel() {
        let (old, new) = pair();
        let memfd = File::from(memfd_create("baton-cpr-test", MFdFlags::MFD_CLOEXEC).unwrap());
        memfd.set_len(4096).unwrap();
        let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
        let efd = EventFd::new().unwrap();
        send_fds(
            &old,
            &[
                ("inflight-disk0", memfd.as_fd()),
                ("pipe-w", pipe_w.as_fd()),
                ("eventfd", efd.as_fd()),
            ],
        )
        .unwrap();
        let mut fds = recv_fds(&new).unwrap();
        let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["inflight-disk0", "pipe-w", "eventfd"]);

        let m = File::from(take_fd(&mut fds, "inflight-disk0").unwrap());
        m.write_all_at(b"shared", 100).unwrap();
        let mut buf = [0u8; 6];
        memfd.read_exact_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"shared");

        let mut w = File::from(take_fd(&mut fds, "pipe-w").unwrap());
        drop(pipe_w);
        w.write_all(b"via pipe").unwrap();
        drop(w);
        let mut got = String::new();
        File::from(pipe_r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "via pipe");

        let mut e = File::from(take_fd(&mut fds, "eventfd").unwrap());
        e.write_all(&5u64.to_ne_bytes()).unwrap();
        assert_eq!(efd.read().unwrap(), 5);
        assert!(fds.is_empty());
    }

    #[test]
    fn received_fds_are_close_on_exec() {
        let (old, new) = pair();
        let (_a, b) = pair();
        send_fds(&old, &[("x", b.as_fd())]).unwrap();
        let fds = recv_fds(&new).unwrap();
        let flags = nix::fcntl::fcntl(&fds[0].1, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc_fd_cloexec(), 0);
    }

    fn libc_fd_cloexec() -> i32 {
        nix::fcntl::FdFlag::FD_CLOEXEC.bits()
    }

    #[test]
    fn zero_and_max_fds_round_trip() {
        let (old, new) = pair();
        send_fds(&old, &[]).unwrap();
        assert!(recv_fds(&new).unwrap().is_empty());

        let (_keep, far) = pair();
        let names: Vec<String> = (0..MAX_FDS).map(|i| format!("fd{i}")).collect();
        let list: Vec<(&str, BorrowedFd)> =
            names.iter().map(|n| (n.as_str(), far.as_fd())).collect();
        send_fds(&old, &list).unwrap();
        let got = recv_fds(&new).unwrap();
        assert_eq!(got.len(), MAX_FDS);
        assert_eq!(got[63].0, "fd63");
    }

    #[test]
    fn fewer_fds_than_names_is_an_error_and_closes_what_arrived() {
        let (old, new) = pair();
        let (mut near, far) = pair();
        send_raw(&old, &["a", "b", "c"], &[far.as_raw_fd()]);
        drop(far);
        let e = recv_fds(&new).unwrap_err();
        assert!(
            matches!(
                e,
                CprError::CountMismatch {
                    named: 3,
                    received: 1
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("names 3 fds but 1 arrived"), "{e}");
        assert!(far_end_closed(&mut near), "received fd leaked");
    }

    #[test]
    fn more_fds_than_names_is_an_error_and_closes_them() {
        let (old, new) = pair();
        let (mut near, far) = pair();
        send_raw(&old, &["only"], &[far.as_raw_fd(), far.as_raw_fd()]);
        drop(far);
        let e = recv_fds(&new).unwrap_err();
        assert!(
            matches!(
                e,
                CprError::CountMismatch {
                    named: 1,
                    received: 2
                }
            ),
            "{e}"
        );
        assert!(far_end_closed(&mut near), "received fds leaked");
    }

    #[test]
    fn over_the_cap_rejected_on_both_sides() {
        let (old, new) = pair();
        let (_a, b) = pair();
        let list = vec![("x", b.as_fd()); MAX_TOTAL_FDS + 1];
        assert!(matches!(
            send_fds(&old, &list),
            Err(CprError::TooManyFds { count: 1025 })
        ));
        // One batch over the per-message cap.
        let names: Vec<String> = (0..=MAX_FDS).map(|i| format!("fd{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        send_raw(&old, &refs, &[b.as_raw_fd()]);
        let e = recv_fds(&new).unwrap_err();
        assert!(
            matches!(&e, CprError::Manifest(FrameError::Invalid { .. })),
            "{e}"
        );
    }

    #[test]
    fn many_fds_travel_in_batches_in_order() {
        // A passed-through device with 65 MSI-X vectors, and more: four batches.
        let (old, new) = pair();
        let (_a, b) = pair();
        let names: Vec<String> = (0..200).map(|i| format!("vector-{i}")).collect();
        let list: Vec<(&str, BorrowedFd<'_>)> =
            names.iter().map(|n| (n.as_str(), b.as_fd())).collect();
        send_fds(&old, &list).unwrap();
        let got = recv_fds(&new).unwrap();
        let got_names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(got_names, names);
    }

    #[test]
    fn a_name_repeated_in_a_later_batch_is_rejected() {
        let (old, new) = pair();
        let (_a, b) = pair();
        let first = Manifest {
            names: vec!["vfio-container".into()],
            more: true,
        };
        write_frame(&mut &old, &MANIFEST_KIND, &first).unwrap();
        sendmsg::<()>(
            old.as_raw_fd(),
            &[IoSlice::new(b"F")],
            &[ControlMessage::ScmRights(&[b.as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        send_raw(&old, &["vfio-container"], &[b.as_raw_fd()]);
        let e = recv_fds(&new).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn bad_names_rejected_before_sending() {
        let (old, _new) = pair();
        let (_a, b) = pair();
        for names in [vec![""], vec!["a", "a"], vec!["a\nb"]] {
            let list: Vec<(&str, BorrowedFd)> = names.iter().map(|n| (*n, b.as_fd())).collect();
            let e = send_fds(&old, &list).unwrap_err();
            assert!(
                matches!(&e, CprError::Manifest(FrameError::Invalid { .. })),
                "{e}"
            );
        }
        let long = "n".repeat(MAX_NAME_LEN + 1);
        assert!(send_fds(&old, &[(long.as_str(), b.as_fd())]).is_err());
    }

    #[test]
    fn peer_closing_after_manifest_is_reported() {
        let (old, new) = pair();
        let m = Manifest {
            names: vec!["vfio-container".into()],
            more: false,
        };
        write_frame(&mut &old, &MANIFEST_KIND, &m).unwrap();
        drop(old);
        let e = recv_fds(&new).unwrap_err();
        assert!(matches!(e, CprError::Closed(1)), "{e}");
        assert!(e.is_disconnect());
        let (old, new) = pair();
        drop(new);
        let e = send_fds(&old, &[]).unwrap_err();
        assert!(e.is_disconnect(), "{e}");
    }

    #[test]
    fn garbage_instead_of_manifest_rejected() {
        let (mut old, new) = pair();
        old.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(matches!(
            recv_fds(&new).unwrap_err(),
            CprError::Manifest(FrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn recv_timeout_is_an_error() {
        let (old, new) = pair();
        write_frame(
            &mut &old,
            &MANIFEST_KIND,
            &Manifest {
                names: vec!["a".into()],
                more: false,
            },
        )
        .unwrap();
        new.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let e = recv_fds(&new).unwrap_err();
        assert!(matches!(e, CprError::Recv(Errno::EAGAIN)), "{e}");
    }
}
