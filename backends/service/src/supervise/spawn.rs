//! Starting the service the way systemd does: its fds at 3, 4, … with `LISTEN_FDS`,
//! `LISTEN_FDNAMES` and `LISTEN_PID` (the child's own pid, known only after fork), plus
//! `NOTIFY_SOCKET` and `FDSTORE`. Everything is prepared before `fork`; the child only makes
//! async-signal-safe calls (fcntl, dup2, sigprocmask, prctl, execve) and allocates nothing.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sd::{LISTEN_FDS_START, format_fdnames};

/// Variables the child gets from us, never from our own environment.
const OURS: [&str; 5] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "FDSTORE",
];

/// `LISTEN_PID=` and room for the pid's digits and a NUL.
const PID_PREFIX: &[u8] = b"LISTEN_PID=";

/// What the child is given.
#[derive(Debug)]
pub struct Launch<'a> {
    /// Program (searched in `PATH` if it has no '/') and its arguments.
    pub command: &'a [OsString],
    /// The fds to pass, in order, with their names.
    pub fds: Vec<(&'a str, BorrowedFd<'a>)>,
    /// `NOTIFY_SOCKET`.
    pub notify_socket: &'a Path,
    /// `FDSTORE`: how many fds the child may store.
    pub fd_store_max: usize,
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::other("a NUL byte in an argument"))
}

/// `program` itself if it names a path, else the first executable file of that name in `PATH`.
pub fn resolve(program: &OsStr) -> io::Result<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found in PATH", program.to_string_lossy()),
            )
        })
}

/// Forks and execs the child; returns its pid.
pub fn spawn(l: &Launch<'_>) -> io::Result<libc::pid_t> {
    let program = l
        .command
        .first()
        .ok_or_else(|| io::Error::other("no command"))?;
    let path = cstring(resolve(program)?.as_os_str())?;
    let argv: Vec<CString> = l
        .command
        .iter()
        .map(|a| cstring(a))
        .collect::<io::Result<_>>()?;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !OURS.iter().any(|o| k == OsStr::new(o)))
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect::<io::Result<_>>()?;
    let names = format_fdnames(l.fds.iter().map(|(n, _)| *n));
    let mut notify = OsString::from("NOTIFY_SOCKET=");
    notify.push(l.notify_socket);
    for kv in [
        OsString::from(format!("LISTEN_FDS={}", l.fds.len())),
        OsString::from(format!("LISTEN_FDNAMES={names}")),
        OsString::from(format!("FDSTORE={}", l.fd_store_max)),
        notify,
    ] {
        env.push(cstring(&kv)?);
    }
    // LISTEN_PID=<digits>\0, the digits written by the child.
    let mut pid_var = PID_PREFIX.to_vec();
    pid_var.resize(PID_PREFIX.len() + 21, 0);
    let argvp: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain([pid_var.as_ptr().cast(), std::ptr::null()])
        .collect();
    let src: Vec<RawFd> = l.fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let mut tmp: Vec<RawFd> = vec![-1; src.len()];
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let digits = pid_var.as_mut_ptr().wrapping_add(PID_PREFIX.len());
    // SAFETY: fork in a process with a single thread (baton-supervise starts none): the child
    // runs `exec_child` only, which needs no lock another thread could hold.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: in the child just forked; every pointer refers to memory prepared above,
        // which the child owns a copy of, and `digits` has room for 20 digits and a NUL.
        unsafe {
            exec_child(&path, &argvp, &envp, digits, &src, &mut tmp, parent);
        }
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// Writes `msg` to stderr and exits 127 (as a shell does when exec fails).
///
/// # Safety
/// Only to be called in a forked child.
unsafe fn fail(msg: &[u8]) -> ! {
    // SAFETY: write and _exit are async-signal-safe; `msg` is valid for its length.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The child's side: pid into `LISTEN_PID`, fds to 3.., signals back to defaults, exec.
///
/// # Safety
/// Only in a child forked from a single-threaded process; `digits` points to 21 writable bytes
/// inside the string `envp` refers to; `argvp` and `envp` are NULL-terminated arrays of valid
/// C strings; `tmp` is as long as `src`.
unsafe fn exec_child(
    path: &CString,
    argvp: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    digits: *mut u8,
    src: &[RawFd],
    tmp: &mut [RawFd],
    parent: libc::pid_t,
) -> ! {
    // SAFETY: see the function's contract; each call below is async-signal-safe and touches
    // only memory prepared before fork.
    unsafe {
        // Stop with the supervisor instead of running on unsupervised; if it is gone already,
        // do not start at all.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
        let mut pid = libc::getpid().unsigned_abs();
        let mut rev = [0u8; 20];
        let mut n = 0;
        loop {
            if let Some(d) = rev.get_mut(n) {
                *d = b'0' + u8::try_from(pid % 10).unwrap_or(0);
            }
            n += 1;
            pid /= 10;
            if pid == 0 || n >= rev.len() {
                break;
            }
        }
        for (i, d) in rev.iter().take(n).rev().enumerate() {
            *digits.add(i) = *d;
        }
        *digits.add(n) = 0;
        // First above every target (close-on-exec), then down to 3, 4, …: a source that sits
        // on a target number is never overwritten before it is copied.
        let above = LISTEN_FDS_START + RawFd::try_from(src.len()).unwrap_or(RawFd::MAX - 4);
        for (t, s) in tmp.iter_mut().zip(src) {
            *t = libc::fcntl(*s, libc::F_DUPFD_CLOEXEC, above);
            if *t < 0 {
                fail(b"baton-supervise: cannot move the fds for the child\n");
            }
        }
        for (target, t) in (LISTEN_FDS_START..).zip(tmp.iter()) {
            // dup2 clears close-on-exec on the target.
            if libc::dup2(*t, target) < 0 {
                fail(b"baton-supervise: cannot move the fds for the child\n");
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Rust ignores SIGPIPE in its programs; the child starts with the default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::execve(path.as_ptr(), argvp.as_ptr(), envp.as_ptr());
        fail(b"baton-supervise: cannot execute the service\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_path() {
        assert!(resolve(OsStr::new("sh")).unwrap().is_absolute());
        assert_eq!(
            resolve(OsStr::new("./x")).unwrap(),
            PathBuf::from("./x"),
            "a path is taken as it is"
        );
        assert!(resolve(OsStr::new("no-such-program-baton")).is_err());
    }
}
