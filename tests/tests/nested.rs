//! Linux in L2 on baton, in the nested KVM rig (`tests/nested/`: QEMU/TCG → L1 Linux with a
//! real /dev/kvm → baton-vmm, baton-blk, baton-net-tap → L2 Linux, Debian's generic kernel as
//! both). Each test is one L0 run of a scenario (`tests/nested/scenarios/`), 20 s to 2 min here;
//! the console log's path is in the failure message, and with `--nocapture` each run's checks
//! and what L1's and L2's kernels complained about are printed, pass or fail.
//!
//! Every test fails when Linux in L2 complains: a kernel message of warning level or worse, a
//! call trace, `BUG:`, `WARNING:`, an I/O error... anywhere on an L2 console
//! ([`RigOutput::l2_complaints`]; the scenarios check the same in L1 with lib.sh's
//! `check_l2`).

use baton_tests::nested::{RigError, RigOutput, run_scenario};

/// Runs a scenario; `None` when the rig cannot run here and that skip is allowed.
fn run(name: &str, args: &[&str]) -> Option<RigOutput> {
    match run_scenario(name, args) {
        Ok(out) => {
            eprintln!("{name}: {}", out.summary());
            Some(out)
        }
        Err(RigError::CannotRun(_)) => None,
        Err(e) => panic!("{name}: {e}"),
    }
}

/// The scenario passed: status 0, no failed check, each of `checks` passed, and Linux in L2
/// complained about nothing.
fn assert_passes(out: &RigOutput, checks: &[&str]) {
    assert!(
        out.l2_complaints().is_empty(),
        "Linux in L2 complained:\n  {}\n{}",
        out.l2_complaints().join("\n  "),
        out.summary()
    );
    assert!(
        out.failed_checks().is_empty(),
        "failed checks:\n  {}\n{}",
        out.failed_checks().join("\n  "),
        out.summary()
    );
    assert_eq!(out.status, Some(0), "{}", out.summary());
    for check in checks {
        assert!(out.passed(check), "no `ok: {check}`: {}", out.summary());
    }
}

#[test]
fn linux_boots_with_1_2_and_4_vcpus() {
    // One L0 run boots L2 three times.
    let Some(out) = run("boot", &["1", "2", "4"]) else {
        return;
    };
    let mut checks = Vec::new();
    for (n, online) in [(1, "0"), (2, "0-1"), (4, "0-3")] {
        checks.push(format!("boot-{n}: baton-vmm exits 0"));
        checks.push(format!(
            "boot-{n}: L2's kernel logs no warning, error or call trace"
        ));
        checks.push(format!("boot-{n}: nproc is {n}"));
        checks.push(format!("boot-{n}: CPUs {online} online"));
    }
    assert_passes(&out, &checks.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn linux_virtio_blk_two_queues_patterns_discard_flush() {
    let Some(out) = run("blk", &[]) else {
        return;
    };
    assert_passes(
        &out,
        &[
            "blk-l2: L2's script exits 0",
            "blk-l2: L2's kernel logs no warning, error or call trace",
            "L2 has 2 hardware queues on vda",
            "L2 read both patterns back",
            "after L2's flush, before it exits: pattern A is in the image",
            "after L2's flush, before it exits: pattern B is in the image",
            "image after exit: pattern A",
            "image after exit: pattern B",
            "image after exit: the discarded 1 MiB reads as zeros",
            "image after exit: the discarded range is a hole",
        ],
    );
}

#[test]
fn linux_virtio_net_two_queue_pairs_ping_and_tcp_both_ways() {
    let Some(out) = run("net", &[]) else {
        return;
    };
    assert_passes(
        &out,
        &[
            "net-l2: L2's script exits 0",
            "net-l2: L2's kernel logs no warning, error or call trace",
            "L2's eth0 has 2 RX and 2 TX queues",
            "L2 pinged L1 through the TAP",
            "TCP L2 -> L1: 4 MiB arrive intact",
            "TCP L1 -> L2: 4 MiB arrive intact",
        ],
    );
}

#[test]
fn linux_under_disk_and_tcp_load_through_10_live_updates_and_a_rollback() {
    let Some(out) = run("live-update", &["10"]) else {
        return;
    };
    let mut checks: Vec<String> = (1..=10)
        .flat_map(|n| {
            [
                format!("swap {n}: batonctl live-update exits 0"),
                format!("swap {n}: the old VMM exits 0"),
                format!("swap {n}: the TCP stream goes on"),
                format!("swap {n}: the writer goes on"),
            ]
        })
        .collect();
    checks.extend(
        [
            "rollback: batonctl live-update fails",
            "rollback: the old VMM says it rolled back",
            "rollback: the old VMM still runs",
            "rollback: the TCP stream goes on",
            "rollback: the writer goes on",
            "the last VMM exits 0",
            "lu: L2's script exits 0",
            "lu: L2's kernel logs no warning, error or call trace",
            "lu: L2's writer had no write error and no verify error",
            "lu: L2's clocks never went back",
            "the TCP stream arrived whole, in order",
            "the image holds every block's last write",
        ]
        .map(String::from),
    );
    assert_passes(&out, &checks.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn linux_under_disk_load_and_pings_through_backend_restarts() {
    let Some(out) = run("restart", &["3"]) else {
        return;
    };
    let mut checks: Vec<String> = (1..=3)
        .flat_map(|i| {
            [
                format!("round {i}: baton-vmm reconnects baton-blk"),
                format!("round {i}: L2's writer goes on"),
                format!("round {i}: baton-vmm reconnects baton-net-tap"),
                format!("round {i}: L2's pings reach L1 again"),
            ]
        })
        .collect();
    checks.extend(
        [
            "baton-vmm exits 0",
            "rs: L2's script exits 0",
            "rs: L2's kernel logs no warning, error or call trace",
            "rs: L2's writer had no write error and no verify error",
            "rs: L2's clocks never went back",
            "the image holds every block's last write",
        ]
        .map(String::from),
    );
    assert_passes(&out, &checks.iter().map(String::as_str).collect::<Vec<_>>());
}
