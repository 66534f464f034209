//! Live update with qemu-storage-daemon (qsd) as the blk back-end instead of baton-blk.
//!
//! baton-blk completes its in-flight requests before it answers GET_VRING_BASE; qsd does not.
//! It closes the ring's call fd at GET_VRING_BASE, so the first request completing afterwards
//! fails to notify and breaks the connection, and the requests completing after it never
//! reach the used ring; if the old VMM hangs up at once, even the first can complete after the
//! new VMM has taken the ring over. The guest lost requests that way (seen: 3 requests never
//! completed and the disk stalled until the guest gave up). The guest here keeps verified
//! writes in flight through every swap; at the end nothing may be missing, failed or wrong,
//! in the guest or on disk. See `baton_vmm::virtio::drain` for what the old VMM does about it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use baton_tests::boot::{baton_cmd, percentile};
use baton_tests::harness::{TempDir, can_run, result_json, wait_until};
use baton_tests::local_users::vmm_user_args;
use baton_tests::services::{Vmm, blk_cont_max_seq, start_qsd_blk, verify_blk_cont_image};

const T: Duration = Duration::from_secs(30);

/// One test at a time: each keeps both of the machine's cores busy.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Swaps in a row.
const SWAPS: usize = 20;

/// Blocks the guest cycles through (4 KiB each).
const BLOCKS: usize = 1024;

/// Requests the guest keeps in flight: deeper than blk-cont's default (4), so that qsd has
/// several in flight whenever the old VMM stops the ring.
const DEPTH: u32 = 16;

/// The outgoing phase of a live-update report named `prefix ...`, in microseconds.
fn phase_us(report: &serde_json::Value, prefix: &str) -> Option<f64> {
    report["outgoing"].as_array()?.iter().find_map(|p| {
        p["name"]
            .as_str()?
            .starts_with(prefix)
            .then(|| p["micros"].as_f64())?
    })
}

/// Boots the guest writing (and verifying) its disk on a qemu-storage-daemon export, limited
/// to `iops` when given, swaps the VMM [`SWAPS`] times, and checks that every request
/// completed, without error, and that the image verifies from the host.
fn swaps_on_qsd(test: &str, iops: Option<u32>) {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    if !can_run(test) {
        return;
    }
    let dir = TempDir::new("lu-qsd");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = dir.join("qsd.sock");
    // No skip: a missing qemu-storage-daemon fails the test.
    let _qsd = start_qsd_blk(&img, &sock, 1, iops).unwrap();
    let mut c = baton_cmd(
        2,
        "256M",
        &format!("test=blk-cont seconds=0 blocks={BLOCKS} depth={DEPTH}"),
    );
    c.args(vmm_user_args());
    c.arg("--disk")
        .arg(format!("socket={},queues=1", sock.display()));
    let mut vmm = Vmm::boot(c, dir.join("vmm.api")).unwrap();
    assert!(
        vmm.proc.wait_line(T, |l| l.contains("ready")).is_some(),
        "{}",
        vmm.proc.transcript()
    );
    // The writes get going before the first swap, and again between swaps: the image shows
    // a higher sequence number.
    let mut seq = 0;
    let mut wait_writes = |after: &str| {
        seq = wait_until(T, || blk_cont_max_seq(&img, BLOCKS).filter(|&s| s > seq))
            .unwrap_or_else(|| panic!("no write reached the disk {after}"));
    };
    wait_writes("before the first swap");
    let mut blackouts = Vec::new();
    let mut waits = Vec::new();
    for n in 0..SWAPS {
        let (new, dest) = Vmm::incoming(&dir.0, n).unwrap();
        let report = vmm
            .live_update(&dest)
            .unwrap_or_else(|e| panic!("swap {n}: {e}"));
        blackouts.push(report["blackout_us"].as_f64().unwrap() / 1000.0);
        if let Some(us) = phase_us(&report, "wait_used") {
            waits.push(us / 1000.0);
        }
        assert_eq!(
            vmm.proc.wait_exit(2 * T),
            Some(0),
            "old VMM exits 0 after swap {n}"
        );
        vmm = new;
        wait_writes(&format!("after swap {n}"));
    }
    vmm.proc.send(b"q").unwrap();
    assert_eq!(
        vmm.proc.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        vmm.proc.transcript()
    );
    let r = result_json(&vmm.proc.seen).unwrap_or_else(|| panic!("{}", vmm.proc.transcript()));
    eprintln!(
        "{test}: {SWAPS} swaps, blackout p50 {:.2} ms, max {:.2} ms; wait for in-flight \
         completions p50 {:.3} ms, max {:.3} ms; guest: {r}",
        percentile(&mut blackouts, 50.0),
        percentile(&mut blackouts, 100.0),
        percentile(&mut waits, 50.0),
        percentile(&mut waits, 100.0),
    );
    assert_eq!(r["outstanding"], 0, "requests never completed: {r}");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert_eq!(r["verify_errors"], 0, "{r}");
    assert_eq!(r["result"], "pass", "{r}");
    assert!(r["writes"].as_u64().unwrap() > 1000, "{r}");
    let written = verify_blk_cont_image(&img, BLOCKS).unwrap();
    assert!(written > 0);
}

#[test]
fn twenty_swaps_under_verified_writes_on_qemu_storage_daemon() {
    swaps_on_qsd(
        "twenty_swaps_under_verified_writes_on_qemu_storage_daemon",
        None,
    );
}

/// At 5000 requests/s (reads and writes) the guest's 16 requests are in flight at nearly
/// every swap; the old VMM waits for them (about 3 ms).
#[test]
fn twenty_swaps_with_requests_always_in_flight_on_qemu_storage_daemon() {
    swaps_on_qsd(
        "twenty_swaps_with_requests_always_in_flight_on_qemu_storage_daemon",
        Some(5000),
    );
}
