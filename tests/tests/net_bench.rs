//! `./bench.sh net` (through bench/net.sh): frames per second and Gbit/s through baton-net-tap
//! with the host-side driver, against two peers measured in the same run:
//!
//! - **dpdk-testpmd**: DPDK's vhost PMD as the vhost-user-net back-end, forwarding (`io` mode,
//!   one polling lcore) to and from a TAP its TAP PMD creates; driven by the same driver on the
//!   same traffic ([`baton_tests::dpdk`] has its set-up and where it comes from).
//! - **TAP syscall floor**: one thread writing the same frames to / reading them from a TAP
//!   directly, with no vhost-user in between.
//!
//! Ignored in normal test runs; prints two JSON lines per case (one per peer), with
//! `peer_config`, and `peer_value: null` plus `peer_failure` where a peer cannot do the case.
//! Each measurement lasts `BATON_BENCH_SECONDS` (default 2).
//!
//! TX (driver → TAP): frames addressed to a MAC nobody has, so the namespace's kernel drops them
//! right after the TAP, the same way for all. RX (TAP → driver): a generator thread writes the
//! frames into a TAP `gen` bridged with the measured TAP (baton-net-tap's, testpmd's, or the one
//! the floor's thread reads); only the measured TAP and `gen` are in the bridge, so the
//! generator and bridge cost the same for all.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use baton_tests::dpdk::{Hugepages, TestPmd, TestPmdOptions};
use baton_tests::harness::TempDir;
use baton_tests::harness::{Need, can_run_with};
use baton_tests::net::*;
use baton_tests::netns::{Netns, sh, unique_tap};
use baton_tests::vhost_user::net::{NetDriver, NetOptions};

const DRIVER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x09, 0x02];
const GEN_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const NOBODY: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
/// How long each case is measured: `BATON_BENCH_SECONDS`, default 2.
static RUN: LazyLock<Duration> = LazyLock::new(|| {
    let secs = std::env::var("BATON_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
});

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

const FLOOR: &str = "TAP syscall floor";
const FLOOR_CONFIG: &str = "one thread: writev (TX) / read (RX) of whole frames on a TAP fd with a \
    12-byte virtio-net header (RX: TUNSETOFFLOAD CSUM|TSO4|TSO6), as many buffers as the driver's \
    ring, no vhost-user";

/// One case's numbers in frames per second; a peer that cannot do the case has the reason.
struct Row {
    ours: f64,
    testpmd: Result<f64, String>,
    floor: f64,
}

/// Prints the case's two lines: ours against testpmd, and against the TAP syscall floor.
fn report(dir: &str, c: &Case, r: &Row, testpmd_config: &str) {
    let (unit, scale) = if c.len == 64 {
        ("pps", 1.0)
    } else {
        ("Gbit/s", c.len as f64 * 8.0 / 1e9)
    };
    let v = |fps: f64| (fps * scale * 1000.0).round() / 1000.0;
    let ratio = |peer: f64| (peer > 0.0).then(|| (r.ours / peer * 1000.0).round() / 1000.0);
    let bench = format!("net-{dir}-{}", c.name);
    let (pv, failure) = match &r.testpmd {
        Ok(fps) => (Some(*fps), None),
        Err(why) => (None, Some(why.as_str())),
    };
    println!(
        "{}",
        serde_json::json!({"bench": bench, "unit": unit, "ours": v(r.ours),
            "peer": "dpdk-testpmd", "peer_value": pv.map(v), "ratio": pv.and_then(ratio),
            "peer_config": testpmd_config, "peer_failure": failure})
    );
    println!(
        "{}",
        serde_json::json!({"bench": bench, "unit": unit, "ours": v(r.ours),
            "peer": FLOOR, "peer_value": v(r.floor), "ratio": ratio(r.floor),
            "peer_config": FLOOR_CONFIG})
    );
}

/// Driver → back-end (baton-net-tap or testpmd) → TAP: frames completed per second.
fn tx_driver(d: &mut NetDriver, c: &Case) -> f64 {
    let (h, f) = frame(NOBODY, DRIVER_MAC, c.len, c.tso);
    let tx = &mut d.tx[0];
    // The frames are written into the buffers once: what is measured is the back-end moving
    // them, not the driver producing them.
    tx.prefill(&h, &f).unwrap();
    let start = Instant::now();
    let before = tx.completed;
    while start.elapsed() < *RUN {
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
fn tx_floor(ns: &Netns, c: &Case) -> f64 {
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
        while start.elapsed() < *RUN {
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

/// Frames of the case's length per second the driver receives through the back-end
/// (baton-net-tap or testpmd).
fn rx_driver(ns: &Netns, d: &mut NetDriver, c: &Case) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let g = generator(ns, c, stop.clone());
    let rx = &mut d.rx[0];
    // Warm up until frames flow, then measure.
    let _ = rx.recv(Duration::from_secs(5));
    let start = Instant::now();
    let mut n = 0u64;
    let mut lens = Vec::with_capacity(1024);
    let mut timeouts = 0u64;
    while start.elapsed() < *RUN {
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
fn rx_floor(ns: &Netns, c: &Case) -> f64 {
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
                if start.is_some_and(|s: Instant| s.elapsed() >= *RUN) {
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

/// Driver options for both back-ends. Mergeable RX buffers large enough for a whole 64 KiB
/// frame: the driver then spends one buffer per frame, so the comparison is about the back-end,
/// not the driver's refilling.
fn driver_options() -> NetOptions {
    NetOptions {
        rx_buf: 65_562 + 14,
        ..NetOptions::default()
    }
}

/// A TAP counter (`rx_packets`: frames written into it) as seen in the namespace.
fn tap_counter(ns: &Netns, tap: &str, name: &str) -> u64 {
    ns.exec(&format!("cat /sys/class/net/{tap}/statistics/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The testpmd column: testpmd started in `ns`, the same driver connected to it, the TX cases,
/// then its TAP bridged and the RX cases. Returns (TX, RX) per selected case, and the
/// configuration printed beside each figure; `Err` if testpmd cannot run at all.
#[allow(clippy::type_complexity)]
fn testpmd_column(
    ns: &Netns,
    dir: &TempDir,
    tx: &[&Case],
    rx: &[&Case],
) -> Result<(Vec<Result<f64, String>>, Vec<Result<f64, String>>, String), String> {
    let _pages = Hugepages::reserve(baton_tests::dpdk::HUGEPAGES).map_err(|e| e.to_string())?;
    let o = TestPmdOptions {
        socket: dir.join("testpmd.sock"),
        tap: unique_tap("bd"),
        tso: true,
    };
    let pmd = TestPmd::start(ns, &dir.0, &o).map_err(|e| e.to_string())?;
    let config = pmd.config.clone();
    let mut d = NetDriver::connect(&pmd.socket, driver_options())
        .map_err(|e| format!("the driver could not set up testpmd's vhost port: {e}"))?;
    eprintln!(
        "testpmd offered features {:#x}, acked {:#x}, protocol {:?}",
        d.conn.offered, d.conn.features, d.conn.protocol
    );
    let mut tx_out = Vec::new();
    eprintln!(
        "testpmd's TAP: {}",
        ns.exec(&format!("ip link show {}", pmd.tap))
            .unwrap_or_default()
    );
    for c in tx {
        let before = tap_counter(ns, &pmd.tap, "rx_packets");
        let start = Instant::now();
        let fps = tx_driver(&mut d, c);
        let secs = start.elapsed().as_secs_f64();
        let got = tap_counter(ns, &pmd.tap, "rx_packets") - before;
        // What reached the TAP, in the driver's frames: the TAP PMD writes a TSO frame as
        // MSS-sized segments (1448 bytes of payload after 54 of headers).
        let segs = if c.tso {
            (c.len - 54).div_ceil(1448)
        } else {
            1
        };
        let delivered = got as f64 / segs as f64 / secs;
        eprintln!(
            "testpmd tx-{}: driver saw {fps:.0} frames/s completed; its TAP took {got} frames \
             ({delivered:.0} driver frames/s)",
            c.name
        );
        // Frames testpmd completed but dropped before its TAP do not count.
        tx_out.push(if got == 0 {
            Err("testpmd completed the frames but none reached its TAP".into())
        } else {
            Ok(fps.min(delivered))
        });
    }
    let mut rx_out = Vec::new();
    if !rx.is_empty() {
        ns.exec(&format!("ip link set {} master br0", pmd.tap))
            .map_err(|e| e.to_string())?;
    }
    for c in rx {
        let fps = rx_driver(ns, &mut d, c);
        rx_out.push(if fps > 0.0 {
            Ok(fps)
        } else if c.tso {
            Err(
                "the TAP PMD opens its TAP without IFF_VNET_HDR, so the kernel segments each \
                 64 KiB GSO frame into MSS-sized frames before testpmd reads them, and io \
                 forwarding does no GRO: no 64 KiB frame reaches the driver"
                    .into(),
            )
        } else {
            Err("no frame of this length reached the driver through testpmd".into())
        });
    }
    drop(d);
    let log = pmd.stop();
    let stats: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("-packets") || l.contains("-dropped"))
        .collect();
    eprintln!("testpmd's own counters at exit:\n{}", stats.join("\n"));
    if tx_out.iter().chain(&rx_out).any(Result::is_err) {
        eprintln!("testpmd's output:\n{log}");
    }
    Ok((tx_out, rx_out, config))
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
    let tx: Vec<&Case> = CASES.iter().filter(|c| selected("tx", c)).collect();
    let rx: Vec<&Case> = CASES.iter().filter(|c| selected("rx", c)).collect();

    // baton-net-tap, then the floor.
    let mut d = NetDriver::connect(&tap.socket, driver_options()).unwrap();
    let tx_ours: Vec<f64> = tx.iter().map(|c| tx_driver(&mut d, c)).collect();
    let tx_floor: Vec<f64> = tx.iter().map(|c| tx_floor(&ns, c)).collect();
    ns.exec(&format!("ip link set {name} master br0")).unwrap();
    let rx_ours: Vec<f64> = rx.iter().map(|c| rx_driver(&ns, &mut d, c)).collect();
    ns.exec(&format!("ip link set {name} nomaster")).unwrap();
    let rx_floor: Vec<f64> = rx.iter().map(|c| rx_floor(&ns, c)).collect();
    eprintln!("{}", tap.log_text());

    // testpmd.
    let (tx_pmd, rx_pmd, config) = match testpmd_column(&ns, &dir, &tx, &rx) {
        Ok(v) => v,
        Err(why) => {
            eprintln!("testpmd: {why}");
            let e = |n: usize| vec![Err(why.clone()); n];
            (e(tx.len()), e(rx.len()), "dpdk-testpmd did not run".into())
        }
    };

    for (i, c) in tx.iter().enumerate() {
        let r = Row {
            ours: tx_ours[i],
            testpmd: tx_pmd[i].clone(),
            floor: tx_floor[i],
        };
        report("tx", c, &r, &config);
    }
    for (i, c) in rx.iter().enumerate() {
        let r = Row {
            ours: rx_ours[i],
            testpmd: rx_pmd[i].clone(),
            floor: rx_floor[i],
        };
        report("rx", c, &r, &config);
    }
}
