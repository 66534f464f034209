//! Who may talk to a baton process over its local sockets: the VMM's API socket and
//! live-update `--incoming` sockets (state stream and cpr channel), and each back-end's
//! vhost-user socket. One policy for all of them.
//!
//! Two layers, each enough on its own against an ordinary local user:
//!
//! - **the socket file** is created mode 0600 whatever the umask: [`bind_private`] binds
//!   under a umask of 0o177, so the file never exists with a wider mode, and only then calls
//!   listen(2). (chmod after bind would leave a moment where the socket has the umask's mode,
//!   and chmod follows a symlink swapped in at the path.) Each extra uid of the
//!   [`AllowList`] gets a POSIX ACL entry (`user:UID:rw-`), so it can connect(2) too.
//! - **every accepted connection** is checked with SO_PEERCRED against the [`AllowList`]
//!   ([`accept`]). This also holds for root, who passes any file mode, and for a socket whose
//!   mode was widened afterwards. A refused peer is closed before a byte is read from it and
//!   logged with its uid and pid, at most once a minute per uid.
//!
//! The allowlist always holds the process's own effective uid (a process of that uid could
//! ptrace it anyway); `--allow-uid` adds more. Root is not let in unless it is the process's
//! uid or listed.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use baton_protocol::cpr::{PeerCred, peer_cred};
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::Mode;

/// Errors binding a private listening socket.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A process listens on the path.
    #[error("{0} is already in use by another process")]
    InUse(PathBuf),
    /// Something other than a socket is at the path; it is left as it is.
    #[error(
        "{path} exists and is a {what}, not a socket: refusing to replace it (remove it yourself if it is stale)"
    )]
    NotSocket {
        /// The path.
        path: PathBuf,
        /// What is there.
        what: &'static str,
    },
    /// lstat or a probing connect failed in a way that does not say "stale".
    #[error("cannot tell whether {0} is a stale socket: {1}")]
    Probe(PathBuf, #[source] std::io::Error),
    /// The stale socket could not be removed.
    #[error("cannot remove the stale socket {0}: {1}")]
    RemoveStale(PathBuf, #[source] std::io::Error),
    /// socket, bind or listen failed.
    #[error("cannot bind {0}: {1}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// The ACL entry for an extra allowed uid could not be set.
    #[error(
        "cannot let uid {uid} reach {path} (POSIX ACL): {source}; --allow-uid for another uid needs a filesystem with ACLs (tmpfs, ext4, xfs)"
    )]
    Grant {
        /// The socket.
        path: PathBuf,
        /// The uid.
        uid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The uids whose processes may use a socket of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    /// Sorted, without duplicates.
    uids: Vec<u32>,
    /// Who owns the sockets once the process is set up: the uid it drops to (`--user`), else
    /// its own. No ACL entry is needed for that uid.
    owner: u32,
}

impl AllowList {
    /// Our effective uid plus `extra` (`--allow-uid`).
    pub fn new(extra: &[u32]) -> Self {
        let mut uids = extra.to_vec();
        uids.push(nix::unistd::geteuid().as_raw());
        Self::exactly(uids)
    }

    /// `extra` plus the uid the service runs as once set up: `user`'s when it drops to one
    /// (`--user`), else its own.
    pub fn for_user(extra: &[u32], user: Option<crate::privilege::User>) -> Self {
        match user {
            Some(u) => {
                let mut uids = extra.to_vec();
                uids.push(u.uid);
                AllowList {
                    owner: u.uid,
                    ..Self::exactly(uids)
                }
            }
            None => Self::new(extra),
        }
    }

    /// Exactly `uids` (tests: an allowlist without our own uid).
    pub fn exactly(mut uids: Vec<u32>) -> Self {
        uids.sort_unstable();
        uids.dedup();
        AllowList {
            uids,
            owner: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Whether `uid` may connect.
    pub fn allows(&self, uid: u32) -> bool {
        self.uids.binary_search(&uid).is_ok()
    }

    /// The allowed uids, sorted.
    pub fn uids(&self) -> &[u32] {
        &self.uids
    }
}

/// An [`AllowList`] and the socket it guards (named in the log of refusals).
#[derive(Debug, Clone)]
pub struct SocketPolicy {
    /// Who may connect.
    pub allow: AllowList,
    /// The socket, for the log.
    pub socket: PathBuf,
}

impl SocketPolicy {
    /// The policy of a listening socket bound at `socket`, or passed by the service manager
    /// (`None`: named "the activation socket" in the log).
    pub fn new(allow: AllowList, socket: Option<&Path>) -> Self {
        Self {
            allow,
            socket: socket.map_or_else(|| "the activation socket".into(), Path::to_path_buf),
        }
    }

    /// Whether an accepted connection's peer may stay (a refusal is logged).
    pub fn admit(&self, stream: &UnixStream) -> bool {
        admit(stream, &self.allow, &self.socket).is_some()
    }
}

/// Binds a listening socket at `path` that only `allow` can reach: mode 0600 (independent of
/// the umask) plus an ACL entry for each allowed uid other than the socket's owner once set up
/// (ours, or the `--user` it is given to: [`crate::privilege::chown_socket`]). A stale socket at the
/// path (nobody listening) is replaced; a live one, or anything that is not a socket (file,
/// directory, symlink), is refused and left untouched.
pub fn bind_private(path: &Path, allow: &AllowList) -> Result<UnixListener, BindError> {
    clear_stale(path)?;
    let bind = |e: nix::Error| BindError::Bind(path.into(), e.into());
    let addr = UnixAddr::new(path).map_err(bind)?;
    let fd: OwnedFd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(bind)?;
    {
        // umask is per process: serialise our own users of it. Nothing else in the VMM
        // creates files while the sockets are bound (it happens before the VM exists).
        static UMASK: Mutex<()> = Mutex::new(());
        let _one = UMASK.lock().unwrap_or_else(|e| e.into_inner());
        let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
        let r = nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr);
        nix::sys::stat::umask(old);
        r.map_err(bind)?;
    }
    // From here on the file is ours: remove it if anything fails.
    let fail = |e: BindError| {
        let _ = std::fs::remove_file(path);
        e
    };
    let owner = allow.owner;
    if let Some(&uid) = allow.uids().iter().find(|u| **u != owner) {
        // One ACL holds every extra uid.
        grant(path, owner, allow.uids()).map_err(|source| {
            fail(BindError::Grant {
                path: path.into(),
                uid,
                source,
            })
        })?;
    }
    nix::sys::socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| fail(bind(e)))?;
    Ok(UnixListener::from(fd))
}

/// Removes a stale socket at `path`; refuses a live one and anything that is not a socket.
fn clear_stale(path: &Path) -> Result<(), BindError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(BindError::Probe(path.into(), e)),
    };
    let t = meta.file_type();
    if !t.is_socket() {
        let what = if t.is_symlink() {
            "symlink"
        } else if t.is_dir() {
            "directory"
        } else if t.is_file() {
            "regular file"
        } else {
            "special file"
        };
        return Err(BindError::NotSocket {
            path: path.into(),
            what,
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse(path.into())),
        // Only "nobody listens" means stale; EACCES and the like leave it alone.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| BindError::RemoveStale(path.into(), e))
        }
        Err(e) => Err(BindError::Probe(path.into(), e)),
    }
}

/// Lets every uid of `allow` other than its owner reach the socket at `path` (bound by us,
/// mode 0600): a POSIX ACL entry each. Nothing to do when `allow` holds only the owner.
pub fn grant_allowed(path: &Path, allow: &AllowList) -> std::io::Result<()> {
    let owner = allow.owner;
    if allow.uids().iter().any(|u| *u != owner) {
        grant(path, owner, allow.uids())?;
    }
    Ok(())
}

/// Sets the access ACL of the socket at `path` to: owner rw, each uid of `uids` other than
/// `owner` rw, group and others nothing (mask rw, so `ls -l` shows 0660).
fn grant(path: &Path, owner: u32, uids: &[u32]) -> std::io::Result<()> {
    // The kernel's xattr form (include/uapi/linux/posix_acl_xattr.h): a version word, then
    // {tag u16, perm u16, id u32} entries sorted by tag, then id.
    const VERSION: u32 = 2;
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const RW: u16 = 6;
    const NO_ID: u32 = u32::MAX;
    let mut acl = VERSION.to_le_bytes().to_vec();
    let mut entry = |tag: u16, perm: u16, id: u32| {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    };
    entry(USER_OBJ, RW, NO_ID);
    for &uid in uids.iter().filter(|u| **u != owner) {
        entry(USER, RW, uid);
    }
    entry(GROUP_OBJ, 0, NO_ID);
    entry(MASK, RW, NO_ID);
    entry(OTHER, 0, NO_ID);
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: both strings are NUL-terminated and live across the call; the value pointer
    // and length describe `acl`, which the kernel only reads. lsetxattr does not follow a
    // symlink at the path.
    let r = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts the next connection on `listener` whose peer `allow` lets in, and returns it with
/// the peer's credentials. Refused peers are closed at once (nothing is read from them) and
/// logged; `socket` names the listener in the log.
pub fn accept(
    listener: &UnixListener,
    allow: &AllowList,
    socket: &Path,
) -> std::io::Result<(UnixStream, PeerCred)> {
    loop {
        let (stream, _) = match listener.accept() {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(peer) = admit(&stream, allow, socket) {
            return Ok((stream, peer));
        }
    }
}

/// Checks an accepted connection's peer against `allow`: its credentials if let in; else
/// `None`, after logging the refusal (the caller drops the stream without reading from it).
pub fn admit(stream: &UnixStream, allow: &AllowList, socket: &Path) -> Option<PeerCred> {
    match peer_cred(stream) {
        Ok(peer) if allow.allows(peer.uid) => Some(peer),
        Ok(peer) => {
            log_refusal(socket, &peer, allow);
            None
        }
        Err(e) => {
            tracing::warn!(
                "closed a connection on {} whose credentials cannot be read: {e}",
                socket.display()
            );
            None
        }
    }
}

/// How often a refused uid is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Refusals per uid: logs the first one, then at most one per [`LOG_EVERY`] with the number
/// left unlogged in between.
#[derive(Debug, Default)]
struct RefusalLog {
    /// uid → (last logged, refusals since).
    seen: HashMap<u32, (Instant, u64)>,
}

impl RefusalLog {
    /// Most uids remembered (only root can make many).
    const MAX_UIDS: usize = 1024;

    /// Records a refusal of `uid` at `now`; returns how many went unlogged before it if this
    /// one is to be logged.
    fn note(&mut self, uid: u32, now: Instant) -> Option<u64> {
        if self.seen.len() >= Self::MAX_UIDS && !self.seen.contains_key(&uid) {
            self.seen.clear();
        }
        match self.seen.get_mut(&uid) {
            None => {
                self.seen.insert(uid, (now, 0));
                Some(0)
            }
            Some((last, quiet)) if now.duration_since(*last) >= LOG_EVERY => {
                let q = *quiet;
                *last = now;
                *quiet = 0;
                Some(q)
            }
            Some((_, quiet)) => {
                *quiet += 1;
                None
            }
        }
    }
}

fn log_refusal(socket: &Path, peer: &PeerCred, allow: &AllowList) {
    static LOG: Mutex<Option<RefusalLog>> = Mutex::new(None);
    let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    let Some(unlogged) = log
        .get_or_insert_with(RefusalLog::default)
        .note(peer.uid, Instant::now())
    else {
        return;
    };
    tracing::warn!(
        "refused a connection on {} from pid {} uid {} (allowed uids: {:?}; --allow-uid {} lets it in){}",
        socket.display(),
        peer.pid,
        peer.uid,
        allow.uids(),
        peer.uid,
        if unlogged > 0 {
            format!("; {unlogged} more refusals of this uid since the last report")
        } else {
            String::new()
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("baton-access-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn allowlist_holds_our_uid_and_the_extra_ones_only() {
        let ours = nix::unistd::geteuid().as_raw();
        let a = AllowList::new(&[65534, 65534]);
        assert!(a.allows(ours) && a.allows(65534));
        assert_eq!(a.uids().len(), if ours == 65534 { 1 } else { 2 });
        let b = AllowList::new(&[]);
        assert_eq!(b.uids(), &[ours]);
        if ours != 0 {
            assert!(!b.allows(0), "root is not implicitly allowed");
        }
        assert!(!AllowList::exactly(vec![1234]).allows(ours));
    }

    #[test]
    fn socket_is_0600_whatever_the_umask_and_a_stale_one_is_replaced() {
        let d = dir("mode");
        let p = d.join("s.sock");
        let old = nix::sys::stat::umask(Mode::empty());
        let l = bind_private(&p, &AllowList::new(&[]));
        nix::sys::stat::umask(old);
        let l = l.unwrap();
        assert_eq!(mode(&p), 0o600);
        // A live socket is refused...
        let e = bind_private(&p, &AllowList::new(&[])).unwrap_err();
        assert!(matches!(e, BindError::InUse(_)), "{e}");
        // ...a stale one replaced.
        drop(l);
        assert!(p.exists());
        let _l = bind_private(&p, &AllowList::new(&[])).unwrap();
        assert_eq!(mode(&p), 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn non_sockets_at_the_path_are_refused_and_left_alone() {
        let d = dir("nonsock");
        let file = d.join("file");
        std::fs::write(&file, "keep").unwrap();
        let sub = d.join("dir");
        std::fs::create_dir(&sub).unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let dangling = d.join("dangling");
        std::os::unix::fs::symlink(d.join("nothing"), &dangling).unwrap();
        for (p, what) in [
            (&file, "regular file"),
            (&sub, "directory"),
            (&link, "symlink"),
            (&dangling, "symlink"),
        ] {
            let e = bind_private(p, &AllowList::new(&[])).unwrap_err();
            assert!(
                matches!(&e, BindError::NotSocket { what: w, .. } if *w == what),
                "{e}"
            );
            assert!(e.to_string().contains(p.to_str().unwrap()), "{e}");
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        assert!(sub.is_dir());
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(
            !d.join("nothing").exists(),
            "nothing created through a symlink"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn accept_closes_refused_peers_and_returns_allowed_ones() {
        let d = dir("accept");
        let p = d.join("s.sock");
        let l = bind_private(&p, &AllowList::new(&[])).unwrap();
        let ours = nix::unistd::geteuid().as_raw();
        // An allowlist without our uid: our own connection is refused and closed unread.
        let refused = UnixStream::connect(&p).unwrap();
        let allowed = UnixStream::connect(&p).unwrap();
        let nobody_but = AllowList::exactly(vec![ours.wrapping_add(1)]);
        l.set_nonblocking(true).unwrap();
        let e = accept(&l, &nobody_but, &p).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        let mut buf = [0u8; 1];
        for s in [&refused, &allowed] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(
                std::io::Read::read(&mut &*s, &mut buf).unwrap(),
                0,
                "closed"
            );
        }
        // With our uid allowed, the next connection comes through.
        let _c = UnixStream::connect(&p).unwrap();
        let (_s, peer) = accept(&l, &AllowList::new(&[]), &p).unwrap();
        assert_eq!(peer.uid, ours);
        assert_eq!(peer.pid, i32::try_from(std::process::id()).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn extra_uids_get_an_acl_entry() {
        let d = dir("acl");
        let p = d.join("s.sock");
        let _l = match bind_private(&p, &AllowList::new(&[65534])) {
            Err(BindError::Grant { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                eprintln!("skipped: {} has no POSIX ACLs", d.display());
                return;
            }
            r => r.unwrap(),
        };
        // The ACL's mask shows as the group bits; other bits stay clear.
        assert_eq!(mode(&p), 0o660);
        let mut buf = [0u8; 64];
        let c_path = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated strings and a buffer we own, with its length.
        let n = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c"system.posix_acl_access".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 4 + 5 * 8, "owner, one user, group, mask, other");
        assert_eq!(&buf[12..20], &[2, 0, 6, 0, 0xfe, 0xff, 0, 0]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// With `--user`, the socket is given to that uid once bound ([`crate::privilege`]): the
    /// uid needs no ACL entry of its own, only the other allowed uids do.
    #[test]
    fn the_user_a_socket_is_given_to_needs_no_acl_entry() {
        let d = dir("acl-user");
        let p = d.join("s.sock");
        let user = crate::privilege::User {
            uid: 65534,
            gid: 65534,
        };
        let allow = AllowList::for_user(&[], Some(user));
        assert_eq!(allow.uids(), [65534]);
        let _l = bind_private(&p, &allow).unwrap();
        assert_eq!(mode(&p), 0o600, "no ACL: the mask would show as group bits");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refusals_are_logged_once_a_minute_per_uid() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(7, t0), Some(0));
        assert_eq!(log.note(7, t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note(7, t0 + Duration::from_secs(2)), None);
        assert_eq!(log.note(8, t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(log.note(7, t0 + LOG_EVERY), Some(2));
        assert_eq!(log.note(7, t0 + LOG_EVERY), None);
    }
}
