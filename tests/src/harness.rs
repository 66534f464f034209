//! Running baton's binaries in tests: where they are, and reading their output against a
//! deadline (never fixed sleeps).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// The cargo target profile directory (`target/<profile>`) of the running executable, where
/// the workspace's binaries are built: tests run from `target/<profile>/deps/`, binaries
/// from `target/<profile>/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        dir
    }
}

/// Path of a workspace binary (`baton-vmm`, `batonctl`, `baton-blk`, ...).
pub fn bin(name: &str) -> PathBuf {
    target_dir().join(name)
}

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The freestanding test guest: `$BATON_TEST_GUEST`, or the release build in tests/guest.
pub fn guest() -> PathBuf {
    std::env::var_os("BATON_TEST_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            repo_root().join("tests/guest/target/x86_64-unknown-none/release/baton-test-guest")
        })
}

/// Where baton-vmm puts the RAM file of VM `name` by default: `/dev/shm/baton-UID/NAME.ram`
/// (UID: ours; the VMMs the tests start run as us).
pub fn default_ram_file(name: &str) -> PathBuf {
    default_ram_dir().join(format!("{name}.ram"))
}

/// Runs a baton-vmm command (with `--name name`) expecting it to be refused: a non-zero exit
/// whose stderr contains every needle, and no RAM file left behind (neither ours nor the test
/// user's, whichever the command runs as).
pub fn assert_refused(cmd: Command, name: &str, needles: &[&str]) {
    let f = run_to_end(cmd, Duration::from_secs(20)).expect("running baton-vmm");
    assert!(matches!(f.code, Some(c) if c != 0), "must fail: {f:?}");
    for n in needles {
        assert!(
            f.stderr.contains(n),
            "stderr must mention {n:?}: {}",
            f.stderr
        );
    }
    for ram in [
        default_ram_file(name),
        crate::local_users::test_ram_file(name),
    ] {
        assert!(
            !ram.exists(),
            "a refused start leaves no RAM file: {}",
            ram.display()
        );
    }
}

/// The per-user directory of default RAM files, `/dev/shm/baton-UID`.
pub fn default_ram_dir() -> PathBuf {
    ram_dir_of(nix::unistd::geteuid().as_raw())
}

/// Where baton-vmm running as `uid` keeps its default RAM files: `/dev/shm/baton-UID`.
pub fn ram_dir_of(uid: u32) -> PathBuf {
    PathBuf::from(format!("/dev/shm/baton-{uid}"))
}

pub use baton_service::skip::cannot_run;

/// Whether /dev/kvm can be opened; tests that need it print why they skip otherwise.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A prerequisite of a test, checked by [`can_run_with`].
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// /dev/kvm (kind `kvm`).
    Kvm,
    /// The freestanding test guest: never skipped, a failure if missing (./test.sh builds it).
    Guest,
    /// Running as root (kind `root`).
    Root,
    /// Root networking: root (kind `root`), /dev/net/tun and `ip netns` (kind `net`).
    Net,
    /// A program on `PATH` from what `scripts/setup.sh` installs for the QEMU tests
    /// (`qemu-system-x86_64`, `qemu-storage-daemon`, `cpio`, `busybox`, ...; kind `qemu`).
    Program(&'static str),
}

/// Why `need` is not met here, as (kind, why), if it is not.
fn missing(need: Need) -> Option<(&'static str, String)> {
    let root = nix::unistd::geteuid().is_root();
    match need {
        Need::Kvm => (!kvm_available()).then(|| ("kvm", "/dev/kvm is not accessible".into())),
        Need::Root | Need::Net if !root => Some(("root", "needs root".into())),
        Need::Root | Need::Guest => None,
        Need::Net => crate::netns::unavailable().map(|why| ("net", why)),
        Need::Program(p) => {
            let found = Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {p} >/dev/null"))
                .status()
                .is_ok_and(|s| s.success());
            (!found).then(|| ("qemu", format!("{p} is not installed")))
        }
    }
}

/// The one skip rule: whether `test` has everything in `needs` here. When something is
/// missing this goes through [`cannot_run`] (a failure unless `BATON_ALLOW_SKIP` allows that
/// kind) and returns false.
pub fn can_run_with(test: &str, needs: &[Need]) -> bool {
    if let Some((kind, why)) = needs.iter().find_map(|&n| missing(n)) {
        cannot_run(kind, &format!("{test}: {why}"));
        return false;
    }
    if needs.iter().any(|n| matches!(n, Need::Guest)) {
        assert!(
            guest().exists(),
            "test guest missing at {} (./test.sh builds it: cd tests/guest && cargo build --release)",
            guest().display()
        );
    }
    true
}

/// Whether a test that boots the test guest under KVM can run here: `can_run_with(test,
/// &[Need::Kvm, Need::Guest])`.
pub fn can_run(test: &str) -> bool {
    can_run_with(test, &[Need::Kvm, Need::Guest])
}

/// A fresh scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `baton-<tag>-<pid>-<n>`, the
    /// [`test user`](crate::local_users::test_user)'s.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("baton-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        crate::local_users::give_to_test_user(&p).expect("give the temp dir to the test user");
        TempDir(p)
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    /// Removes the directory, unless `BATON_KEEP_TMP` is set (to read the logs of a failure).
    fn drop(&mut self) {
        if std::env::var_os("BATON_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process whose stdout lines are collected on a thread; killed on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its stdin, when spawned with [`Proc::spawn_with_stdin`].
    pub stdin: Option<std::process::ChildStdin>,
    lines: Receiver<String>,
    /// Every line seen so far.
    pub seen: Vec<String>,
}

impl Proc {
    /// Spawns `cmd` with stdout piped (stderr inherited so test logs show it).
    pub fn spawn(mut cmd: Command) -> std::io::Result<Self> {
        cmd.stdin(Stdio::null());
        Self::start(cmd)
    }

    /// Like [`Proc::spawn`], with a pipe to its stdin (a VMM forwards it to the guest's UART).
    pub fn spawn_with_stdin(mut cmd: Command) -> std::io::Result<Self> {
        cmd.stdin(Stdio::piped());
        let mut p = Self::start(cmd)?;
        p.stdin = p.child.stdin.take();
        Ok(p)
    }

    fn start(mut cmd: Command) -> std::io::Result<Self> {
        let mut child = cmd.stdout(Stdio::piped()).spawn()?;
        let out = child.stdout.take().ok_or(std::io::ErrorKind::BrokenPipe)?;
        Ok(Proc {
            child,
            stdin: None,
            lines: read_lines(out),
            seen: Vec::new(),
        })
    }

    /// Writes `bytes` to the process's stdin (see [`Proc::spawn_with_stdin`]).
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        match self.stdin.as_mut() {
            Some(s) => s.write_all(bytes).and_then(|()| s.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// Waits until a line satisfies `pred` and returns it; `None` at the deadline or EOF.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Some(l);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits for the process to exit; kills it at the deadline. Returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Drain what is left so `seen` is complete.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// All output seen, for assertion messages.
    pub fn transcript(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Proc {
    /// SIGTERM first, so that a VMM or back-end cleans up after itself; SIGKILL after 2 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(i32::try_from(self.child.id()).unwrap_or(0), libc::SIGTERM) };
            let _ = wait_until(Duration::from_secs(2), || {
                self.child.try_wait().ok().flatten()
            });
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_lines(out: ChildStdout) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The first JSON object line in `lines` that has a `"result"` key.
pub fn result_json(lines: &[String]) -> Option<serde_json::Value> {
    lines.iter().find_map(|l| {
        let start = l.find('{')?;
        let v: serde_json::Value = serde_json::from_str(&l[start..]).ok()?;
        v.get("result").is_some().then_some(v)
    })
}

/// Output of a process run to completion.
#[derive(Debug)]
pub struct Finished {
    /// Exit code (`None` if killed at the deadline or by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `cmd` to completion, killing it after `timeout`.
pub fn run_to_end(mut cmd: Command, timeout: Duration) -> std::io::Result<Finished> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out?,
        Err(_) => {
            // SAFETY: plain kill(2) of our own child's pid.
            unsafe { libc::kill(i32::try_from(pid).unwrap_or(0), libc::SIGKILL) };
            rx.recv().map_err(|_| std::io::ErrorKind::BrokenPipe)??
        }
    };
    Ok(Finished {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[cfg(test)]
mod skip_tests {
    #[test]
    fn a_test_that_cannot_run_fails_unless_its_kind_is_allowed() {
        // This library's tests never set BATON_ALLOW_SKIP; ./test.sh under CI refuses it.
        if std::env::var_os("BATON_ALLOW_SKIP").is_some() {
            return;
        }
        let r = std::panic::catch_unwind(|| super::cannot_run("qemu", "qemu is missing"));
        assert!(r.is_err(), "a missing prerequisite passed as a skip");
    }
}
