//! What tests of hostile input check about a back-end process: that it does not spin, and
//! that it answers a request in time (a watchdog kills it otherwise, so that a livelocked
//! back-end fails the test instead of hanging it).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// CPU time (user + system) of process `pid` so far, from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the ')'.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Share of one CPU that process `pid` used over `window`.
pub fn cpu_share(pid: u32, window: Duration) -> f64 {
    let before = cpu_time(pid);
    std::thread::sleep(window);
    (cpu_time(pid).saturating_sub(before)).as_secs_f64() / window.as_secs_f64()
}

/// Runs `f` (a request to the back-end `pid`) and returns its result and how long it took. If
/// it has not returned after `kill_after`, the back-end is SIGKILLed so that `f` fails.
pub fn timed_with_watchdog<T>(
    pid: u32,
    kill_after: Duration,
    f: impl FnOnce() -> T,
) -> (T, Duration) {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let pid = i32::try_from(pid).unwrap_or(i32::MAX);
    let dog = std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < kill_after {
            if d.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill(2) on the back-end's pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let t = Instant::now();
    let r = f();
    let took = t.elapsed();
    done.store(true, Ordering::Release);
    let _ = dog.join();
    (r, took)
}

/// What a front-end of another uid got from a back-end's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// connect() failed (e.g. EACCES: the socket's mode keeps the uid out).
    NoConnect,
    /// Connected, sent GET_FEATURES, and the back-end hung up without answering.
    HungUp,
    /// Got the answer to GET_FEATURES.
    Served,
    /// Something else went wrong in the child.
    Other,
}

/// Connects to the vhost-user socket at `path` as `uid` (from a forked child that drops to
/// that uid) and sends GET_FEATURES.
pub fn vhost_user_attempt_as(uid: u32, path: &std::path::Path) -> Attempt {
    use std::os::unix::ffi::OsStrExt;
    let mut addr: libc::sockaddr_un = {
        // SAFETY: sockaddr_un is plain data; all-zero is valid.
        unsafe { std::mem::zeroed() }
    };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Attempt::Other;
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    // SAFETY: the child only makes async-signal-safe system calls and then _exit()s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: plain system calls on values owned by this child; it never returns.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(3);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len =
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(0);
            if libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                libc::_exit(2);
            }
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            let tv_len =
                libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(0);
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                tv_len,
            );
            let msg = GET_FEATURES;
            if libc::write(fd, msg.as_ptr().cast(), msg.len()) != 12 {
                libc::_exit(1);
            }
            let mut buf = [0u8; 20];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::_exit(match n {
                20 => 0,
                0 | -1 => 1,
                _ => 3,
            });
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => Attempt::Served,
        Some(1) => Attempt::HungUp,
        Some(2) => Attempt::NoConnect,
        _ => Attempt::Other,
    }
}

/// VHOST_USER_GET_FEATURES, version 1, no body: the smallest request that asks for a reply
/// (12 header bytes; the reply is 20).
pub const GET_FEATURES: [u8; 12] = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

/// Sends GET_FEATURES on `s` and returns the features of the reply (panics on failure).
pub fn get_features_on(s: &mut UnixStream) -> u64 {
    s.write_all(&GET_FEATURES).expect("sending GET_FEATURES");
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply)
        .expect("reading the GET_FEATURES reply");
    let mut f = [0u8; 8];
    f.copy_from_slice(&reply[12..20]);
    u64::from_le_bytes(f)
}

/// [`get_features_on`] over a fresh connection to `sock`, waiting at most 10 s for the reply.
pub fn get_features(sock: &Path) -> u64 {
    let mut s = UnixStream::connect(sock).expect("connecting to the back-end");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    get_features_on(&mut s)
}
