//! What baton's back-ends (baton-blk, baton-net-tap) share as long-lived system services: the
//! vhost-user listening socket, inherited from the service manager (systemd socket activation:
//! `LISTEN_PID`/`LISTEN_FDS`, fd 3) or bound at a path, and readiness reported with
//! `sd_notify("READY=1")`. Both are a few lines of protocol, written by hand rather than
//! pulling in a systemd crate. And what both share as vhost-user devices facing untrusted peers:
//! shared memory mapped so that a truncated file cannot kill them ([`memory`]), the checks a
//! guest-controlled ring needs before a worker loops on it ([`ring`]), a deadline on each
//! front-end message ([`conn`]), and the sandbox each back-end enters once set up: seccomp
//! filters per thread kind and Landlock ([`sandbox`]), which baton-vmm enters too.

pub mod conn;
pub mod memory;
pub mod ring;
pub mod sandbox;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};

/// The file descriptor systemd passes the first socket in.
const LISTEN_FDS_START: i32 = 3;

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
    /// LISTEN_FDS says fd 3 is our socket, but it is not a UNIX socket.
    #[error("socket activation: fd 3 is not a UNIX listening socket")]
    BadActivationFd,
}

/// Whether the service manager passed us a socket (`LISTEN_PID` is us, `LISTEN_FDS` ≥ 1).
fn activated() -> bool {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    ours && fds >= 1
}

/// The listening socket: fd 3 under socket activation, else a socket bound at `path` (a stale
/// socket file there is replaced). Returns whether this process bound it (and so should remove
/// the file when it stops). Call before starting threads: it clears the activation variables
/// so that child processes do not inherit them.
pub fn listener(path: Option<&Path>) -> Result<(UnixListener, bool), ListenError> {
    if activated() {
        // SAFETY: under socket activation fd 3 is the listening socket the service manager
        // passed to us; nothing else in this process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
        // SAFETY: FD_CLOEXEC on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let l = UnixListener::from(fd);
        if l.local_addr().is_err() {
            return Err(ListenError::BadActivationFd);
        }
        // SAFETY: called before any thread is spawned, so nothing reads the environment
        // concurrently.
        unsafe {
            std::env::remove_var("LISTEN_PID");
            std::env::remove_var("LISTEN_FDS");
        }
        return Ok((l, false));
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

/// Sends `READY=1` to `$NOTIFY_SOCKET` if set (a path, or an abstract name after '@').
pub fn notify_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|s| {
        let bytes = target.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            s.send_to_addr(b"READY=1", &addr)
        } else {
            s.send_to(b"READY=1", Path::new(&target))
        }
    });
    if let Err(e) = sent {
        tracing::warn!("sd_notify to {} failed: {e}", target.to_string_lossy());
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
    fn readiness_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("baton-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only reader of NOTIFY_SOCKET in this process.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify_ready();
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 16];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
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
