//! Live updates that do not wait for the disk: baton-blk on a disk whose every request takes
//! 20 ms (`tests/slowfs.py`, FUSE, outside baton-blk), the test guest writing and verifying it
//! 16 requests deep, ten swaps and a rollback after the state was sent. baton-blk and baton-vmm negotiate GET_VRING_BASE_INFLIGHT:
//! every swap stops the disk's ring without draining (the report names the socket under
//! `suspended`), the requests in flight go over in the inflight region and complete in the
//! new VMM (or in the old one after the rollback). Nothing is lost, duplicated or corrupted: the guest's verified writes pass with
//! nothing outstanding, and the backing file holds what the guest completed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use baton_tests::blk::tmpdir;
use baton_tests::boot::{baton_cmd, percentile};
use baton_tests::harness::{Need, Proc, TempDir, bin, can_run_with, result_json, wait_until};
use baton_tests::local_users::vmm_user_args;
use baton_tests::services::{Vmm, start_blk, verify_blk_cont_image};
use baton_tests::slowfs::SlowDisk;

const T: Duration = Duration::from_secs(30);
const BLOCKS: usize = 1024;

/// The guest writing and verifying a 20 ms disk, 16 requests deep, on baton-blk (`blk_args`)
/// over the slow disk mounted in `fuse_dir`, its VMM booted in `dir`.
struct SlowVm {
    slow: SlowDisk,
    sock: std::path::PathBuf,
    blk: Proc,
    vmm: Vmm,
}

impl SlowVm {
    fn start(dir: &TempDir, fuse_dir: &std::path::Path, blk_args: &[&str]) -> SlowVm {
        let slow = SlowDisk::mount(fuse_dir, 16 << 20, 20, false);
        let sock = dir.join("blk.sock");
        let blk = start_blk(&slow.image(), &sock, blk_args).unwrap();
        let mut c = baton_cmd(
            2,
            "256M",
            &format!("test=blk-cont seconds=0 blocks={BLOCKS} depth=16"),
        );
        c.args(vmm_user_args());
        c.arg("--disk").arg(format!("socket={}", sock.display()));
        let mut vmm = Vmm::boot(c, dir.join("vmm.api")).unwrap();
        assert!(
            vmm.proc.wait_line(T, |l| l.contains("ready")).is_some(),
            "{}",
            vmm.proc.transcript()
        );
        std::thread::sleep(Duration::from_millis(300));
        SlowVm {
            slow,
            sock,
            blk,
            vmm,
        }
    }
}

/// A live update whose new VMM exits once it has the state (after the old one suspended the
/// disk's ring with requests in flight): the old VMM rolls back, restarting the ring with its
/// inflight region, and the requests complete there.
fn rollback_after_the_state(dir: &TempDir, vmm: &Vmm) {
    let sock = dir.join("incoming-fail.sock");
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--incoming")
        .arg(&sock)
        .arg("--api-socket")
        .arg(dir.join("vmm-fail.api"))
        .env("BATON_LIVE_UPDATE_FAIL", "exit-after-state");
    baton_tests::local_users::start_as_test_user(&mut c, &[], true);
    let mut new = Proc::spawn(c).unwrap();
    assert!(wait_until(T, || sock.exists().then_some(())).is_some());
    let err = vmm.live_update(&sock).unwrap_err().to_string();
    assert!(err.contains("rolled back"), "{err}");
    assert_ne!(new.wait_exit(T), Some(0));
    assert!(
        wait_until(T, || {
            (vmm.info().ok()?["devices"][0]["backend"] == "connected").then_some(())
        })
        .is_some(),
        "the disk did not come back after the rollback"
    );
    std::thread::sleep(Duration::from_millis(200));
}

#[test]
fn ten_swaps_with_20_ms_requests_in_flight_do_not_drain_and_lose_nothing() {
    if !can_run_with(
        "ten_swaps_with_20_ms_requests_in_flight",
        &[
            Need::Kvm,
            Need::Guest,
            Need::Root,
            Need::Program("fusermount"),
        ],
    ) {
        return;
    }
    let dir = TempDir::new("lu-slow");
    let fuse_dir = tmpdir("lu-slow-fuse");
    let SlowVm {
        slow,
        sock,
        blk,
        mut vmm,
    } = SlowVm::start(&dir, &fuse_dir, &["--direct"]);
    let mut blackouts = Vec::new();
    for n in 0..10 {
        if n == 5 {
            rollback_after_the_state(&dir, &vmm);
        }
        let (new, dest) = Vmm::incoming(&dir.0, n).unwrap();
        let report = vmm
            .live_update(&dest)
            .unwrap_or_else(|e| panic!("swap {n}: {e}"));
        assert_eq!(
            report["suspended"],
            serde_json::json!([sock.display().to_string()]),
            "swap {n}: the disk's ring stopped without draining: {report}"
        );
        blackouts.push(report["blackout_us"].as_f64().unwrap() / 1000.0);
        assert_eq!(
            vmm.proc.wait_exit(T),
            Some(0),
            "old VMM exits 0 after swap {n}"
        );
        vmm = new;
        std::thread::sleep(Duration::from_millis(200));
    }
    vmm.proc.send(b"q").unwrap();
    assert_eq!(
        vmm.proc.wait_exit(T * 2),
        Some(0),
        "{}",
        vmm.proc.transcript()
    );
    let r = result_json(&vmm.proc.seen).unwrap_or_else(|| panic!("{}", vmm.proc.transcript()));
    blackouts.sort_by(f64::total_cmp);
    eprintln!(
        "10 swaps with 20 ms requests in flight, not drained: blackout p50 {:.2} ms, max {:.2} ms; guest: {r}",
        percentile(&mut blackouts, 50.0),
        blackouts.last().copied().unwrap_or_default()
    );
    assert_eq!(r["result"], "pass", "{r}");
    for k in ["io_errors", "verify_errors", "outstanding"] {
        assert_eq!(r[k], 0, "{k}: {r}");
    }
    assert!(r["writes"].as_u64().unwrap() > 100, "{r}");
    drop(blk);
    let slow_backing = slow.backing.clone();
    drop(slow);
    assert!(verify_blk_cont_image(&slow_backing, BLOCKS).unwrap() > 0);
    let _ = std::fs::remove_dir_all(&fuse_dir);
}

/// A back-end that negotiates GET_VRING_BASE_INFLIGHT but does not record what it leaves in
/// flight (baton-blk `--test-suspend-unrecorded`): the old VMM sees the region short of the
/// requests between the used index and the base, waits for them as for a back-end that drains
/// (they never come: a suspended ring completes nothing) and rolls back past the deadline; the
/// VM keeps running in the old VMM. (The requests that back-end dropped are lost with it: the
/// used index cannot say which ones they were, completions come out of order.)
#[test]
fn a_backend_that_suspends_without_recording_makes_the_swap_roll_back() {
    if !can_run_with(
        "a_backend_that_suspends_without_recording",
        &[
            Need::Kvm,
            Need::Guest,
            Need::Root,
            Need::Program("fusermount"),
        ],
    ) {
        return;
    }
    let dir = TempDir::new("lu-slow-liar");
    let fuse_dir = tmpdir("lu-slow-liar-fuse");
    // (Bound, not `..`: the back-end must outlive the test.)
    let SlowVm {
        slow,
        mut vmm,
        blk: _blk,
        sock: _,
    } = SlowVm::start(&dir, &fuse_dir, &["--direct", "--test-suspend-unrecorded"]);
    let (mut new, dest) = Vmm::incoming(&dir.0, 0).unwrap();
    let err = vmm.live_update(&dest).unwrap_err().to_string();
    assert!(
        err.contains("rolled back") && err.contains("did not complete"),
        "{err}"
    );
    assert_ne!(new.proc.wait_exit(T), Some(0));
    assert!(
        wait_until(T, || {
            let i = vmm.info().ok()?;
            (i["state"] == "running" && i["devices"][0]["backend"] == "connected").then_some(())
        })
        .is_some(),
        "the VM does not run in the old VMM with its disk after the rollback"
    );
    let (code, _, err) = baton_tests::services::batonctl(&vmm.api, &["shutdown"]).unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(vmm.proc.wait_exit(T), Some(0), "{}", vmm.proc.transcript());
    drop(slow);
    let _ = std::fs::remove_dir_all(&fuse_dir);
}
