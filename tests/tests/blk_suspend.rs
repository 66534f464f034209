//! GET_VRING_BASE without draining (VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT, protocol
//! feature bit 20): baton-blk on a slow disk outside it (`tests/slowfs.py`, a FUSE file whose
//! every request takes 200 ms), driven by the host-side driver. A front-end that negotiated the
//! feature gets its ring stopped with requests still in flight, recorded in the inflight
//! region; nothing reaches the used ring while no front-end runs it; the next front-end with
//! the same region gets each of them completed exactly once, with the right data. Without the
//! feature, GET_VRING_BASE still drains.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::time::{Duration, Instant};

use baton_tests::blk::{Blk, pattern, tmpdir};
use baton_tests::harness::{Need, can_run_with, wait_until};
use baton_tests::slowfs::SlowDisk;
use baton_tests::vhost_user::blk::*;

const MIB: u64 = 1 << 20;
const DELAY_MS: u32 = 200;
const IN_FLIGHT: u64 = 8;
const WAIT: Duration = Duration::from_secs(10);

fn can_run(test: &str) -> bool {
    can_run_with(test, &[Need::Root, Need::Program("fusermount")])
}

fn opts() -> BlkOptions {
    BlkOptions {
        mem_size: 16 * MIB,
        slots: 32,
        ..BlkOptions::default()
    }
}

/// Submits `IN_FLIGHT` reads of sectors 0, 8, 16, … on queue 0 and waits until the back-end
/// has taken them all (marked in the inflight region); returns their heads.
fn reads_in_flight(drv: &mut BlkDriver) -> Vec<u16> {
    let heads: Vec<u16> = (0..IN_FLIGHT)
        .map(|i| drv.queue(0).submit_io(false, i * 8, 4096, i).unwrap())
        .collect();
    drv.queue(0).kick().unwrap();
    let (info, file) = drv.inflight.as_ref().expect("an inflight region");
    let marked = || {
        baton_service::inflight::count_inflight(file, info.mmap_offset, info.queue_size, 0).unwrap()
    };
    assert!(
        wait_until(WAIT, || (marked() == IN_FLIGHT as usize).then_some(())).is_some(),
        "the back-end did not take the {IN_FLIGHT} reads: {} marked inflight; completed: {:?}",
        marked(),
        drv.queue(0).poll()
    );
    heads
}

/// Waits for the reads `heads` (of sectors `tag * 8`) to complete: each exactly once (nothing
/// more comes within three delays), with the right data.
fn each_read_completes_once(drv: &mut BlkDriver, heads: &[u16]) {
    let mut done = Vec::new();
    let deadline = Instant::now() + WAIT;
    while done.len() < heads.len() && Instant::now() < deadline {
        done.extend(
            drv.queue(0)
                .wait(Duration::from_millis(100))
                .unwrap_or_default(),
        );
    }
    std::thread::sleep(Duration::from_millis(u64::from(DELAY_MS) * 3));
    done.extend(drv.queue(0).poll());
    let mut got: Vec<u16> = done.iter().map(|d| d.head).collect();
    got.sort_unstable();
    let mut want = heads.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "each read completed exactly once: {done:?}");
    for d in &done {
        assert_eq!(
            (d.status, &d.data),
            (S_OK, &pattern(d.tag, 4096)),
            "read {} got the wrong data or status",
            d.tag
        );
    }
}

#[test]
fn a_suspended_ring_leaves_its_requests_to_the_next_front_end_which_gets_each_once() {
    if !can_run("a_suspended_ring_leaves_its_requests_to_the_next_front_end") {
        return;
    }
    let dir = tmpdir("suspend");
    let slow = SlowDisk::mount(&dir, 4 * MIB, DELAY_MS, true);
    let log = dir.join("blk.log");
    let b = Blk::start_with_log(dir.clone(), slow.image(), &["--direct"], Some(&log));
    let mut drv = BlkDriver::connect_suspending(&b.sock, opts()).unwrap();
    let heads = reads_in_flight(&mut drv);

    let t = Instant::now();
    let base = drv.conn().unwrap().stop_queue(0).unwrap();
    let took = t.elapsed();
    let used = drv.queue(0).vq.device_used_idx();
    eprintln!("GET_VRING_BASE answered in {took:?}: base {base}, used index {used}");
    assert_eq!(base, IN_FLIGHT as u32, "every read was taken");
    assert!(
        u64::from(base.wrapping_sub(u32::from(used))) == IN_FLIGHT,
        "GET_VRING_BASE waited for the reads (used index {used}): it must not drain\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The reads finish in the slow disk meanwhile; none may reach the stopped ring.
    std::thread::sleep(Duration::from_millis(u64::from(DELAY_MS) * 4));
    assert_eq!(
        drv.queue(0).vq.device_used_idx(),
        used,
        "a suspended ring got used entries"
    );
    assert!(drv.queue(0).poll().is_empty());

    // The next front-end (same memory, rings and inflight region, as a live update's new VMM).
    drv.reconnect().unwrap();
    each_read_completes_once(&mut drv, &heads);
    // The ring serves new requests.
    let (status, data) = drv.queue(0).read(8 * 9, 4096).unwrap();
    assert_eq!((status, data), (S_OK, pattern(9, 4096)));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("completing the requests still executing since the ring was suspended"),
        "{text}"
    );
    assert!(
        !text.contains("resubmitting"),
        "nothing was resubmitted: {text}"
    );
    drop(drv);
    drop(b);
    drop(slow);
}

#[test]
fn without_the_feature_get_vring_base_still_drains() {
    if !can_run("without_the_feature_get_vring_base_still_drains") {
        return;
    }
    let dir = tmpdir("no-suspend");
    let slow = SlowDisk::mount(&dir, 4 * MIB, DELAY_MS, true);
    let b = Blk::start_on(dir.clone(), slow.image(), &["--direct"]);
    let mut drv = BlkDriver::connect(&b.sock, opts()).unwrap();
    reads_in_flight(&mut drv);
    let base = drv.conn().unwrap().stop_queue(0).unwrap();
    assert_eq!(base, IN_FLIGHT as u32);
    assert_eq!(
        u32::from(drv.queue(0).vq.device_used_idx()),
        base,
        "GET_VRING_BASE answered before the reads completed"
    );
    drop(drv);
    drop(b);
    drop(slow);
}

/// A back-end that suspends without recording (`--test-suspend-unrecorded`), restarted at the
/// used index (the driver's reconnect; right here because the reads complete in order): the
/// requests are taken from the ring again only once the ones left running since the
/// suspension are done, and those are dropped, not completed: each read completes exactly once
/// with the right data.
#[test]
fn requests_taken_again_after_an_unrecorded_suspension_complete_once() {
    if !can_run("requests_taken_again_after_an_unrecorded_suspension_complete_once") {
        return;
    }
    let dir = tmpdir("suspend-unrecorded");
    let slow = SlowDisk::mount(&dir, 4 * MIB, DELAY_MS, true);
    let b = Blk::start_on(
        dir.clone(),
        slow.image(),
        &["--direct", "--test-suspend-unrecorded"],
    );
    let mut drv = BlkDriver::connect_suspending(&b.sock, opts()).unwrap();
    let heads = reads_in_flight(&mut drv);
    let base = drv.conn().unwrap().stop_queue(0).unwrap();
    assert_eq!(base, IN_FLIGHT as u32);
    assert_eq!(drv.queue(0).vq.device_used_idx(), 0);
    let (info, file) = drv.inflight.as_ref().unwrap();
    assert_eq!(
        baton_service::inflight::count_inflight(file, info.mmap_offset, info.queue_size, 0)
            .unwrap(),
        0,
        "the test back-end recorded them"
    );
    // The driver's reconnect restarts each ring at the used index: the reads are taken again.
    drv.reconnect().unwrap();
    each_read_completes_once(&mut drv, &heads);
    drop(drv);
    drop(b);
    drop(slow);
}
