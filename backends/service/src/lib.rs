//! What baton's back-ends (baton-blk, baton-net-tap) share as long-lived system services: the
//! vhost-user listening socket, inherited from the service manager (systemd socket activation,
//! or baton-supervise) or bound at a path, readiness reported with `sd_notify("READY=1")`, and
//! fds kept in the manager's fd store across restarts ([`sd`]: the protocol, both sides, a few
//! lines written by hand rather than a systemd crate). And what both share as vhost-user devices
//! facing untrusted peers: shared memory mapped so that a truncated file cannot kill them
//! ([`memory`]), the checks a guest-controlled ring needs before a worker loops on it
//! ([`ring`]), a deadline on each front-end message ([`conn`]), and the sandbox each back-end
//! enters once set up: seccomp filters per thread kind and Landlock ([`sandbox`]), which
//! baton-vmm enters too. [`supervise`] is baton-supervise, the fd store and restart loop for
//! hosts where systemd is not the service manager. [`vhost`] is the back-end framework: one
//! vhost-user request handler and connection loop over each back-end's device core, with
//! rate-limited logging of peer-triggered errors ([`ratelimit`]).

pub mod conn;
pub mod memory;
pub mod ratelimit;
pub mod ring;
pub mod sandbox;
pub mod sd;
pub mod supervise;
pub mod vhost;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

pub use sd::{ListenFds, notify_ready};

/// Errors setting up the listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Neither a path nor socket activation.
    #[error("no socket: pass --socket PATH or start under socket activation (LISTEN_FDS)")]
    NoSocket,
    /// The socket's directory does not exist.
    #[error("cannot listen on {0}: directory {1} does not exist")]
    NoDir(PathBuf, PathBuf),
    /// The path exists and is not a socket (it is never removed).
    #[error("cannot listen on {0}: it exists and is not a socket")]
    NotASocket(PathBuf),
    /// bind() or listen() failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The service manager passed fds, none of them a UNIX listening socket, and no path was
    /// given.
    #[error("socket activation: none of the {0} fds passed is a UNIX listening socket")]
    BadActivationFd(usize),
}

/// The listening socket: the one the service manager passed (socket activation), else a socket
/// bound at `path` (a stale socket file there is replaced). Returns whether this process bound
/// it (and so should remove the file when it stops). Call before starting threads: it takes
/// the fds passed at exec ([`ListenFds::from_env`]) and drops the others; a service that wants
/// more of them calls [`listener_from`].
pub fn listener(path: Option<&Path>) -> Result<(UnixListener, bool), ListenError> {
    listener_from(&mut ListenFds::from_env(), path)
}

/// [`listener`] taking the socket from `passed`, which keeps the other fds.
pub fn listener_from(
    passed: &mut ListenFds,
    path: Option<&Path>,
) -> Result<(UnixListener, bool), ListenError> {
    if let Some(l) = passed.take_listener() {
        return Ok((l, false));
    }
    if path.is_none() && !passed.is_empty() {
        return Err(ListenError::BadActivationFd(passed.len()));
    }
    let path = path.ok_or(ListenError::NoSocket)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(ListenError::NoDir(path.into(), dir.into()));
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket(path.into()));
        }
        // A stale socket left by a previous instance.
        let _ = std::fs::remove_file(path);
    }
    // The socket file is created 0600 whatever the caller's umask: bind under a umask of 0177.
    // The umask is process-wide; this runs before any thread exists (see above).
    // SAFETY: umask has no memory-safety preconditions.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
        .map(|l| (l, true))
        .map_err(|source| ListenError::Bind {
            path: path.into(),
            source,
        })
}

/// Which local users may be a front-end: SO_PEERCRED of every accepted connection against an
/// allowlist of uids (by default only the service's own uid). A peer outside it is closed
/// before it can send a message.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allowed: Vec<u32>,
}

/// A connection from a peer the policy refuses.
#[derive(Debug, thiserror::Error)]
pub enum PeerRefused {
    /// SO_PEERCRED failed.
    #[error("cannot read the peer's credentials: {0}")]
    Creds(#[source] std::io::Error),
    /// The peer's uid is not allowed.
    #[error(
        "refusing a front-end of uid {uid} (pid {pid}): allowed uids are {allowed:?} (--allow-uid)"
    )]
    Uid {
        /// Peer uid.
        uid: u32,
        /// Peer pid.
        pid: i32,
        /// The allowlist.
        allowed: Vec<u32>,
    },
}

impl PeerPolicy {
    /// Allows `uids`, or only our own uid when empty.
    pub fn new(uids: &[u32]) -> Self {
        let allowed = if uids.is_empty() {
            // SAFETY: getuid has no preconditions.
            vec![unsafe { libc::getuid() }]
        } else {
            uids.to_vec()
        };
        Self { allowed }
    }

    /// Checks an accepted connection's peer.
    pub fn admit(&self, stream: &std::os::unix::net::UnixStream) -> Result<(), PeerRefused> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, which we own.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast(),
                &raw mut len,
            )
        };
        if r != 0 {
            return Err(PeerRefused::Creds(std::io::Error::last_os_error()));
        }
        if self.allowed.contains(&cred.uid) {
            Ok(())
        } else {
            Err(PeerRefused::Uid {
                uid: cred.uid,
                pid: cred.pid,
                allowed: self.allowed.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_replaces_stale_sockets_and_refuses_other_files() {
        let dir = std::env::temp_dir().join(format!("baton-service-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let (l, bound) = listener(Some(&sock)).unwrap();
        assert!(bound);
        drop(l);
        // The file stays behind, stale: a new instance replaces it.
        assert!(listener(Some(&sock)).is_ok());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "socket mode {mode:o}");
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            listener(Some(&file)),
            Err(ListenError::NotASocket(_))
        ));
        assert!(file.exists(), "a regular file is never removed");
        let missing = dir.join("no/such/dir/s.sock");
        assert!(matches!(
            listener(Some(&missing)),
            Err(ListenError::NoDir(..))
        ));
        assert!(matches!(listener(None), Err(ListenError::NoSocket)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn peers_are_checked_against_the_allowlist() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        assert!(PeerPolicy::new(&[]).admit(&a).is_ok());
        assert!(PeerPolicy::new(&[me]).admit(&a).is_ok());
        let e = PeerPolicy::new(&[me + 1]).admit(&a).unwrap_err();
        assert!(e.to_string().contains(&format!("uid {me}")), "{e}");
    }
}
