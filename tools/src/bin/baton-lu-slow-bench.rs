//! `./bench.sh live-update-slow`: the blackout of a live update while every disk request takes
//! 20 ms, with the rings drained (the VMM waits for the requests in flight: `drain=on`) and not
//! (GET_VRING_BASE_INFLIGHT: they go over in the inflight region), in the same run.
//!
//! The slow disk is outside baton-blk: `tests/slowfs.py`, a FUSE file whose every read and
//! write waits 20 ms (`--delay-ms`), under baton-blk `--direct`. It completes about one
//! request at a time (the kernel serializes direct writes to one FUSE file), so draining 16
//! requests waits for up to 16 delays, as a disk with a queue of slow requests would. The test guest (2 vCPUs,
//! 256 MiB) runs `blk-cont depth=16` (verified writes, 16 in flight) on it; each mode boots its
//! own VM and swaps it `--swaps` times (default 100), 100 ms apart. Figures: the old VMM's pause →
//! ack (`blackout_us` of the report), p50 / p99 / max (p99 only over ≥ 100 swaps), and the guest's and the host's checks (nothing lost: the guest's
//! result with no I/O error and nothing outstanding, every block of the backing file holding a
//! write the guest completed). The ratio is drained / not drained (> 1: not draining is
//! faster). One JSON line per figure.
//!
//! Usage: baton-lu-slow-bench [--swaps N] [--delay-ms N]

use std::time::Duration;

use anyhow::Context;
use baton_tests::bench::{self, arg};
use baton_tests::blk::tmpdir;
use baton_tests::boot::{baton_cmd, percentile};
use baton_tests::harness::{TempDir, result_json};
use baton_tests::services::{Vmm, start_blk, verify_blk_cont_image};
use baton_tests::slowfs::SlowDisk;
use serde_json::json;

const T: Duration = Duration::from_secs(60);
const BLOCKS: usize = 1024;

/// Blackouts (ms) of `swaps` live updates of a VM on `slow`, with `drain=on` if `drain`.
fn swaps(slow: &SlowDisk, swaps: usize, drain: bool) -> anyhow::Result<Vec<f64>> {
    let dir = TempDir::new(if drain { "lu-slow-drain" } else { "lu-slow" });
    let sock = dir.join("blk.sock");
    let blk = start_blk(&slow.image(), &sock, &["--direct"])?;
    let mut c = baton_cmd(
        2,
        "256M",
        &format!("test=blk-cont seconds=0 blocks={BLOCKS} depth=16"),
    );
    c.args(baton_tests::local_users::vmm_user_args());
    let drain_opt = if drain { ",drain=on" } else { "" };
    c.arg("--disk")
        .arg(format!("socket={}{drain_opt}", sock.display()));
    let mut vmm = Vmm::boot(c, dir.join("vmm.api"))?;
    vmm.proc
        .wait_line(T, |l| l.contains("ready"))
        .context("the guest did not start")?;
    std::thread::sleep(Duration::from_millis(300));
    let mut out = Vec::new();
    for n in 0..swaps {
        let (new, dest) = Vmm::incoming(&dir.0, n)?;
        let report = vmm
            .live_update(&dest)
            .with_context(|| format!("swap {n}"))?;
        let suspended = report["suspended"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        anyhow::ensure!(
            suspended != drain,
            "swap {n}: the rings were {} drained: {report}",
            if drain { "not" } else { "" }
        );
        out.push(report["blackout_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        anyhow::ensure!(vmm.proc.wait_exit(T) == Some(0), "old VMM of swap {n}");
        vmm = new;
        std::thread::sleep(Duration::from_millis(100));
    }
    vmm.proc.send(b"q")?;
    anyhow::ensure!(
        vmm.proc.wait_exit(T) == Some(0),
        "the last VMM did not exit 0"
    );
    let r = result_json(&vmm.proc.seen).context("no result from the guest")?;
    for k in ["io_errors", "verify_errors", "outstanding"] {
        anyhow::ensure!(r[k] == 0, "{k}: {r}");
    }
    anyhow::ensure!(r["result"] == "pass", "{r}");
    drop(blk);
    verify_blk_cont_image(&slow.backing, BLOCKS)?;
    eprintln!(
        "{} swaps, {}: guest {} verified writes, 0 errors, 0 outstanding; backing file checked",
        swaps,
        if drain { "drained" } else { "not drained" },
        r["writes"]
    );
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let n = arg("--swaps", 100);
    let delay = u32::try_from(arg("--delay-ms", 20)).unwrap_or(20);
    bench::require_kvm_and_guest()?;
    let fuse_dir = tmpdir("lu-slow-bench");
    let slow = SlowDisk::mount(&fuse_dir, 16 << 20, delay, false);
    let mut fast = swaps(&slow, n, false)?;
    let mut drained = swaps(&slow, n, true)?;
    drop(slow);
    let _ = std::fs::remove_dir_all(&fuse_dir);
    let mut rows = vec![("p50", 50.0), ("max", 100.0)];
    if n >= 100 {
        rows.insert(1, ("p99", 99.0));
    }
    for (what, p) in rows {
        let ours = percentile(&mut fast, p);
        let peer = percentile(&mut drained, p);
        println!(
            "{}",
            json!({
                "bench": format!("live-update blackout with {delay} ms disk requests in flight, {what} of {n} swaps"),
                "unit": "ms",
                "ours": bench::round(ours, 3),
                "peer": "the same VMM and back-end draining (drain=on)",
                "peer_value": bench::round(peer, 3),
                "ratio": bench::round(peer / ours, 2),
            })
        );
    }
    Ok(())
}
