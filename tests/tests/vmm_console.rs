//! A console that outlives a VMM: `--serial socket=PATH` (clients attach and detach; output
//! written while nobody is attached is kept; input reaches the guest; a live update keeps the
//! console and loses nothing) and `--serial pty`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_tests::harness::{
    Need, Proc, TempDir, bin, can_run, can_run_with, guest, result_json, run_to_end, wait_until,
};
use baton_tests::services::{Vmm, start_blk_on_new_image};

const T: Duration = Duration::from_secs(30);

fn vmm(serial: &str, cmdline: &str, name: &str) -> Command {
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--kernel")
        .arg(guest())
        .args(["--memory", "size=128M", "--cmdline", cmdline])
        .args(["--serial", serial, "--name", name])
        .args(baton_tests::local_users::vmm_user_args());
    c
}

fn unique(tag: &str) -> String {
    format!("con{}-{tag}", std::process::id())
}

/// Connects to the console socket, retrying while it is not there yet (or, in a live update,
/// between the old VMM closing and the new one's socket taking the path).
fn attach(path: &Path) -> BufReader<UnixStream> {
    let s = wait_until(T, || UnixStream::connect(path).ok()).expect("console socket");
    s.set_read_timeout(Some(T)).unwrap();
    BufReader::new(s)
}

/// The number of a `tick N` line.
fn tick(line: &str) -> Option<u64> {
    line.trim().strip_prefix("tick ")?.parse().ok()
}

/// Reads lines until a `tick N` line with N >= `until`; returns every tick seen. `None` at
/// the end of the stream (the VMM closed it), with a line cut there kept in `partial`: a line
/// the guest was writing when a live update paused it ends on the next VMM's console.
fn read_ticks(
    r: &mut BufReader<UnixStream>,
    until: u64,
    seen: &mut Vec<u64>,
    partial: &mut String,
) -> Option<()> {
    loop {
        match r.read_line(partial) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => panic!("reading the console: {e} (after ticks {seen:?})"),
        }
        if !partial.ends_with('\n') {
            return None;
        }
        let line = std::mem::take(partial);
        if let Some(n) = tick(&line) {
            seen.push(n);
            if n >= until {
                return Some(());
            }
        }
    }
}

fn assert_consecutive(seen: &[u64]) {
    for w in seen.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a tick lost or repeated: {seen:?}");
    }
}

#[test]
fn output_written_while_detached_reaches_the_next_client() {
    if !can_run("output_written_while_detached_reaches_the_next_client") {
        return;
    }
    let dir = TempDir::new("console");
    let sock = dir.join("console.sock");
    let p = Proc::spawn(vmm(
        &format!("socket={}", sock.display()),
        "test=ticks n=0 ms=2",
        &unique("detach"),
    ))
    .unwrap();
    // Nobody attached from the start: the boot lines and the first ticks are kept.
    std::thread::sleep(Duration::from_millis(300));
    let mut c = attach(&sock);
    let mut head = String::new();
    while !head.contains("tick 1\n") {
        assert!(c.read_line(&mut head).unwrap() > 0, "{head}");
    }
    assert!(
        head.starts_with("cpu 0 online") && head.contains("baton-test-guest ready"),
        "the next client gets the guest's output from its start: {head}"
    );
    let mut seen = vec![1];
    read_ticks(&mut c, 50, &mut seen, &mut String::new()).unwrap();
    assert_eq!(seen[..2], [1, 2]);
    assert_consecutive(&seen);
    // A second client at the same time gets the same live output.
    let mut d = attach(&sock);
    let mut other = Vec::new();
    read_ticks(
        &mut d,
        seen[seen.len() - 1] + 20,
        &mut other,
        &mut String::new(),
    )
    .unwrap();
    assert_consecutive(&other);
    drop((c, d));
    drop(p); // SIGTERM: a clean stop
    // The socket is the VMM's to remove when it stops.
    let gone = wait_until(Duration::from_secs(10), || (!sock.exists()).then_some(()));
    assert!(gone.is_some(), "the console socket is removed at exit");
}

#[test]
fn input_from_a_client_reaches_the_guest() {
    if !can_run("input_from_a_client_reaches_the_guest") {
        return;
    }
    let dir = TempDir::new("console-in");
    let sock = dir.join("console.sock");
    let blk_sock = dir.join("blk.sock");
    let _blk = start_blk_on_new_image(&dir.join("disk.img"), 16 << 20, &blk_sock, &[]).unwrap();
    let mut c = vmm(
        &format!("socket={}", sock.display()),
        "test=blk-cont seconds=0",
        &unique("input"),
    );
    c.arg("--disk")
        .arg(format!("socket={}", blk_sock.display()));
    let mut p = Proc::spawn(c).unwrap();
    let mut con = attach(&sock);
    let mut out = String::new();
    let mut line = String::new();
    while !out.contains("ready") {
        line.clear();
        assert!(con.read_line(&mut line).unwrap() > 0, "{out}");
        out.push_str(&line);
    }
    // blk-cont stops on a 'q' from its console (after some writes: none is a failure).
    std::thread::sleep(Duration::from_millis(500));
    con.get_mut().write_all(b"q").unwrap();
    let mut rest = String::new();
    let _ = con.read_to_string(&mut rest);
    out.push_str(&rest);
    let lines: Vec<String> = out.lines().map(String::from).collect();
    let r = result_json(&lines).unwrap_or_default();
    assert_eq!(r["stopped_by"], "serial", "{out}");
    assert_eq!(r["result"], "pass", "{out}");
    assert_eq!(p.wait_exit(T), Some(0));
}

#[test]
fn a_live_update_keeps_the_console_and_loses_no_output() {
    if !can_run("a_live_update_keeps_the_console_and_loses_no_output") {
        return;
    }
    let dir = TempDir::new("console-lu");
    let sock = dir.join("console.sock");
    let serial = format!("socket={}", sock.display());
    let mut cur = Vmm::boot(
        vmm(&serial, "test=ticks n=0 ms=2", &unique("lu")),
        dir.join("vmm.api"),
    )
    .unwrap();
    let mut con = attach(&sock);
    let (mut seen, mut partial) = (Vec::new(), String::new());
    read_ticks(&mut con, 20, &mut seen, &mut partial).unwrap();
    for n in 0..3 {
        let (new, incoming) = Vmm::incoming_with(&dir.0, n, &["--serial", &serial]).unwrap();
        cur.live_update(&incoming).unwrap();
        assert_eq!(cur.proc.wait_exit(T), Some(0), "{}", cur.proc.transcript());
        // The old VMM closed its clients; attaching again reaches the new one, which first
        // gives what the guest wrote meanwhile.
        let last = seen[seen.len() - 1];
        while read_ticks(&mut con, u64::MAX, &mut seen, &mut partial).is_some() {}
        con = attach(&sock);
        read_ticks(&mut con, last + 50, &mut seen, &mut partial).unwrap();
        assert_consecutive(&seen);
        cur = new;
    }
    // Detached during a swap: what the guest wrote on the old VMM meanwhile comes from the
    // new one. (What the old VMM had already sent to the dropped client is gone with it: a
    // few ticks at most, where losing the carried-over output would lose about 250.)
    drop(con);
    let last = seen[seen.len() - 1];
    std::thread::sleep(Duration::from_millis(500));
    let (new, incoming) = Vmm::incoming_with(&dir.0, 3, &["--serial", &serial]).unwrap();
    cur.live_update(&incoming).unwrap();
    assert_eq!(cur.proc.wait_exit(T), Some(0), "{}", cur.proc.transcript());
    cur = new;
    let mut con = attach(&sock);
    let mut after = Vec::new();
    let mut partial = String::new();
    read_ticks(&mut con, last + 300, &mut after, &mut partial).unwrap();
    assert!(
        after[0] <= last + 30,
        "the output written while detached, before the swap, is carried over: ticks up to \
         {last} read before, {} first after",
        after[0]
    );
    assert_consecutive(&after[1..]);
    assert_eq!(
        cur.info().unwrap()["console"],
        sock.display().to_string(),
        "vm.info names the console"
    );
}

#[test]
fn a_pty_console_carries_the_guest_output() {
    if !can_run("a_pty_console_carries_the_guest_output") {
        return;
    }
    let dir = TempDir::new("console-pty");
    let vm = Vmm::boot(
        vmm("pty", "test=ticks n=0 ms=5", &unique("pty")),
        dir.join("vmm.api"),
    )
    .unwrap();
    // Its path is in vm.info (and on stderr).
    let info = wait_until(T, || vm.info().ok()).unwrap();
    let path = info["console"].as_str().unwrap_or_default().to_string();
    assert!(path.starts_with("/dev/pts/"), "{info}");
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut r = BufReader::new(tty);
    let start = Instant::now();
    let mut l = String::new();
    let mut ticks = 0;
    while ticks < 10 && start.elapsed() < T {
        l.clear();
        r.read_line(&mut l).unwrap();
        if tick(&l).is_some() {
            ticks += 1;
        }
    }
    assert_eq!(ticks, 10, "ticks through {path}");
}

#[test]
fn a_console_socket_in_use_is_refused_and_nothing_is_left() {
    if !can_run_with(
        "a_console_socket_in_use_is_refused_and_nothing_is_left",
        &[Need::Kvm],
    ) {
        return;
    }
    let dir = TempDir::new("console-busy");
    let sock = dir.join("console.sock");
    let _other = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let name = unique("busy");
    let f = run_to_end(
        vmm(&format!("socket={}", sock.display()), "test=boot", &name),
        T,
    )
    .unwrap();
    assert!(matches!(f.code, Some(c) if c != 0), "{f:?}");
    assert!(
        f.stderr.contains(sock.to_str().unwrap()),
        "the error names the socket: {}",
        f.stderr
    );
    assert!(sock.exists(), "the other listener's socket is left alone");
    assert!(
        !baton_tests::local_users::test_ram_file(&name).exists(),
        "no RAM file left behind"
    );
}
