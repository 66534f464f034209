//! The test guest's drivers cross-checked on QEMU/TCG: the same image that runs under
//! baton-vmm passes `test=blk` with QEMU's own virtio-blk-pci, `test=net` with QEMU's own
//! virtio-net-pci on a TAP inside a network namespace created here (ping and UDP echo from
//! the namespace; 10.213.52.x, never user networking), and `test=blk` with
//! vhost-user-blk-pci on baton-blk. Tests that cannot run print `SKIP <name>: reason`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton_tests::harness::{Need, can_run_with};
use baton_tests::harness::{Proc, TempDir, guest, result_json, run_to_end, wait_until};
use baton_tests::net::*;
use baton_tests::netns::{Netns, unique_tap};
use baton_tests::services::start_blk as start_blk_service;

/// Deadline for one guest run under TCG (SeaBIOS, boot, test, power-off).
const RUN: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// QEMU/TCG booting the test guest with `append`; devices are added by the caller.
fn qemu(append: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    qemu_args(&mut c, append);
    c
}

fn qemu_args(c: &mut Command, append: &str) {
    c.args(["-accel", "tcg", "-M", "pc", "-m", "256", "-nodefaults"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(guest())
        .args(["-append", append]);
}

/// Runs QEMU to the end; asserts exit 0 and a passing result line.
fn run_pass(cmd: Command) -> serde_json::Value {
    let f = run_to_end(cmd, RUN).unwrap();
    let lines: Vec<String> = f.stdout.lines().map(str::to_string).collect();
    let r = result_json(&lines).unwrap_or_else(|| {
        panic!(
            "no result line\nstdout:\n{}\nstderr:\n{}",
            f.stdout, f.stderr
        )
    });
    assert_eq!(r["result"], "pass", "{r}\nstderr:\n{}", f.stderr);
    assert_eq!(f.code, Some(0), "QEMU exits 0 on power-off: {}", f.stderr);
    r
}

fn sparse_image(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Every 4 KiB block the guest wrote holds data; everything after it is untouched.
fn check_image(image: &Path, written: usize) {
    let data = std::fs::read(image).unwrap();
    let (w, rest) = data.split_at(written);
    for (i, block) in w.chunks(4096).enumerate() {
        assert!(block.iter().any(|&b| b != 0), "block {i} is all zero");
    }
    assert!(
        rest.iter().all(|&b| b == 0),
        "bytes beyond {written:#x} changed"
    );
}

fn check_blk(r: &serde_json::Value, queues: u32, serial: &str) {
    let bytes = u64::from(queues) * 2048 * 512;
    assert_eq!(r["queues"], queues, "{r}");
    assert_eq!(r["bytes_written"], bytes, "{r}");
    assert_eq!(r["bytes_verified"], bytes, "{r}");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert_eq!(r["verify_errors"], 0, "{r}");
    assert_eq!(r["flush"], "ok", "{r}");
    assert_eq!(r["serial"], serial, "{r}");
}

#[test]
fn guest_blk_on_qemu_virtio_blk_pci() {
    if !can_run_with(
        "guest_blk_on_qemu_virtio_blk_pci",
        &[Need::Program("qemu-system-x86_64"), Need::Guest],
    ) {
        return;
    }
    let dir = TempDir::new("feq-blk");
    let image = dir.join("q.img");
    sparse_image(&image, 64 * MIB);
    for mode in ["poll", "irq"] {
        let mut c = qemu(&format!("test=blk queues=4 mode={mode}"));
        c.arg("-drive")
            .arg(format!("file={},if=none,id=d0,format=raw", image.display()))
            .args([
                "-device",
                "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=4,serial=QEMUBLK",
            ]);
        let r = run_pass(c);
        check_blk(&r, 4, "QEMUBLK");
        assert_eq!(r["mode"], mode, "{r}");
    }
    check_image(&image, 4 * 2048 * 512);
}

/// A running baton-blk on a fresh image; SIGTERM on drop.
fn start_blk(dir: &TempDir, queues: u32, serial: &str) -> (Proc, PathBuf, PathBuf) {
    let sock = dir.join("blk.sock");
    let image = dir.join("blk.img");
    sparse_image(&image, 64 * MIB);
    let p = start_blk_service(
        &image,
        &sock,
        &["--queues", &queues.to_string(), "--serial", serial],
    )
    .unwrap();
    (p, sock, image)
}

#[test]
fn guest_blk_on_qemu_vhost_user_blk_pci_with_baton_blk() {
    if !can_run_with(
        "guest_blk_on_qemu_vhost_user_blk_pci_with_baton_blk",
        &[Need::Program("qemu-system-x86_64"), Need::Guest],
    ) {
        return;
    }
    let dir = TempDir::new("feq-vu");
    let (_blk, sock, image) = start_blk(&dir, 4, "BATONVU");
    // baton-blk serves one front-end after another on the same socket.
    for mode in ["poll", "irq"] {
        let mut c = qemu(&format!("test=blk queues=4 mode={mode}"));
        c.args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine",
            "memory-backend=mem",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=4"]);
        let r = run_pass(c);
        check_blk(&r, 4, "BATONVU");
        assert_eq!(r["max_queues"], 4, "{r}");
    }
    check_image(&image, 4 * 2048 * 512);
}

const GUEST_IP: &str = "10.213.52.2";
const HOST_IP: &str = "10.213.52.1";
const GUEST_MAC: &str = "52:54:00:21:34:02";

fn datagram(seq: u32) -> Vec<u8> {
    let mut p = format!("baton-fq {seq:08} ").into_bytes();
    let extra = (seq as usize * 37) % 1200;
    p.extend((0..extra).map(|i| (i as u32 ^ seq) as u8));
    p
}

#[test]
fn guest_net_on_qemu_virtio_net_pci_on_a_tap() {
    if !can_run_with(
        "guest_net_on_qemu_virtio_net_pci_on_a_tap",
        &[Need::Program("qemu-system-x86_64"), Need::Guest, Need::Net],
    ) {
        return;
    }
    let ns = Netns::new("feq").unwrap();
    let tap = unique_tap("fq");
    // QEMU creates the TAP inside the namespace: nothing reaches the host's network.
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0, "qemu-system-x86_64"]);
    qemu_args(
        &mut c,
        &format!("test=net ip={GUEST_IP}/24 peer={HOST_IP} seconds=10"),
    );
    c.arg("-netdev")
        .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=n0,disable-legacy=on,mac={GUEST_MAC}"
        ));
    let mut p = Proc::spawn(c).unwrap();
    let up = wait_until(Duration::from_secs(20), || {
        ns.exec(&format!("ip link show {tap}"))
            .is_ok()
            .then_some(())
    });
    assert!(up.is_some(), "QEMU did not create {tap}");
    ns.exec(&format!(
        "ip addr add {HOST_IP}/24 dev {tap} && ip link set {tap} up"
    ))
    .unwrap();
    assert!(
        p.wait_line(RUN, |l| l.contains("ready")).is_some(),
        "no ready line:\n{}",
        p.transcript()
    );
    ping_from(&ns, GUEST_IP, 3);
    let dst = format!("{GUEST_IP}:7");
    let (echoed, burst) = ns
        .thread(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = vec![0u8; 2048];
            for seq in 0..100 {
                let d = datagram(seq);
                s.send_to(&d, &dst).unwrap();
                let (len, from) = s.recv_from(&mut buf).expect("echo reply");
                assert_eq!(from.port(), 7);
                assert_eq!(&buf[..len], &d[..], "datagram {seq} changed");
            }
            let mut want: BTreeSet<u32> = (100..116).collect();
            for seq in 100..116 {
                s.send_to(&datagram(seq), &dst).unwrap();
            }
            while !want.is_empty() {
                let Ok((len, _)) = s.recv_from(&mut buf) else {
                    break;
                };
                let seq: u32 = std::str::from_utf8(&buf[9..17]).unwrap().parse().unwrap();
                assert_eq!(&buf[..len], &datagram(seq)[..]);
                assert!(want.remove(&seq), "datagram {seq} twice");
            }
            (100, 16 - want.len())
        })
        .join()
        .unwrap();
    assert_eq!((echoed, burst), (100, 16), "UDP echo");
    assert_eq!(p.wait_exit(RUN), Some(0), "{}", p.transcript());
    let r = result_json(&p.seen).unwrap_or_else(|| panic!("no result:\n{}", p.transcript()));
    assert_eq!(r["result"], "pass", "{r}");
    assert_eq!(r["mac"], GUEST_MAC, "{r}");
    assert_eq!(r["peer_arp"], true, "{r}");
    assert!(r["ping_replies"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["icmp_replied"].as_u64().unwrap() >= 4, "{r}");
    assert!(r["udp_echoed"].as_u64().unwrap() >= 116, "{r}");
}
