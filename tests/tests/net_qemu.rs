//! baton-net-tap with QEMU (TCG) and a real Linux guest: ping and TCP streams both ways between
//! the guest and a network namespace the test creates, then a second QEMU reconnecting to the
//! same running back-end. Skips (printing why) without root, /dev/net/tun or QEMU.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use baton_tests::harness::{Need, can_run_with};
use baton_tests::harness::{TempDir, wait_until};
use baton_tests::net::*;
use baton_tests::netns::{Netns, unique_tap};

fn pattern(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

fn md5(data: &[u8]) -> String {
    let mut c = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn accept(l: &TcpListener) -> Option<TcpStream> {
    l.set_nonblocking(true).unwrap();
    let s = wait_until(Duration::from_secs(100), || l.accept().ok().map(|(s, _)| s))?;
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    Some(s)
}

/// One guest session: ping, guest→namespace stream (verified byte for byte here) and
/// namespace→guest stream (verified by md5 in the guest). Panics with the transcript on failure.
fn session(
    queues: u16,
    ns: &Netns,
    guest: &(std::path::PathBuf, std::path::PathBuf),
    tap: &NetTap,
    subnet: u8,
    n: u32,
) {
    let host_ip = format!("10.213.{subnet}.1");
    let ip = host_ip.clone();
    let expect_up = pattern(n);
    let sink = ns.thread(move || {
        let l = TcpListener::bind((ip.as_str(), 5001)).unwrap();
        let mut s = accept(&l)?;
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        Some(got)
    });
    let ip = host_ip.clone();
    let down = pattern(n + 7);
    let down_md5 = md5(&down);
    let source = ns.thread(move || {
        let l = TcpListener::bind((ip.as_str(), 5002)).unwrap();
        let mut s = accept(&l)?;
        s.write_all(&down).ok()?;
        Some(())
    });
    let script = format!(
        "ip link set lo up; ip link set eth0 up; ip addr add 10.213.{subnet}.2/24 dev eth0\n\
         ping -c 3 -W 5 {host_ip} >/dev/null && echo PING-OK\n\
         seq 1 {n} | nc {host_ip} 5001; echo SEND-DONE\n\
         echo RECV-MD5 $(nc {host_ip} 5002 | md5sum)\n\
         echo QUEUES $(ls /sys/class/net/eth0/queues | tr \"\\n\" \" \")\n"
    );
    let out = run_guest(guest, &tap.socket, "52:54:00:12:34:56", queues, &script);
    let ctx = || {
        format!(
            "guest console:\n{out}\nbaton-net-tap log:\n{}",
            tap.log_text()
        )
    };
    assert!(
        out.contains("PING-OK"),
        "ping from the guest failed\n{}",
        ctx()
    );
    let got = sink.join().unwrap();
    assert!(
        got.as_ref() == Some(&expect_up),
        "guest→namespace stream differs ({:?} bytes)\n{}",
        got.map(|g| g.len()),
        ctx()
    );
    assert!(
        source.join().unwrap().is_some(),
        "namespace→guest stream failed\n{}",
        ctx()
    );
    if queues > 1 {
        assert!(
            out.contains("rx-1"),
            "the guest does not have 2 queue pairs\n{}",
            ctx()
        );
    }
    assert!(
        out.contains(&format!("RECV-MD5 {down_md5}")),
        "namespace→guest data differs (want {down_md5})\n{}",
        ctx()
    );
}

#[test]
fn net_qemu_ping_tcp_and_reconnect() {
    if !can_run_with(
        "net_qemu_ping_tcp_and_reconnect",
        &[Need::Net, Need::Program("qemu-system-x86_64")],
    ) {
        return;
    }
    let guest = match baton_tests::linux_guest::build() {
        Ok(g) => g,
        Err(why) => panic!("building the Linux test guest failed: {why}"),
    };
    let ns = Netns::new("nq").unwrap();
    let dir = TempDir::new("net-qemu");
    let name = unique_tap("q");
    let mut tap = NetTap::start(&ns, &dir, &["--tap", &name, "--mac", "52:54:00:12:34:56"]);
    ns.exec(&format!(
        "ip addr add 10.213.7.1/24 dev {name} && ip link set {name} up"
    ))
    .unwrap();

    session(1, &ns, &guest, &tap, 7, 40_000);
    assert!(
        tap.wait_log("front-end gone", Duration::from_secs(10)),
        "no disconnect seen:\n{}",
        tap.log_text()
    );
    assert!(
        tap.alive(),
        "baton-net-tap exited after the first front-end:\n{}",
        tap.log_text()
    );
    // The TAP stays while no front-end is connected.
    ns.exec(&format!("ip link show {name} >/dev/null")).unwrap();

    // A second QEMU on the same running back-end.
    session(1, &ns, &guest, &tap, 7, 25_000);
    assert!(
        tap.alive(),
        "baton-net-tap exited after the second front-end:\n{}",
        tap.log_text()
    );
    assert_eq!(
        tap.terminate(),
        Some(0),
        "SIGTERM must exit 0:\n{}",
        tap.log_text()
    );
}

#[test]
fn net_qemu_two_queue_pairs() {
    if !can_run_with(
        "net_qemu_two_queue_pairs",
        &[Need::Net, Need::Program("qemu-system-x86_64")],
    ) {
        return;
    }
    let guest = match baton_tests::linux_guest::build() {
        Ok(g) => g,
        Err(why) => panic!("building the Linux test guest failed: {why}"),
    };
    let ns = Netns::new("nq2").unwrap();
    let dir = TempDir::new("net-qemu");
    let name = unique_tap("m");
    let mut tap = NetTap::start(&ns, &dir, &["--tap", &name, "--queues", "2"]);
    ns.exec(&format!(
        "ip addr add 10.213.8.1/24 dev {name} && ip link set {name} up"
    ))
    .unwrap();
    session(2, &ns, &guest, &tap, 8, 30_000);
    assert!(tap.alive(), "{}", tap.log_text());
    assert_eq!(tap.terminate(), Some(0), "{}", tap.log_text());
}

#[test]
fn net_qemu_killed_front_end_then_a_new_one() {
    if !can_run_with(
        "net_qemu_killed_front_end_then_a_new_one",
        &[Need::Net, Need::Program("qemu-system-x86_64")],
    ) {
        return;
    }
    let guest = match baton_tests::linux_guest::build() {
        Ok(g) => g,
        Err(why) => panic!("building the Linux test guest failed: {why}"),
    };
    let ns = Netns::new("nq3").unwrap();
    let dir = TempDir::new("net-qemu");
    let name = unique_tap("k");
    let mut tap = NetTap::start(&ns, &dir, &["--tap", &name]);
    ns.exec(&format!(
        "ip addr add 10.213.6.1/24 dev {name} && ip link set {name} up"
    ))
    .unwrap();
    // A guest that pings until it is killed (no clean shutdown of the rings).
    let script =
        "ip link set eth0 up; ip addr add 10.213.6.2/24 dev eth0; ping -i 0.2 10.213.6.1\n";
    let mut cmd = qemu_command(&guest, &tap.socket, "52:54:00:12:34:56", 1, script);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut qemu = cmd.spawn().unwrap();
    let flowing = wait_until(Duration::from_secs(100), || {
        std::thread::sleep(Duration::from_millis(200));
        tap.stat("rx_frames").filter(|n| *n >= 3)
    });
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(
        flowing.is_some(),
        "no traffic from the first guest:\n{}",
        tap.log_text()
    );
    assert!(
        tap.wait_log("front-end gone", Duration::from_secs(10)),
        "{}",
        tap.log_text()
    );
    assert!(tap.alive(), "{}", tap.log_text());
    session(1, &ns, &guest, &tap, 6, 20_000);
    assert_eq!(tap.terminate(), Some(0), "{}", tap.log_text());
}
