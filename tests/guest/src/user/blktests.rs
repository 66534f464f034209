//! virtio-blk tests: `blk` (pattern write/flush/read/verify on every queue, get-id),
//! `blk-cont` (sequence-numbered writes verified on read-back until stopped), `blk-lat`
//! (queue-depth-1 read latency, polled or interrupt-driven) and `virtio-bad` (NEEDS_RESET
//! after a misprogrammed queue, then recovery).

use super::blk::{Blk, Op};
use super::devices::{self, Stop, opt, poll_mode};
use super::serial::JsonStr;
use super::tests::report;
use super::virtio::{VirtioPci, status};
use super::{Machine, sys, time};

const SECTOR: u64 = 512;

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `buf` with the pattern of `sector` under `seed`.
fn fill(buf: &mut [u8], seed: u64, sector: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(seed ^ (sector << 12) ^ i as u64).to_le_bytes());
    }
}

fn matches(buf: &[u8], seed: u64, sector: u64) -> bool {
    buf.chunks_exact(8)
        .enumerate()
        .all(|(i, w)| w == mix(seed ^ (sector << 12) ^ i as u64).to_le_bytes())
}

/// Opens the `disk=N`th virtio-blk device (default 0).
fn open(m: &Machine, queues: usize, poll: bool) -> Result<Blk, &'static str> {
    let nth = usize::try_from(opt(m.cmdline, "disk", 0)).unwrap_or(0);
    let f = devices::find(devices::VIRTIO_BLK, nth).ok_or("no virtio-blk device")?;
    Blk::new(f, queues, poll).map_err(|e| {
        crate::println!("baton-test-guest: virtio-blk init: {e:?}");
        "virtio-blk initialisation failed"
    })
}

/// Completes every outstanding request on every queue of `blk` (up to `timeout_us`),
/// calling `done(queue, id, status)` for each.
fn drain(
    blk: &mut Blk,
    poll: bool,
    outstanding: &mut [u32],
    timeout_us: u64,
    mut done: impl FnMut(&mut Blk, usize, u16, u8),
) -> bool {
    let end = sys::rdtsc() + time::us_to_tsc(timeout_us);
    while outstanding.iter().any(|n| *n > 0) {
        if sys::rdtsc() > end {
            return false;
        }
        let nq = blk.nq;
        devices::wait(poll, 100_000, || (0..nq).any(|q| blk.has_used(q)));
        for (q, n) in outstanding.iter_mut().enumerate().take(nq) {
            while let Some(d) = blk.complete(q) {
                *n -= 1;
                done(blk, q, d.id, d.status);
            }
        }
    }
    true
}

/// Runs one pass over `sectors` sectors per queue: writes (with `write`) or reads and
/// verifies, `io` bytes per request, `depth` outstanding per queue. Returns (bytes, io
/// errors, verify errors, completed in time).
fn pass(
    blk: &mut Blk,
    poll: bool,
    write: bool,
    seed: u64,
    sectors: u64,
    io: u32,
    depth: u32,
) -> (u64, u64, u64, bool) {
    let nq = blk.nq;
    let per = u64::from(io) / SECTOR;
    let mut next = [0u64; 8];
    let mut outstanding = [0u32; 8];
    let mut ids = [[0u64; 256]; 8];
    let (mut bytes, mut io_errors, mut verify_errors) = (0u64, 0u64, 0u64);
    let end = sys::rdtsc() + time::us_to_tsc(60_000_000);
    loop {
        for q in 0..nq {
            let mut submitted = false;
            while outstanding[q] < depth && next[q] < sectors {
                let sector = q as u64 * sectors + next[q];
                if write {
                    let Some(buf) = blk.next_buffer(q) else { break };
                    fill(&mut buf[..io as usize], seed, sector);
                }
                let op = if write { Op::Write } else { Op::Read };
                let Some(id) = blk.submit(q, op, sector, io, false) else {
                    break;
                };
                ids[q][usize::from(id) % 256] = sector;
                next[q] += per;
                outstanding[q] += 1;
                submitted = true;
            }
            if submitted {
                blk.kick(q);
            }
        }
        if outstanding.iter().all(|n| *n == 0) {
            return (bytes, io_errors, verify_errors, true);
        }
        if sys::rdtsc() > end {
            return (bytes, io_errors, verify_errors, false);
        }
        devices::wait(poll, 100_000, || (0..nq).any(|q| blk.has_used(q)));
        for q in 0..nq {
            while let Some(d) = blk.complete(q) {
                outstanding[q] -= 1;
                if d.status != 0 {
                    io_errors += 1;
                    continue;
                }
                if !write {
                    let sector = ids[q][usize::from(d.id) % 256];
                    let buf = blk.buffer(q, d.id);
                    if !matches(&buf[..io as usize], seed, sector) {
                        verify_errors += 1;
                        continue;
                    }
                }
                bytes += u64::from(io);
            }
        }
    }
}

/// `test=blk [queues=N] [sectors=N] [io=BYTES] [depth=N] [mode=poll|irq] [disk=K]`.
pub fn test_blk(m: &Machine) {
    let queues = usize::try_from(opt(m.cmdline, "queues", 1)).unwrap_or(1);
    let poll = poll_mode(m.cmdline, true);
    let mut blk = match open(m, queues, poll) {
        Ok(b) => b,
        Err(e) => return report(m, "blk", Err(e), format_args!("")),
    };
    let io = u32::try_from(opt(m.cmdline, "io", 4096))
        .unwrap_or(4096)
        .clamp(512, super::blk::MAX_IO)
        & !511;
    let depth = u32::try_from(opt(m.cmdline, "depth", 8))
        .unwrap_or(8)
        .clamp(1, 32);
    let nq = blk.nq as u64;
    let per_io = u64::from(io) / SECTOR;
    let mut sectors = opt(m.cmdline, "sectors", 2048).max(per_io) / per_io * per_io;
    if sectors * nq > blk.capacity {
        sectors = blk.capacity / nq / per_io * per_io;
    }
    let seed = mix(sys::rdtsc());
    let t0 = sys::rdtsc();
    let (written, werr, _, wok) = pass(&mut blk, poll, true, seed, sectors, io, depth);
    let t1 = sys::rdtsc();
    let mut flush_status = None;
    let mut outstanding = [0u32; 8];
    if blk.flush && blk.submit(0, Op::Flush, 0, 0, true).is_some() {
        outstanding[0] = 1;
        drain(
            &mut blk,
            poll,
            &mut outstanding,
            10_000_000,
            |_, _, _, s| flush_status = Some(s),
        );
    }
    let t2 = sys::rdtsc();
    let (verified, rerr, verify_errors, rok) =
        pass(&mut blk, poll, false, seed, sectors, io, depth);
    let t3 = sys::rdtsc();
    let mut serial = [0u8; 20];
    let mut id_status = None;
    if blk.submit(0, Op::GetId, 0, 20, true).is_some() {
        outstanding[0] = 1;
        drain(
            &mut blk,
            poll,
            &mut outstanding,
            10_000_000,
            |b, q, id, s| {
                id_status = Some(s);
                serial.copy_from_slice(&b.buffer(q, id)[..20]);
            },
        );
    }
    let serial_len = serial.iter().position(|b| *b == 0).unwrap_or(20);
    let serial = core::str::from_utf8(&serial[..serial_len]).unwrap_or("?");
    let io_errors = werr + rerr + u64::from(flush_status.is_some_and(|s| s != 0));
    let expected = sectors * nq * SECTOR;
    let result = if !wok || !rok {
        Err("timeout")
    } else if io_errors > 0 {
        Err("I/O errors")
    } else if verify_errors > 0 || verified != expected || written != expected {
        Err("verify errors")
    } else if blk.flush && flush_status != Some(0) {
        Err("flush failed")
    } else {
        Ok(())
    };
    let us = |a: u64, b: u64| time::tsc_to_us(b - a);
    report(
        m,
        "blk",
        result,
        format_args!(
            ",\"pci\":\"00:{:02x}.{}\",\"queues\":{nq},\"max_queues\":{},\"capacity_sectors\":{},\"io_bytes\":{io},\"depth\":{depth},\"mode\":\"{}\",\"bytes_written\":{written},\"bytes_verified\":{verified},\"io_errors\":{io_errors},\"verify_errors\":{verify_errors},\"flush\":{},\"get_id_status\":{},\"serial\":\"{}\",\"write_us\":{},\"flush_us\":{},\"read_us\":{}",
            blk.dev.pci.dev,
            blk.dev.pci.func,
            blk.max_queues,
            blk.capacity,
            if poll { "poll" } else { "irq" },
            flush_status.map_or("\"not offered\"", |s| if s == 0 {
                "\"ok\""
            } else {
                "\"error\""
            }),
            id_status.map_or(-1, i32::from),
            JsonStr(serial),
            us(t0, t1),
            us(t1, t2),
            us(t2, t3),
        ),
    );
}

/// blk-cont block content: seq, sector, a marker, then words derived from both.
fn cont_fill(buf: &mut [u8], seq: u64, sector: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => seq,
            1 => sector,
            2 => 0x6261_746f_6e2d_626b, // "baton-bk"
            _ => mix(seq ^ (sector << 20) ^ i as u64),
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn cont_check(buf: &[u8], seq: u64, sector: u64) -> bool {
    buf.chunks_exact(8).enumerate().all(|(i, w)| {
        let v = match i {
            0 => seq,
            1 => sector,
            2 => 0x6261_746f_6e2d_626b,
            _ => mix(seq ^ (sector << 20) ^ i as u64),
        };
        w == v.to_le_bytes()
    })
}

/// Bytes per `blk-cont` block.
pub const CONT_BLOCK: u32 = 4096;

/// The outcome of a [`cont_run`].
pub struct ContResult {
    /// Writes completed.
    pub writes: u64,
    /// Read-backs completed.
    pub reads: u64,
    /// Requests that completed with a non-zero status.
    pub io_errors: u64,
    /// Read-backs whose content did not match.
    pub verify_errors: u64,
    /// Longest time between two consecutive completions (µs).
    pub max_gap_us: u64,
    /// Last completion to the end when requests never completed (µs), else 0.
    pub stall_us: u64,
    /// The next sequence number.
    pub next_seq: u64,
    /// Requests still in flight at the end.
    pub outstanding: u64,
    /// Duration of the run (ms).
    pub elapsed_ms: u64,
}

impl ContResult {
    /// The pass/fail verdict of a `blk-cont` run.
    pub fn verdict(&self) -> Result<(), &'static str> {
        if self.io_errors > 0 {
            Err("I/O errors")
        } else if self.verify_errors > 0 {
            Err("verify errors")
        } else if self.outstanding > 0 {
            Err("requests never completed")
        } else if self.writes == 0 {
            Err("no writes completed")
        } else {
            Ok(())
        }
    }
}

/// The `blk-cont` options read from the command line: (depth, blocks), or why they are bad.
pub fn cont_options(m: &Machine, blk: &Blk) -> Result<(u32, u64), &'static str> {
    let depth = u32::try_from(opt(m.cmdline, "depth", 4))
        .unwrap_or(4)
        .clamp(1, 32);
    let max_blocks = blk.capacity / (u64::from(CONT_BLOCK) / SECTOR);
    let blocks = opt(m.cmdline, "blocks", 1024).min(max_blocks).max(1);
    if blocks < u64::from(depth) * blk.nq as u64 * 2 {
        return Err("blocks must be at least 2 x depth x queues");
    }
    Ok((depth, blocks))
}

/// The `blk-cont` workload: block `seq mod blocks` gets a write of `seq`, then a read-back
/// that must match; `depth` chains in flight per queue until `stop()` says so, then drains
/// (giving up after `drain_us` without a completion).
pub fn cont_run(
    blk: &mut Blk,
    poll: bool,
    depth: u32,
    blocks: u64,
    start_seq: u64,
    drain_us: u64,
    mut stop: impl FnMut() -> bool,
) -> ContResult {
    const BLOCK: u32 = CONT_BLOCK;
    let nq = blk.nq;
    let drain = time::us_to_tsc(drain_us);
    // Per queue, per request id: (seq, is_read).
    let mut inflight = [[(0u64, false); 256]; 8];
    let mut outstanding = [0u32; 8];
    let mut seq = start_seq;
    let (mut writes, mut reads, mut io_errors, mut verify_errors) = (0u64, 0u64, 0u64, 0u64);
    let mut last = sys::rdtsc();
    let mut max_gap = 0u64;
    let mut stopping = false;
    let started = last;
    loop {
        if !stopping && stop() {
            stopping = true;
        }
        // Keep `depth` write-or-read chains per queue.
        for q in 0..nq {
            let mut submitted = false;
            while !stopping && outstanding[q] < depth {
                let sector = (seq % blocks) * u64::from(BLOCK) / SECTOR;
                let Some(buf) = blk.next_buffer(q) else { break };
                cont_fill(&mut buf[..BLOCK as usize], seq, sector);
                let Some(id) = blk.submit(q, Op::Write, sector, BLOCK, false) else {
                    break;
                };
                inflight[q][usize::from(id) % 256] = (seq, false);
                seq += 1;
                outstanding[q] += 1;
                submitted = true;
            }
            if submitted {
                blk.kick(q);
            }
        }
        if stopping && outstanding.iter().all(|n| *n == 0) {
            break;
        }
        devices::wait(poll, 5_000, || (0..nq).any(|q| blk.has_used(q)));
        let now = sys::rdtsc();
        let mut any = false;
        for q in 0..nq {
            let mut resubmitted = false;
            while let Some(d) = blk.complete(q) {
                any = true;
                outstanding[q] -= 1;
                let (s, is_read) = inflight[q][usize::from(d.id) % 256];
                let sector = (s % blocks) * u64::from(BLOCK) / SECTOR;
                if d.status != 0 {
                    io_errors += 1;
                    continue;
                }
                if is_read {
                    reads += 1;
                    if !cont_check(&blk.buffer(q, d.id)[..BLOCK as usize], s, sector) {
                        verify_errors += 1;
                        if verify_errors <= 3 {
                            crate::println!(
                                "baton-test-guest: blk-cont verify error seq={s} sector={sector}"
                            );
                        }
                    }
                } else {
                    writes += 1;
                    // Read the block back.
                    if let Some(id) = blk.submit(q, Op::Read, sector, BLOCK, false) {
                        inflight[q][usize::from(id) % 256] = (s, true);
                        outstanding[q] += 1;
                        resubmitted = true;
                    }
                }
            }
            if resubmitted {
                blk.kick(q);
            }
        }
        if any {
            max_gap = max_gap.max(now - last);
            last = now;
        } else if stopping && now - last > drain {
            break;
        }
    }
    let lost = outstanding.iter().map(|n| u64::from(*n)).sum::<u64>();
    ContResult {
        writes,
        reads,
        io_errors,
        verify_errors,
        max_gap_us: time::tsc_to_us(max_gap),
        // Time from the last completion to the end (a stall that never ended shows here).
        stall_us: if lost > 0 {
            time::tsc_to_us(sys::rdtsc() - last)
        } else {
            0
        },
        next_seq: seq,
        outstanding: lost,
        elapsed_ms: time::tsc_to_us(sys::rdtsc() - started) / 1000,
    }
}

/// Opens the `disk=K`th virtio-blk device for a continuous test (`queues=`, `mode=`).
pub fn open_cont(m: &Machine, poll: bool) -> Result<Blk, &'static str> {
    let queues = usize::try_from(opt(m.cmdline, "queues", 1)).unwrap_or(1);
    open(m, queues, poll)
}

/// `test=blk-cont [seconds=N] [blocks=N] [depth=N] [queues=N] [mode=irq|poll] [start=SEQ]
/// [drain=S]`:
/// block `seq mod blocks` (4 KiB) gets a write of `seq`, then a read-back that must match.
pub fn test_blk_cont(m: &Machine) {
    let poll = poll_mode(m.cmdline, false);
    let mut blk = match open_cont(m, poll) {
        Ok(b) => b,
        Err(e) => return report(m, "blk-cont", Err(e), format_args!("")),
    };
    let (depth, blocks) = match cont_options(m, &blk) {
        Ok(o) => o,
        Err(e) => return report(m, "blk-cont", Err(e), format_args!("")),
    };
    let mut stop = Stop::new(opt(m.cmdline, "seconds", 10));
    let drain_us = opt(m.cmdline, "drain", 10) * 1_000_000;
    let start = opt(m.cmdline, "start", 0);
    let r = cont_run(&mut blk, poll, depth, blocks, start, drain_us, || {
        stop.due()
    });
    report(
        m,
        "blk-cont",
        r.verdict(),
        format_args!(
            ",\"writes\":{},\"reads\":{},\"io_errors\":{},\"verify_errors\":{},\"max_gap_us\":{},\"stall_us\":{},\"next_seq\":{},\"blocks\":{blocks},\"depth\":{depth},\"queues\":{},\"mode\":\"{}\",\"stopped_by\":\"{}\",\"outstanding\":{},\"elapsed_ms\":{}",
            r.writes,
            r.reads,
            r.io_errors,
            r.verify_errors,
            r.max_gap_us,
            r.stall_us,
            r.next_seq,
            blk.nq,
            if poll { "poll" } else { "irq" },
            stop.reason,
            r.outstanding,
            r.elapsed_ms,
        ),
    );
}

/// Latency samples (TSC ticks).
static mut SAMPLES: [u64; 100_000] = [0; 100_000];
/// Time spent in the notify write of each request (TSC ticks).
static mut KICKS: [u64; 100_000] = [0; 100_000];

/// `test=blk-lat mode=poll|irq n=N`: N sequential 4 KiB reads at queue depth 1.
pub fn test_blk_lat(m: &Machine) {
    let poll = poll_mode(m.cmdline, true);
    let mut blk = match open(m, 1, poll) {
        Ok(b) => b,
        Err(e) => return report(m, "blk-lat", Err(e), format_args!("")),
    };
    // SAFETY: only the BSP runs tests; nothing else touches SAMPLES.
    let ptr = &raw mut SAMPLES;
    // SAFETY: as above: the only reference to SAMPLES.
    let samples = unsafe { &mut *ptr };
    let kptr = &raw mut KICKS;
    // SAFETY: as above: the only reference to KICKS.
    let kicks = unsafe { &mut *kptr };
    let n = usize::try_from(opt(m.cmdline, "n", 1000))
        .unwrap_or(1000)
        .clamp(1, samples.len());
    let range = (blk.capacity / 8).max(1);
    let mut io_errors = 0u64;
    let mut timeouts = 0u64;
    let irqs0 = sys::irq_count();
    for (i, s) in samples.iter_mut().enumerate().take(n) {
        let sector = (i as u64 % range) * 8;
        let t0 = sys::rdtsc();
        if blk.submit(0, Op::Read, sector, 4096, false).is_none() {
            io_errors += 1;
            break;
        }
        let k0 = sys::rdtsc();
        blk.kick(0);
        kicks[i] = sys::rdtsc() - k0;
        let end = t0 + time::us_to_tsc(5_000_000);
        let done = loop {
            if let Some(d) = blk.complete(0) {
                break Some(d);
            }
            if sys::rdtsc() > end {
                break None;
            }
            devices::wait(poll, 1_000_000, || blk.has_used(0));
        };
        *s = sys::rdtsc() - t0;
        match done {
            Some(d) if d.status == 0 => {}
            Some(_) => io_errors += 1,
            None => {
                timeouts += 1;
                break;
            }
        }
    }
    let irqs = sys::irq_count() - irqs0;
    let v = &mut samples[..n];
    v.sort_unstable();
    let kv = &mut kicks[..n];
    kv.sort_unstable();
    let ns = |t: u64| {
        u64::try_from(u128::from(t) * 1_000_000_000 / u128::from(time::tsc_hz().max(1)))
            .unwrap_or(0)
    };
    let kick = ns(devices::percentile(kv, 50));
    let (median, p99, min, max) = (
        ns(devices::percentile(v, 50)),
        ns(devices::percentile(v, 99)),
        ns(v[0]),
        ns(v[n - 1]),
    );
    let result = if timeouts > 0 {
        Err("request timed out")
    } else if io_errors > 0 {
        Err("I/O errors")
    } else {
        Ok(())
    };
    report(
        m,
        "blk-lat",
        result,
        format_args!(
            ",\"mode\":\"{}\",\"n\":{n},\"io_bytes\":4096,\"median_us\":{}.{},\"p99_us\":{}.{},\"min_us\":{}.{},\"max_us\":{}.{},\"kick_median_us\":{}.{},\"irqs\":{irqs},\"io_errors\":{io_errors}",
            if poll { "poll" } else { "irq" },
            median / 1000,
            median % 1000 / 100,
            p99 / 1000,
            p99 % 1000 / 100,
            min / 1000,
            min % 1000 / 100,
            max / 1000,
            max % 1000 / 100,
            kick / 1000,
            kick % 1000 / 100,
        ),
    );
}

/// Programs queue 0 badly (`size` instead of a power of two, or the descriptor table at
/// `bad_desc`), sets DRIVER_OK and returns the status read back.
fn misprogram(
    f: super::pci::Function,
    size: u16,
    bad_desc: Option<u64>,
) -> Result<u8, &'static str> {
    let mut dev = VirtioPci::new(f).map_err(|_| "transport")?;
    dev.reset();
    dev.negotiate(0).map_err(|_| "features")?;
    let q = dev
        .setup_queue(0, size, true, true)
        .map_err(|_| "queue setup")?;
    if let Some(addr) = bad_desc {
        dev.set_queue_desc(q.index, addr);
    }
    let _ = dev.driver_ok();
    let s = dev.status();
    dev.set_status(0);
    Ok(s)
}

/// `test=virtio-bad [disk=K]`: a queue size of 3, then a descriptor table beyond RAM, must
/// each end in NEEDS_RESET; after a reset the device is set up correctly and reads.
pub fn test_virtio_bad(m: &Machine) {
    let nth = usize::try_from(opt(m.cmdline, "disk", 0)).unwrap_or(0);
    let Some(f) = devices::find(devices::VIRTIO_BLK, nth) else {
        return report(
            m,
            "virtio-bad",
            Err("no virtio-blk device"),
            format_args!(""),
        );
    };
    let beyond = ((m.mem_mib + 64) << 20).max(0x8000_0000);
    let bad_size = misprogram(f, 3, None);
    let bad_addr = misprogram(f, 16, Some(beyond));
    // Recovery: a correct set-up and one read.
    let recovered = match Blk::new(f, 1, true) {
        Ok(mut blk) => {
            let mut out = [0u32; 8];
            let mut st = None;
            if blk.submit(0, Op::Read, 0, 4096, true).is_some() {
                out[0] = 1;
                drain(&mut blk, true, &mut out, 5_000_000, |_, _, _, s| {
                    st = Some(s)
                });
            }
            st == Some(0)
        }
        Err(_) => false,
    };
    let nr = |r: &Result<u8, &str>| r.as_ref().is_ok_and(|s| s & status::NEEDS_RESET != 0);
    let st = |r: &Result<u8, &str>| r.as_ref().map_or(-1, |s| i32::from(*s));
    let result = if !nr(&bad_size) {
        Err("queue size 3: no NEEDS_RESET")
    } else if !nr(&bad_addr) {
        Err("ring beyond RAM: no NEEDS_RESET")
    } else if !recovered {
        Err("device did not work after reset")
    } else {
        Ok(())
    };
    report(
        m,
        "virtio-bad",
        result,
        format_args!(
            ",\"bad_size_status\":{},\"bad_addr_status\":{},\"bad_addr\":{beyond},\"needs_reset_bad_size\":{},\"needs_reset_bad_addr\":{},\"recovered\":{recovered}",
            st(&bad_size),
            st(&bad_addr),
            nr(&bad_size),
            nr(&bad_addr),
        ),
    );
}
