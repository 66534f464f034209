//! Shared helpers of the baton-blk integration tests: locating/building the binary, starting
//! it on a temporary image, polling with deadlines.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Path of a workspace binary next to this test executable; built if missing.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let p = profile_dir.join(name);
    if !p.exists() {
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let target = profile_dir.parent().unwrap();
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.args(["build", "--quiet", "-p", "baton-blk"])
            .env("CARGO_TARGET_DIR", target);
        if release {
            c.arg("--release");
        }
        let st = c.status().expect("cargo build baton-blk");
        assert!(st.success(), "building {name} failed");
    }
    p
}

static N: AtomicU32 = AtomicU32::new(0);

/// A fresh temporary directory.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "baton-blk-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
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

/// A running baton-blk.
pub struct Blk {
    pub child: Child,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub img: PathBuf,
}

impl Blk {
    /// Creates an image of `size` bytes (filled by `fill`) and starts baton-blk on it.
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

    /// Same, with an info-level log written to `log`.
    pub fn start_with_log(dir: PathBuf, img: PathBuf, extra: &[&str], log: Option<&Path>) -> Blk {
        let sock = dir.join("blk.sock");
        let mut cmd = Command::new(bin("baton-blk"));
        if let Some(l) = log {
            cmd.stderr(std::fs::File::create(l).unwrap())
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1");
        } else {
            cmd.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        }
        let child = cmd
            .arg("--socket")
            .arg(&sock)
            .arg("--image")
            .arg(&img)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let b = Blk {
            child,
            dir,
            sock,
            img,
        };
        b.wait_listening();
        b
    }

    /// Waits until the socket accepts connections... without consuming a front-end slot:
    /// only checks that the socket file exists.
    pub fn wait_listening(&self) {
        let ok = wait_until(Duration::from_secs(20), || self.sock.exists().then_some(()));
        assert!(
            ok.is_some(),
            "baton-blk did not create {}",
            self.sock.display()
        );
    }

    /// Image contents.
    pub fn image(&self) -> Vec<u8> {
        std::fs::read(&self.img).unwrap()
    }

    /// Sends a signal and waits for the exit status (with a deadline).
    pub fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        wait_until(Duration::from_secs(20), || self.child.try_wait().unwrap())
            .expect("baton-blk did not exit")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
