//! baton-net-tap through the host-side vhost-user driver: frames both ways through a TAP in a
//! namespace, checksum offload, TCP with TSO/checksum offloads and two queue pairs through a
//! driver that forwards between two back-ends, the control queue, and hostile input (counted,
//! logged, never fatal). Skips (printing why) without root or /dev/net/tun.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_tests::harness::TempDir;
use baton_tests::harness::{Need, can_run_with};
use baton_tests::net::*;
use baton_tests::netns::{Netns, unique_tap};
use baton_tests::services::{net_tap_command, start_service};
use baton_tests::vhost_user::net::{NetDriver, NetOptions, f};
use baton_tests::vhost_user::virtq::{DESC_F_NEXT, DESC_F_WRITE, RawDesc};

const DRIVER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x09, 0x02];
const T: Duration = Duration::from_secs(10);

/// A namespace with baton-net-tap on TAP `name` = 10.213.<subnet>.1, the driver's address
/// .2 known statically (no ARP needed), IPv6 off (no stray frames).
fn setup(tag: &str, subnet: u8, extra: &[&str]) -> (Netns, TempDir, NetTap, String, [u8; 6]) {
    let ns = Netns::new(tag).unwrap();
    let dir = TempDir::new("net-drv");
    let name = unique_tap(tag);
    let mut args = vec!["--tap", name.as_str()];
    args.extend_from_slice(extra);
    let tap = NetTap::start(&ns, &dir, &args);
    ns.exec(&format!(
        "sysctl -qw net.ipv6.conf.{name}.disable_ipv6=1; ip addr add 10.213.{subnet}.1/24 dev {name} && \
         ip link set {name} up && ip neigh replace 10.213.{subnet}.2 lladdr 52:54:00:00:09:02 dev {name}"
    )).unwrap();
    let tap_mac = mac(&ns
        .exec(&format!("cat /sys/class/net/{name}/address"))
        .unwrap());
    (ns, dir, tap, name, tap_mac)
}

fn udp_sink(ns: &Netns, addr: String, count: usize) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    {
        // Bind before returning so that no frame races the socket.
        let (tx, rx) = std::sync::mpsc::channel();
        let h = ns.thread(move || {
            let s = UdpSocket::bind(addr).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            tx.send(()).unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 70_000];
            while got.len() < count {
                match s.recv(&mut buf) {
                    Ok(n) => got.push(buf[..n].to_vec()),
                    Err(_) => break,
                }
            }
            got
        });
        rx.recv().unwrap();
        h
    }
}

#[test]
fn net_driver_frames_both_ways_and_checksum_offload() {
    if !can_run_with(
        "net_driver_frames_both_ways_and_checksum_offload",
        &[Need::Net],
    ) {
        return;
    }
    let (ns, _dir, tap, _name, tap_mac) = setup("nd1", 31, &[]);
    let mut d = NetDriver::connect(&tap.socket, NetOptions::default()).unwrap();
    assert_ne!(d.conn.features & f::CSUM, 0);
    let cfg = d.conn.config(0, 12).unwrap();
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]) & 1, 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500, "mtu");

    // Driver → namespace: a full checksum and a partial one that the TAP must complete.
    let sink = udp_sink(&ns, "10.213.31.1:6001".into(), 2);
    let (src, dst) = ([10, 213, 31, 2], [10, 213, 31, 1]);
    let (h1, f1) = udp_frame(
        (DRIVER_MAC, tap_mac),
        (src, dst),
        (5000, 6001),
        b"full-checksum",
        false,
    );
    let (h2, f2) = udp_frame(
        (DRIVER_MAC, tap_mac),
        (src, dst),
        (5000, 6001),
        b"partial-checksum",
        true,
    );
    d.tx[0].send(&h1, &f1).unwrap();
    d.tx[0].send(&h2, &f2).unwrap();
    d.tx[0].flush(T).unwrap();
    let got = sink.join().unwrap();
    assert_eq!(
        got,
        vec![b"full-checksum".to_vec(), b"partial-checksum".to_vec()],
        "{}",
        tap.log_text()
    );

    // Namespace → driver.
    for i in 0..20u32 {
        let msg = format!("to-the-driver-{i}");
        let m = msg.clone();
        ns.thread(move || {
            let s = UdpSocket::bind("10.213.31.1:0").unwrap();
            s.send_to(m.as_bytes(), "10.213.31.2:6002").unwrap();
        })
        .join()
        .unwrap();
        let fr = d.rx[0]
            .recv_matching(T, |fr| {
                udp_payload(&fr.data).is_some_and(|(p, _)| p == 6002)
            })
            .unwrap_or_else(|e| panic!("frame {i}: {e}\n{}", tap.log_text()));
        assert_eq!(udp_payload(&fr.data).unwrap().1, msg.as_bytes());
        assert_eq!(&fr.data[0..6], &DRIVER_MAC);
    }
}

/// Moves frames (with their virtio-net headers) from one driver's RX to the other's TX on the
/// same pair, both ways, until `stop`. Returns per pair: frames, GSO frames, NEEDS_CSUM frames,
/// largest frame.
fn forward(a: &mut NetDriver, b: &mut NetDriver, stop: &AtomicBool) -> Vec<[usize; 4]> {
    let pairs = a.rx.len();
    let mut stats = vec![[0usize; 4]; pairs];
    while !stop.load(Ordering::Relaxed) {
        let mut any = false;
        #[allow(clippy::needless_range_loop)] // `p` indexes both back-ends' queues and `stats`.
        for p in 0..pairs {
            for dir in 0..2 {
                let (from, to) = if dir == 0 {
                    (&mut *a, &mut *b)
                } else {
                    (&mut *b, &mut *a)
                };
                let frames = from.rx[p].poll().unwrap();
                for fr in &frames {
                    let s = &mut stats[p];
                    s[0] += 1;
                    s[1] += usize::from(fr.hdr[1] != 0);
                    s[2] += usize::from(fr.hdr[0] & 1 != 0);
                    s[3] = s[3].max(fr.data.len());
                    to.tx[p].queue(&fr.hdr[..10], &fr.data, T).unwrap();
                }
                if !frames.is_empty() {
                    any = true;
                    to.tx[p].q.kick().unwrap();
                }
                to.tx[p].reap();
            }
        }
        if !any {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    stats
}

#[test]
fn net_driver_tcp_with_tso_csum_offloads_and_two_queue_pairs() {
    if !can_run_with(
        "net_driver_tcp_with_tso_csum_offloads_and_two_queue_pairs",
        &[Need::Net],
    ) {
        return;
    }
    let ns1 = Netns::new("nf1").unwrap();
    let ns2 = Netns::new("nf2").unwrap();
    let dir1 = TempDir::new("net-fwd");
    let dir2 = TempDir::new("net-fwd");
    let (n1, n2) = (unique_tap("fa"), unique_tap("fb"));
    let t1 = NetTap::start(&ns1, &dir1, &["--tap", &n1, "--queues", "2"]);
    let t2 = NetTap::start(&ns2, &dir2, &["--tap", &n2, "--queues", "2"]);
    for (ns, n, ip) in [(&ns1, &n1, "10.213.41.1"), (&ns2, &n2, "10.213.41.2")] {
        ns.exec(&format!("sysctl -qw net.ipv6.conf.{n}.disable_ipv6=1; ip addr add {ip}/24 dev {n} && ip link set {n} up")).unwrap();
    }
    let o = NetOptions {
        pairs: 2,
        ..NetOptions::default()
    };
    let mut a = NetDriver::connect(&t1.socket, o).unwrap();
    let mut b = NetDriver::connect(&t2.socket, o).unwrap();
    assert_ne!(a.conn.features & f::GUEST_TSO4, 0);
    assert_ne!(a.conn.features & f::MQ, 0);
    // Control queue: 2 pairs is fine, 3 is more than the device has.
    assert_eq!(a.set_queue_pairs(2).unwrap(), 0);
    assert_eq!(a.set_queue_pairs(3).unwrap(), 1);
    assert_eq!(b.set_queue_pairs(2).unwrap(), 0);

    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let fwd = std::thread::spawn(move || forward(&mut a, &mut b, &st));

    const CONNS: usize = 8;
    const BYTES: usize = 2 << 20;
    let server = ns2.thread(|| {
        let l = TcpListener::bind("10.213.41.2:7000").unwrap();
        let mut hs = Vec::new();
        for _ in 0..CONNS {
            let (mut s, _) = l.accept().unwrap();
            hs.push(std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut id = [0u8; 1];
                s.read_exact(&mut id).unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                let want: Vec<u8> = (0..BYTES)
                    .map(|i| (i as u8).wrapping_mul(7).wrapping_add(id[0]))
                    .collect();
                got == want
            }));
        }
        hs.into_iter().all(|h| h.join().unwrap())
    });
    let clients: Vec<_> = (0..CONNS as u8)
        .map(|id| {
            ns1.thread(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut s = loop {
                    match TcpStream::connect("10.213.41.2:7000") {
                        Ok(s) => break s,
                        Err(e) if Instant::now() < deadline => {
                            let _ = e;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("connect: {e}"),
                    }
                };
                s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
                s.write_all(&[id]).unwrap();
                let data: Vec<u8> = (0..BYTES)
                    .map(|i| (i as u8).wrapping_mul(7).wrapping_add(id))
                    .collect();
                s.write_all(&data).unwrap();
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let ok = server.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let stats = fwd.join().unwrap();
    let logs = format!("{}\n{}", t1.log_text(), t2.log_text());
    assert!(ok, "TCP data differs\n{logs}");
    eprintln!("per pair [frames, gso, needs_csum, largest]: {stats:?}");
    assert!(
        stats.iter().any(|s| s[1] > 0 && s[3] > 1514),
        "no TSO frame seen: {stats:?}"
    );
    assert!(
        stats.iter().any(|s| s[2] > 0),
        "no partial-checksum frame seen: {stats:?}"
    );
    assert!(
        stats.iter().all(|s| s[0] > 0),
        "a queue pair carried nothing: {stats:?}"
    );
    assert!(
        !logs.contains("TX header refused")
            && !logs.contains("frame larger")
            && !logs.contains("chain"),
        "{logs}"
    );
}

#[test]
fn net_driver_bad_input_is_counted_and_never_fatal() {
    if !can_run_with(
        "net_driver_bad_input_is_counted_and_never_fatal",
        &[Need::Net],
    ) {
        return;
    }
    let (ns, _dir, mut tap, _name, tap_mac) = setup("nb1", 51, &[]);
    // No mergeable buffers, no GSO on receive, tiny RX buffers.
    let features = f::CSUM | f::HOST_TSO4 | f::MAC | (1 << 32) | (1 << 29);
    let o = NetOptions {
        features,
        rx_buf: 256,
        ..NetOptions::default()
    };
    let mut d = NetDriver::connect(&tap.socket, o).unwrap();
    let send_from_ns = |port: u16, len: usize| {
        ns.thread(move || {
            let s = UdpSocket::bind("10.213.51.1:0").unwrap();
            s.send_to(&vec![b'x'; len], ("10.213.51.2", port)).unwrap();
        })
        .join()
        .unwrap();
    };
    let is_port = |p: u16| {
        move |fr: &baton_tests::vhost_user::net::Frame| {
            udp_payload(&fr.data).is_some_and(|(q, _)| q == p)
        }
    };

    // A frame larger than the guest's buffers is dropped and counted; the next one arrives.
    send_from_ns(7001, 1000);
    send_from_ns(7002, 50);
    let fr = d.rx[0].recv_matching(T, is_port(7002)).unwrap();
    assert_eq!(udp_payload(&fr.data).unwrap().1.len(), 50);
    assert!(
        tap.wait_log("frame larger than the guest's buffers", T),
        "{}",
        tap.log_text()
    );

    // Hostile TX chains: each is completed (len 0) and logged.
    let size = d.mem.size();
    let good = d.mem.alloc(4096, 64).unwrap();
    let raw: Vec<(Vec<RawDesc>, &str)> = vec![
        (
            vec![RawDesc {
                addr: size + 4096,
                len: 100,
                flags: 0,
                next: 0,
            }],
            "outside guest memory",
        ),
        (
            vec![RawDesc {
                addr: u64::MAX - 10,
                len: 100,
                flags: 0,
                next: 0,
            }],
            "outside guest memory",
        ),
        (
            vec![RawDesc {
                addr: good.0,
                len: 100,
                flags: DESC_F_WRITE,
                next: 0,
            }],
            "wrong direction",
        ),
        (
            vec![
                RawDesc {
                    addr: good.0,
                    len: 64,
                    flags: DESC_F_NEXT,
                    next: 1,
                },
                RawDesc {
                    addr: good.0,
                    len: 64,
                    flags: DESC_F_NEXT,
                    next: 0,
                },
            ],
            "loops",
        ),
        (
            vec![RawDesc {
                addr: good.0,
                len: 4,
                flags: 0,
                next: 0,
            }],
            "shorter than the virtio-net header",
        ),
    ];
    let mut bad = 0;
    for (descs, want) in raw {
        let q = &mut d.tx[0].q;
        let ids = q.alloc_descs(descs.len()).unwrap();
        for (k, dsc) in descs.iter().enumerate() {
            let next = if dsc.flags & DESC_F_NEXT != 0 {
                ids[usize::from(dsc.next)]
            } else {
                0
            };
            q.write_desc(ids[k], RawDesc { next, ..*dsc }).unwrap();
        }
        q.track(ids.clone());
        q.publish(ids[0]).unwrap();
        q.kick().unwrap();
        let used = q.wait(T).unwrap();
        assert!(used.iter().any(|u| u.id == ids[0]), "{want}: not completed");
        bad += 1;
        assert_eq!(
            tap.stat("bad_chain"),
            Some(bad),
            "{want} not counted:\n{}",
            tap.log_text()
        );
    }
    // Logged, but rate-limited: the first one at least.
    assert!(
        tap.wait_log("outside guest memory", T),
        "{}",
        tap.log_text()
    );

    // TX headers with bad offload flags are refused.
    let (src, dst) = ([10, 213, 51, 2], [10, 213, 51, 1]);
    let (mut h, fr) = udp_frame(
        (DRIVER_MAC, tap_mac),
        (src, dst),
        (5000, 7003),
        b"bad-header",
        false,
    );
    h[0] = 0x10; // unknown flag
    d.tx[0].send(&h, &fr).unwrap();
    h[0] = 1;
    h[1] = 3; // GSO UDP: not offered
    h[4] = 100;
    d.tx[0].send(&h, &fr).unwrap();
    d.tx[0].flush(T).unwrap();
    assert!(tap.wait_log("TX header refused", T), "{}", tap.log_text());
    assert_eq!(tap.stat("bad_tx_header"), Some(2), "{}", tap.log_text());
    assert_eq!(tap.stat("rx_too_large"), Some(1), "{}", tap.log_text());

    // Still serving both ways.
    let sink = udp_sink(&ns, "10.213.51.1:7004".into(), 1);
    let (h, fr) = udp_frame(
        (DRIVER_MAC, tap_mac),
        (src, dst),
        (5000, 7004),
        b"still-alive",
        true,
    );
    d.tx[0].send(&h, &fr).unwrap();
    assert_eq!(
        sink.join().unwrap(),
        vec![b"still-alive".to_vec()],
        "{}",
        tap.log_text()
    );
    send_from_ns(7005, 20);
    d.rx[0].recv_matching(T, is_port(7005)).unwrap();
    assert!(tap.alive());
    let log = tap.log_text();
    assert!(!log.contains("panicked"), "{log}");
    // A refused header frame never reached the namespace: the bad-header sink saw nothing.
    drop(d);
    assert!(tap.wait_log("front-end gone", T));
    assert_eq!(tap.terminate(), Some(0));
}

#[test]
fn net_driver_frames_wait_in_the_tap_between_front_ends() {
    if !can_run_with(
        "net_driver_frames_wait_in_the_tap_between_front_ends",
        &[Need::Net],
    ) {
        return;
    }
    let (ns, _dir, tap, _name, tap_mac) = setup("nw1", 61, &[]);
    let send_from_ns = |port: u16, msg: &'static str| {
        ns.thread(move || {
            let s = UdpSocket::bind("10.213.61.1:0").unwrap();
            s.send_to(msg.as_bytes(), ("10.213.61.2", port)).unwrap();
        })
        .join()
        .unwrap();
    };
    let mut d = NetDriver::connect(&tap.socket, NetOptions::default()).unwrap();
    send_from_ns(8001, "first");
    d.rx[0]
        .recv_matching(T, |fr| {
            udp_payload(&fr.data).is_some_and(|(p, _)| p == 8001)
        })
        .unwrap();
    // The front-end goes away; a frame arrives while nobody is connected.
    drop(d);
    assert!(tap.wait_log("front-end gone", T), "{}", tap.log_text());
    send_from_ns(8002, "while-away");
    // The next front-end gets it, and traffic flows both ways again.
    let mut d = NetDriver::connect(&tap.socket, NetOptions::default()).unwrap();
    let fr = d.rx[0]
        .recv_matching(T, |fr| {
            udp_payload(&fr.data).is_some_and(|(p, _)| p == 8002)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tap.log_text()));
    assert_eq!(udp_payload(&fr.data).unwrap().1, b"while-away");
    let sink = udp_sink(&ns, "10.213.61.1:8003".into(), 1);
    let (h, f) = udp_frame(
        (DRIVER_MAC, tap_mac),
        ([10, 213, 61, 2], [10, 213, 61, 1]),
        (5000, 8003),
        b"back",
        false,
    );
    d.tx[0].send(&h, &f).unwrap();
    assert_eq!(sink.join().unwrap(), vec![b"back".to_vec()]);
}

#[test]
fn net_driver_inherited_tap_fd() {
    if !can_run_with("net_driver_inherited_tap_fd", &[Need::Net]) {
        return;
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let ns = Netns::new("ni1").unwrap();
    let dir = TempDir::new("net-drv");
    let name = unique_tap("i");
    let n2 = name.clone();
    // The TAP fd is made inside the namespace, as a service manager would hand it over.
    let fd = ns.thread(move || open_tap(&n2, 0, false)).join().unwrap();
    let raw = fd.as_raw_fd();
    let socket = dir.join("net.sock");
    let log = dir.join("net-tap.log");
    let mut cmd = net_tap_command(&ns, &socket, &["--tap-fd", "5"]);
    // SAFETY: only dup2/fcntl (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
            let r = if raw == 5 {
                libc::fcntl(5, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 5)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let proc = start_service(cmd, &socket, Some(&log)).unwrap();
    drop(fd);
    let tap = NetTap { proc, socket, log };
    assert!(
        baton_tests::harness::wait_until(T, || tap.socket.exists().then_some(())).is_some(),
        "{}",
        tap.log_text()
    );
    assert!(
        tap.log_text().contains(&name) || tap.wait_log(&name, T),
        "{}",
        tap.log_text()
    );
    ns.exec(&format!(
        "sysctl -qw net.ipv6.conf.{name}.disable_ipv6=1; ip addr add 10.213.71.1/24 dev {name} && \
         ip link set {name} up && ip neigh replace 10.213.71.2 lladdr 52:54:00:00:09:02 dev {name}"
    ))
    .unwrap();
    let tap_mac = mac(&ns
        .exec(&format!("cat /sys/class/net/{name}/address"))
        .unwrap());
    let mut d = NetDriver::connect(&tap.socket, NetOptions::default()).unwrap();
    let sink = udp_sink(&ns, "10.213.71.1:9101".into(), 1);
    let (h, f) = udp_frame(
        (DRIVER_MAC, tap_mac),
        ([10, 213, 71, 2], [10, 213, 71, 1]),
        (5000, 9101),
        b"via-inherited-fd",
        true,
    );
    d.tx[0].send(&h, &f).unwrap();
    assert_eq!(
        sink.join().unwrap(),
        vec![b"via-inherited-fd".to_vec()],
        "{}",
        tap.log_text()
    );
    ns.thread(|| {
        let s = UdpSocket::bind("10.213.71.1:0").unwrap();
        s.send_to(b"back", "10.213.71.2:9102").unwrap();
    })
    .join()
    .unwrap();
    d.rx[0]
        .recv_matching(T, |fr| {
            udp_payload(&fr.data).is_some_and(|(p, _)| p == 9102)
        })
        .unwrap();
}

#[test]
fn net_driver_get_vring_base_stops_the_ring() {
    if !can_run_with("net_driver_get_vring_base_stops_the_ring", &[Need::Net]) {
        return;
    }
    let (ns, _dir, tap, _name, _tap_mac) = setup("ns1", 81, &[]);
    let send_from_ns = |port: u16| {
        ns.thread(move || {
            let s = UdpSocket::bind("10.213.81.1:0").unwrap();
            s.send_to(b"ping", ("10.213.81.2", port)).unwrap();
        })
        .join()
        .unwrap();
    };
    let is_port = |p: u16| {
        move |fr: &baton_tests::vhost_user::net::Frame| {
            udp_payload(&fr.data).is_some_and(|(q, _)| q == p)
        }
    };
    let mut d = NetDriver::connect(&tap.socket, NetOptions::default()).unwrap();
    send_from_ns(9201);
    d.rx[0].recv_matching(T, is_port(9201)).unwrap();
    // Stop the RX ring: the device must not touch it any more.
    let base = d.conn.stop_queue(0).unwrap();
    let used = d.rx[0].q.device_used_idx();
    send_from_ns(9202);
    let moved = baton_tests::harness::wait_until(Duration::from_millis(500), || {
        (d.rx[0].q.device_used_idx() != used).then_some(())
    });
    assert!(
        moved.is_none(),
        "the device wrote the used ring of a stopped ring"
    );
    // Restart where it stopped: the frame that waited in the TAP arrives.
    d.conn
        .start_queue(&d.rx[0].q, u16::try_from(base).unwrap())
        .unwrap();
    d.rx[0].q.kick().unwrap();
    let fr = d.rx[0]
        .recv_matching(T, is_port(9202))
        .unwrap_or_else(|e| panic!("{e}\n{}", tap.log_text()));
    assert_eq!(udp_payload(&fr.data).unwrap().1, b"ping");
}

#[test]
fn net_driver_unpollable_kick_fd_does_not_stop_the_device() {
    if !can_run_with(
        "net_driver_unpollable_kick_fd_does_not_stop_the_device",
        &[Need::Net],
    ) {
        return;
    }
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vhost::VhostBackend;
    let (ns, dir, tap, _name, tap_mac) = setup("nk1", 91, &[]);
    let mut d = NetDriver::connect(&tap.socket, NetOptions::default()).unwrap();
    // A regular file as TX kick fd: it cannot be polled.
    let file = std::fs::File::create(dir.join("not-an-eventfd")).unwrap();
    // SAFETY: the fd is owned by `file` and handed over to the EventFd, which closes it.
    let fake = unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(file.into_raw_fd()) };
    d.conn.frontend().set_vring_kick(1, &fake).unwrap();
    assert!(
        tap.wait_log("kick fd cannot be polled", T),
        "{}",
        tap.log_text()
    );
    // Restore a real kick fd: the same worker still serves the ring.
    d.conn
        .start_queue(&d.tx[0].q, d.tx[0].q.avail_idx())
        .unwrap();
    let sink = udp_sink(&ns, "10.213.91.1:9301".into(), 1);
    let (h, f) = udp_frame(
        (DRIVER_MAC, tap_mac),
        ([10, 213, 91, 2], [10, 213, 91, 1]),
        (5000, 9301),
        b"after",
        false,
    );
    d.tx[0].send(&h, &f).unwrap();
    assert_eq!(
        sink.join().unwrap(),
        vec![b"after".to_vec()],
        "{}",
        tap.log_text()
    );
}

/// Which ring the guest breaks.
#[derive(Clone, Copy, Debug)]
enum Broken {
    Rx,
    Ctrl,
}

/// A guest that sets a ring's avail index more than the ring size ahead: baton-net-tap
/// ignores that ring (no spinning core), answers GET_VRING_BASE within 1 s, keeps sending,
/// and serves the next front-end. With and without EVENT_IDX.
fn avail_index_overrun(tag: &str, subnet: u8, ring: Broken, event_idx: bool) {
    use baton_tests::hostile::{cpu_share, timed_with_watchdog};
    let (ns, _dir, mut tap, _name, tap_mac) = setup(tag, subnet, &[]);
    let pid = tap.proc.child.id();
    let features = if event_idx {
        f::ALL
    } else {
        f::ALL & !(1 << 29)
    };
    let o = NetOptions {
        features,
        ..NetOptions::default()
    };
    let mut d = NetDriver::connect(&tap.socket, o).unwrap();
    assert_eq!(d.conn.features & (1 << 29) != 0, event_idx);
    let index = match ring {
        Broken::Rx => {
            let q = &d.rx[0].q;
            q.write_avail_idx_raw(q.avail_idx().wrapping_add(q.size() + 5))
                .unwrap();
            q.kick().unwrap();
            0
        }
        Broken::Ctrl => {
            let q = d.ctrl.as_ref().unwrap();
            q.write_avail_idx_raw(q.avail_idx().wrapping_add(q.size() + 5))
                .unwrap();
            q.kick().unwrap();
            q.index
        }
    };
    // Frames arriving for the guest make the RX path look at its ring.
    let addr = format!("10.213.{subnet}.2:9300");
    ns.thread(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..20 {
            let _ = s.send_to(b"wake", addr.as_str());
        }
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let share = cpu_share(pid, Duration::from_secs(1));
    assert!(
        share < 0.3,
        "baton-net-tap uses {:.0} % of a CPU on a broken {ring:?} ring\n{}",
        share * 100.0,
        tap.log_text()
    );
    // TX still works.
    let sink = udp_sink(&ns, format!("10.213.{subnet}.1:6101"), 1);
    let (h, fr) = udp_frame(
        (DRIVER_MAC, tap_mac),
        ([10, 213, subnet, 2], [10, 213, subnet, 1]),
        (5000, 6101),
        b"still-sending",
        false,
    );
    d.tx[0].send(&h, &fr).unwrap();
    d.tx[0].flush(T).unwrap();
    assert_eq!(sink.join().unwrap(), vec![b"still-sending".to_vec()]);
    let (base, took) =
        timed_with_watchdog(pid, Duration::from_secs(5), || d.conn.stop_queue(index));
    assert!(base.is_ok(), "GET_VRING_BASE failed: {base:?}");
    assert!(
        took < Duration::from_secs(1),
        "GET_VRING_BASE took {took:?}"
    );
    drop(d);
    // The next front-end is served, once the back-end has seen this one go.
    assert!(tap.wait_log("front-end gone", T), "{}", tap.log_text());
    let mut d = NetDriver::connect(&tap.socket, NetOptions::default())
        .unwrap_or_else(|e| panic!("next front-end refused: {e}\n{}", tap.log_text()));
    let addr = format!("10.213.{subnet}.2:9301");
    ns.thread(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"again", addr.as_str()).unwrap();
    })
    .join()
    .unwrap();
    let fr = d.rx[0]
        .recv_matching(T, |fr| {
            udp_payload(&fr.data).is_some_and(|(p, _)| p == 9301)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tap.log_text()));
    assert_eq!(udp_payload(&fr.data).unwrap().1, b"again");
    assert!(tap.alive());
}

#[test]
fn net_driver_rx_avail_overrun_with_event_idx_does_not_livelock() {
    if !can_run_with(
        "net_driver_rx_avail_overrun_with_event_idx_does_not_livelock",
        &[Need::Net],
    ) {
        return;
    }
    avail_index_overrun("nh1", 91, Broken::Rx, true);
}

#[test]
fn net_driver_rx_avail_overrun_without_event_idx_does_not_livelock() {
    if !can_run_with(
        "net_driver_rx_avail_overrun_without_event_idx_does_not_livelock",
        &[Need::Net],
    ) {
        return;
    }
    avail_index_overrun("nh2", 92, Broken::Rx, false);
}

#[test]
fn net_driver_ctrl_avail_overrun_with_event_idx_does_not_livelock() {
    if !can_run_with(
        "net_driver_ctrl_avail_overrun_with_event_idx_does_not_livelock",
        &[Need::Net],
    ) {
        return;
    }
    avail_index_overrun("nh3", 93, Broken::Ctrl, true);
}

#[test]
fn net_driver_ctrl_avail_overrun_without_event_idx_does_not_livelock() {
    if !can_run_with(
        "net_driver_ctrl_avail_overrun_without_event_idx_does_not_livelock",
        &[Need::Net],
    ) {
        return;
    }
    avail_index_overrun("nh4", 94, Broken::Ctrl, false);
}
