//! baton-net-tap's sandbox (seccomp per thread kind, Landlock): reported at start, on by
//! default, controlled by `--seccomp`/`--landlock` with clear errors, and real: a forbidden
//! system call stops the service naming it, /dev/net/tun cannot be opened after set-up, and the
//! one file system right kept (removing its socket at exit) works.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::process::Command;
use std::time::Duration;

use baton_tests::harness::{Need, TempDir, bin, can_run_with, run_to_end, wait_until};
use baton_tests::hostile::get_features;
use baton_tests::net::*;
use baton_tests::netns::{Netns, unique_tap};

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn net_sandbox_is_on_by_default_and_reported() {
    if !can_run_with("net_sandbox_is_on_by_default_and_reported", &[Need::Net]) {
        return;
    }
    let ns = Netns::new("sb1").unwrap();
    let dir = TempDir::new("net-sandbox");
    let name = unique_tap("sb");
    let mut tap = NetTap::start(&ns, &dir, &["--tap", &name, "--queues", "2"]);
    assert!(
        tap.wait_log(
            "seccomp: 4 filters installed (signals, worker, worker, control)",
            WAIT
        ),
        "{}",
        tap.log_text()
    );
    let text = tap.log_text();
    let landlock = text.contains(&format!(
        "landlock: enforced (ABI 7): file system access only to remove files in {}",
        dir.0.display()
    ));
    assert!(
        landlock || text.contains("landlock: not enforced"),
        "{text}"
    );
    assert_ne!(get_features(&tap.socket), 0);
    // One front-end at a time: the next is served once the first one is gone.
    assert!(tap.wait_log("front-end gone", WAIT), "{}", tap.log_text());
    assert_ne!(get_features(&tap.socket), 0, "a second connection");
    // SIGUSR1 (the signal thread logs the counters), then SIGTERM: stop, remove the socket (the
    // one Landlock right kept), exit 0.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(tap.proc.child.id() as i32, libc::SIGUSR1) };
    assert!(
        tap.wait_log("stats: rx_frames=", WAIT),
        "{}",
        tap.log_text()
    );
    assert_eq!(tap.terminate(), Some(0), "{}", tap.log_text());
    assert!(!tap.socket.exists(), "socket left behind");
    assert!(!tap.log_text().contains("made a forbidden"));
}

#[test]
fn net_sandbox_options_and_their_errors() {
    if !can_run_with("net_sandbox_options_and_their_errors", &[Need::Net]) {
        return;
    }
    let ns = Netns::new("sb2").unwrap();
    let dir = TempDir::new("net-sandbox");
    let name = unique_tap("so");
    let tap = NetTap::start(
        &ns,
        &dir,
        &["--tap", &name, "--seccomp", "false", "--landlock", "false"],
    );
    assert!(
        tap.wait_log("seccomp: disabled (--seccomp false)", WAIT),
        "{}",
        tap.log_text()
    );
    assert!(
        tap.log_text()
            .contains("landlock: disabled (--landlock false)")
    );
    drop(tap);
    let dir2 = TempDir::new("net-sandbox");
    let tap = NetTap::start(&ns, &dir2, &["--tap", &name, "--seccomp", "log"]);
    assert!(
        tap.wait_log(
            "filters installed (signals, worker, control) in log mode",
            WAIT
        ),
        "{}",
        tap.log_text()
    );
    drop(tap);
    for (args, want) in [
        (
            ["--seccomp", "on"],
            "invalid value 'on' for '--seccomp <MODE>'",
        ),
        (
            ["--landlock", "1"],
            "invalid value '1' for '--landlock <BOOL>'",
        ),
    ] {
        let mut cmd = Command::new(bin("baton-net-tap"));
        cmd.args(["--tap", &name]).args(args);
        let f = run_to_end(cmd, WAIT).unwrap();
        assert_eq!(f.code, Some(2), "{}", f.stderr);
        assert!(f.stderr.contains(want), "{}", f.stderr);
    }
}

/// The filter is real: execve after set-up stops the service at once (exit 159 = 128 +
/// SIGSYS), with the system call named.
#[test]
fn net_forbidden_syscall_stops_it_and_is_named() {
    if !can_run_with("net_forbidden_syscall_stops_it_and_is_named", &[Need::Net]) {
        return;
    }
    let ns = Netns::new("sb3").unwrap();
    let dir = TempDir::new("net-sandbox");
    let name = unique_tap("sx");
    let mut tap = NetTap::start(
        &ns,
        &dir,
        &["--tap", &name, "--test-sandbox-violation", "execve"],
    );
    let st = wait_until(WAIT, || tap.proc.child.try_wait().ok().flatten()).expect("still running");
    assert_eq!(st.code(), Some(159), "{}", tap.log_text());
    assert!(
        tap.log_text().contains(
            "baton-net-tap: seccomp: the control thread made a forbidden system call 59 \
             (execve): stopping"
        ),
        "{}",
        tap.log_text()
    );
}

/// Landlock is real: with seccomp off (it would stop the open first), /dev/net/tun — opened
/// freely at set-up — is refused afterwards, and the service carries on.
#[test]
fn net_landlock_refuses_the_tun_device_after_set_up() {
    if !can_run_with(
        "net_landlock_refuses_the_tun_device_after_set_up",
        &[Need::Net],
    ) {
        return;
    }
    let ns = Netns::new("sb4").unwrap();
    let dir = TempDir::new("net-sandbox");
    let name = unique_tap("sl");
    let mut tap = NetTap::start(
        &ns,
        &dir,
        &[
            "--tap",
            &name,
            "--seccomp",
            "false",
            "--test-sandbox-violation",
            "open:/dev/net/tun",
        ],
    );
    assert!(tap.wait_log("test: ", WAIT), "{}", tap.log_text());
    if tap.log_text().contains("landlock: not enforced") {
        baton_tests::harness::cannot_run("landlock", "this kernel does not enforce Landlock");
        return;
    }
    assert!(
        tap.log_text()
            .contains("test: open /dev/net/tun denied: Permission denied"),
        "{}",
        tap.log_text()
    );
    assert_ne!(get_features(&tap.socket), 0);
    assert!(tap.alive());
    assert_eq!(tap.terminate(), Some(0), "{}", tap.log_text());
}
