//! The part of systemd's service protocol baton uses, both sides of it, written by hand rather
//! than pulling in a systemd crate: fds passed at exec (`LISTEN_PID`, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`, from fd 3 on: the listening socket under socket activation, then the fds
//! a previous instance stored) and `sd_notify` datagrams to `$NOTIFY_SOCKET` (`READY=1`, and
//! `FDSTORE=1`/`FDSTOREREMOVE=1` with `FDNAME=` and the fds as SCM_RIGHTS).
//!
//! The service side is what baton-blk and baton-net-tap use under systemd or baton-supervise;
//! the manager side ([`Notification::parse`], [`recv_notification`], [`format_fdnames`]) is
//! baton-supervise's. The manager keeps a *duplicate* of each stored fd and hands it back at
//! the next start, so a TAP queue stays attached while no service process holds it.

use std::ffi::OsStr;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixDatagram, UnixListener};

use nix::sys::socket::{
    self, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, cmsg_space, sockopt,
};

/// The first fd a service manager passes.
pub const LISTEN_FDS_START: RawFd = 3;
/// Most fds taken from `LISTEN_FDS` (a larger number is a broken or hostile environment).
pub const MAX_LISTEN_FDS: usize = 1024;
/// Longest fd name (systemd's `FDNAME_MAX`).
pub const FDNAME_MAX: usize = 255;
/// The name of an fd passed without one (as `sd_listen_fds_with_names` says).
pub const UNKNOWN_FDNAME: &str = "unknown";
/// Most fds one datagram can carry (the kernel's `SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;
/// Largest notification accepted (systemd's `NOTIFY_BUFFER_MAX`, `PIPE_BUF`).
pub const NOTIFY_MAX: usize = 4096;

/// Whether `name` may name a stored fd: 1 to 255 printable ASCII characters, no ':' (the
/// separator of `LISTEN_FDNAMES`).
pub fn fdname_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= FDNAME_MAX
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

/// The names of `n` passed fds from `LISTEN_FDNAMES` (`:`-separated): missing ones are
/// [`UNKNOWN_FDNAME`], extra ones ignored.
pub fn parse_fdnames(value: Option<&str>, n: usize) -> Vec<String> {
    let mut names: Vec<String> = value
        .map(|v| v.split(':').take(n).map(str::to_string).collect())
        .unwrap_or_default();
    names.resize(n, UNKNOWN_FDNAME.to_string());
    names
}

/// `LISTEN_FDNAMES` for fds with these names (each must be [`fdname_is_valid`]).
pub fn format_fdnames<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().collect::<Vec<_>>().join(":")
}

/// The fds the service manager passed at exec, each with its name, in order.
#[derive(Debug, Default)]
pub struct ListenFds {
    fds: Vec<(String, OwnedFd)>,
}

impl ListenFds {
    /// Takes the fds passed to this process (`LISTEN_PID` is ours, `LISTEN_FDS` ≥ 1), marks
    /// them close-on-exec and clears the three variables so that children do not inherit them.
    /// Call once, before starting threads (it changes the environment). Empty when none were
    /// passed.
    pub fn from_env() -> ListenFds {
        let ours = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            == Some(std::process::id());
        let n = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
            .min(MAX_LISTEN_FDS);
        let names = std::env::var("LISTEN_FDNAMES").ok();
        // SAFETY: callers run this before any thread is spawned (see above), so nothing reads
        // the environment concurrently.
        unsafe {
            std::env::remove_var("LISTEN_PID");
            std::env::remove_var("LISTEN_FDS");
            std::env::remove_var("LISTEN_FDNAMES");
        }
        if !ours {
            return ListenFds::default();
        }
        let mut fds = Vec::with_capacity(n);
        for (fd, name) in (LISTEN_FDS_START..).zip(parse_fdnames(names.as_deref(), n)) {
            // SAFETY: F_GETFD/F_SETFD on a number that may or may not be open; no memory
            // involved. A closed number fails F_GETFD and is skipped.
            let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            if !open {
                continue;
            }
            // SAFETY: as above.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            // SAFETY: the service manager passed this open fd to us under LISTEN_PID; nothing
            // else in this process owns it, and this runs once.
            fds.push((name, unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        ListenFds { fds }
    }

    /// Wraps fds already taken (for tests and managers).
    pub fn from_fds(fds: Vec<(String, OwnedFd)>) -> ListenFds {
        ListenFds { fds }
    }

    /// How many fds are left.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether no fd is left.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Removes and returns the fds whose name satisfies `pred`, in order.
    pub fn take(&mut self, pred: impl Fn(&str) -> bool) -> Vec<(String, OwnedFd)> {
        let (taken, kept) = std::mem::take(&mut self.fds)
            .into_iter()
            .partition(|(name, _)| pred(name));
        self.fds = kept;
        taken
    }

    /// Gives up ownership of fd number `fd` if it is one of these (without closing it), for a
    /// caller that takes it over by number (e.g. `--tap-fd N`); returns `fd`.
    pub fn release(&mut self, fd: RawFd) -> RawFd {
        if let Some(i) = self.fds.iter().position(|(_, f)| f.as_raw_fd() == fd) {
            let (_, f) = self.fds.remove(i);
            let _ = std::os::fd::IntoRawFd::into_raw_fd(f);
        }
        fd
    }

    /// Removes and returns the first UNIX stream socket in listening state (the socket of
    /// socket activation, whatever its name).
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        let i = self.fds.iter().position(|(_, fd)| is_unix_listener(fd))?;
        let (_, fd) = self.fds.remove(i);
        Some(UnixListener::from(fd))
    }
}

fn is_unix_listener(fd: &OwnedFd) -> bool {
    let listening = socket::getsockopt(fd, sockopt::AcceptConn).unwrap_or(false);
    let stream =
        socket::getsockopt(fd, sockopt::SockType).is_ok_and(|t| t == socket::SockType::Stream);
    let unix = socket::getsockname::<UnixAddr>(fd.as_raw_fd()).is_ok();
    listening && stream && unix
}

/// Where `$NOTIFY_SOCKET` points: a path, or an abstract name after '@'.
fn notify_addr(target: &OsStr) -> io::Result<UnixAddr> {
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name),
        None if bytes.starts_with(b"/") => UnixAddr::new(bytes),
        None => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "NOTIFY_SOCKET is neither an absolute path nor an abstract name",
            ));
        }
    };
    addr.map_err(io::Error::from)
}

/// Sends `state` (newline-separated assignments) with `fds` as SCM_RIGHTS to
/// `$NOTIFY_SOCKET`. `Ok(false)`: no `NOTIFY_SOCKET`, nothing sent.
pub fn notify(state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = notify_addr(&target)?;
    let sock = UnixDatagram::unbound()?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    socket::sendmsg(
        sock.as_raw_fd(),
        &[IoSlice::new(state.as_bytes())],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )?;
    Ok(true)
}

/// Sends `READY=1` to `$NOTIFY_SOCKET` if set; a failure is logged.
pub fn notify_ready() {
    if let Err(e) = notify("READY=1", &[]) {
        tracing::warn!("sd_notify READY=1 failed: {e}");
    }
}

/// Whether the service manager may keep fds for us: `$NOTIFY_SOCKET` is set and `$FDSTORE`
/// (the store's size, set by newer systemd and by baton-supervise) is not 0. Older systemd
/// does not say; there a unit without `FileDescriptorStoreMax=` drops the fds with a warning.
pub fn fd_store_available() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
        && std::env::var("FDSTORE").map_or(true, |n| n.trim() != "0")
}

/// Stores `fds` in the service manager under `name` (`FDSTORE=1`): it keeps duplicates and
/// passes them back at the next start, named `name` in `LISTEN_FDNAMES`.
pub fn store_fds(name: &str, fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
    if !fdname_is_valid(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{name}' is not a valid fd name"),
        ));
    }
    notify(&format!("FDSTORE=1\nFDNAME={name}"), fds)
}

/// Makes the service manager close every fd it keeps under `name` (`FDSTOREREMOVE=1`).
pub fn remove_stored_fds(name: &str) -> io::Result<bool> {
    notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
}

/// A notification a service sent, as far as a manager acts on it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Notification {
    /// `READY=1`.
    pub ready: bool,
    /// `STOPPING=1`.
    pub stopping: bool,
    /// `FDSTORE=1`: keep the fds that came with it.
    pub fdstore: bool,
    /// `FDSTOREREMOVE=1`: close the fds kept under [`Notification::fdname`].
    pub fdstore_remove: bool,
    /// `FDNAME=`.
    pub fdname: Option<String>,
    /// `STATUS=`.
    pub status: Option<String>,
}

/// Why a notification was refused (its fds are closed, nothing else happens).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyParseError {
    /// Longer than [`NOTIFY_MAX`] (the datagram was cut).
    #[error("longer than {NOTIFY_MAX} bytes")]
    TooLong,
    /// A NUL byte inside.
    #[error("contains a NUL byte")]
    Nul,
    /// Not UTF-8.
    #[error("not UTF-8")]
    NotUtf8,
    /// `FDNAME=` with a name [`fdname_is_valid`] refuses.
    #[error("invalid FDNAME")]
    BadFdName,
    /// `FDSTOREREMOVE=1` without `FDNAME=`.
    #[error("FDSTOREREMOVE=1 without FDNAME=")]
    RemoveWithoutName,
}

impl Notification {
    /// Parses a datagram: newline-separated `KEY=VALUE` assignments; unknown keys and lines
    /// without '=' are ignored, as systemd does.
    pub fn parse(data: &[u8]) -> Result<Notification, NotifyParseError> {
        if data.len() > NOTIFY_MAX {
            return Err(NotifyParseError::TooLong);
        }
        if data.contains(&0) {
            return Err(NotifyParseError::Nul);
        }
        let text = std::str::from_utf8(data).map_err(|_| NotifyParseError::NotUtf8)?;
        let mut n = Notification::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "READY" => n.ready = value == "1",
                "STOPPING" => n.stopping = value == "1",
                "FDSTORE" => n.fdstore = value == "1",
                "FDSTOREREMOVE" => n.fdstore_remove = value == "1",
                "FDNAME" if fdname_is_valid(value) => n.fdname = Some(value.to_string()),
                "FDNAME" => return Err(NotifyParseError::BadFdName),
                "STATUS" => n.status = Some(value.to_string()),
                _ => {}
            }
        }
        if n.fdstore_remove && n.fdname.is_none() {
            return Err(NotifyParseError::RemoveWithoutName);
        }
        Ok(n)
    }
}

/// One datagram received on a manager's notify socket.
#[derive(Debug)]
pub struct Received {
    /// The sender's pid (SCM_CREDENTIALS; the socket needs SO_PASSCRED), if known.
    pub pid: Option<i32>,
    /// The bytes, up to [`NOTIFY_MAX`].
    pub data: Vec<u8>,
    /// The fds that came with it (close-on-exec; closed when dropped).
    pub fds: Vec<OwnedFd>,
    /// The datagram or its fds did not fit: refuse it.
    pub truncated: bool,
}

/// Turns on SO_PASSCRED, so that every datagram says who sent it.
pub fn pass_credentials(sock: &UnixDatagram) -> io::Result<()> {
    socket::setsockopt(sock, sockopt::PassCred, &true).map_err(io::Error::from)
}

/// Receives one datagram from a (nonblocking) notify socket; `Ok(None)` when none is waiting.
pub fn recv_notification(sock: &UnixDatagram) -> io::Result<Option<Received>> {
    let mut buf = vec![0u8; NOTIFY_MAX + 1];
    let mut cmsg = vec![0u8; cmsg_space::<libc::ucred>() + cmsg_space::<[RawFd; SCM_MAX_FD]>()];
    let (bytes, flags, pid, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (mut pid, mut fds) = (None, Vec::new());
        for c in msg.cmsgs()? {
            match c {
                ControlMessageOwned::ScmRights(raw) => {
                    for fd in raw {
                        // SAFETY: the kernel just installed this fd in our table for this
                        // message; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
                ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                _ => {}
            }
        }
        (msg.bytes, msg.flags, pid, fds)
    };
    buf.truncate(bytes.min(NOTIFY_MAX));
    let r = Received {
        pid,
        data: buf,
        fds,
        truncated: flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
            || bytes > NOTIFY_MAX,
    };
    Ok(Some(r))
}

/// A notify socket for a manager: a datagram socket bound at `path` (a stale socket there is
/// replaced; anything else is an error), mode 0600, nonblocking, with SO_PASSCRED.
pub fn bind_notify_socket(path: &std::path::Path) -> io::Result<UnixDatagram> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // As for the listening socket: bound under a umask of 0177, so never wider than 0600. The
    // umask is process-wide; managers call this before starting any thread or child.
    // SAFETY: umask has no memory-safety preconditions.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixDatagram::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let sock = bound?;
    sock.set_nonblocking(true)?;
    pass_credentials(&sock)?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn fd_names() {
        assert!(fdname_is_valid("tap-q0"));
        assert!(fdname_is_valid(&"x".repeat(255)));
        assert!(!fdname_is_valid(&"x".repeat(256)));
        assert!(!fdname_is_valid(""));
        assert!(!fdname_is_valid("a:b"));
        assert!(!fdname_is_valid("a\nb"));
        assert!(!fdname_is_valid("é"));
        assert_eq!(
            parse_fdnames(Some("socket:tap-q0:tap-q1"), 3),
            ["socket", "tap-q0", "tap-q1"]
        );
        assert_eq!(parse_fdnames(Some("socket"), 2), ["socket", "unknown"]);
        assert_eq!(parse_fdnames(None, 1), ["unknown"]);
        assert_eq!(parse_fdnames(Some("a:b:c"), 2), ["a", "b"]);
        let names = ["socket", "tap-q0", "tap-q1"];
        assert_eq!(
            parse_fdnames(Some(&format_fdnames(names)), 3),
            names.map(String::from)
        );
    }

    #[test]
    fn notifications_parse_like_systemd() {
        let n = Notification::parse(b"FDSTORE=1\nFDNAME=tap-q0").unwrap();
        assert!(n.fdstore && !n.ready && !n.fdstore_remove);
        assert_eq!(n.fdname.as_deref(), Some("tap-q0"));
        let n = Notification::parse(b"READY=1\nSTATUS=serving\nMAINPID=7\njunk\n\n").unwrap();
        assert!(n.ready);
        assert_eq!(n.status.as_deref(), Some("serving"));
        assert_eq!(
            Notification::parse(b"READY=0").unwrap(),
            Notification::default()
        );
        let n = Notification::parse(b"FDSTOREREMOVE=1\nFDNAME=tap-q1").unwrap();
        assert!(n.fdstore_remove && !n.fdstore);
        assert_eq!(Notification::parse(b""), Ok(Notification::default()));
        assert_eq!(
            Notification::parse(b"FDSTOREREMOVE=1"),
            Err(NotifyParseError::RemoveWithoutName)
        );
        assert_eq!(
            Notification::parse(b"FDSTORE=1\nFDNAME=a:b"),
            Err(NotifyParseError::BadFdName)
        );
        assert_eq!(
            Notification::parse(b"READY=1\0"),
            Err(NotifyParseError::Nul)
        );
        assert_eq!(
            Notification::parse(b"READY=1\n\xff\xfe"),
            Err(NotifyParseError::NotUtf8)
        );
        assert_eq!(
            Notification::parse(&[b'x'; NOTIFY_MAX + 1]),
            Err(NotifyParseError::TooLong)
        );
        // Garbage of every byte value never panics.
        let mut x = 0x1234_5678u32;
        for len in 0..512 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x.to_le_bytes()[0]
                })
                .collect();
            let _ = Notification::parse(&junk);
        }
    }

    #[test]
    fn fds_and_credentials_cross_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("baton-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = bind_notify_socket(&path).unwrap();
        assert!(recv_notification(&rx).unwrap().is_none());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: this test is the only user of NOTIFY_SOCKET in this process.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        assert!(fd_store_available());
        let sent = store_fds("tap-q0", &[a.as_fd()]);
        let removed = remove_stored_fds("tap-q0");
        let bad = store_fds("a:b", &[a.as_fd()]);
        notify_ready();
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert!(sent.unwrap() && removed.unwrap());
        assert!(bad.is_err());
        assert!(
            !notify("READY=1", &[]).unwrap(),
            "no NOTIFY_SOCKET: nothing sent"
        );

        let got = recv_notification(&rx).unwrap().unwrap();
        assert_eq!(got.pid, Some(i32::try_from(std::process::id()).unwrap()));
        assert!(!got.truncated);
        assert_eq!(got.fds.len(), 1);
        let n = Notification::parse(&got.data).unwrap();
        assert!(n.fdstore);
        assert_eq!(n.fdname.as_deref(), Some("tap-q0"));
        let got = recv_notification(&rx).unwrap().unwrap();
        assert!(got.fds.is_empty());
        assert!(Notification::parse(&got.data).unwrap().fdstore_remove);
        let got = recv_notification(&rx).unwrap().unwrap();
        assert_eq!(got.data, b"READY=1");
        assert!(recv_notification(&rx).unwrap().is_none());

        // An over-long datagram is flagged, not cut silently.
        let tx = UnixDatagram::unbound().unwrap();
        tx.send_to(&[b'x'; NOTIFY_MAX + 10], &path).unwrap();
        assert!(recv_notification(&rx).unwrap().unwrap().truncated);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn listen_fds_finds_the_listener_and_takes_by_name() {
        let dir = std::env::temp_dir().join(format!("baton-lfd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let l = UnixListener::bind(dir.join("l.sock")).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut fds = ListenFds::from_fds(vec![
            ("tap-q1".into(), OwnedFd::from(a)),
            ("socket".into(), OwnedFd::from(l)),
            ("tap-q0".into(), OwnedFd::from(b)),
        ]);
        assert!(fds.take_listener().is_some());
        assert!(
            fds.take_listener().is_none(),
            "a connected socket is not a listener"
        );
        let taps = fds.take(|n| n.starts_with("tap-q"));
        assert_eq!(
            taps.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["tap-q1", "tap-q0"]
        );
        assert!(fds.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
