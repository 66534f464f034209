//! baton-net-tap command line, TAP setup errors, lifetime rules without a guest: bad options
//! exit non-zero with a clear message; a TAP name taken by a non-TAP device, no permission for
//! TAP creation; a second concurrent front-end is refused without disturbing the first;
//! SIGTERM exits 0 leaving a persistent TAP; socket activation and sd_notify.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use baton_tests::harness::{Need, TempDir, bin, can_run_with, run_to_end, wait_until};
use baton_tests::hostile::get_features_on;
use baton_tests::net::*;
use baton_tests::netns::{Netns, sh, unique_tap};

/// Runs baton-net-tap inside `ns` with `args`; returns (exit code, stderr).
fn run_in(ns: &Netns, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(bin("baton-net-tap"))
        .args(args);
    let f = run_to_end(cmd, Duration::from_secs(20)).unwrap();
    (f.code, f.stderr)
}

#[test]
fn net_cli_bad_options_exit_nonzero_with_a_message() {
    if !can_run_with(
        "net_cli_bad_options_exit_nonzero_with_a_message",
        &[Need::Net],
    ) {
        return;
    }
    let ns = Netns::new("nc1").unwrap();
    let dir = TempDir::new("net-cli");
    let sock = dir.join("s.sock");
    let sock = sock.to_str().unwrap();
    let tap = unique_tap("c");
    let cases: &[(&[&str], &str)] = &[
        (&["--socket", sock], "--tap"),
        (
            &["--socket", sock, "--tap", "a-name-that-is-too-long"],
            "too long",
        ),
        (
            &["--socket", sock, "--tap", "bad/name"],
            "not a valid interface name",
        ),
        (
            &[
                "--socket",
                sock,
                "--tap",
                &tap,
                "--mac",
                "01:00:5e:00:00:01",
            ],
            "multicast",
        ),
        (
            &[
                "--socket",
                sock,
                "--tap",
                &tap,
                "--mac",
                "52:54:00:zz:00:01",
            ],
            "hex",
        ),
        (&["--socket", sock, "--tap", &tap, "--mtu", "10"], "--mtu"),
        (
            &["--socket", sock, "--tap", &tap, "--queues", "0"],
            "--queues",
        ),
        (
            &["--socket", "/nonexistent-dir/x.sock", "--tap", &tap],
            "cannot listen on /nonexistent-dir/x.sock",
        ),
        (&["--socket", sock, "--tap-fd", "77"], "fd 77 is not a TAP"),
        (
            &["--socket", sock, "--tap", &tap, "--tap-fd", "77"],
            "cannot be used with",
        ),
        (&["--tap", &tap], "no socket"),
    ];
    for (args, want) in cases {
        let (code, err) = run_in(&ns, args);
        assert!(
            code.is_some_and(|c| c != 0),
            "{args:?}: exit {code:?}, stderr:\n{err}"
        );
        assert!(
            err.contains(want),
            "{args:?}: stderr lacks {want:?}:\n{err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    }
}

#[test]
fn net_cli_tap_name_taken_by_a_non_tap_device() {
    if !can_run_with("net_cli_tap_name_taken_by_a_non_tap_device", &[Need::Net]) {
        return;
    }
    let ns = Netns::new("nc2").unwrap();
    let dir = TempDir::new("net-cli");
    let name = unique_tap("d");
    // Whichever of these link types the kernel has.
    let kind = ["dummy", "veth", "bridge"]
        .into_iter()
        .find(|k| ns.exec(&format!("ip link add {name} type {k}")).is_ok());
    let Some(kind) = kind else {
        baton_tests::harness::cannot_run("net", "no dummy/veth/bridge link type");
        return;
    };
    let (code, err) = run_in(
        &ns,
        &["--socket", dir.join("s").to_str().unwrap(), "--tap", &name],
    );
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {err}");
    assert!(err.contains("is not a TAP device"), "{err}");
    // A persistent TAP without multi-queue support: a hint how to create it.
    let single = unique_tap("e");
    ns.exec(&format!("ip tuntap add dev {single} mode tap vnet_hdr"))
        .unwrap();
    let (code, err) = run_in(
        &ns,
        &[
            "--socket",
            dir.join("s2").to_str().unwrap(),
            "--tap",
            &single,
        ],
    );
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {err}");
    assert!(err.contains("without multi-queue support"), "{err}");
    // The other device is untouched.
    ns.exec(&format!("ip -d link show {name} | grep -q {kind}"))
        .unwrap();
}

#[test]
fn net_cli_no_permission_to_create_a_tap() {
    if !can_run_with("net_cli_no_permission_to_create_a_tap", &[Need::Net]) {
        return;
    }
    if sh("command -v setpriv").is_err() {
        baton_tests::harness::cannot_run("root", "setpriv is not installed");
        return;
    }
    let ns = Netns::new("nc3").unwrap();
    let dir = TempDir::new("net-cli");
    // The unprivileged user must be able to reach the binary and the socket directory.
    let bin = bin("baton-net-tap");
    if sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups test -x {}",
        bin.display()
    ))
    .is_err()
    {
        baton_tests::harness::cannot_run(
            "root",
            &format!("nobody cannot execute {}", bin.display()),
        );
        return;
    }
    sh(&format!("chmod 777 {}", dir.0.display())).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.0,
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ])
    .arg(bin)
    .args([
        "--socket",
        dir.join("s").to_str().unwrap(),
        "--tap",
        &unique_tap("p"),
    ]);
    let f = run_to_end(cmd, Duration::from_secs(20)).unwrap();
    assert!(
        f.code.is_some_and(|c| c != 0),
        "exit {:?}: {}",
        f.code,
        f.stderr
    );
    assert!(
        f.stderr.contains("no permission") || f.stderr.contains("cannot open /dev/net/tun"),
        "{}",
        f.stderr
    );
    assert!(!f.stderr.contains("panicked"), "{}", f.stderr);
}

#[test]
fn net_a_second_front_end_waits_in_standby_and_a_third_is_refused() {
    if !can_run_with(
        "net_a_second_front_end_waits_in_standby_and_a_third_is_refused",
        &[Need::Net],
    ) {
        return;
    }
    let ns = Netns::new("nc4").unwrap();
    let dir = TempDir::new("net-cli");
    let tap = NetTap::start(&ns, &dir, &["--tap", &unique_tap("r")]);
    let timeout = |s: &UnixStream, ms: u64| {
        s.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
    };
    let mut first = UnixStream::connect(&tap.socket).unwrap();
    timeout(&first, 10_000);
    let f = get_features_on(&mut first);
    assert_ne!(f & (1 << 32), 0, "VERSION_1 offered");
    // The second (a live update's next VMM connecting early) is served its handshake...
    let mut second = UnixStream::connect(&tap.socket).unwrap();
    timeout(&second, 10_000);
    assert_eq!(get_features_on(&mut second), f, "the standby's handshake");
    assert!(
        tap.wait_log("in standby", Duration::from_secs(5)),
        "{}",
        tap.log_text()
    );
    // ... but a message that touches the device waits, unread, while the first runs.
    // GET_VRING_BASE (11) of ring 0.
    let mut get_base = Vec::new();
    for w in [11u32, 1, 8, 0, 0] {
        get_base.extend_from_slice(&w.to_le_bytes());
    }
    second.write_all(&get_base).unwrap();
    timeout(&second, 300);
    let mut reply = [0u8; 20];
    assert!(
        second.read_exact(&mut reply).is_err(),
        "the standby front-end reached the device while the first runs"
    );
    // A third is closed at once.
    let mut third = UnixStream::connect(&tap.socket).unwrap();
    timeout(&third, 10_000);
    let mut b = [0u8; 1];
    assert_eq!(
        third.read(&mut b).unwrap_or(0),
        0,
        "third front-end must be closed"
    );
    assert!(
        tap.wait_log("refusing a third front-end", Duration::from_secs(5)),
        "{}",
        tap.log_text()
    );
    assert_eq!(
        get_features_on(&mut first),
        f,
        "first front-end still served"
    );
    // The first goes: the second takes the device over, and its waiting message is served.
    drop(first);
    timeout(&second, 10_000);
    second.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 11);
    assert!(
        tap.wait_log(
            "the standby front-end takes the device over",
            Duration::from_secs(5)
        ),
        "{}",
        tap.log_text()
    );
    assert_eq!(get_features_on(&mut second), f);
}

#[test]
fn net_sigterm_exits_0_and_leaves_a_persistent_tap() {
    if !can_run_with(
        "net_sigterm_exits_0_and_leaves_a_persistent_tap",
        &[Need::Net],
    ) {
        return;
    }
    let ns = Netns::new("nc5").unwrap();
    let dir = TempDir::new("net-cli");
    let name = unique_tap("s");
    ns.exec(&format!(
        "ip tuntap add dev {name} mode tap multi_queue vnet_hdr"
    ))
    .unwrap();
    let mut tap = NetTap::start(&ns, &dir, &["--tap", &name, "--queues", "2"]);
    let mut fe = UnixStream::connect(&tap.socket).unwrap();
    fe.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    get_features_on(&mut fe);
    assert_eq!(tap.terminate(), Some(0), "{}", tap.log_text());
    ns.exec(&format!("ip link show {name} >/dev/null")).unwrap();

    // A TAP that baton-net-tap created itself goes away with it.
    let name2 = unique_tap("t");
    let dir2 = TempDir::new("net-cli");
    let mut tap2 = NetTap::start(&ns, &dir2, &["--tap", &name2]);
    ns.exec(&format!("ip link show {name2} >/dev/null"))
        .unwrap();
    assert_eq!(tap2.terminate(), Some(0), "{}", tap2.log_text());
    assert!(
        ns.exec(&format!("ip link show {name2}")).is_err(),
        "non-persistent TAP left behind"
    );
}

/// Kills (and reaps) the child when the test ends, even on failure.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn net_socket_activation_and_sd_notify() {
    if !can_run_with("net_socket_activation_and_sd_notify", &[Need::Net]) {
        return;
    }
    let ns = Netns::new("nc6").unwrap();
    let dir = TempDir::new("net-cli");
    let listener = UnixListener::bind(dir.join("act.sock")).unwrap();
    let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let lfd = listener.as_raw_fd();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.0,
        "sh",
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"",
    ])
    .arg(bin("baton-net-tap"))
    .args(["--tap", &unique_tap("a")])
    .env("NOTIFY_SOCKET", dir.join("notify.sock"))
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
            let r = if lfd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(lfd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    // The TAP queue goes to the fd store first (FDSTORE=1, the fd as SCM_RIGHTS: dropped here),
    // then READY=1.
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("FDSTORE=1 from sd_notify");
    assert_eq!(&buf[..n], b"FDSTORE=1\nFDNAME=tap-q0");
    let n = notify.recv(&mut buf).expect("READY=1 from sd_notify");
    assert_eq!(&buf[..n], b"READY=1");
    let mut fe = UnixStream::connect(dir.join("act.sock")).unwrap();
    fe.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_ne!(get_features_on(&mut fe), 0);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let st = wait_until(Duration::from_secs(10), || {
        child.0.try_wait().ok().flatten()
    });
    assert_eq!(st.and_then(|s| s.code()), Some(0));
}

#[test]
fn net_garbage_from_a_front_end_ends_only_that_connection() {
    if !can_run_with(
        "net_garbage_from_a_front_end_ends_only_that_connection",
        &[Need::Net],
    ) {
        return;
    }
    let ns = Netns::new("nc7").unwrap();
    let dir = TempDir::new("net-cli");
    let mut tap = NetTap::start(&ns, &dir, &["--tap", &unique_tap("g")]);
    for (i, junk) in [
        vec![0x0f, 0x27, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0], // unknown request
        vec![1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f], // oversized payload
        vec![5, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8], // mem table without fds
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = UnixStream::connect(&tap.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&junk);
        let mut b = [0u8; 64];
        // Refused (an error reply or the connection closed), never a crash.
        let _ = s.read(&mut b);
        drop(s);
        // One front-end at a time: wait until this one is gone before the next.
        let gone = 2 * i + 1;
        let seen = wait_until(Duration::from_secs(10), || {
            (tap.log_text().matches("front-end gone").count() >= gone).then_some(())
        });
        assert!(seen.is_some(), "{}", tap.log_text());
        assert!(tap.alive(), "{}", tap.log_text());
        let mut good = UnixStream::connect(&tap.socket).unwrap();
        good.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_ne!(get_features_on(&mut good), 0, "{}", tap.log_text());
        drop(good);
        let seen = wait_until(Duration::from_secs(10), || {
            (tap.log_text().matches("front-end gone").count() > gone).then_some(())
        });
        assert!(seen.is_some(), "{}", tap.log_text());
    }
    assert!(!tap.log_text().contains("panicked"));
}
