//! `./demo.sh`: baton's main job, end to end.
//!
//! Starts baton-blk on a disk image and baton-net-tap on a TAP inside a network namespace (under
//! baton-supervise, which keeps its TAP queue in an fd store across restarts), boots the test
//! guest on baton-vmm with both (2 vCPUs), and runs continuous verified disk writes and a
//! sequence-numbered UDP echo stream from the namespace. Under that load it swaps the VMM three
//! times (live update) and restarts each back-end once (SIGKILL; baton-blk started again by
//! hand, baton-net-tap by its supervisor). Prints a summary; the last line is one JSON object
//! with the figures.
//!
//! Nothing that touches the guest runs as root: baton-blk and baton-net-tap open their image
//! and TAP and bind their sockets, then drop to `nobody` (`--user`); the first baton-vmm opens
//! /dev/kvm and creates the RAM file and drops to `nobody` (`--user`),
//! and every new VMM of a live update is started as `nobody:kvm` (it reaches /dev/kvm through
//! the group). Only baton-supervise (the service manager's stand-in, which keeps the TAP
//! queue) and this program, the operator, stay root. `unprivileged` is measured: the uid of
//! every VMM and back-end process, read from /proc.
//!
//! Every figure is measured: `guest_ready` from the guest's `ready` line, `drain` (whether any
//! live update waited for the disk's requests in flight) from the reports, `backend_restarts`
//! from the last VMM's per-device reconnect counts (`vm.info`), the blackouts from the
//! live-update reports, the disk from the host once everything stopped. A figure that could
//! not be measured is `null` and a failure, never 0. Any failed check (a figure missing, an
//! old VMM that did not exit 0 after its live update, a guest test that did not pass, an I/O
//! error, a disk block that does not hold the last write the guest completed to it, a device
//! that did not reconnect exactly once) makes `"ok": false` with the `"reason"`, and the exit
//! status 1.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use baton_tests::bench::round;
use baton_tests::boot::baton_cmd;
use baton_tests::boot::percentile;
use baton_tests::harness::{TempDir, result_json};
use baton_tests::local_users::uid_of;
use baton_tests::netns::{self, Netns};
use baton_tests::services::{
    Vmm, blk_cont_seq, kill, service_pid, start_blk, start_supervised_net_tap_as,
    verify_blk_cont_image,
};
use baton_tests::udp::EchoStream;
use serde_json::{Map, Value};

const GUEST_IP: &str = "10.213.60.2";
const HOST_IP: &str = "10.213.60.1";
const LIVE_UPDATES: usize = 3;
/// The 4 KiB blocks the guest's `io-cont` cycles through (`blocks=`), and the host verifies.
const BLOCKS: usize = 1024;
/// The devices (disk, NIC), each of whose back-end is restarted once.
const DEVICES: usize = 2;

/// Every field of the JSON line besides `ok` and `reason`; one not measured is a failure.
const FIELDS: &[&str] = &[
    "guest_ready",
    "boot_ms",
    "guest_test_passed",
    "io_errors",
    "disk_writes_verified",
    "disk_blocks_verified_host",
    "udp_sent",
    "udp_echoed",
    "lost_packets",
    "lost_packets_during_live_updates",
    "lost_packets_at_net_restart",
    "duplicate_packets",
    "max_echo_gap_ms",
    "live_updates",
    "blackout_ms_p50",
    "blackout_ms_p99",
    "blackout_ms_max",
    "drain",
    "backend_restarts",
    "unprivileged",
];

/// The uid the services and the VMMs run as: `nobody`.
const DEMO_UID: u32 = 65534;

fn step(what: &str) {
    println!("== {what}");
}

/// The figures measured so far and the checks that failed.
#[derive(Default)]
struct Report {
    figures: Map<String, Value>,
    failures: Vec<String>,
}

impl Report {
    fn set(&mut self, field: &str, v: impl Into<Value>) {
        debug_assert!(FIELDS.contains(&field), "{field}");
        self.figures.insert(field.to_owned(), v.into());
    }

    /// Records a failure unless `ok`.
    fn check(&mut self, ok: bool, why: impl FnOnce() -> String) {
        if !ok {
            let why = why();
            println!("!! {why}");
            self.failures.push(why);
        }
    }
}

fn main() -> ExitCode {
    let mut report = Report::default();
    if let Err(e) = run(&mut report) {
        report.check(false, || format!("{e:#}"));
    }
    let missing: Vec<&str> = FIELDS
        .iter()
        .copied()
        .filter(|f| !report.figures.contains_key(*f))
        .collect();
    report.check(missing.is_empty(), || {
        format!("not measured: {}", missing.join(", "))
    });
    for f in missing {
        report.figures.insert(f.to_owned(), Value::Null);
    }
    let ok = report.failures.is_empty();
    let mut out = report.figures;
    out.insert("ok".to_owned(), ok.into());
    out.insert(
        "reason".to_owned(),
        if ok {
            Value::Null
        } else {
            report.failures.join("; ").into()
        },
    );
    println!("{}", Value::Object(out));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(report: &mut Report) -> anyhow::Result<()> {
    if let Some(why) = netns::unavailable() {
        anyhow::bail!("the demo {why}");
    }
    let dir = TempDir::new("demo");
    // /dev/kvm through its group; the directory of the sockets writable by the VMMs' user.
    let kvm_gid = nix::unistd::Group::from_name("kvm")?
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| anyhow::anyhow!("no kvm group: /dev/kvm cannot be reached unprivileged"))?;
    // The first VMM opens /dev/kvm as root before it drops; the new ones of the live updates
    // are started as nobody:kvm and reach it through the group.
    let vmm_user = DEMO_UID.to_string();
    let service_user = DEMO_UID.to_string();
    std::os::unix::fs::chown(&dir.0, Some(DEMO_UID), Some(kvm_gid))?;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700))?;
    let mut uids: Vec<(String, Option<u32>)> = Vec::new();
    let img = dir.join("disk.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    let blk_sock = dir.join("blk.sock");
    let net_sock = dir.join("net.sock");
    let tap = netns::unique_tap("demo");

    step(
        "starting baton-blk (64 MiB image) and baton-net-tap (TAP in a private namespace, under baton-supervise)",
    );
    let mut blk = start_blk(&img, &blk_sock, &["--user", &service_user])?;
    let ns = Netns::new("demo")?;
    ns.persistent_tap(&tap, &format!("{HOST_IP}/24"))?;
    let net = start_supervised_net_tap_as(&ns, &tap, &net_sock, &[], Some(DEMO_UID))?;

    step("booting the test guest on baton-vmm: 2 vCPUs, 256 MiB, one disk, one NIC");
    let mut c = baton_cmd(
        2,
        "256M",
        &format!("test=io-cont ip={GUEST_IP}/24 seconds=0 blocks={BLOCKS}"),
    );
    c.arg("--disk")
        .arg(format!("socket={}", blk_sock.display()))
        .arg("--net")
        .arg(format!("socket={}", net_sock.display()))
        // Drops to nobody once /dev/kvm, the kernel and the RAM file are open; this
        // program (root) keeps the API (batonctl) through --allow-uid 0.
        .args(["--user", &vmm_user, "--allow-uid", "0"]);
    c.stderr(baton_tests::services::log_file(&dir.join("vmm.api"))?);
    let t0 = Instant::now();
    let mut vmm = Vmm::boot(c, dir.join("vmm.api"))?;
    let ready = vmm
        .proc
        .wait_line(Duration::from_secs(30), |l| l.contains("ready"));
    report.set("guest_ready", ready.is_some());
    let Some(ready) = ready else {
        println!("{}", vmm.proc.transcript());
        anyhow::bail!("the guest printed no ready line within 30 s");
    };
    let boot_ms = t0.elapsed().as_secs_f64() * 1000.0;
    report.set("boot_ms", round(boot_ms, 2));
    println!("   guest | {ready}");
    println!("   ready {boot_ms:.1} ms after exec of baton-vmm");
    uids.push(("baton-vmm".into(), uid_of(vmm.proc.child.id())));
    uids.push(("baton-blk".into(), uid_of(blk.child.id())));
    uids.push((
        "baton-net-tap".into(),
        service_pid(&net).and_then(|p| uid_of(p.unsigned_abs())),
    ));
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
    // Whether any live update waited for the disk's requests in flight (baton-blk and baton-vmm
    // negotiate GET_VRING_BASE_INFLIGHT: they go over in the inflight region instead).
    let mut drained = false;
    let updates_from = echo.mark();
    for n in 0..LIVE_UPDATES {
        let (new, sock) =
            Vmm::incoming_as(&dir.0, n, &["--allow-uid", "0"], Some((DEMO_UID, kvm_gid)))?;
        let lu = vmm
            .live_update(&sock)
            .map_err(|e| anyhow::anyhow!("live update {}: {e:#}", n + 1))?;
        let ms = lu["blackout_us"].as_f64().ok_or_else(|| {
            anyhow::anyhow!("live update {}: no blackout_us in the report: {lu}", n + 1)
        })? / 1000.0;
        blackouts.push(ms);
        let disk = blk_sock.display().to_string();
        drained |= !lu["suspended"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s.as_str() == Some(disk.as_str())));
        let code = vmm.proc.wait_exit(Duration::from_secs(10));
        let old_pid = vmm.proc.child.id();
        println!(
            "== live update {}: old baton-vmm (pid {old_pid}) exited {code:?}; blackout {ms:.2} ms; new pid {}",
            n + 1,
            lu["new_pid"]
        );
        report.check(code == Some(0), || {
            format!(
                "live update {}: the old baton-vmm (pid {old_pid}) exited {code:?}, not 0",
                n + 1
            )
        });
        vmm = new;
        uids.push((
            format!("baton-vmm after live update {}", n + 1),
            uid_of(vmm.proc.child.id()),
        ));
        std::thread::sleep(Duration::from_millis(700));
    }
    let mut b = blackouts.clone();
    report.set("live_updates", blackouts.len());
    report.set("drain", drained);
    report.set("blackout_ms_p50", round(percentile(&mut b, 50.0), 2));
    report.set("blackout_ms_p99", round(percentile(&mut b, 99.0), 2));
    report.set(
        "blackout_ms_max",
        round(b.iter().copied().fold(f64::NAN, f64::max), 2),
    );

    let updates_to = echo.mark();
    step("restarting baton-blk (SIGKILL, then start again on the same socket)");
    kill(&mut blk, libc::SIGKILL);
    blk = start_blk(&img, &blk_sock, &["--user", &service_user])?;
    uids.push(("baton-blk after its restart".into(), uid_of(blk.child.id())));
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
    uids.push((
        "baton-net-tap after its restart".into(),
        service_pid(&net).and_then(|p| uid_of(p.unsigned_abs())),
    ));
    println!("   running as: {uids:?}");
    let unprivileged = uids.iter().all(|(_, u)| matches!(u, Some(u) if *u != 0));
    report.check(unprivileged, || {
        format!("a process ran as root or its uid could not be read: {uids:?}")
    });
    report.set("unprivileged", unprivileged);

    // The back-end restarts as the VMM counted them: each device's reconnects in vm.info.
    let info = vmm.info()?;
    let devices = info["devices"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("vm.info has no devices: {info}"))?;
    let mut restarts = 0;
    for d in devices {
        let n = d["reconnects"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("vm.info: a device without reconnects: {d}"))?;
        report.check(n == 1, || {
            format!(
                "device {} reconnected {n} times; its back-end was restarted once",
                d["name"]
            )
        });
        restarts += n;
    }
    report.check(devices.len() == DEVICES, || {
        format!("vm.info lists {} devices, not {DEVICES}", devices.len())
    });
    report.set("backend_restarts", restarts);

    let net_to = echo.mark();
    step("stopping: echo stream, then the guest workload ('q' on its console)");
    let stats = echo.stop()?;
    anyhow::ensure!(stats.sent > 0, "the echo stream sent no datagram");
    let lost_in_updates = stats.lost_between(updates_from, updates_to);
    let lost_in_net_restart = stats.lost_between(net_from, net_to);
    report.set("udp_sent", stats.sent);
    report.set("udp_echoed", stats.echoed);
    report.set("lost_packets", stats.lost);
    report.set("lost_packets_during_live_updates", lost_in_updates);
    report.set("lost_packets_at_net_restart", lost_in_net_restart);
    report.set("duplicate_packets", stats.duplicates);
    report.set("max_echo_gap_ms", round(stats.max_gap_ms, 2));
    vmm.proc.send(b"q")?;
    let code = vmm.proc.wait_exit(Duration::from_secs(60));
    report.check(code == Some(0), || {
        format!("the last baton-vmm exited {code:?}, not 0")
    });
    kill(&mut blk, libc::SIGTERM);
    drop(net); // SIGTERM to baton-supervise, which stops baton-net-tap and exits

    let r = result_json(&vmm.proc.seen)
        .ok_or_else(|| anyhow::anyhow!("the guest printed no result line"))?;
    println!("   guest | {r}");
    let count = |k: &str| {
        r[k].as_u64()
            .ok_or_else(|| anyhow::anyhow!("the guest's result has no {k}: {r}"))
    };
    let passed = r["result"] == "pass";
    let io_errors = count("io_errors")? + count("verify_errors")? + count("outstanding")?;
    let writes = count("writes")?;
    let next_seq = count("next_seq")?;
    report.set("guest_test_passed", passed);
    report.set("io_errors", io_errors);
    report.set("disk_writes_verified", writes);
    report.check(passed, || format!("the guest workload did not pass: {r}"));
    report.check(io_errors == 0, || {
        format!("{io_errors} I/O errors (failed, unverified or never completed requests)")
    });

    step("verifying the disk image from the host");
    let on_disk = verify_blk_cont_image(&img, BLOCKS)
        .and_then(|n| last_writes_on_disk(&img, next_seq).map(|()| n));
    match on_disk {
        Ok(n) => {
            println!("   {n} blocks hold the last write the guest completed to each");
            report.set("disk_blocks_verified_host", n);
        }
        Err(e) => report.check(false, || format!("disk image: {e:#}")),
    }

    println!(
        "== summary: boot {boot_ms:.1} ms; {writes} disk writes verified, {io_errors} I/O errors; \
         {} of {} datagrams echoed ({} lost: {lost_in_updates} during the live updates, \
         {lost_in_net_restart} around the baton-net-tap kill; \
         {} duplicated, largest echo gap {:.1} ms); \
         {} live updates (blackout p50 {} ms, p99 {} ms, max {} ms); \
         {restarts} back-end reconnects; last baton-vmm exited {code:?}",
        stats.echoed,
        stats.sent,
        stats.lost,
        stats.duplicates,
        stats.max_gap_ms,
        blackouts.len(),
        report.figures["blackout_ms_p50"],
        report.figures["blackout_ms_p99"],
        report.figures["blackout_ms_max"],
    );
    Ok(())
}

/// Checks that each of the first [`BLOCKS`] blocks of `img` holds the last of the writes
/// `0..next_seq` that went to it (write `s` goes to block `s % BLOCKS`), and that nothing was
/// written past them.
fn last_writes_on_disk(img: &Path, next_seq: u64) -> anyhow::Result<()> {
    let blocks = BLOCKS as u64;
    let data = std::fs::read(img)?;
    for (b, block) in (0u64..).zip(data.chunks_exact(4096)) {
        let want = (b < blocks && b < next_seq).then(|| b + (next_seq - 1 - b) / blocks * blocks);
        let unwritten = block.iter().all(|&x| x == 0);
        let got = blk_cont_seq(block);
        anyhow::ensure!(
            got == want && (want.is_some() || unwritten),
            "block {b} holds write {got:?}{}, expected {want:?}",
            if unwritten { " (zeros)" } else { "" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_tests::services::BLK_CONT_MARKER;

    /// An image as the guest leaves it after writes `0..next_seq`, with `stale` (block, seq)
    /// written over it.
    fn image(next_seq: u64, stale: Option<(u64, u64)>) -> (TempDir, std::path::PathBuf) {
        let mut data = vec![0u8; (BLOCKS + 4) * 4096];
        let mut put = |b: u64, seq: u64| {
            let at = usize::try_from(b).unwrap() * 4096;
            for (i, w) in [seq, b * 8, BLK_CONT_MARKER].into_iter().enumerate() {
                data[at + i * 8..at + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
        };
        for seq in 0..next_seq {
            put(seq % BLOCKS as u64, seq);
        }
        if let Some((b, seq)) = stale {
            put(b, seq);
        }
        let dir = TempDir::new("demo-unit");
        let img = dir.join("disk.img");
        std::fs::write(&img, data).unwrap();
        (dir, img)
    }

    #[test]
    fn last_writes_on_disk_accepts_what_the_guest_wrote() {
        for next_seq in [0, 1, 700, 1024, 3000] {
            let (_dir, img) = image(next_seq, None);
            last_writes_on_disk(&img, next_seq).unwrap();
        }
    }

    #[test]
    fn last_writes_on_disk_rejects_a_stale_missing_or_extra_block() {
        let (_dir, img) = image(3000, Some((5, 5 + 1024)));
        assert!(last_writes_on_disk(&img, 3000).is_err(), "stale block");
        let (_dir, img) = image(2999, None);
        assert!(
            last_writes_on_disk(&img, 3000).is_err(),
            "last write missing"
        );
        let (_dir, img) = image(700, Some((900, 900)));
        assert!(last_writes_on_disk(&img, 700).is_err(), "write never made");
    }
}
