//! baton-blk's sandbox (seccomp per thread kind, Landlock): reported at start, on by default,
//! controlled by `--seccomp`/`--landlock` with clear errors, and real: a forbidden system call
//! stops the service naming it, a file opened after set-up is refused.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_tests::blk::*;
use baton_tests::harness::{bin, wait_until};
use baton_tests::vhost_user::blk::*;

const MIB: u64 = 1 << 20;

/// A baton-blk on a fresh 16 MiB image with an info-level log; returns it and its log path.
fn start(extra: &[&str]) -> (Blk, PathBuf) {
    let dir = tmpdir("sandbox");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let log = dir.join("blk.log");
    let b = Blk::start_with_log(dir, img, extra, Some(&log));
    (b, log)
}

/// Waits until the log has a line containing `needle`; returns the whole log.
fn wait_log(log: &Path, needle: &str) -> String {
    wait_until(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(log).ok()?;
        text.contains(needle).then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "no '{needle}' in the log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

/// Whether this kernel enforces Landlock (the log says so at start either way); a kernel
/// without it cannot run the Landlock checks (see `harness::cannot_run`).
fn landlock_enforced(log: &str) -> bool {
    if log.contains("landlock: enforced") {
        return true;
    }
    assert!(log.contains("landlock: not enforced"), "{log}");
    baton_tests::harness::cannot_run("landlock", "this kernel does not enforce Landlock");
    false
}

fn opts() -> BlkOptions {
    BlkOptions {
        queues: 2,
        mem_size: 32 * MIB,
        slots: 32,
        ..BlkOptions::default()
    }
}

#[test]
fn blk_sandbox_is_on_by_default_and_reported() {
    let (mut b, log) = start(&["--queues", "2"]);
    let text = wait_log(
        &log,
        "seccomp: 3 filters installed (worker, worker, control)",
    );
    assert!(
        text.contains("landlock: enforced (ABI 7): no file system access")
            || text.contains("landlock: not enforced"),
        "{text}"
    );
    // I/O works inside the sandbox, on both queues (the other suites run every request type).
    let mut d = BlkDriver::connect(&b.sock, opts()).unwrap();
    for q in 0..2 {
        let data = pattern(q as u64 + 1, 8192);
        assert_eq!(d.queue(q).write(q as u64 * 64, &data).unwrap(), S_OK);
        assert_eq!(d.queue(q).read(q as u64 * 64, 8192).unwrap(), (S_OK, data));
        assert_eq!(d.queue(q).flush().unwrap(), S_OK);
    }
    drop(d);
    let st = b.signal_and_wait(libc::SIGTERM);
    assert_eq!(
        st.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .contains("made a forbidden")
    );
}

#[test]
fn blk_sandbox_options_and_their_errors() {
    let (_b, log) = start(&["--seccomp", "false", "--landlock", "false"]);
    let text = wait_log(&log, "seccomp: disabled (--seccomp false)");
    assert!(
        text.contains("landlock: disabled (--landlock false)"),
        "{text}"
    );
    let (_b, log) = start(&["--seccomp", "log"]);
    wait_log(
        &log,
        "seccomp: 2 filters installed (worker, control) in log mode",
    );
    let (_b, log) = start(&["--seccomp", "true", "--landlock", "true"]);
    wait_log(
        &log,
        "seccomp: 2 filters installed (worker, control); a forbidden",
    );

    let dir = tmpdir("sandbox-cli");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let sock = dir.join("s.sock");
    let run = |extra: [&str; 2]| {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--socket"),
            sock.as_os_str(),
            OsStr::new("--image"),
            img.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        run_failing(&args, false)
    };
    let (code, err) = run(["--seccomp", "maybe"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("invalid value 'maybe' for '--seccomp <MODE>'")
            && err.contains("[possible values: true, false, log]"),
        "{err}"
    );
    let (code, err) = run(["--landlock", "yes"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("invalid value 'yes' for '--landlock <BOOL>'"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The filter is real: execve after set-up stops the service at once (exit 159 = 128 +
/// SIGSYS), with the system call named on stderr.
#[test]
fn blk_forbidden_syscall_stops_it_and_is_named() {
    let dir = tmpdir("sandbox-execve");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let out = Command::new(bin("baton-blk"))
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .arg("--image")
        .arg(&img)
        .args(["--test-sandbox-violation", "execve"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(159), "{err}");
    assert!(
        err.contains(
            "baton-blk: seccomp: the control thread made a forbidden system call 59 (execve): \
             stopping"
        ),
        "{err}"
    );
    assert!(!err.contains("execve denied"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Landlock is real: with seccomp off (which would stop the open first), opening a file after
/// set-up — even the image itself — is refused and the service carries on; without Landlock the
/// same open succeeds. In `--seccomp log` mode execve is let through by seccomp and refused by
/// Landlock's execute right, and the service carries on too.
#[test]
fn blk_landlock_refuses_files_after_set_up() {
    let (probe, log) = start(&["--seccomp", "false"]);
    if !landlock_enforced(&wait_log(&log, "landlock: ")) {
        return;
    }
    drop(probe);
    let dir = tmpdir("sandbox-open");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let violation = format!("open:{}", img.display());
    let log = dir.join("denied.log");
    let mut b = Blk::start_with_log(
        dir.clone(),
        img.clone(),
        &["--seccomp", "false", "--test-sandbox-violation", &violation],
        Some(&log),
    );
    wait_log(
        &log,
        &format!("test: open {} denied: Permission denied", img.display()),
    );
    let mut d = BlkDriver::connect(&b.sock, opts_one()).unwrap();
    assert_eq!(d.queue(0).write(0, &pattern(7, 4096)).unwrap(), S_OK);
    drop(d);
    assert!(b.alive());
    drop(b);

    let (_b, log) = start(&[
        "--seccomp",
        "false",
        "--landlock",
        "false",
        "--test-sandbox-violation",
        "open:/proc/self/status",
    ]);
    wait_log(&log, "test: opened /proc/self/status inside the sandbox");

    let (mut b, log) = start(&["--seccomp", "log", "--test-sandbox-violation", "execve"]);
    wait_log(&log, "test: execve denied: Permission denied");
    assert!(b.alive());
}

fn opts_one() -> BlkOptions {
    BlkOptions {
        queues: 1,
        ..opts()
    }
}
