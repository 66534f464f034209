//! virtio-net tests: `net` (ARP, ICMP echo, UDP echo server, and our own ARP + ping to a
//! peer) and `net-cont` (UDP echo of a sequence-numbered stream until stopped).

use super::devices::{self, Stop, opt, poll_mode};
use super::net::{self, Net};
use super::pvh::cmdline_value;
use super::tests::report;
use super::{Machine, sys, time};

/// Opens the `nic=K`th virtio-net device with `ip=A.B.C.D[/LEN]`, `port=`, `peer=`.
pub fn open(m: &Machine, poll: bool) -> Result<Net, &'static str> {
    let ip = cmdline_value(m.cmdline, "ip").unwrap_or("10.0.2.15");
    let ip = net::parse_ip(ip.split('/').next().unwrap_or("")).ok_or("bad ip=")?;
    let peer = match cmdline_value(m.cmdline, "peer") {
        Some(p) => net::parse_ip(p).ok_or("bad peer=")?,
        None => [0; 4],
    };
    let nth = usize::try_from(opt(m.cmdline, "nic", 0)).unwrap_or(0);
    let pairs = usize::try_from(opt(m.cmdline, "queues", 1)).unwrap_or(1);
    let f = devices::find(devices::VIRTIO_NET, nth).ok_or("no virtio-net device")?;
    let mut n = Net::new(f, pairs, poll).map_err(|e| {
        crate::println!("baton-test-guest: virtio-net init: {e:?}");
        "virtio-net initialisation failed"
    })?;
    n.ip = ip;
    n.peer = peer;
    n.port = u16::try_from(opt(m.cmdline, "port", 7)).unwrap_or(7);
    Ok(n)
}

/// Serves until `stop`; every second, if a peer is set and has not answered yet, sends an
/// ARP request or a ping. Returns the largest gap between two received frames (µs).
pub fn serve(n: &mut Net, poll: bool, mut stop: impl FnMut() -> bool, until_ping: bool) -> u64 {
    let has_peer = n.peer != [0; 4];
    let mut next_probe = sys::rdtsc();
    let mut seq = 0u16;
    let mut last_rx: Option<u64> = None;
    let mut max_gap = 0u64;
    loop {
        if stop() || (until_ping && n.stats.ping_replies > 0) {
            return time::tsc_to_us(max_gap);
        }
        let now = sys::rdtsc();
        // The first ping goes out as soon as the ARP reply is in; retries once a second.
        let first_ping = n.peer_mac.is_some() && seq == 0;
        if has_peer && n.stats.ping_replies == 0 && (now >= next_probe || first_ping) {
            next_probe = now + time::us_to_tsc(1_000_000);
            if n.peer_mac.is_none() {
                n.arp_request();
            } else {
                seq = seq.wrapping_add(1);
                n.ping(seq);
            }
        }
        if n.poll() > 0 {
            let now = sys::rdtsc();
            if let Some(l) = last_rx {
                max_gap = max_gap.max(now - l);
            }
            last_rx = Some(now);
            continue;
        }
        let wait_us = if has_peer && n.stats.ping_replies == 0 {
            time::tsc_to_us(next_probe.saturating_sub(sys::rdtsc())).min(10_000)
        } else {
            10_000
        };
        devices::wait(poll, wait_us.max(100), || n.rx_pending());
    }
}

pub fn ip_str(ip: [u8; 4]) -> impl core::fmt::Display {
    struct Ip([u8; 4]);
    impl core::fmt::Display for Ip {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "{}.{}.{}.{}", self.0[0], self.0[1], self.0[2], self.0[3])
        }
    }
    Ip(ip)
}

pub fn mac_str(mac: [u8; 6]) -> impl core::fmt::Display {
    struct Mac([u8; 6]);
    impl core::fmt::Display for Mac {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            let m = self.0;
            write!(
                f,
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            )
        }
    }
    Mac(mac)
}

/// `test=net ip=A.B.C.D/LEN [peer=IP] [port=7] [seconds=10] [queues=N] [mode=irq|poll]
/// [until=ping]`.
pub fn test_net(m: &Machine) {
    let poll = poll_mode(m.cmdline, false);
    let mut n = match open(m, poll) {
        Ok(n) => n,
        Err(e) => return report(m, "net", Err(e), format_args!("")),
    };
    crate::println!(
        "baton-test-guest: net up mac={} ip={} port={} queues={}",
        mac_str(n.mac),
        ip_str(n.ip),
        n.port,
        n.npairs
    );
    let mut stop = Stop::new(opt(m.cmdline, "seconds", 10));
    let until_ping = cmdline_value(m.cmdline, "until") == Some("ping");
    let t0 = sys::rdtsc();
    let max_gap = serve(&mut n, poll, || stop.due(), until_ping);
    let has_peer = n.peer != [0; 4];
    let s = n.stats;
    let result = if has_peer && n.peer_mac.is_none() {
        Err("no ARP reply from the peer")
    } else if has_peer && s.ping_replies == 0 {
        Err("no ping reply from the peer")
    } else {
        Ok(())
    };
    report(
        m,
        "net",
        result,
        format_args!(
            ",\"mac\":\"{}\",\"ip\":\"{}\",\"peer\":\"{}\",\"peer_arp\":{},\"ping_replies\":{},\"queues\":{},\"max_queues\":{},\"rx_packets\":{},\"tx_packets\":{},\"rx_dropped\":{},\"rx_ignored\":{},\"tx_dropped\":{},\"arp_replied\":{},\"icmp_replied\":{},\"udp_echoed\":{},\"max_rx_gap_us\":{max_gap},\"mode\":\"{}\",\"stopped_by\":\"{}\",\"elapsed_ms\":{}",
            mac_str(n.mac),
            ip_str(n.ip),
            ip_str(n.peer),
            n.peer_mac.is_some(),
            s.ping_replies,
            n.npairs,
            n.max_pairs,
            s.rx_packets,
            s.tx_packets,
            s.rx_dropped,
            s.rx_ignored,
            s.tx_dropped,
            s.arp_replied,
            s.icmp_replied,
            s.udp_echoed,
            if poll { "poll" } else { "irq" },
            if until_ping && s.ping_replies > 0 {
                "ping"
            } else {
                stop.reason
            },
            time::tsc_to_us(sys::rdtsc() - t0) / 1000,
        ),
    );
}

/// `test=net-cont ip=A.B.C.D/LEN [port=7] [seconds=0] [queues=N] [mode=irq|poll]`: echoes
/// every UDP datagram to the port unchanged (and answers ARP/ping) until stopped.
pub fn test_net_cont(m: &Machine) {
    let poll = poll_mode(m.cmdline, false);
    let mut n = match open(m, poll) {
        Ok(n) => n,
        Err(e) => return report(m, "net-cont", Err(e), format_args!("")),
    };
    n.peer = [0; 4];
    crate::println!(
        "baton-test-guest: net-cont up mac={} ip={} port={}",
        mac_str(n.mac),
        ip_str(n.ip),
        n.port
    );
    let mut stop = Stop::new(opt(m.cmdline, "seconds", 0));
    let t0 = sys::rdtsc();
    let max_gap = serve(&mut n, poll, || stop.due(), false);
    let s = n.stats;
    report(
        m,
        "net-cont",
        if s.tx_dropped == 0 {
            Ok(())
        } else {
            Err("TX ring full: replies dropped")
        },
        format_args!(
            ",\"udp_echoed\":{},\"rx_dropped\":{},\"rx_packets\":{},\"tx_packets\":{},\"tx_dropped\":{},\"arp_replied\":{},\"icmp_replied\":{},\"max_rx_gap_us\":{max_gap},\"port\":{},\"stopped_by\":\"{}\",\"elapsed_ms\":{}",
            s.udp_echoed,
            s.rx_dropped,
            s.rx_packets,
            s.tx_packets,
            s.tx_dropped,
            s.arp_replied,
            s.icmp_replied,
            n.port,
            stop.reason,
            time::tsc_to_us(sys::rdtsc() - t0) / 1000,
        ),
    );
}
