//! `./demo.sh`: baton's main job, end to end.
//!
//! Starts baton-blk on a disk image and baton-net-tap on a TAP inside a network namespace (under
//! baton-supervise, which keeps its TAP queue in an fd store across restarts), boots the test
//! guest on baton-vmm with both (2 vCPUs), and runs continuous verified disk writes and a
//! sequence-numbered UDP echo stream from the namespace. Under that load it swaps the VMM three
//! times (live update) and restarts each back-end once (SIGKILL; baton-blk started again by
//! hand, baton-net-tap by its supervisor). Prints a summary; the last line is one JSON object
//! with the figures.

use std::time::{Duration, Instant};

use baton_tests::bench::round;
use baton_tests::boot::baton_cmd;
use baton_tests::boot::percentile;
use baton_tests::harness::{TempDir, result_json};
use baton_tests::netns::{self, Netns};
use baton_tests::services::{Vmm, kill, service_pid, start_blk, start_supervised_net_tap};
use baton_tests::udp::EchoStream;
use serde_json::json;

const GUEST_IP: &str = "10.213.60.2";
const HOST_IP: &str = "10.213.60.1";
const LIVE_UPDATES: usize = 3;

fn step(what: &str) {
    println!("== {what}");
}

fn main() -> anyhow::Result<()> {
    if let Some(why) = netns::unavailable() {
        anyhow::bail!("the demo {why}");
    }
    let dir = TempDir::new("demo");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    let blk_sock = dir.join("blk.sock");
    let net_sock = dir.join("net.sock");
    let tap = netns::unique_tap("demo");

    step(
        "starting baton-blk (64 MiB image) and baton-net-tap (TAP in a private namespace, under baton-supervise)",
    );
    let mut blk = start_blk(&img, &blk_sock, &[])?;
    let ns = Netns::new("demo")?;
    ns.persistent_tap(&tap, &format!("{HOST_IP}/24"))?;
    let net = start_supervised_net_tap(&ns, &tap, &net_sock, &[])?;

    step("booting the test guest on baton-vmm: 2 vCPUs, 256 MiB, one disk, one NIC");
    let mut c = baton_cmd(
        2,
        "256M",
        &format!("test=io-cont ip={GUEST_IP}/24 seconds=0"),
    );
    c.arg("--disk")
        .arg(format!("socket={}", blk_sock.display()))
        .arg("--net")
        .arg(format!("socket={}", net_sock.display()));
    c.stderr(baton_tests::services::log_file(&dir.join("vmm.api"))?);
    let t0 = Instant::now();
    let mut vmm = Vmm::boot(c, dir.join("vmm.api"))?;
    let ready = vmm
        .proc
        .wait_line(Duration::from_secs(30), |l| l.contains("ready"))
        .ok_or_else(|| anyhow::anyhow!("no ready line:\n{}", vmm.proc.transcript()))?;
    let boot_ms = t0.elapsed().as_secs_f64() * 1000.0;
    println!("   guest | {ready}");
    println!("   ready {boot_ms:.1} ms after exec of baton-vmm");
    // The echo stream starts once the guest's NIC is up (an unanswered first ARP would make
    // the namespace drop datagrams for seconds).
    vmm.proc
        .wait_line(Duration::from_secs(30), |l| {
            l.contains("io-cont net on cpu")
        })
        .ok_or_else(|| anyhow::anyhow!("the guest's NIC did not come up"))?;

    step("continuous I/O: verified disk writes in the guest, UDP echo every ms from the namespace");
    let echo = EchoStream::start(&ns, format!("{GUEST_IP}:7"), Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(1500));

    let mut blackouts = Vec::new();
    let updates_from = echo.mark();
    for n in 0..LIVE_UPDATES {
        let (new, sock) = Vmm::incoming(&dir.0, n)?;
        let report = vmm.live_update(&sock)?;
        let ms = report["blackout_us"].as_f64().unwrap_or(0.0) / 1000.0;
        blackouts.push(ms);
        let code = vmm.proc.wait_exit(Duration::from_secs(10));
        println!(
            "== live update {}: old baton-vmm (pid {}) exited {:?}; blackout {ms:.2} ms; new pid {}",
            n + 1,
            vmm.proc.child.id(),
            code,
            report["new_pid"]
        );
        vmm = new;
        std::thread::sleep(Duration::from_millis(700));
    }

    let updates_to = echo.mark();
    step("restarting baton-blk (SIGKILL, then start again on the same socket)");
    kill(&mut blk, libc::SIGKILL);
    blk = start_blk(&img, &blk_sock, &[])?;
    let t = vmm.wait_reconnects(0, 1)?;
    println!(
        "   disk reconnected {:.1} ms after baton-blk was started again",
        t.as_secs_f64() * 1000.0
    );
    std::thread::sleep(Duration::from_millis(700));

    let net_from = echo.mark();
    step(
        "restarting baton-net-tap (SIGKILL; baton-supervise starts it again with the TAP queue it kept)",
    );
    let pid = service_pid(&net).ok_or_else(|| anyhow::anyhow!("baton-net-tap is not running"))?;
    // SAFETY: kill(2) on baton-supervise's child, a process this program started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = vmm.wait_reconnects(1, 1)?;
    println!(
        "   NIC reconnected {:.1} ms after baton-net-tap was killed",
        t.as_secs_f64() * 1000.0
    );
    std::thread::sleep(Duration::from_millis(1000));

    let net_to = echo.mark();
    step("stopping: echo stream, then the guest workload ('q' on its console)");
    let stats = echo.stop()?;
    let lost_in_updates = stats.lost_between(updates_from, updates_to);
    let lost_in_net_restart = stats.lost_between(net_from, net_to);
    vmm.proc.send(b"q")?;
    let code = vmm.proc.wait_exit(Duration::from_secs(60));
    let result = result_json(&vmm.proc.seen);
    let r = result.clone().unwrap_or_default();
    if let Some(line) = vmm
        .proc
        .seen
        .iter()
        .rev()
        .find(|l| l.contains("\"result\""))
    {
        println!("   guest | {line}");
    }
    let count = |k: &str| r[k].as_u64().unwrap_or(0);
    let io_errors = count("io_errors") + count("verify_errors") + count("outstanding");
    let passed = r["result"] == "pass";
    kill(&mut blk, libc::SIGTERM);
    drop(net); // SIGTERM to baton-supervise, which stops baton-net-tap and exits

    let mut b = blackouts.clone();
    let (p50, p99) = (percentile(&mut b, 50.0), percentile(&mut b, 99.0));
    println!(
        "== summary: boot {boot_ms:.1} ms; {} disk writes verified, {io_errors} I/O errors; \
         {} of {} datagrams echoed ({} lost: {lost_in_updates} during the live updates, \
         {lost_in_net_restart} around the baton-net-tap kill; \
         {} duplicated, largest echo gap {:.1} ms); \
         {LIVE_UPDATES} live updates (blackout p50 {p50:.2} ms, p99 {p99:.2} ms); \
         2 back-end restarts; last baton-vmm exited {code:?}",
        count("writes"),
        stats.echoed,
        stats.sent,
        stats.lost,
        stats.duplicates,
        stats.max_gap_ms,
    );
    println!(
        "{}",
        json!({
            "guest_ready": true,
            "boot_ms": round(boot_ms, 2),
            "guest_test_passed": passed,
            "io_errors": io_errors,
            "disk_writes_verified": count("writes"),
            "udp_sent": stats.sent,
            "udp_echoed": stats.echoed,
            "lost_packets": stats.lost,
            "lost_packets_during_live_updates": lost_in_updates,
            "lost_packets_at_net_restart": lost_in_net_restart,
            "duplicate_packets": stats.duplicates,
            "max_echo_gap_ms": round(stats.max_gap_ms, 2),
            "live_updates": blackouts.len(),
            "blackout_ms_p50": round(p50, 2),
            "blackout_ms_p99": round(p99, 2),
            "backend_restarts": 2,
        })
    );
    anyhow::ensure!(
        passed && code == Some(0),
        "the guest workload did not pass: {r}"
    );
    Ok(())
}
