//! What baton's back-ends (baton-blk, baton-net-tap) share as long-lived system services: the
//! vhost-user listening socket, inherited from the service manager (systemd socket activation,
//! or baton-supervise) or bound at a path, readiness reported with `sd_notify("READY=1")`, and
//! fds kept in the manager's fd store across restarts ([`sd`]: the protocol, both sides, a few
//! lines written by hand rather than a systemd crate). And what both share as vhost-user devices
//! facing untrusted peers: shared memory mapped so that a truncated file cannot kill them
//! ([`memory`]), the checks a guest-controlled ring needs before a worker loops on it
//! ([`ring`]), a deadline on each front-end message ([`conn`]), the inflight region
//! (INFLIGHT_SHMFD) that lets a restarted back-end resubmit what its predecessor left
//! ([`inflight`]), and the sandbox each back-end
//! enters once set up: seccomp filters per thread kind and Landlock ([`sandbox`]), which
//! baton-vmm enters too. [`supervise`] is baton-supervise, the fd store and restart loop for
//! hosts where systemd is not the service manager. [`vhost`] is the back-end framework: one
//! vhost-user request handler, connection loop and accept loop over each back-end's device
//! core, with rate-limited logging of peer-triggered errors ([`ratelimit`]).

pub mod access;
pub mod conn;
pub mod inflight;
pub mod memory;
pub mod privilege;
pub mod ratelimit;
pub mod ring;
pub mod sandbox;
pub mod sd;
pub mod skip;
pub mod supervise;
pub mod uring;
pub mod vhost;

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
    /// Binding failed, or the path holds something that is not a stale socket (a file, a
    /// directory, a symlink, a live socket: never removed).
    #[error("cannot listen: {0}")]
    Bind(#[source] access::BindError),
    /// The service manager passed fds, none of them a UNIX listening socket, and no path was
    /// given.
    #[error("socket activation: none of the {0} fds passed is a UNIX listening socket")]
    BadActivationFd(usize),
}

/// The listening socket: the one the service manager passed (socket activation), else a socket
/// bound at `path` for `allow` (see [`access::bind_private`]; a stale socket there is replaced). Returns whether this process bound
/// it (and so should remove the file when it stops). Call before starting threads: it takes
/// the fds passed at exec ([`ListenFds::from_env`]) and drops the others; a service that wants
/// more of them calls [`listener_from`].
pub fn listener(
    path: Option<&Path>,
    allow: &access::AllowList,
) -> Result<(UnixListener, bool), ListenError> {
    listener_from(&mut ListenFds::from_env(), path, allow)
}

/// [`listener`] taking the socket from `passed`, which keeps the other fds.
pub fn listener_from(
    passed: &mut ListenFds,
    path: Option<&Path>,
    allow: &access::AllowList,
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
    // 0600 whatever the umask, an ACL entry per extra allowed uid; only a stale socket is
    // replaced (see access::bind_private).
    access::bind_private(path, allow)
        .map(|l| (l, true))
        .map_err(ListenError::Bind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use access::AllowList;

    #[test]
    fn binds_replaces_stale_sockets_and_refuses_other_files() {
        let dir = std::env::temp_dir().join(format!("baton-service-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let own = AllowList::new(&[]);
        let (l, bound) = listener(Some(&sock), &own).unwrap();
        assert!(bound);
        // A live socket is never replaced.
        assert!(matches!(
            listener(Some(&sock), &own),
            Err(ListenError::Bind(access::BindError::InUse(_)))
        ));
        drop(l);
        // The file stays behind, stale: a new instance replaces it.
        assert!(listener(Some(&sock), &own).is_ok());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "socket mode {mode:o}");
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            listener(Some(&file), &own),
            Err(ListenError::Bind(access::BindError::NotSocket { .. }))
        ));
        assert!(file.exists(), "a regular file is never removed");
        let missing = dir.join("no/such/dir/s.sock");
        assert!(matches!(
            listener(Some(&missing), &own),
            Err(ListenError::NoDir(..))
        ));
        assert!(matches!(listener(None, &own), Err(ListenError::NoSocket)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn peers_are_checked_against_the_allowlist() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let here = Path::new("test");
        assert!(access::admit(&a, &AllowList::new(&[]), here).is_some());
        assert!(access::admit(&a, &AllowList::new(&[me + 1]), here).is_some());
        assert!(access::admit(&a, &AllowList::exactly(vec![me + 1]), here).is_none());
    }
}
