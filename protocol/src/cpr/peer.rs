//! SO_PEERCRED: only a peer with our uid, or root, may take part in a live update.

use std::os::unix::net::UnixStream;

use nix::sys::socket::{getsockopt, sockopt};

use super::CprError;

/// Credentials of the process at the other end of a UNIX socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id at connect time.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// Reads the peer's credentials (SO_PEERCRED).
pub fn peer_cred(stream: &UnixStream) -> Result<PeerCred, CprError> {
    let c = getsockopt(stream, sockopt::PeerCredentials).map_err(CprError::PeerCred)?;
    Ok(PeerCred {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// Accepts `peer` if it runs as `our_uid` or as root.
pub fn check_credentials(peer: &PeerCred, our_uid: u32) -> Result<(), CprError> {
    if peer.uid == our_uid || peer.uid == 0 {
        return Ok(());
    }
    Err(CprError::PeerRejected {
        pid: peer.pid,
        uid: peer.uid,
        ours: our_uid,
    })
}

/// Checks that the peer of `stream` runs as our effective uid or as root; returns its
/// credentials (the pid is the one to compare with the handshake's `Hello::pid`).
pub fn check_peer(stream: &UnixStream) -> Result<PeerCred, CprError> {
    let peer = peer_cred(stream)?;
    check_credentials(&peer, nix::unistd::geteuid().as_raw())?;
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read};
    use std::time::Duration;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn own_uid_accepted() {
        let (a, b) = pair();
        let peer = check_peer(&a).unwrap();
        assert_eq!(peer.pid, i32::try_from(std::process::id()).unwrap());
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        check_peer(&b).unwrap();
    }

    #[test]
    fn other_uid_rejected_root_accepted() {
        let other = PeerCred {
            pid: 4242,
            uid: 1001,
            gid: 1001,
        };
        let e = check_credentials(&other, 1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "peer pid 4242 runs as uid 1001; only uid 1000 or root may take part"
        );
        check_credentials(&PeerCred { uid: 0, ..other }, 1000).unwrap();
        check_credentials(&PeerCred { uid: 1000, ..other }, 1000).unwrap();
    }

    const CHILD_ENV: &str = "BATON_CPR_TEST_CONNECT";

    /// Not a test by itself: the child half of `other_uid_rejected_for_real`.
    #[test]
    fn child_connects_when_asked() {
        let Ok(path) = std::env::var(CHILD_ENV) else {
            return;
        };
        let mut s = UnixStream::connect(path).unwrap();
        // Wait for the parent to close.
        let _ = s.read(&mut [0u8; 1]);
    }

    #[test]
    fn other_uid_rejected_for_real() {
        use std::os::unix::fs::PermissionsExt;
        use std::process::{Command, Stdio};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to run a child as uid 65534");
            return;
        }
        let dir = std::env::temp_dir().join(format!("baton-cpr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.join("cpr.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let exe = std::env::current_exe().unwrap();
        let child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args([
                "--exact",
                "cpr::peer::tests::child_connects_when_asked",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("skipped: setpriv not available");
            return;
        };
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break Some(s),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        let Some(stream) = stream else {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!(
                "skipped: the child could not connect (test binary not readable by uid 65534?)"
            );
            return;
        };
        let e = check_peer(&stream).unwrap_err();
        let text = e.to_string();
        drop(stream);
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        match e {
            CprError::PeerRejected { pid, uid, .. } => {
                assert_eq!(uid, 65534, "{text}");
                assert_eq!(pid, i32::try_from(child.id()).unwrap(), "{text}");
            }
            other => panic!("expected rejection, got {other}"),
        }
        assert!(text.contains("uid 65534"), "{text}");
    }
}
