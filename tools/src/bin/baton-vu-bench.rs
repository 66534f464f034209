//! baton-vu-bench: drives a vhost-user back-end with the host-side driver and prints one JSON
//! line of results.
//!
//! `baton-vu-bench blk --socket S --op randread --bs 4096 --qd 32 --queues 2 --seconds 5`
//! (`--qd` is per queue; each queue runs on its own thread.)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_tests::vhost_user::blk::{BlkDriver, BlkOptions, S_OK};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "baton-vu-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Op {
    Randread,
    Randwrite,
    Read,
    Write,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmark a vhost-user-blk back-end.
    Blk {
        /// vhost-user socket.
        #[arg(long)]
        socket: PathBuf,
        /// Access pattern.
        #[arg(long, value_enum, default_value_t = Op::Randread)]
        op: Op,
        /// Block size in bytes (multiple of 512).
        #[arg(long, default_value_t = 4096)]
        bs: u32,
        /// Requests in flight per queue.
        #[arg(long, default_value_t = 32)]
        qd: u16,
        /// Queues (one thread each).
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Duration.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Ask for INFLIGHT_SHMFD.
        #[arg(long)]
        inflight: bool,
    },
}

struct Stats {
    ios: u64,
    errors: u64,
    lat_ns: u128,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn main() -> anyhow::Result<()> {
    let Cmd::Blk {
        socket,
        op,
        bs,
        qd,
        queues,
        seconds,
        inflight,
    } = Cli::parse().cmd;
    if bs == 0 || bs % 512 != 0 {
        bail!("--bs must be a non-zero multiple of 512");
    }
    let qd = qd.max(1);
    let queue_size = (qd.saturating_mul(3)).next_power_of_two().clamp(16, 1024);
    let mem = (16u64 << 20) + u64::from(queues) * u64::from(qd) * (u64::from(bs) + 4096);
    let opts = BlkOptions {
        queues,
        queue_size,
        mem_size: mem.max(64 << 20),
        max_io: bs,
        slots: qd,
        inflight,
        ..BlkOptions::default()
    };
    let mut d = BlkDriver::connect(&socket, opts)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let sectors = d.capacity;
    let per_io = u64::from(bs / 512);
    if sectors < per_io {
        bail!("disk of {sectors} sectors is smaller than one block");
    }
    let blocks = sectors / per_io;
    let write = matches!(op, Op::Randwrite | Op::Write);
    let random = matches!(op, Op::Randread | Op::Randwrite);
    let dur = Duration::from_secs_f64(seconds);
    let qs = std::mem::take(&mut d.queues);
    let start = Instant::now();
    let threads: Vec<_> = qs
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || -> anyhow::Result<Stats> {
                q.collect_data = false;
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (qi as u64 + 1);
                let mut seq = (blocks / queues.max(1) as u64) * qi as u64;
                let mut st = Stats {
                    ios: 0,
                    errors: 0,
                    lat_ns: 0,
                };
                let mut submitted_at = std::collections::HashMap::new();
                let end = Instant::now() + dur;
                let mut tag = 0u64;
                loop {
                    let now = Instant::now();
                    let more = now < end;
                    if more {
                        while q.in_flight() < usize::from(qd) {
                            let blk = if random {
                                xorshift(&mut rng) % blocks
                            } else {
                                seq % blocks
                            };
                            seq += 1;
                            q.submit_io(write, blk * per_io, bs, tag)?;
                            submitted_at.insert(tag, Instant::now());
                            tag += 1;
                        }
                        q.kick()?;
                    } else if q.in_flight() == 0 {
                        break;
                    }
                    for c in q.wait(Duration::from_secs(10))? {
                        if c.status == S_OK {
                            st.ios += 1;
                        } else {
                            st.errors += 1;
                        }
                        if let Some(t) = submitted_at.remove(&c.tag) {
                            st.lat_ns += t.elapsed().as_nanos();
                        }
                    }
                }
                Ok(st)
            })
        })
        .collect();
    let mut total = Stats {
        ios: 0,
        errors: 0,
        lat_ns: 0,
    };
    for t in threads {
        let s = t
            .join()
            .map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
        total.ios += s.ios;
        total.errors += s.errors;
        total.lat_ns += s.lat_ns;
    }
    let secs = start.elapsed().as_secs_f64();
    let iops = total.ios as f64 / secs;
    let mbps = iops * f64::from(bs) / 1e6;
    let lat_us = if total.ios > 0 {
        total.lat_ns as f64 / total.ios as f64 / 1000.0
    } else {
        0.0
    };
    let out = serde_json::json!({
        "op": format!("{op:?}").to_lowercase(),
        "bs": bs, "qd": qd, "queues": queues, "seconds": secs,
        "ios": total.ios, "errors": total.errors,
        "iops": iops.round(), "mbps": (mbps * 10.0).round() / 10.0, "lat_avg_us": (lat_us * 10.0).round() / 10.0,
    });
    println!("{out}");
    if total.errors > 0 {
        bail!("{} requests failed", total.errors);
    }
    Ok(())
}
