//! Pieces of the baton-blk tests: baton-blk on a temporary image, a pattern to fill sectors
//! with, and running it on bad arguments.
// Test support: a failed set-up step panics, as the test that called it would.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::harness::{Proc, bin, wait_until};
use crate::services::{blk_command, start_service};

static N: AtomicU32 = AtomicU32::new(0);

/// A fresh temporary directory, the [`test user`](crate::local_users::test_user)'s.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "baton-blk-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    crate::local_users::give_to_test_user(&d).unwrap();
    d
}

/// Deterministic pattern for sector `s`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A running baton-blk; killed (SIGKILL) on drop, its directory removed.
pub struct Blk {
    /// The process.
    pub proc: Proc,
    /// The directory of the image and the socket.
    pub dir: PathBuf,
    /// Its vhost-user socket.
    pub sock: PathBuf,
    /// The image it serves.
    pub img: PathBuf,
}

impl Blk {
    /// Creates an image of `size` bytes in a fresh directory and starts baton-blk on it.
    pub fn start(size: u64, extra: &[&str]) -> Blk {
        let dir = tmpdir("t");
        let img = dir.join("disk.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        Self::start_on(dir, img, extra)
    }

    /// Starts baton-blk on an existing image.
    pub fn start_on(dir: PathBuf, img: PathBuf, extra: &[&str]) -> Blk {
        Self::start_with_log(dir, img, extra, None)
    }

    /// Same, with an info-level log written to `log` (else to `<dir>/blk.sock.log`, at
    /// `RUST_LOG`'s level, `warn` by default).
    pub fn start_with_log(dir: PathBuf, img: PathBuf, extra: &[&str], log: Option<&Path>) -> Blk {
        let sock = dir.join("blk.sock");
        let mut cmd = blk_command(&img, &sock, extra);
        if let Some(l) = log {
            let _ = std::fs::remove_file(l);
            cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        } else {
            cmd.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        }
        let proc = start_service(cmd, &sock, log).unwrap_or_else(|e| panic!("{e}"));
        Blk {
            proc,
            dir,
            sock,
            img,
        }
    }

    /// Image contents.
    pub fn image(&self) -> Vec<u8> {
        std::fs::read(&self.img).unwrap()
    }

    /// Sends a signal and waits for the exit status (with a deadline).
    pub fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(self.proc.child.id() as i32, sig) };
        wait_until(Duration::from_secs(20), || {
            self.proc.child.try_wait().unwrap()
        })
        .expect("baton-blk did not exit")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.proc.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs baton-blk with `args` and expects a quick failure; returns (exit code, stderr).
pub fn run_failing(args: &[&std::ffi::OsStr], as_nobody: bool) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(bin("baton-blk"));
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if as_nobody {
        // SAFETY: setgid/setuid are async-signal-safe and run in the child before exec.
        unsafe {
            c.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = c.spawn().unwrap();
    let st = wait_until(Duration::from_secs(20), || child.try_wait().unwrap());
    let st = match st {
        Some(s) => s,
        None => {
            let _ = child.kill();
            panic!("baton-blk did not exit on bad arguments");
        }
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (st.code(), err)
}

/// Path helper.
pub fn os(p: &Path) -> &std::ffi::OsStr {
    p.as_os_str()
}
