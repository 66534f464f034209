//! The serial console's far end when it outlives a terminal: a UNIX socket that clients attach
//! to and detach from (`--serial socket=PATH`), or a pseudo-terminal (`--serial pty`).
//!
//! The guest's output goes to every attached client; what it writes while none is attached is
//! kept (the last [`UNREAD_MAX`] bytes) and given to the next client first. A client that does
//! not read gets its output queued up to [`PENDING_MAX`], then is dropped: the vCPU that writes
//! the UART never blocks on a client. What any client types goes to the guest's UART.
//!
//! One thread (`console`) polls the listener, the clients and a wake-up eventfd: it accepts
//! (peers checked with SO_PEERCRED against the VMM's allow list), reads input, and flushes
//! queued output. In a live update the old VMM's undelivered output travels in the state
//! stream ([`ConsoleHub::undelivered`]) and the new VMM, which bound its socket beside the old
//! one's, renames it over the old path when it takes the VM over ([`ConsoleHub::take_over`]).

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use baton_service::access::{self, AllowList};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::SockFlag;
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialConfig;
use crate::devices::serial::{ConsoleOut, ConsoleSerial};

/// Output kept while no client is attached.
pub const UNREAD_MAX: usize = 64 << 10;
/// Output queued for one slow client before it is dropped.
pub const PENDING_MAX: usize = 1 << 20;

/// Errors setting a console up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The socket cannot be bound.
    #[error("serial console socket: {0}")]
    Bind(#[from] access::BindError),
    /// No pseudo-terminal.
    #[error("cannot open a pseudo-terminal for the serial console: {0}")]
    Pty(#[source] nix::Error),
    /// Renaming the new VMM's socket over the old one's path.
    #[error("cannot move the console socket {from} to {to}: {source}")]
    Rename {
        /// The new VMM's socket.
        from: PathBuf,
        /// The console's path.
        to: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd or a socket option.
    #[error("console set-up: {0}")]
    Io(#[source] std::io::Error),
}

/// The `--serial` a VMM was started with, and the far end of a socket or pty console, opened
/// by the main thread before the sandbox (binding a socket and opening /dev/ptmx are not
/// allowed later).
#[derive(Debug, Clone, Default)]
pub struct ConsoleChoice {
    /// `--serial`, if given (an incoming VMM otherwise takes the old VMM's).
    pub serial: Option<SerialConfig>,
    /// The console's far end for `socket=PATH` and `pty`.
    pub hub: Option<Arc<ConsoleHub>>,
}

impl ConsoleChoice {
    /// Opens the far end of `serial` if it needs one. `incoming`: a new VMM in a live update,
    /// whose socket is bound beside the old VMM's (`PATH.incoming-PID`) until it takes over.
    pub fn open(
        serial: Option<SerialConfig>,
        incoming: bool,
        allow: &AllowList,
    ) -> Result<Self, ConsoleError> {
        let hub = match &serial {
            Some(SerialConfig::Socket(path)) if incoming => {
                let mut beside = path.clone().into_os_string();
                beside.push(format!(".incoming-{}", std::process::id()));
                Some(ConsoleHub::socket(
                    path,
                    Some(Path::new(&beside)),
                    b"",
                    allow.clone(),
                )?)
            }
            Some(SerialConfig::Socket(path)) => {
                Some(ConsoleHub::socket(path, None, b"", allow.clone())?)
            }
            Some(SerialConfig::Pty) => Some(ConsoleHub::pty(b"")?),
            _ => None,
        };
        Ok(Self { serial, hub })
    }
}

/// A connected client, or the pty's master.
struct Client {
    fd: Peer,
    /// Output the client has not taken yet.
    pending: Vec<u8>,
}

enum Peer {
    Socket(UnixStream),
    Pty(std::fs::File),
}

impl Peer {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Peer::Socket(s) => s.as_fd(),
            Peer::Pty(f) => f.as_fd(),
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Peer::Socket(s) => s.write(buf),
            Peer::Pty(f) => f.write(buf),
        }
    }
}

impl Client {
    /// Writes what it can of `pending` then `more` without blocking; false when the client is
    /// gone or too far behind.
    fn send(&mut self, more: &[u8]) -> bool {
        if self.pending.is_empty() {
            match write_some(&mut self.fd, more) {
                Some(n) => self.pending.extend_from_slice(&more[n..]),
                None => return false,
            }
        } else {
            self.pending.extend_from_slice(more);
            if !self.flush() {
                return false;
            }
        }
        self.pending.len() <= PENDING_MAX
    }

    /// Writes what it can of `pending`; false when the client is gone.
    fn flush(&mut self) -> bool {
        match write_some(&mut self.fd, &self.pending) {
            Some(n) => {
                self.pending.drain(..n);
                true
            }
            None => false,
        }
    }
}

/// Writes without blocking (the fds are non-blocking); `None` when the peer is gone.
fn write_some(peer: &mut Peer, buf: &[u8]) -> Option<usize> {
    let mut done = 0;
    while done < buf.len() {
        match peer.write(&buf[done..]) {
            Ok(0) => return None,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A pty whose other side nobody holds: the output is dropped, as a terminal would.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Some(buf.len()),
            Err(_) => return None,
        }
    }
    Some(done)
}

#[derive(Default)]
struct Hub {
    clients: Vec<Client>,
    /// Output written while no client was attached (oldest first).
    unread: VecDeque<u8>,
    /// Bytes of `unread` dropped because it was full, since the last client attached.
    dropped: u64,
}

impl Hub {
    fn broadcast(&mut self, buf: &[u8]) {
        if self.clients.is_empty() {
            self.keep_unread(buf);
            return;
        }
        self.clients.retain_mut(|c| {
            let keep = c.send(buf);
            if !keep {
                tracing::info!("serial console: a client went away or fell too far behind");
            }
            keep
        });
    }

    fn keep_unread(&mut self, buf: &[u8]) {
        self.unread.extend(buf);
        let over = self.unread.len().saturating_sub(UNREAD_MAX);
        if over > 0 {
            self.unread.drain(..over);
            self.dropped += over as u64;
        }
    }
}

/// Where the console goes: the clients, what they have not been sent yet, and the socket.
pub struct ConsoleHub {
    hub: Mutex<Hub>,
    /// Wakes the console thread when output is queued for a slow client.
    wake: EventFd,
    listener: Option<UnixListener>,
    /// Where clients connect (`socket=PATH`), and where this VMM's socket is now (beside the
    /// old VMM's during a live update, until [`ConsoleHub::take_over`]).
    path: Option<(PathBuf, Mutex<PathBuf>)>,
    /// The pty's slave, held open so that output to the master never fails while no terminal
    /// is attached; and its path.
    pty: Option<(OwnedFd, PathBuf)>,
    allow: AllowList,
}

impl std::fmt::Debug for ConsoleHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleHub")
            .field("socket", &self.socket_path())
            .field("pty", &self.pty_path())
            .finish_non_exhaustive()
    }
}

impl ConsoleHub {
    fn lock(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new(unread: &[u8], allow: AllowList) -> Result<Self, ConsoleError> {
        let mut hub = Hub::default();
        hub.keep_unread(unread);
        Ok(Self {
            hub: Mutex::new(hub),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::Io)?,
            listener: None,
            path: None,
            pty: None,
            allow,
        })
    }

    /// A console on a UNIX socket at `path` (mode 0600, `allow` may connect), starting with
    /// `unread` (what an old VMM had not delivered). `bind_at` binds elsewhere first (a new
    /// VMM in a live update; [`ConsoleHub::take_over`] moves it to `path`).
    pub fn socket(
        path: &Path,
        bind_at: Option<&Path>,
        unread: &[u8],
        allow: AllowList,
    ) -> Result<Arc<Self>, ConsoleError> {
        let mut hub = Self::new(unread, allow)?;
        let at = bind_at.unwrap_or(path);
        let listener = access::bind_private(at, &hub.allow)?;
        tracing::info!("serial console on {}", at.display());
        listener.set_nonblocking(true).map_err(ConsoleError::Io)?;
        hub.listener = Some(listener);
        hub.path = Some((path.to_path_buf(), Mutex::new(at.to_path_buf())));
        Ok(Arc::new(hub))
    }

    /// A console on a new pseudo-terminal; its path is [`ConsoleHub::pty_path`].
    pub fn pty(unread: &[u8]) -> Result<Arc<Self>, ConsoleError> {
        let mut hub = Self::new(unread, AllowList::exactly(Vec::new()))?;
        let pty = nix::pty::openpty(None, None).map_err(ConsoleError::Pty)?;
        let path = nix::unistd::ttyname(&pty.slave).map_err(ConsoleError::Pty)?;
        raw_mode(&pty.slave).map_err(ConsoleError::Pty)?;
        let master = std::fs::File::from(pty.master);
        set_nonblocking(master.as_fd()).map_err(ConsoleError::Io)?;
        let mut client = Client {
            fd: Peer::Pty(master),
            pending: Vec::new(),
        };
        let unread: Vec<u8> = hub.lock().unread.drain(..).collect();
        client.send(&unread);
        hub.lock().clients.push(client);
        hub.pty = Some((pty.slave, path));
        Ok(Arc::new(hub))
    }

    /// The pty's path (`/dev/pts/N`) for `--serial pty`.
    pub fn pty_path(&self) -> Option<&Path> {
        self.pty.as_ref().map(|(_, p)| p.as_path())
    }

    /// The socket's path for `--serial socket=PATH`.
    pub fn socket_path(&self) -> Option<&Path> {
        self.path.as_ref().map(|(p, _)| p.as_path())
    }

    /// The UART's output: into this hub.
    pub fn writer(self: &Arc<Self>) -> ConsoleOut {
        Box::new(HubWriter(self.clone()))
    }

    /// What the guest wrote that no client has received (its newest [`UNREAD_MAX`] bytes):
    /// the unread output and the most any attached client has queued (the guest is paused:
    /// nothing is added meanwhile).
    pub fn undelivered(&self) -> Vec<u8> {
        let hub = self.lock();
        let behind = hub
            .clients
            .iter()
            .map(|c| c.pending.as_slice())
            .max_by_key(|p| p.len())
            .unwrap_or(&[]);
        hub.unread
            .iter()
            .copied()
            .chain(behind.iter().copied())
            .collect()
    }

    /// A new VMM taking the VM over: moves its socket to the console's path (atomically: a
    /// client connecting meanwhile reaches the old VMM or this one). Clients of the old VMM
    /// see it close and attach again.
    pub fn take_over(&self) -> Result<(), ConsoleError> {
        let Some((path, at)) = &self.path else {
            return Ok(());
        };
        let mut at = at.lock().unwrap_or_else(|e| e.into_inner());
        if *at == *path {
            return Ok(());
        }
        std::fs::rename(&*at, path).map_err(|source| ConsoleError::Rename {
            from: at.clone(),
            to: path.clone(),
            source,
        })?;
        *at = path.clone();
        Ok(())
    }

    /// The socket file this VMM bound (where it is now), to remove when the VMM stops —
    /// unless a live update moved the VM, and the console's path, to another VMM.
    pub fn bound_socket(&self) -> Option<PathBuf> {
        self.path
            .as_ref()
            .map(|(_, at)| at.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Output an old VMM had not delivered: given to the next client before anything new.
    pub fn carry_over(&self, unread: &[u8]) {
        let mut hub = self.lock();
        let newer: Vec<u8> = hub.unread.drain(..).collect();
        hub.keep_unread(unread);
        hub.keep_unread(&newer);
        // A pty's master is attached from the start: it gets the output now.
        if !hub.clients.is_empty() {
            let unread: Vec<u8> = std::mem::take(&mut hub.unread).into();
            if let Some(c) = hub.clients.first_mut() {
                c.send(&unread);
            }
        }
    }

    /// Runs the console thread: accepts clients, feeds their input to `serial`, flushes
    /// queued output. Returns when the listener fails (never in normal operation).
    pub fn serve(self: &Arc<Self>, serial: &Arc<Mutex<ConsoleSerial>>) {
        let mut input: VecDeque<u8> = VecDeque::new();
        let mut buf = [0u8; 4096];
        loop {
            let fds: Vec<(OwnedFd, bool)> = {
                let hub = self.lock();
                hub.clients
                    .iter()
                    .filter_map(|c| {
                        c.fd.fd()
                            .try_clone_to_owned()
                            .ok()
                            .map(|fd| (fd, !c.pending.is_empty()))
                    })
                    .collect()
            };
            let mut polled = Vec::with_capacity(fds.len() + 2);
            // SAFETY: the eventfd lives as long as `self`, which outlives this poll.
            let wake = unsafe { BorrowedFd::borrow_raw(self.wake.as_raw_fd()) };
            polled.push(PollFd::new(wake, PollFlags::POLLIN));
            if let Some(l) = &self.listener {
                polled.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            }
            let first_client = polled.len();
            for (fd, out) in &fds {
                let mut ev = PollFlags::POLLIN;
                if *out {
                    ev |= PollFlags::POLLOUT;
                }
                polled.push(PollFd::new(fd.as_fd(), ev));
            }
            // While typed input waits for room in the UART's FIFO, look again soon.
            let timeout = if input.is_empty() {
                PollTimeout::NONE
            } else {
                PollTimeout::from(5u8)
            };
            match poll(&mut polled, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("serial console: poll failed: {e}; console stopped");
                    return;
                }
            }
            let ready: Vec<PollFlags> = polled
                .iter()
                .map(|p| p.revents().unwrap_or(PollFlags::empty()))
                .collect();
            drop(polled);
            if ready[0].contains(PollFlags::POLLIN) {
                let _ = self.wake.read();
            }
            if self.listener.is_some() && ready[1].contains(PollFlags::POLLIN) {
                self.accept_all();
            }
            let mut gone = Vec::new();
            for (i, (fd, _)) in fds.iter().enumerate() {
                let ev = ready[first_client + i];
                if ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                    match read_client(fd, &mut buf) {
                        Some(n) => input.extend(&buf[..n]),
                        None => gone.push(fd.as_raw_fd()),
                    }
                }
            }
            {
                let mut hub = self.lock();
                hub.clients.retain_mut(|c| {
                    let fd = c.fd.fd().as_raw_fd();
                    !gone.contains(&fd) && (c.pending.is_empty() || c.flush())
                });
            }
            feed(serial, &mut input);
        }
    }

    fn accept_all(&self) {
        let Some(listener) = &self.listener else {
            return;
        };
        let socket = self.socket_path().unwrap_or(Path::new("console"));
        loop {
            // Non-blocking from the start: the vCPUs write to it and must never wait.
            let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
            let stream = match nix::sys::socket::accept4(listener.as_fd(), flags) {
                Ok(fd) => UnixStream::from(fd),
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
                Err(_) => return,
            };
            if access::admit(&stream, &self.allow, socket).is_none() {
                continue;
            }
            let mut hub = self.lock();
            let unread: Vec<u8> = hub.unread.drain(..).collect();
            let dropped = std::mem::take(&mut hub.dropped);
            let mut client = Client {
                fd: Peer::Socket(stream),
                pending: Vec::new(),
            };
            if dropped > 0 {
                let note = format!("[baton-vmm: {dropped} bytes of earlier output dropped]\r\n");
                client.send(note.as_bytes());
            }
            if client.send(&unread) {
                hub.clients.push(client);
                tracing::info!("serial console: a client attached");
            }
        }
    }
}

/// Reads what a client typed; `None` when it went away.
fn read_client(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: read(2) into a buffer we own, of its length, on an fd we hold.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    match n {
        0 => None,
        n if n > 0 => usize::try_from(n).ok(),
        _ => {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Some(0),
                // A pty with nobody on its slave side: nothing to read, not gone.
                _ if e.raw_os_error() == Some(libc::EIO) => Some(0),
                _ => None,
            }
        }
    }
}

/// Moves typed input into the UART's receive FIFO, as much as fits.
fn feed(serial: &Arc<Mutex<ConsoleSerial>>, input: &mut VecDeque<u8>) {
    if input.is_empty() {
        return;
    }
    let (a, _) = input.as_slices();
    let taken = serial
        .lock()
        .map(|mut s| s.enqueue_raw_bytes(a).unwrap_or(0))
        .unwrap_or(0);
    input.drain(..taken);
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    fcntl(
        fd,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(std::io::Error::from)?;
    Ok(())
}

/// A pty line discipline that passes bytes through (the guest does its own echo and editing).
fn raw_mode(slave: &OwnedFd) -> nix::Result<()> {
    use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
    let mut t = tcgetattr(slave)?;
    cfmakeraw(&mut t);
    tcsetattr(slave, SetArg::TCSANOW, &t)
}

struct HubWriter(Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let queued = {
            let mut hub = self.0.lock();
            hub.broadcast(buf);
            hub.clients.iter().any(|c| !c.pending.is_empty())
        };
        if queued {
            let _ = self.0.wake.write(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How long a test waits for the console thread.
#[cfg(test)]
const T: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("baton-console-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn output_without_a_client_is_kept_up_to_the_limit() {
        let mut hub = Hub::default();
        hub.keep_unread(&vec![b'a'; UNREAD_MAX]);
        hub.keep_unread(b"bc");
        assert_eq!(hub.unread.len(), UNREAD_MAX);
        assert_eq!(hub.dropped, 2);
        assert_eq!(hub.unread.back(), Some(&b'c'));
    }

    #[test]
    fn a_client_gets_the_unread_output_then_live_output() {
        let d = dir();
        let path = d.join("console.sock");
        let hub = ConsoleHub::socket(&path, None, b"before\n", AllowList::new(&[])).unwrap();
        let mut out = hub.writer();
        out.write_all(b"while away\n").unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        hub.accept_all();
        out.write_all(b"live\n").unwrap();
        let mut got = [0u8; 64];
        let mut n = 0;
        while !got[..n].ends_with(b"live\n") {
            n += c.read(&mut got[n..]).unwrap();
        }
        assert_eq!(&got[..n], b"before\nwhile away\nlive\n");
        assert!(hub.undelivered().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_client_that_does_not_read_is_dropped_and_the_rest_is_kept() {
        let d = dir();
        let path = d.join("console.sock");
        let hub = ConsoleHub::socket(&path, None, b"", AllowList::new(&[])).unwrap();
        let _slow = UnixStream::connect(&path).unwrap();
        hub.accept_all();
        let mut out = hub.writer();
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..(PENDING_MAX / chunk.len() + 64) {
            out.write_all(&chunk).unwrap();
        }
        assert!(hub.lock().clients.is_empty(), "the slow client is dropped");
        out.write_all(b"after").unwrap();
        // What follows the drop is kept for the next client, the newest last.
        let kept = hub.undelivered();
        assert!(
            kept.len() <= UNREAD_MAX && kept.ends_with(b"after"),
            "{}",
            kept.len()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_new_vmm_binds_beside_and_takes_the_path_over() {
        let d = dir();
        let path = d.join("console.sock");
        let old = ConsoleHub::socket(&path, None, b"", AllowList::new(&[])).unwrap();
        let beside = d.join("console.sock.incoming");
        let new = ConsoleHub::socket(&path, Some(&beside), b"kept", AllowList::new(&[])).unwrap();
        new.take_over().unwrap();
        assert!(!beside.exists());
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        new.accept_all();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"kept");
        drop(old);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_pty_passes_output_and_input_through() {
        let hub = match ConsoleHub::pty(b"hello") {
            Ok(h) => h,
            Err(e) => panic!("no pty here: {e}"),
        };
        let path = hub.pty_path().unwrap().to_path_buf();
        let mut term = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut got = [0u8; 5];
        term.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        hub.writer().write_all(b" world").unwrap();
        let mut got = [0u8; 6];
        term.read_exact(&mut got).unwrap();
        assert_eq!(&got, b" world");
    }
}
