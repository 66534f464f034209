//! baton-supervise: the part of systemd a back-end relies on, for hosts (containers, tests, the
//! demo) where systemd is not the service manager. It
//!
//! - binds the listening socket once and passes it to every instance of the service as fd 3
//!   (`LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`): it stays open across restarts, so a VMM
//!   that reconnects meanwhile waits in the backlog (a `.socket` unit);
//! - gives the service a `NOTIFY_SOCKET` and acts on `READY=1`, `FDSTORE=1` (keeps the fds that
//!   come with it under their `FDNAME=`, at most `--fd-store-max`: `FileDescriptorStoreMax=`)
//!   and `FDSTOREREMOVE=1`, from the service's main process only (`NotifyAccess=main`);
//! - restarts the service as soon as it dies (`Restart=always`, `RestartSec=0`), passing the
//!   stored fds back after the socket; one that dies before `READY=1` is restarted after a
//!   delay that doubles from 10 ms to 1 s, so a broken configuration does not spin;
//! - forwards SIGTERM/SIGINT and exits once the service has exited (SIGKILL after
//!   `--stop-timeout`): 0 if it stopped cleanly, else its status.
//!
//! It needs no privilege of its own. It is one thread: a poll loop over a signalfd and the
//! notify socket; nothing a service sends there can stop it (refused datagrams are logged,
//! at most [`WARNINGS_PER_SECOND`] a second).

pub mod spawn;
pub mod store;

use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::sd::{self, Notification, Received};
use store::FdStore;

/// The name the listening socket has in `LISTEN_FDNAMES`.
pub const SOCKET_FDNAME: &str = "socket";
/// The name of stored fds that came without `FDNAME=` (systemd's default).
pub const DEFAULT_FDNAME: &str = "stored";
/// Refused-notification warnings logged per second at most.
pub const WARNINGS_PER_SECOND: u32 = 10;
const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Command line.
#[derive(Debug, clap::Parser)]
#[command(name = "baton-supervise", version)]
pub struct Args {
    /// The listening socket to create (mode 0600) and pass as fd 3 to every instance.
    #[arg(long)]
    pub socket: PathBuf,
    /// The notify socket (default: the socket's path with `.notify` appended).
    #[arg(long)]
    pub notify_socket: Option<PathBuf>,
    /// Most fds kept for the service (systemd's `FileDescriptorStoreMax=`).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub fd_store_max: u16,
    /// A uid that may connect to the socket besides our own (repeatable): it gets an ACL entry
    /// on the socket file. Give the service the same `--allow-uid`s: it checks every peer.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Seconds the service has to exit after SIGTERM before it is killed.
    #[arg(long, default_value_t = 30)]
    pub stop_timeout: u64,
    /// The service and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

/// Errors that stop the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The listening socket.
    #[error("listening socket: {0}")]
    Listen(#[from] crate::ListenError),
    /// The notify socket.
    #[error("notify socket {path}: {source}")]
    Notify {
        /// Its path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Signal handling set-up or polling.
    #[error("{0}: {1}")]
    Sys(&'static str, #[source] nix::Error),
    /// The service could not be started at all (not found, not executable).
    #[error("cannot start {0}: {1}")]
    Spawn(String, #[source] io::Error),
}

/// The running instance.
#[derive(Debug, Clone, Copy)]
struct Running {
    pid: Pid,
    ready: bool,
}

/// A stop in progress.
#[derive(Debug, Clone, Copy)]
struct Stopping {
    deadline: Instant,
    killed: bool,
}

/// Rate limit for warnings about what a service sends.
#[derive(Debug)]
struct Warnings {
    window: Instant,
    count: u32,
    suppressed: u32,
}

impl Warnings {
    fn warn(&mut self, msg: &str) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                log(&format!("{} more warnings suppressed", self.suppressed));
            }
            *self = Warnings {
                window: Instant::now(),
                count: 0,
                suppressed: 0,
            };
        }
        if self.count < WARNINGS_PER_SECOND {
            self.count += 1;
            log(msg);
        } else {
            self.suppressed += 1;
        }
    }
}

/// Logs to stderr; a stderr that went away must not stop the supervisor (eprintln! panics).
fn log(msg: &str) {
    use std::io::Write;
    let _ = writeln!(io::stderr(), "baton-supervise: {msg}");
}

struct Supervisor {
    command: Vec<OsString>,
    listener: UnixListener,
    notify: UnixDatagram,
    notify_path: PathBuf,
    store: FdStore,
    child: Option<Running>,
    stopping: Option<Stopping>,
    stop_timeout: Duration,
    early_deaths: u32,
    next_start: Instant,
    warnings: Warnings,
}

/// Runs the service under supervision until SIGTERM/SIGINT; returns the exit status.
pub fn run(args: Args) -> Result<i32, SuperviseError> {
    let (listener, _) = crate::listener(
        Some(&args.socket),
        &crate::access::AllowList::new(&args.allow_uid),
    )?;
    let notify_path = args.notify_socket.clone().unwrap_or_else(|| {
        let mut p = args.socket.clone().into_os_string();
        p.push(".notify");
        PathBuf::from(p)
    });
    let notify = sd::bind_notify_socket(&notify_path).map_err(|source| SuperviseError::Notify {
        path: notify_path.clone(),
        source,
    })?;
    // A service that drops to an --allow-uid user must still reach its notify socket (as
    // systemd's is reachable from any uid); a notification counts only from the service's
    // main process anyway (its pid, from SCM_CREDENTIALS).
    crate::access::grant_allowed(
        &notify_path,
        &crate::access::AllowList::new(&args.allow_uid),
    )
    .map_err(|source| SuperviseError::Notify {
        path: notify_path.clone(),
        source,
    })?;
    let program = args.command.first().cloned().unwrap_or_default();
    spawn::resolve(&program)
        .map_err(|e| SuperviseError::Spawn(program.to_string_lossy().into_owned(), e))?;
    let mut signals = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| SuperviseError::Sys("blocking signals", e))?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| SuperviseError::Sys("signalfd", e))?;
    let mut s = Supervisor {
        command: args.command,
        listener,
        notify,
        notify_path,
        store: FdStore::new(usize::from(args.fd_store_max)),
        child: None,
        stopping: None,
        stop_timeout: Duration::from_secs(args.stop_timeout),
        early_deaths: 0,
        next_start: Instant::now(),
        warnings: Warnings {
            window: Instant::now(),
            count: 0,
            suppressed: 0,
        },
    };
    let code = s.run(&sigfd);
    let _ = std::fs::remove_file(&args.socket);
    let _ = std::fs::remove_file(&s.notify_path);
    code
}

impl Supervisor {
    fn run(&mut self, sigfd: &SignalFd) -> Result<i32, SuperviseError> {
        loop {
            let now = Instant::now();
            if self.child.is_none() {
                if self.stopping.is_some() {
                    return Ok(0);
                }
                if now >= self.next_start {
                    self.start();
                }
            }
            let wake = match (self.child, self.stopping) {
                (Some(_), Some(s)) if !s.killed => Some(s.deadline),
                (None, _) => Some(self.next_start),
                _ => None,
            };
            let timeout = wake.map_or(PollTimeout::NONE, |t| {
                let ms = t.saturating_duration_since(now).as_millis() + 1;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            });
            let mut fds = [
                PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(SuperviseError::Sys("poll", e)),
            }
            // Notifications first: a service's last FDSTORE=1 is read before its death is.
            self.drain_notifications();
            while let Ok(Some(si)) = sigfd.read_signal() {
                match Signal::try_from(i32::try_from(si.ssi_signo).unwrap_or(0)) {
                    Ok(Signal::SIGCHLD) => {
                        self.drain_notifications();
                        if let Some(code) = self.reap() {
                            return Ok(code);
                        }
                    }
                    Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) => self.stop(sig),
                    _ => {}
                }
            }
            if let (Some(c), Some(s)) = (self.child, self.stopping.as_mut()) {
                if !s.killed && Instant::now() >= s.deadline {
                    log(&format!("pid {} did not exit in time: SIGKILL", c.pid));
                    let _ = kill(c.pid, Signal::SIGKILL);
                    s.killed = true;
                }
            }
        }
    }

    fn start(&mut self) {
        let mut fds = vec![(SOCKET_FDNAME, self.listener.as_fd())];
        fds.extend(self.store.entries());
        let launch = spawn::Launch {
            command: &self.command,
            fds,
            notify_socket: &self.notify_path,
            fd_store_max: self.store.max(),
        };
        match spawn::spawn(&launch) {
            Ok(pid) => {
                log(&format!(
                    "started {} (pid {pid}) with {} stored fds",
                    self.command
                        .first()
                        .map(|c| c.to_string_lossy())
                        .unwrap_or_default(),
                    self.store.len()
                ));
                self.child = Some(Running {
                    pid: Pid::from_raw(pid),
                    ready: false,
                });
            }
            Err(e) => {
                log(&format!("cannot start the service: {e}"));
                self.died_early();
            }
        }
    }

    fn died_early(&mut self) {
        self.early_deaths = self.early_deaths.saturating_add(1);
        let shift = (self.early_deaths - 1).min(7);
        let delay = (FIRST_DELAY * (1u32 << shift)).min(MAX_DELAY);
        self.next_start = Instant::now() + delay;
    }

    fn stop(&mut self, sig: Signal) {
        if self.stopping.is_none() {
            self.stopping = Some(Stopping {
                deadline: Instant::now() + self.stop_timeout,
                killed: false,
            });
        }
        if let Some(c) = self.child {
            log(&format!("{sig}: stopping pid {}", c.pid));
            let _ = kill(c.pid, sig);
        }
    }

    /// Reaps dead children; returns the exit status once the service is gone for good.
    fn reap(&mut self) -> Option<i32> {
        loop {
            let (pid, status, clean) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code, code == 0),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (
                    pid,
                    128 + sig as i32,
                    matches!(sig, Signal::SIGTERM | Signal::SIGINT),
                ),
                Ok(WaitStatus::StillAlive) | Err(_) => return None,
                Ok(_) => continue,
            };
            let Some(c) = self.child.filter(|c| c.pid == pid) else {
                continue;
            };
            self.child = None;
            let how = if status > 128 {
                format!("was killed by signal {}", status - 128)
            } else {
                format!("exited with status {status}")
            };
            if self.stopping.is_some() {
                log(&format!("pid {pid} {how}; stopped"));
                return Some(if clean { 0 } else { status });
            }
            if c.ready {
                self.early_deaths = 0;
                self.next_start = Instant::now();
            } else {
                self.died_early();
            }
            log(&format!(
                "pid {pid} {how}; restarting{} with {} stored fds",
                if c.ready { "" } else { " (it was never ready)" },
                self.store.len()
            ));
        }
    }

    fn drain_notifications(&mut self) {
        loop {
            match sd::recv_notification(&self.notify) {
                Ok(Some(r)) => self.handle(r),
                Ok(None) => return,
                Err(e) => {
                    self.warnings.warn(&format!("notify socket: {e}"));
                    return;
                }
            }
        }
    }

    fn handle(&mut self, r: Received) {
        let Some(child) = self
            .child
            .as_mut()
            .filter(|c| r.pid == Some(c.pid.as_raw()))
        else {
            self.warnings.warn(&format!(
                "ignored a notification from pid {:?}: not the service's main process",
                r.pid
            ));
            return;
        };
        if r.truncated {
            self.warnings
                .warn("ignored a notification that was too long or carried too many fds");
            return;
        }
        let n = match Notification::parse(&r.data) {
            Ok(n) => n,
            Err(e) => {
                self.warnings.warn(&format!(
                    "ignored a notification from pid {}: {e}",
                    child.pid
                ));
                return;
            }
        };
        if n.ready && !child.ready {
            child.ready = true;
            log(&format!("pid {} is ready", child.pid));
        }
        let name = n.fdname.as_deref().unwrap_or(DEFAULT_FDNAME);
        if n.fdstore_remove {
            let k = self.store.remove(name);
            log(&format!("closed {k} stored fds named {name}"));
        }
        if n.fdstore {
            let got = r.fds.len();
            let a = self.store.add(name, r.fds);
            log(&format!(
                "stored {} fds as {name} ({} in the store)",
                a.stored,
                self.store.len()
            ));
            if a.over_limit > 0 {
                self.warnings.warn(&format!(
                    "closed {} of {got} fds: the store keeps at most {} (--fd-store-max)",
                    a.over_limit,
                    self.store.max()
                ));
            }
        } else if !r.fds.is_empty() {
            self.warnings.warn("closed fds that came without FDSTORE=1");
        }
    }
}
