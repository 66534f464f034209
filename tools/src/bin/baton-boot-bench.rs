//! `./bench.sh boot`: exec → ready line of the test guest on baton-vmm and on QEMU
//! (`-accel kvm`, same guest), median of N runs each; plus baton-vmm's RSS beyond guest RAM.

use std::time::Duration;

use baton_tests::bench::round;
use baton_tests::boot::{baton_cmd, median, qemu_available, qemu_cmd, timed_boot};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let timeout = Duration::from_secs(60);
    let mut ours = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        let b = timed_boot(baton_cmd(1, "256M", "test=boot"), timeout)?;
        anyhow::ensure!(b.exit_code == Some(0), "baton-vmm exited {:?}", b.exit_code);
        ours.push(b.ready_ms);
        rss.extend(b.rss_beyond_ram_kib.map(|k| k as f64));
    }
    let mut peer = Vec::new();
    if qemu_available() {
        for _ in 0..runs {
            match timed_boot(qemu_cmd("kvm", 1, 256, "test=boot"), timeout) {
                Ok(b) => peer.push(b.ready_ms),
                Err(e) => eprintln!("qemu -accel kvm failed: {e}"),
            }
        }
    }
    let ours_ms = median(&mut ours);
    let peer_ms = median(&mut peer);
    eprintln!("baton-vmm boot runs (ms): {ours:.1?}");
    eprintln!("qemu -accel kvm boot runs (ms): {peer:.1?}");
    let ratio = if ours_ms > 0.0 && peer_ms > 0.0 {
        peer_ms / ours_ms
    } else {
        0.0
    };
    println!(
        "{}",
        json!({"bench": "boot-to-ready", "unit": "ms", "ours": round(ours_ms, 2),
               "peer": "qemu-kvm", "peer_value": round(peer_ms, 2), "ratio": round(ratio, 2),
               "runs": runs, "goal_ms": 50})
    );
    let rss_kib = median(&mut rss);
    println!(
        "{}",
        json!({"bench": "vmm-rss-beyond-guest-ram", "unit": "KiB", "ours": rss_kib,
               "peer": "none", "peer_value": null, "ratio": null})
    );
    Ok(())
}
