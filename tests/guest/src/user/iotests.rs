//! `io-cont`: the `blk-cont` and `net-cont` workloads at the same time.
//!
//! With two or more CPUs (`layout=split`, the default there) the net workload runs on CPU 1
//! and the blk workload on the BSP, each at CPL3 and each waiting for its own interrupts
//! (or polling, `mode=poll`). Each device is initialised on the CPU that serves it, so its
//! MSI-X table entries carry that CPU's APIC id (`virtio::VirtioPci` programs the address
//! `0xfee00000 | apic_id << 12` of the CPU that opened the device): the blk completions
//! interrupt the BSP, the RX interrupts CPU 1. The two set-ups run one after the other (net
//! on CPU 1 first, then blk on the BSP), since PCI configuration through 0xcf8/0xcfc and the
//! DMA allocator are not shared safely. Only the BSP reads the serial input and the clock
//! deadline; it tells CPU 1 to stop through [`STOP`].
//!
//! With one CPU (or `layout=interleaved`) one loop on the BSP does both: the blk loop calls
//! the net receive path on every turn; in `mode=irq` an RX interrupt (also aimed at the BSP)
//! ends the blk loop's halt just like a blk completion.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::blktests::{self, ContResult};
use super::devices::{Stop, opt, poll_mode};
use super::net::Stats;
use super::nettests;
use super::pvh::cmdline_value;
use super::tests::report;
use super::{Machine, smp, sys, time};

/// The command line, for the job on CPU 1 (pointer, length; it lives as long as the run).
static CMD_PTR: AtomicUsize = AtomicUsize::new(0);
static CMD_LEN: AtomicUsize = AtomicUsize::new(0);
/// Set by the BSP when the run ends; CPU 1's net loop stops on it.
static STOP: AtomicBool = AtomicBool::new(false);
/// The net job's state: 0 starting, 1 serving, 2 failed to start, 3 finished.
static NET_STATE: AtomicU32 = AtomicU32::new(0);
/// Why the net job failed (a `&'static str` as pointer and length).
static NET_ERR: [AtomicUsize; 2] = [const { AtomicUsize::new(0) }; 2];
/// The net job's results, valid once [`NET_STATE`] is 3: the [`Stats`] fields in order,
/// then max_rx_gap_us, apic_id, port.
static NET_OUT: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];

const STARTING: u32 = 0;
const SERVING: u32 = 1;
const FAILED: u32 = 2;
const FINISHED: u32 = 3;

/// What the report needs from the net workload.
#[derive(Default)]
struct NetResult {
    stats: Stats,
    max_rx_gap_us: u64,
    apic_id: u64,
    port: u64,
}

fn stats_to_out(s: &Stats, gap: u64, apic: u64, port: u64) {
    let v = [
        s.rx_packets,
        s.tx_packets,
        s.rx_dropped,
        s.rx_ignored,
        s.tx_dropped,
        s.arp_replied,
        s.icmp_replied,
        s.udp_echoed,
        s.ping_replies,
        gap,
        apic,
        port,
    ];
    for (slot, x) in NET_OUT.iter().zip(v) {
        slot.store(x, Ordering::Relaxed);
    }
}

fn out_to_result() -> NetResult {
    let v: [u64; 12] = core::array::from_fn(|i| NET_OUT[i].load(Ordering::Relaxed));
    NetResult {
        stats: Stats {
            rx_packets: v[0],
            tx_packets: v[1],
            rx_dropped: v[2],
            rx_ignored: v[3],
            tx_dropped: v[4],
            arp_replied: v[5],
            icmp_replied: v[6],
            udp_echoed: v[7],
            ping_replies: v[8],
        },
        max_rx_gap_us: v[9],
        apic_id: v[10],
        port: v[11],
    }
}

/// The net workload, run on CPU 1 by [`smp::post_job`].
fn net_job(cpu: usize) {
    if cpu != 1 || NET_STATE.load(Ordering::Acquire) != STARTING {
        return;
    }
    let (ptr, len) = (
        CMD_PTR.load(Ordering::Acquire),
        CMD_LEN.load(Ordering::Acquire),
    );
    // SAFETY: the BSP stored the command line's address and length; it lives in the BSP's
    // boot frame, which never returns, and nothing writes it.
    let cmdline = unsafe {
        core::str::from_utf8_unchecked(core::slice::from_raw_parts(ptr as *const u8, len))
    };
    let m = Machine {
        cpus: 0,
        mem_mib: 0,
        boot_us: 0,
        cmdline,
    };
    let poll = poll_mode(cmdline, false);
    let mut n = match nettests::open(&m, poll) {
        Ok(n) => n,
        Err(e) => {
            NET_ERR[0].store(e.as_ptr() as usize, Ordering::Relaxed);
            NET_ERR[1].store(e.len(), Ordering::Relaxed);
            NET_STATE.store(FAILED, Ordering::Release);
            return;
        }
    };
    n.peer = [0; 4];
    let apic = sys::apic_id();
    crate::println!(
        "baton-test-guest: io-cont net on cpu {cpu} apic_id={apic} mac={} ip={} port={}",
        nettests::mac_str(n.mac),
        nettests::ip_str(n.ip),
        n.port
    );
    NET_STATE.store(SERVING, Ordering::Release);
    let gap = nettests::serve(&mut n, poll, || STOP.load(Ordering::Acquire), false);
    stats_to_out(&n.stats, gap, u64::from(apic), u64::from(n.port));
    NET_STATE.store(FINISHED, Ordering::Release);
}

/// Waits (sleeping) up to `us` for [`NET_STATE`] to leave `from`; returns the state.
fn wait_net_state(from: u32, us: u64) -> u32 {
    let end = sys::rdtsc() + time::us_to_tsc(us);
    loop {
        let s = NET_STATE.load(Ordering::Acquire);
        if s != from || sys::rdtsc() > end {
            return s;
        }
        time::sleep_us(200);
    }
}

/// `test=io-cont [ip=A.B.C.D/LEN] [port=7] [blocks=N] [depth=N] [mode=irq|poll]
/// [seconds=10] [layout=split|interleaved] [queues=N] [disk=K] [nic=K] [drain=S] [start=SEQ]`.
pub fn test_io_cont(m: &Machine) {
    const NAME: &str = "io-cont";
    let poll = poll_mode(m.cmdline, false);
    let split = match cmdline_value(m.cmdline, "layout") {
        Some("interleaved") => false,
        Some("split") if m.cpus < 2 => {
            return report(m, NAME, Err("layout=split needs 2 CPUs"), format_args!(""));
        }
        _ => m.cpus >= 2,
    };
    let seconds = opt(m.cmdline, "seconds", 10);
    let drain_us = opt(m.cmdline, "drain", 10) * 1_000_000;
    let start = opt(m.cmdline, "start", 0);

    // Net first: on CPU 1 (its MSI-X entries then name CPU 1), or here.
    let mut local_net = None;
    if split {
        CMD_PTR.store(m.cmdline.as_ptr() as usize, Ordering::Release);
        CMD_LEN.store(m.cmdline.len(), Ordering::Release);
        STOP.store(false, Ordering::Release);
        NET_STATE.store(STARTING, Ordering::Release);
        smp::post_job(1, net_job);
        match wait_net_state(STARTING, 10_000_000) {
            SERVING => {}
            FAILED => {
                let (p, l) = (
                    NET_ERR[0].load(Ordering::Relaxed),
                    NET_ERR[1].load(Ordering::Relaxed),
                );
                // SAFETY: a `&'static str` stored by `net_job`.
                let e = unsafe {
                    core::str::from_utf8_unchecked(core::slice::from_raw_parts(p as *const u8, l))
                };
                return report(m, NAME, Err(e), format_args!(""));
            }
            _ => {
                return report(
                    m,
                    NAME,
                    Err("the net workload did not start on cpu 1"),
                    format_args!(""),
                );
            }
        }
    } else {
        match nettests::open(m, poll) {
            Ok(mut n) => {
                n.peer = [0; 4];
                crate::println!(
                    "baton-test-guest: io-cont net on cpu 0 (interleaved) mac={} ip={} port={}",
                    nettests::mac_str(n.mac),
                    nettests::ip_str(n.ip),
                    n.port
                );
                local_net = Some(n);
            }
            Err(e) => return report(m, NAME, Err(e), format_args!("")),
        }
    }
    let stop_net = || {
        STOP.store(true, Ordering::Release);
        wait_net_state(SERVING, 2_000_000)
    };

    let blk_setup =
        blktests::open_cont(m, poll).and_then(|b| blktests::cont_options(m, &b).map(|o| (b, o)));
    let (mut blk, (depth, blocks)) = match blk_setup {
        Ok(x) => x,
        Err(e) => {
            if split {
                stop_net();
            }
            return report(m, NAME, Err(e), format_args!(""));
        }
    };
    let blk_apic = sys::apic_id();
    let mut stop = Stop::new(seconds);
    let t0 = sys::rdtsc();
    let (r, net, net_ok): (ContResult, NetResult, bool) = if let Some(n) = local_net.as_mut() {
        let mut last_rx: Option<u64> = None;
        let mut max_gap = 0u64;
        let r = blktests::cont_run(&mut blk, poll, depth, blocks, start, drain_us, || {
            if n.poll() > 0 {
                let now = sys::rdtsc();
                if let Some(l) = last_rx {
                    max_gap = max_gap.max(now - l);
                }
                last_rx = Some(now);
            }
            stop.due()
        });
        let net = NetResult {
            stats: n.stats,
            max_rx_gap_us: time::tsc_to_us(max_gap),
            apic_id: u64::from(blk_apic),
            port: u64::from(n.port),
        };
        (r, net, true)
    } else {
        let r = blktests::cont_run(&mut blk, poll, depth, blocks, start, drain_us, || {
            let due = stop.due();
            if due {
                STOP.store(true, Ordering::Release);
            }
            due
        });
        let finished = stop_net() == FINISHED;
        (r, out_to_result(), finished)
    };
    let elapsed_ms = time::tsc_to_us(sys::rdtsc() - t0) / 1000;
    let result = match r.verdict() {
        Ok(()) if !net_ok => Err("the net workload did not finish"),
        v => v,
    };
    let s = net.stats;
    let rate = |n: u64| n * 1000 / r.elapsed_ms.max(1);
    report(
        m,
        NAME,
        result,
        format_args!(
            ",\"writes\":{},\"reads\":{},\"io_errors\":{},\"verify_errors\":{},\"max_gap_us\":{},\"outstanding\":{},\"stall_us\":{},\"next_seq\":{},\"udp_echoed\":{},\"rx_dropped\":{},\"rx_packets\":{},\"tx_packets\":{},\"max_rx_gap_us\":{},\"tx_dropped\":{},\"arp_replied\":{},\"icmp_replied\":{},\"writes_per_s\":{},\"echoes_per_s\":{},\"layout\":\"{}\",\"blk_apic_id\":{blk_apic},\"net_apic_id\":{},\"blocks\":{blocks},\"depth\":{depth},\"queues\":{},\"port\":{},\"mode\":\"{}\",\"stopped_by\":\"{}\",\"elapsed_ms\":{elapsed_ms}",
            r.writes,
            r.reads,
            r.io_errors,
            r.verify_errors,
            r.max_gap_us,
            r.outstanding,
            r.stall_us,
            r.next_seq,
            s.udp_echoed,
            s.rx_dropped,
            s.rx_packets,
            s.tx_packets,
            net.max_rx_gap_us,
            s.tx_dropped,
            s.arp_replied,
            s.icmp_replied,
            rate(r.writes),
            rate(s.udp_echoed),
            if split { "split" } else { "interleaved" },
            net.apic_id,
            blk.nq,
            net.port,
            if poll { "poll" } else { "irq" },
            stop.reason,
        ),
    );
}
