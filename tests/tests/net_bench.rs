//! `./bench.sh net` (through bench/net.sh): frames per second and Gbit/s through baton-net-tap
//! with the host-side driver, against the same frames written to / read from a TAP directly by
//! one thread. Ignored in normal test runs; prints one JSON line per case.
//!
//! TX (driver → TAP): frames addressed to a MAC nobody has, so the namespace's kernel drops them
//! right after the TAP, the same way for both. RX (TAP → driver): a generator thread writes the
//! frames into a TAP `gen` bridged with the measured TAP (baton-net-tap's, or the peer's that one
//! thread reads directly); the generator and bridge cost the same for both.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use baton_tests::harness::TempDir;
use baton_tests::harness::{Need, can_run_with};
use baton_tests::net::*;
use baton_tests::netns::{Netns, sh, unique_tap};
use baton_tests::vhost_user::net::{NetDriver, NetOptions};

const DRIVER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x09, 0x02];
const GEN_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const NOBODY: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
const RUN: Duration = Duration::from_secs(2);

/// A frame of `len` bytes (Ethernet + IPv4 + UDP, or TCP with a GSO header when `tso`), with
/// its 12-byte virtio-net header.
fn frame(dst: [u8; 6], src: [u8; 6], len: usize, tso: bool) -> ([u8; 12], Vec<u8>) {
    let (sip, dip) = ([10, 213, 90, 1], [10, 213, 90, 2]);
    if !tso {
        let (h, f) = udp_frame(
            (src, dst),
            (sip, dip),
            (9000, 9001),
            &vec![0x5a; len.max(42) - 42],
            false,
        );
        return (h, f);
    }
    let ip_len = len - 14;
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip.extend_from_slice(&sip);
    ip.extend_from_slice(&dip);
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&9000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&9001u16.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x18; // PSH ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&sip);
    pseudo.extend_from_slice(&dip);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((ip_len - 20) as u16).to_be_bytes());
    tcp[16..18].copy_from_slice(&csum_fold(csum_add(0, &pseudo)).to_be_bytes());
    f.extend_from_slice(&tcp);
    f.resize(len, 0x5a);
    let mut h = [0u8; 12];
    h[0] = 1; // NEEDS_CSUM
    h[1] = 1; // GSO TCPv4
    h[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    h[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    (h, f)
}

fn writev_frame(fd: RawFd, h: &[u8; 12], f: &[u8]) -> isize {
    let iov = [
        libc::iovec {
            iov_base: h.as_ptr() as *mut _,
            iov_len: 12,
        },
        libc::iovec {
            iov_base: f.as_ptr() as *mut _,
            iov_len: f.len(),
        },
    ];
    // SAFETY: both iovecs point to live buffers; the kernel only reads them.
    unsafe { libc::writev(fd, iov.as_ptr(), 2) }
}

struct Case {
    name: &'static str,
    len: usize,
    tso: bool,
}

const CASES: [Case; 3] = [
    Case {
        name: "64",
        len: 64,
        tso: false,
    },
    Case {
        name: "1500",
        len: 1514,
        tso: false,
    },
    Case {
        name: "tso64k",
        len: 65_014,
        tso: true,
    },
];

fn report(dir: &str, c: &Case, ours_fps: f64, peer_fps: f64) {
    let (unit, ours, peer) = if c.len == 64 {
        ("pps", ours_fps, peer_fps)
    } else {
        let g = |fps: f64| fps * c.len as f64 * 8.0 / 1e9;
        ("Gbit/s", g(ours_fps), g(peer_fps))
    };
    let r = if peer > 0.0 { ours / peer } else { 0.0 };
    println!(
        "{{\"bench\":\"net-{dir}-{}\",\"unit\":\"{unit}\",\"ours\":{ours:.3},\"peer\":\"tap-direct\",\"peer_value\":{peer:.3},\"ratio\":{r:.3}}}",
        c.name
    );
}

/// Driver → baton-net-tap → TAP: frames completed per second.
fn tx_ours(d: &mut NetDriver, c: &Case) -> f64 {
    let (h, f) = frame(NOBODY, DRIVER_MAC, c.len, c.tso);
    let tx = &mut d.tx[0];
    // The frames are written into the buffers once: what is measured is the back-end moving
    // them, not the driver producing them.
    tx.prefill(&h, &f).unwrap();
    let start = Instant::now();
    let before = tx.completed;
    while start.elapsed() < RUN {
        let mut queued = 0;
        while queued < 64 && tx.queue_prefilled(f.len()).unwrap() {
            queued += 1;
        }
        tx.q.kick().unwrap();
        if tx.reap() == 0 && queued == 0 {
            std::thread::yield_now();
        }
    }
    tx.flush(Duration::from_secs(10)).unwrap();
    (tx.completed - before) as f64 / start.elapsed().as_secs_f64()
}

/// One thread writing the same frames to a TAP directly, from as many buffers as the driver's
/// ring has (the same memory footprint as frames sitting in a guest's TX ring).
fn tx_peer(ns: &Netns, c: &Case) -> f64 {
    let (h, f) = frame(NOBODY, DRIVER_MAC, c.len, c.tso);
    let bufs: Vec<Vec<u8>> = (0..NetOptions::default().queue_size)
        .map(|_| f.clone())
        .collect();
    let name = unique_tap("bp");
    ns.thread(move || {
        let fd = open_tap(&name, 0, false);
        sh(&format!("ip link set {name} up")).unwrap();
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < RUN {
            for f in &bufs {
                if writev_frame(fd.as_raw_fd(), &h, f) > 0 {
                    n += 1;
                }
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
    .join()
    .unwrap()
}

/// Starts a generator writing frames for the driver into TAP `gen` (bridged with the measured
/// TAP) until `stop`.
fn generator(ns: &Netns, c: &Case, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let (h, f) = frame(DRIVER_MAC, GEN_MAC, c.len, c.tso);
    let gen_name = unique_tap("bg");
    ns.thread(move || {
        let fd = open_tap(&gen_name, 0, false);
        sh(&format!(
            "ip link set {gen_name} master br0 && ip link set {gen_name} up"
        ))
        .unwrap();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..64 {
                if writev_frame(fd.as_raw_fd(), &h, &f) > 0 {
                    n += 1;
                }
            }
        }
        n
    })
}

/// Frames per second the driver receives through baton-net-tap.
fn rx_ours(ns: &Netns, d: &mut NetDriver, c: &Case) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let g = generator(ns, c, stop.clone());
    let rx = &mut d.rx[0];
    // Warm up until frames flow, then measure.
    let _ = rx.recv(Duration::from_secs(5));
    let start = Instant::now();
    let mut n = 0u64;
    let mut lens = Vec::with_capacity(1024);
    let mut timeouts = 0u64;
    while start.elapsed() < RUN {
        lens.clear();
        rx.poll_lengths(&mut lens).unwrap();
        n += lens.iter().filter(|l| **l == c.len).count() as u64;
        if lens.is_empty() {
            // Like a guest's NAPI: poll while frames come, sleep on the notification when
            // none are left (a spinning driver would take a CPU from the back-end and the
            // generator, which the peer does not have to share).
            let t0 = Instant::now();
            if !rx.wait_used(Duration::from_millis(10)) && t0.elapsed() >= Duration::from_millis(9)
            {
                timeouts += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("rx-{}: {timeouts} waits timed out", c.name);
    stop.store(true, Ordering::Relaxed);
    g.join().unwrap();
    n as f64 / secs
}

/// Frames per second one thread reads from a TAP directly.
fn rx_peer(ns: &Netns, c: &Case) -> f64 {
    let name = unique_tap("br");
    let n2 = name.clone();
    let len = c.len;
    let fd = ns
        .thread(move || {
            // What baton-net-tap sets with GUEST_CSUM + GUEST_TSO4/6.
            let fd = open_tap(&n2, 0x1 | 0x2 | 0x4, true);
            sh(&format!(
                "ip link set {n2} master br0 && ip link set {n2} up"
            ))
            .unwrap();
            fd
        })
        .join()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let (st, cn) = (stop.clone(), count.clone());
    let reader = std::thread::spawn(move || {
        // As many buffers as the driver's RX ring, used in turn (the same memory footprint).
        let mut bufs: Vec<Vec<u8>> = (0..NetOptions::default().queue_size)
            .map(|_| vec![0u8; 70_000])
            .collect();
        let mut start = None;
        let mut n = 0u64;
        let mut i = 0usize;
        loop {
            i = (i + 1) % bufs.len();
            let buf = &mut bufs[i];
            // SAFETY: `buf` is a live writable buffer of its length.
            let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r > 0 {
                if r as usize == len + 12 {
                    if start.is_none() {
                        start = Some(Instant::now());
                    }
                    n += 1;
                }
                if start.is_some_and(|s: Instant| s.elapsed() >= RUN) {
                    break;
                }
            } else if st.load(Ordering::Relaxed) {
                break;
            }
        }
        cn.store(n, Ordering::Relaxed);
        start.map_or(0.0, |s| n as f64 / s.elapsed().as_secs_f64())
    });
    let g = generator(ns, c, stop.clone());
    let fps = loop {
        if reader.is_finished() {
            break reader.join().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, Ordering::Relaxed);
    g.join().unwrap();
    fps
}

/// Whether case `dir`-`name` runs: all of them, or those listed (comma-separated, e.g.
/// `rx-64,rx-1500`) in `BATON_NET_BENCH`.
fn selected(dir: &str, c: &Case) -> bool {
    std::env::var("BATON_NET_BENCH").map_or(true, |only| {
        only.split(',')
            .any(|o| o.trim() == format!("{dir}-{}", c.name))
    })
}

#[test]
#[ignore = "benchmark: run through ./bench.sh net"]
fn net_bench() {
    if !can_run_with("net_bench", &[Need::Net]) {
        return;
    }
    let ns = Netns::new("nbench").unwrap();
    let dir = TempDir::new("net-bench");
    let name = unique_tap("bb");
    let tap = NetTap::start(&ns, &dir, &["--tap", &name]);
    ns.exec(&format!(
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=1; ip link set {name} up; ip link add br0 type bridge && ip link set br0 up"
    )).unwrap();
    // Mergeable RX buffers large enough for a whole 64 KiB frame: the driver then spends one
    // buffer per frame, so the comparison is about the back-end, not the driver's refilling.
    let o = NetOptions {
        rx_buf: 65_562 + 14,
        ..NetOptions::default()
    };
    let mut d = NetDriver::connect(&tap.socket, o).unwrap();
    for c in CASES.iter().filter(|c| selected("tx", c)) {
        let ours = tx_ours(&mut d, c);
        let peer = tx_peer(&ns, c);
        report("tx", c, ours, peer);
    }
    ns.exec(&format!("ip link set {name} master br0")).unwrap();
    for c in CASES.iter().filter(|c| selected("rx", c)) {
        let ours = rx_ours(&ns, &mut d, c);
        let peer = rx_peer(&ns, c);
        report("rx", c, ours, peer);
    }
    eprintln!("{}", tap.log_text());
}
