//! virtio-net driver (RX buffers, TX, optional multi-queue through the control queue) and a
//! tiny hand-written IPv4 stack: ARP (answer, ask), ICMP echo (answer, send) and UDP echo.
//!
//! Hand-written rather than smoltcp: the guest stays free of external crates and of a heap,
//! and these three protocols over one Ethernet segment are about 200 lines. Replies go to
//! the sender's MAC address taken from the frame, so answering needs no ARP cache.

use super::dma;
use super::pci::Function;
use super::virtio::{VirtioError, VirtioPci};
use super::virtq::Virtq;

/// VIRTIO_NET_F_MAC.
const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_CTRL_VQ.
const F_CTRL_VQ: u64 = 1 << 17;
/// VIRTIO_NET_F_MQ.
const F_MQ: u64 = 1 << 22;
/// virtio-net header length (VERSION_1).
const HDR: usize = 12;
/// Bytes per RX/TX buffer (header + a 1514-byte frame, rounded).
const BUF: u32 = 2048;
/// Queue size used for every queue.
const QSIZE: u16 = 256;
/// Most queue pairs used.
pub const MAX_PAIRS: usize = 4;

/// Counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Frames received.
    pub rx_packets: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Frames for us that were not handled (malformed, bad checksum, fragment, unknown IP
    /// protocol or UDP port).
    pub rx_dropped: u64,
    /// Frames not for us (other ethertypes such as IPv6, other IP or ARP targets).
    pub rx_ignored: u64,
    /// Frames that could not be sent (TX ring full).
    pub tx_dropped: u64,
    /// ARP requests answered.
    pub arp_replied: u64,
    /// ICMP echo requests answered.
    pub icmp_replied: u64,
    /// UDP datagrams echoed.
    pub udp_echoed: u64,
    /// ICMP echo replies received for our own pings.
    pub ping_replies: u64,
}

/// What became of a received frame.
enum Rx {
    Handled,
    Ignored,
    Dropped,
}

struct Pair {
    rx: Virtq,
    tx: Virtq,
    rx_bufs: u64,
    tx_bufs: u64,
}

/// One virtio-net device with its IPv4 configuration.
pub struct Net {
    /// The transport.
    pub dev: VirtioPci,
    pairs: [Option<Pair>; MAX_PAIRS],
    /// Queue pairs in use.
    pub npairs: usize,
    /// Queue pairs the device offers.
    pub max_pairs: u16,
    /// Our MAC address.
    pub mac: [u8; 6],
    /// Our IPv4 address.
    pub ip: [u8; 4],
    /// UDP echo port.
    pub port: u16,
    /// Counters.
    pub stats: Stats,
    /// MAC address of the peer once its ARP reply arrived.
    pub peer_mac: Option<[u8; 6]>,
    /// The peer's address (for our own ARP request and ping).
    pub peer: [u8; 4],
}

/// Parses `a.b.c.d`.
pub fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut out {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0xffff)
}

impl Net {
    /// Initialises the device with up to `want_pairs` queue pairs (`poll`: no interrupts).
    pub fn new(pci: Function, want_pairs: usize, poll: bool) -> Result<Net, VirtioError> {
        let mut dev = VirtioPci::new(pci)?;
        dev.reset();
        let want = if want_pairs > 1 {
            F_MAC | F_CTRL_VQ | F_MQ
        } else {
            F_MAC
        };
        let f = dev.negotiate(want)?;
        let mut mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        if f & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.config(i as u64);
            }
        }
        let max_pairs = if f & F_MQ != 0 {
            dev.config::<u16>(8).max(1)
        } else {
            1
        };
        let npairs = want_pairs.clamp(1, MAX_PAIRS).min(usize::from(max_pairs));
        let mut pairs = [const { None }; MAX_PAIRS];
        for (i, slot) in pairs.iter_mut().enumerate().take(npairs) {
            let i = u16::try_from(i).unwrap_or(0);
            let mut rx = dev.setup_queue(2 * i, QSIZE, false, !poll)?;
            let mut tx = dev.setup_queue(2 * i + 1, QSIZE, false, false)?;
            rx.set_interrupts(!poll);
            tx.set_interrupts(false);
            let rx_bufs = dma::alloc(u64::from(BUF) * u64::from(rx.size), 4096)
                .ok_or(VirtioError::NoMemory)?;
            let tx_bufs = dma::alloc(u64::from(BUF) * u64::from(tx.size), 4096)
                .ok_or(VirtioError::NoMemory)?;
            *slot = Some(Pair {
                rx,
                tx,
                rx_bufs,
                tx_bufs,
            });
        }
        let mut ctrl = if f & F_CTRL_VQ != 0 {
            Some(dev.setup_queue(2 * max_pairs, 16, false, false)?)
        } else {
            None
        };
        dev.driver_ok()?;
        let mut net = Net {
            dev,
            pairs,
            npairs,
            max_pairs,
            mac,
            ip: [0; 4],
            port: 7,
            stats: Stats::default(),
            peer_mac: None,
            peer: [0; 4],
        };
        if let Some(cq) = ctrl.as_mut()
            && npairs > 1
            && !set_pairs(cq, npairs)
        {
            return Err(VirtioError::NeedsReset(net.dev.status()));
        }
        for p in net.pairs.iter_mut().flatten() {
            while p.rx.num_free() > 0 {
                let id = p.rx.peek_free_head();
                let addr = p.rx_bufs + u64::from(BUF) * u64::from(id);
                if p.rx.push(&[(addr, BUF, true)]).is_none() {
                    break;
                }
            }
            p.rx.kick();
        }
        Ok(net)
    }

    /// True if any RX queue has frames waiting.
    pub fn rx_pending(&self) -> bool {
        self.pairs.iter().flatten().any(|p| p.rx.has_used())
    }

    /// Handles every received frame; returns how many.
    pub fn poll(&mut self) -> u64 {
        let mut handled = 0;
        for q in 0..self.npairs {
            let mut refill = false;
            while let Some(p) = self.pairs[q].as_mut() {
                let Some((id, len)) = p.rx.pop() else { break };
                let addr = p.rx_bufs + u64::from(BUF) * u64::from(id);
                let len = len.min(BUF) as usize;
                let mut frame = [0u8; 1600];
                let n = len.saturating_sub(HDR).min(frame.len());
                // SAFETY: RX buffer `id`, just returned by the device with `len` bytes.
                let src =
                    unsafe { core::slice::from_raw_parts((addr + HDR as u64) as *const u8, n) };
                frame[..n].copy_from_slice(src);
                // Give a buffer back at once (the one just freed).
                let nid = p.rx.peek_free_head();
                let _ =
                    p.rx.push(&[(p.rx_bufs + u64::from(BUF) * u64::from(nid), BUF, true)]);
                refill = true;
                self.stats.rx_packets += 1;
                handled += 1;
                match self.handle(q, &frame[..n]) {
                    Rx::Handled => {}
                    Rx::Ignored => self.stats.rx_ignored += 1,
                    Rx::Dropped => self.stats.rx_dropped += 1,
                }
            }
            if refill && let Some(p) = self.pairs[q].as_mut() {
                p.rx.kick();
            }
        }
        handled
    }

    /// Sends one frame (Ethernet header included) on pair `q`.
    pub fn send(&mut self, q: usize, frame: &[u8]) -> bool {
        let Some(p) = self.pairs.get_mut(q).and_then(Option::as_mut) else {
            return false;
        };
        while p.tx.pop().is_some() {}
        let Ok(total) = u32::try_from(HDR + frame.len()) else {
            return false;
        };
        if p.tx.num_free() == 0 || total > BUF {
            self.stats.tx_dropped += 1;
            return false;
        }
        let id = p.tx.peek_free_head();
        let addr = p.tx_bufs + u64::from(BUF) * u64::from(id);
        // SAFETY: TX buffer `id`, free because its descriptor is.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, HDR + frame.len()) };
        buf[..HDR].fill(0);
        buf[HDR..].copy_from_slice(frame);
        let _ = p.tx.push(&[(addr, total, false)]);
        p.tx.kick();
        self.stats.tx_packets += 1;
        true
    }

    fn handle(&mut self, q: usize, f: &[u8]) -> Rx {
        if f.len() < 14 {
            return Rx::Dropped;
        }
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        let src_mac: [u8; 6] = f[6..12].try_into().unwrap_or([0; 6]);
        let ours = match ethertype {
            0x0806 => f.len() >= 42 && (f[38..42] == self.ip || f[28..32] == self.peer),
            0x0800 => f.len() >= 34 && f[30..34] == self.ip,
            _ => false,
        };
        if !ours {
            return Rx::Ignored;
        }
        let ok = match ethertype {
            0x0806 => self.arp(q, &f[14..]),
            _ => self.ipv4(q, src_mac, &f[14..]),
        };
        if ok { Rx::Handled } else { Rx::Dropped }
    }

    fn arp(&mut self, q: usize, a: &[u8]) -> bool {
        if a.len() < 28 || a[0..6] != [0, 1, 8, 0, 6, 4] {
            return false;
        }
        let op = u16::from_be_bytes([a[6], a[7]]);
        let sha: [u8; 6] = a[8..14].try_into().unwrap_or([0; 6]);
        let spa: [u8; 4] = a[14..18].try_into().unwrap_or([0; 4]);
        let tpa = &a[24..28];
        if op == 2 && spa == self.peer {
            self.peer_mac = Some(sha);
            return true;
        }
        if op != 1 || tpa != self.ip {
            return false;
        }
        let mut r = [0u8; 42];
        self.eth_header(&mut r, sha, 0x0806);
        r[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        r[22..28].copy_from_slice(&self.mac);
        r[28..32].copy_from_slice(&self.ip);
        r[32..38].copy_from_slice(&sha);
        r[38..42].copy_from_slice(&spa);
        self.stats.arp_replied += 1;
        self.send(q, &r)
    }

    /// Broadcasts an ARP request for the peer.
    pub fn arp_request(&mut self) -> bool {
        let mut r = [0u8; 42];
        self.eth_header(&mut r, [0xff; 6], 0x0806);
        r[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        r[22..28].copy_from_slice(&self.mac);
        r[28..32].copy_from_slice(&self.ip);
        r[38..42].copy_from_slice(&self.peer);
        self.send(0, &r)
    }

    /// Sends an ICMP echo request to the peer (needs its MAC).
    pub fn ping(&mut self, seq: u16) -> bool {
        let Some(dst) = self.peer_mac else {
            return false;
        };
        let mut r = [0u8; 14 + 20 + 8 + 32];
        self.eth_header(&mut r, dst, 0x0800);
        let peer = self.peer;
        self.ip_header(&mut r[14..34], peer, 1, 8 + 32);
        let icmp = &mut r[34..];
        icmp[0] = 8;
        icmp[4..6].copy_from_slice(&0xba70u16.to_be_bytes());
        icmp[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in icmp[8..].iter_mut().enumerate() {
            *b = i.to_le_bytes()[0];
        }
        let c = csum_fold(csum_add(0, icmp));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        self.send(0, &r)
    }

    fn eth_header(&self, r: &mut [u8], dst: [u8; 6], ethertype: u16) {
        r[0..6].copy_from_slice(&dst);
        r[6..12].copy_from_slice(&self.mac);
        r[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }

    fn ip_header(&self, h: &mut [u8], dst: [u8; 4], proto: u8, payload: usize) {
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&u16::try_from(20 + payload).unwrap_or(0).to_be_bytes());
        h[4..8].copy_from_slice(&[0, 0, 0x40, 0]);
        h[8] = 64;
        h[9] = proto;
        h[10..12].fill(0);
        h[12..16].copy_from_slice(&self.ip);
        h[16..20].copy_from_slice(&dst);
        let c = csum_fold(csum_add(0, &h[..20]));
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }

    fn ipv4(&mut self, q: usize, src_mac: [u8; 6], p: &[u8]) -> bool {
        if p.len() < 20 || p[0] >> 4 != 4 {
            return false;
        }
        let ihl = usize::from(p[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        if ihl < 20 || total < ihl || total > p.len() || p[16..20] != self.ip {
            return false;
        }
        // Fragments are not handled.
        if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
            return false;
        }
        let src: [u8; 4] = p[12..16].try_into().unwrap_or([0; 4]);
        let body = &p[ihl..total];
        match p[9] {
            1 => self.icmp(q, src_mac, src, body),
            17 => self.udp(q, src_mac, src, body),
            _ => false,
        }
    }

    fn icmp(&mut self, q: usize, src_mac: [u8; 6], src: [u8; 4], m: &[u8]) -> bool {
        if m.len() < 8 || csum_fold(csum_add(0, m)) != 0 {
            return false;
        }
        if m[0] == 0 && src == self.peer {
            self.stats.ping_replies += 1;
            return true;
        }
        if m[0] != 8 || m.len() > 1500 - 20 {
            return false;
        }
        let mut r = [0u8; 1514];
        let n = 34 + m.len();
        self.eth_header(&mut r, src_mac, 0x0800);
        self.ip_header(&mut r[14..34], src, 1, m.len());
        r[34..n].copy_from_slice(m);
        r[34] = 0;
        r[36..38].fill(0);
        let c = csum_fold(csum_add(0, &r[34..n]));
        r[36..38].copy_from_slice(&c.to_be_bytes());
        self.stats.icmp_replied += 1;
        self.send(q, &r[..n])
    }

    fn udp(&mut self, q: usize, src_mac: [u8; 6], src: [u8; 4], u: &[u8]) -> bool {
        if u.len() < 8 {
            return false;
        }
        let sport = u16::from_be_bytes([u[0], u[1]]);
        let dport = u16::from_be_bytes([u[2], u[3]]);
        let len = usize::from(u16::from_be_bytes([u[4], u[5]]));
        if dport != self.port || len < 8 || len > u.len() || len > 1500 - 20 {
            return false;
        }
        let data = &u[8..len];
        let mut r = [0u8; 1514];
        let n = 42 + data.len();
        self.eth_header(&mut r, src_mac, 0x0800);
        self.ip_header(&mut r[14..34], src, 17, len);
        r[34..36].copy_from_slice(&dport.to_be_bytes());
        r[36..38].copy_from_slice(&sport.to_be_bytes());
        r[38..40].copy_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
        r[42..n].copy_from_slice(data);
        // Checksum over the pseudo-header and the datagram (0 means "none": send 0xffff).
        let mut sum = csum_add(0, &self.ip);
        sum = csum_add(sum, &src);
        sum += 17 + u32::try_from(len).unwrap_or(0);
        let c = match csum_fold(csum_add(sum, &r[34..n])) {
            0 => 0xffff,
            c => c,
        };
        r[40..42].copy_from_slice(&c.to_be_bytes());
        self.stats.udp_echoed += 1;
        self.send(q, &r[..n])
    }
}

/// VIRTIO_NET_CTRL_MQ / VQ_PAIRS_SET on the control queue; true if the device said OK.
fn set_pairs(cq: &mut Virtq, pairs: usize) -> bool {
    let Some(buf) = dma::alloc(64, 64) else {
        return false;
    };
    let n = u16::try_from(pairs).unwrap_or(1);
    // SAFETY: `buf` is 64 fresh bytes: class, command, u16 argument, ack byte at 8.
    unsafe {
        core::ptr::write_volatile(buf as *mut u8, 4);
        core::ptr::write_volatile((buf + 1) as *mut u8, 0);
        core::ptr::write_volatile((buf + 2) as *mut u16, n);
        core::ptr::write_volatile((buf + 8) as *mut u8, 0xff);
    }
    if cq
        .push(&[(buf, 2, false), (buf + 2, 2, false), (buf + 8, 1, true)])
        .is_none()
    {
        return false;
    }
    cq.kick();
    let start = super::sys::rdtsc();
    while !cq.has_used() {
        if super::sys::rdtsc() - start > super::time::us_to_tsc(2_000_000) {
            return false;
        }
        core::hint::spin_loop();
    }
    let _ = cq.pop();
    // SAFETY: the ack byte the device wrote.
    unsafe { core::ptr::read_volatile((buf + 8) as *const u8) == 0 }
}
