//! A sequence-numbered UDP echo stream at a fixed rate, sent from inside a namespace to a
//! guest's echo port: counts what came back, what was lost or duplicated, and the largest gap
//! between two echoes (what a VMM swap or back-end restart costs the guest's network).

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// What the stream saw.
#[derive(Debug, Clone, Default)]
pub struct EchoStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Distinct sequence numbers echoed.
    pub echoed: u64,
    /// Echoes of a sequence number already seen.
    pub duplicates: u64,
    /// Sent and never echoed (after a final grace period).
    pub lost: u64,
    /// Largest time between two consecutive echoes, in ms.
    pub max_gap_ms: f64,
    /// Every sequence number that came back.
    pub echoed_seqs: BTreeSet<u64>,
}

impl EchoStats {
    /// Datagrams with sequence numbers in `from..to` that never came back.
    pub fn lost_between(&self, from: u64, to: u64) -> u64 {
        (to.saturating_sub(from)).saturating_sub(self.echoed_seqs.range(from..to).count() as u64)
    }
}

/// A running stream; [`EchoStream::stop`] ends it and returns the counts.
pub struct EchoStream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<anyhow::Result<EchoStats>>,
}

impl EchoStream {
    /// Sends one datagram every `interval` from `ns` to `dst` (ip:port).
    pub fn start(ns: &Netns, dst: String, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let echoed = Arc::new(AtomicU64::new(0));
        let (flag, counter, back) = (stop.clone(), sent.clone(), echoed.clone());
        let thread = ns.thread(move || run(&dst, interval, &flag, (&counter, &back)));
        EchoStream {
            stop,
            sent,
            echoed,
            thread,
        }
    }

    /// Distinct datagrams echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::SeqCst)
    }

    /// Waits until a datagram comes back (the path is up: ARP answered, the guest echoing) and
    /// returns the mark after it: count losses from there.
    pub fn wait_first_echo(&self, timeout: Duration) -> anyhow::Result<u64> {
        crate::harness::wait_until(timeout, || (self.echoed() > 0).then_some(()))
            .ok_or_else(|| anyhow::anyhow!("no datagram came back in {timeout:?}"))?;
        Ok(self.mark())
    }

    /// The sequence number the next datagram will carry (a mark for [`EchoStats::lost_between`]).
    pub fn mark(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops sending, waits for late echoes, and returns the counts.
    pub fn stop(self) -> anyhow::Result<EchoStats> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
    }
}

fn run(
    dst: &str,
    interval: Duration,
    stop: &AtomicBool,
    (counter, back): (&AtomicU64, &AtomicU64),
) -> anyhow::Result<EchoStats> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_nonblocking(true)?;
    let mut st = EchoStats::default();
    let mut seen = BTreeSet::new();
    let mut last_echo: Option<Instant> = None;
    let mut buf = [0u8; 64];
    let mut next = Instant::now();
    let mut seq = 0u64;
    let mut receive = |st: &mut EchoStats, seen: &mut BTreeSet<u64>| {
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            let Some(b) = buf.get(..8).filter(|_| n == 16) else {
                continue;
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let seq = u64::from_le_bytes(a);
            let now = Instant::now();
            if let Some(t) = last_echo {
                st.max_gap_ms = st.max_gap_ms.max((now - t).as_secs_f64() * 1000.0);
            }
            last_echo = Some(now);
            if seen.insert(seq) {
                st.echoed += 1;
                back.store(st.echoed, Ordering::SeqCst);
            } else {
                st.duplicates += 1;
            }
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next {
            let mut p = [0u8; 16];
            p[..8].copy_from_slice(&seq.to_le_bytes());
            p[8..].copy_from_slice(b"baton-ec");
            if s.send_to(&p, dst).is_ok() {
                st.sent += 1;
                seq += 1;
                counter.store(seq, Ordering::SeqCst);
            }
            next += interval;
            if next < now {
                next = now + interval;
            }
        }
        receive(&mut st, &mut seen);
        std::thread::sleep(Duration::from_micros(100));
    }
    let grace = Instant::now() + Duration::from_millis(500);
    while Instant::now() < grace {
        receive(&mut st, &mut seen);
        std::thread::sleep(Duration::from_millis(1));
    }
    st.lost = st.sent.saturating_sub(st.echoed);
    st.echoed_seqs = seen;
    Ok(st)
}
