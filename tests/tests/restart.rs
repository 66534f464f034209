//! Per-back-end restart under a running guest: the back-end process is killed (SIGKILL at a
//! random moment, or SIGTERM for a graceful upgrade) and started again on the same socket;
//! baton-vmm reconnects and the guest sees no error.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

#[path = "net_util.rs"]
mod net_util;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_tests::bench::Rng;
use baton_tests::boot::baton_cmd;
use baton_tests::harness::{Proc, TempDir, bin, can_run, result_json, run_to_end, wait_until};
use baton_tests::services::verify_blk_cont_image;
use net_util::{NetTap, Netns, net_skip_reason, tap_name};

const T: Duration = Duration::from_secs(30);

fn info(api: &Path) -> serde_json::Value {
    let mut c = Command::new(bin("batonctl"));
    c.arg("--api-socket").arg(api).arg("info");
    let f = run_to_end(c, T).unwrap();
    serde_json::from_str(f.stdout.trim()).unwrap_or(serde_json::Value::Null)
}

/// Waits until device 0 has reconnected `n` times and is connected again.
fn wait_reconnects(api: &Path, n: u64) -> Duration {
    let t0 = Instant::now();
    let ok = wait_until(T, || {
        let i = info(api);
        let d = &i["devices"][0];
        (d["reconnects"] == n && d["backend"] == "connected").then_some(())
    });
    assert!(
        ok.is_some(),
        "device did not reconnect ({n}): {}",
        info(api)
    );
    t0.elapsed()
}

fn start_blk(img: &Path, sock: &Path) -> Proc {
    let mut c = Command::new(bin("baton-blk"));
    c.arg("--socket").arg(sock).arg("--image").arg(img);
    Proc::spawn(c).unwrap()
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(i32::try_from(p.child.id()).unwrap(), sig) };
}

/// A 16 MiB image with baton-blk on it, and baton-vmm running `cmdline` with that disk
/// (`disk_opts` appended to its --disk option). Returns (dir, image, socket, back-end, VM, API).
fn blk_vm(
    tag: &str,
    cpus: u32,
    cmdline: &str,
    disk_opts: &str,
) -> (
    TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    Proc,
    Proc,
    std::path::PathBuf,
) {
    let dir = TempDir::new(tag);
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = dir.join("blk.sock");
    let blk = start_blk(&img, &sock);
    assert!(wait_until(T, || sock.exists().then_some(())).is_some());
    let api = dir.join("api.sock");
    let mut c = baton_cmd(cpus, "128M", cmdline);
    c.arg("--disk")
        .arg(format!("socket={}{disk_opts}", sock.display()))
        .arg("--api-socket")
        .arg(&api);
    let mut vm = Proc::spawn_with_stdin(c).unwrap();
    assert!(
        vm.wait_line(T, |l| l.contains("ready")).is_some(),
        "{}",
        vm.transcript()
    );
    (dir, img, sock, blk, vm, api)
}

fn blk_restarts(sig: i32, restarts: u64) {
    let (_dir, img, sock, mut blk, mut vm, api) = blk_vm(
        "restart-blk",
        2,
        "test=blk-cont seconds=0 depth=8 blocks=1024",
        "",
    );
    let mut rng = Rng::from_clock();
    let mut back = Vec::new();
    for i in 1..=restarts {
        std::thread::sleep(Duration::from_millis(20 + rng.next(200)));
        signal(&blk, sig);
        let code = blk.wait_exit(T);
        if sig == libc::SIGTERM {
            assert_eq!(code, Some(0), "baton-blk exits 0 on SIGTERM");
        }
        blk = start_blk(&img, &sock);
        if vm.child.try_wait().ok().flatten().is_some() {
            vm.wait_exit(T);
            panic!("baton-vmm exited during restart {i}:\n{}", vm.transcript());
        }
        back.push(wait_reconnects(&api, i));
    }
    vm.send(b"q").unwrap();
    assert_eq!(
        vm.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        vm.transcript()
    );
    let r = result_json(&vm.seen).unwrap_or_else(|| panic!("{}", vm.transcript()));
    assert_eq!(r["result"], "pass", "{r}");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert_eq!(r["verify_errors"], 0, "{r}");
    assert_eq!(r["outstanding"], 0, "{r}");
    assert!(r["writes"].as_u64().unwrap() > restarts * 10, "{r}");
    drop(blk);
    let written = verify_blk_cont_image(&img, 1024).unwrap();
    assert!(written > 0);
    back.sort();
    eprintln!(
        "{restarts} restarts (signal {sig}): reconnected after p50 {:?} max {:?}; guest {} writes, max gap {} us; {written} blocks verified on the host",
        back[back.len() / 2],
        back.last().unwrap(),
        r["writes"],
        r["max_gap_us"]
    );
}

#[test]
fn blk_backend_sigkilled_20_times_under_verified_writes() {
    if can_run("blk_backend_sigkilled_20_times") {
        blk_restarts(libc::SIGKILL, 20);
    }
}

#[test]
fn blk_backend_upgraded_with_sigterm() {
    if can_run("blk_backend_upgraded_with_sigterm") {
        blk_restarts(libc::SIGTERM, 5);
    }
}

const GUEST_IP: &str = "10.213.7.2";
const HOST_IP: &str = "10.213.7.1";

#[test]
fn net_backend_restarted_under_udp_echo() {
    if !can_run("net_backend_restarted_under_udp_echo") {
        return;
    }
    if let Some(why) = net_skip_reason() {
        eprintln!("SKIP net_backend_restarted_under_udp_echo: {why}");
        return;
    }
    let ns = Netns::new("rst");
    let dir = TempDir::new("restart-net");
    let tap = tap_name("rs");
    // A persistent TAP, so that it (and its address) outlives each baton-net-tap process.
    ns.exec(&format!(
        "ip tuntap add dev {tap} mode tap multi_queue vnet_hdr && ip addr add {HOST_IP}/24 dev {tap} && ip link set {tap} up"
    ));
    let mut nt = NetTap::start(&ns, &dir, &["--tap", &tap]);
    let api = dir.join("api.sock");
    let mut c = baton_cmd(
        1,
        "128M",
        &format!("test=net-cont ip={GUEST_IP}/24 seconds=0"),
    );
    c.arg("--net")
        .arg(format!("socket={}", nt.socket.display()))
        .arg("--api-socket")
        .arg(&api);
    let mut vm = Proc::spawn_with_stdin(c).unwrap();
    assert!(
        vm.wait_line(T, |l| l.contains("ready")).is_some(),
        "{}",
        vm.transcript()
    );

    // A sender in the namespace: one datagram per ms with a sequence number; a receiver
    // thread records what comes back.
    let dst = format!("{GUEST_IP}:7");
    let restarts = 5u64;
    let sent_so_far = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = sent_so_far.clone();
    let sender = ns.thread(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut got = BTreeSet::new();
        let mut buf = [0u8; 64];
        let t0 = Instant::now();
        let mut seq = 0u32;
        let mut sent = 0u32;
        while t0.elapsed() < Duration::from_secs(8) {
            let _ = s.send_to(&seq.to_le_bytes(), &dst);
            sent += 1;
            seq += 1;
            counter.store(seq, std::sync::atomic::Ordering::SeqCst);
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                if n == 4 {
                    got.insert(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
                }
            }
        }
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            if let Ok((4, _)) = s.recv_from(&mut buf) {
                got.insert(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
        (sent, got)
    });
    std::thread::sleep(Duration::from_millis(800));
    for i in 1..=restarts {
        nt.child.kill().unwrap();
        let _ = nt.child.wait();
        nt = NetTap::start(&ns, &dir, &["--tap", &tap]);
        wait_reconnects(&api, i);
        std::thread::sleep(Duration::from_millis(700));
    }
    let (sent, got) = sender.join().unwrap();
    let lost = sent - got.len() as u32;
    // Echo resumed after the last restart: the last second's datagrams came back.
    let tail = got
        .iter()
        .filter(|&&s| s >= sent.saturating_sub(500))
        .count();
    eprintln!(
        "{restarts} baton-net-tap restarts: {sent} datagrams sent, {} echoed, {lost} lost",
        got.len()
    );
    assert!(
        tail > 400,
        "echo did not resume: {tail} of the last 500 came back"
    );
    assert!(got.len() as u32 > sent / 2, "{} of {sent}", got.len());
    vm.send(b"q").unwrap();
    assert_eq!(vm.wait_exit(T), Some(0), "{}", vm.transcript());
    let r = result_json(&vm.seen).unwrap_or_else(|| panic!("{}", vm.transcript()));
    assert_eq!(r["result"], "pass", "{r}");
    drop(nt);
}

#[test]
fn reconnect_gives_up_only_when_configured() {
    if !can_run("reconnect_gives_up_only_when_configured") {
        return;
    }
    let (_dir, _img, _sock, mut blk, mut vm, api) = blk_vm(
        "restart-giveup",
        1,
        "test=blk-cont seconds=0",
        ",reconnect_ms=300",
    );
    std::thread::sleep(Duration::from_millis(200));
    signal(&blk, libc::SIGKILL);
    blk.wait_exit(T);
    // The back-end stays away: after 300 ms the device is given up, the VM keeps running.
    let failed = wait_until(T, || {
        (info(&api)["devices"][0]["backend"] == "failed").then_some(())
    });
    assert!(failed.is_some(), "{}", info(&api));
    assert_eq!(info(&api)["state"], "running");
    vm.send(b"q").unwrap();
    assert!(
        vm.wait_exit(Duration::from_secs(60)).is_some(),
        "{}",
        vm.transcript()
    );
}
