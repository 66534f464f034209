//! `./bench.sh boot`: exec → ready line of the test guest on baton-vmm and on QEMU booting the
//! same guest by PVH direct boot in each of its set-ups (`-M microvm` with qboot, QEMU's
//! fast-boot machine, and `-M pc` with SeaBIOS; `-accel kvm` and `-accel tcg`), median of N runs
//! each; the ratio is against the fastest QEMU set-up. Plus baton-vmm's RSS beyond guest RAM.

use std::time::Duration;

use baton_tests::bench::round;
use baton_tests::boot::{baton_cmd, median, qemu_available, qemu_cmd, timed_boot};
use serde_json::json;

/// QEMU's set-ups: (accel, machine). microvm without x-option-roms=off: QEMU's PVH `-kernel`
/// loader is an option ROM, and without it the guest does not start.
const PEERS: [(&str, &str); 4] = [
    ("kvm", "microvm,pit=off,pic=off,rtc=off"),
    ("kvm", "pc"),
    ("tcg", "microvm,pit=off,pic=off,rtc=off"),
    ("tcg", "pc"),
];

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
    let ours_ms = median(&mut ours);
    eprintln!("baton-vmm boot runs (ms): {ours:.1?}");
    anyhow::ensure!(
        qemu_available(),
        "qemu-system-x86_64 is not installed: no peer"
    );
    let mut peers = Vec::new();
    for (accel, machine) in PEERS {
        let mut times = Vec::new();
        for _ in 0..runs {
            let b = timed_boot(qemu_cmd(accel, machine, 1, 256, "test=boot"), timeout)?;
            times.push(b.ready_ms);
        }
        eprintln!("qemu -accel {accel} -M {machine} boot runs (ms): {times:.1?}");
        peers.push((
            format!("qemu -accel {accel} -M {machine} -kernel (PVH)"),
            median(&mut times),
        ));
    }
    let (fastest, fastest_ms) = peers
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .cloned()
        .unwrap_or_default();
    for (peer, ms) in &peers {
        println!(
            "{}",
            json!({"bench": "boot-to-ready", "unit": "ms", "ours": round(ours_ms, 2),
                   "peer": peer, "peer_value": round(*ms, 2), "ratio": round(ms / ours_ms, 2),
                   "runs": runs, "fastest_peer": *peer == fastest})
        );
    }
    eprintln!(
        "boot: baton-vmm {ours_ms:.1} ms, fastest QEMU ({fastest}) {fastest_ms:.1} ms: x{:.1}",
        fastest_ms / ours_ms
    );
    let rss_kib = median(&mut rss);
    println!(
        "{}",
        json!({"bench": "vmm-rss-beyond-guest-ram", "unit": "KiB", "ours": rss_kib,
               "peer": "none", "peer_value": null, "ratio": null})
    );
    Ok(())
}
