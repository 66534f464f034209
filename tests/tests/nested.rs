//! Linux in L2 on baton, in the nested KVM rig (`tests/nested/`: QEMU/TCG → L1 Linux with a
//! real /dev/kvm → baton-vmm, baton-blk, baton-net-tap → L2 Linux, Debian's generic kernel as
//! both). Each test is one L0 run of a scenario (`tests/nested/scenarios/`), about 15–40 s here;
//! the console log's path is in the failure message, and with `--nocapture` each run's checks
//! and what L1's and L2's kernels complained about are printed, pass or fail.

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

#[test]
fn linux_boots_with_1_2_and_4_vcpus() {
    // One L0 run boots L2 three times.
    let Some(out) = run("boot", &["1", "2", "4"]) else {
        return;
    };
    assert_eq!(out.status, Some(0), "{}", out.summary());
    for (n, online) in [(1, "0"), (2, "0-1"), (4, "0-3")] {
        for check in [
            format!("ok: boot-{n}: baton-vmm exits 0"),
            format!("ok: boot-{n}: nproc is {n}"),
            format!("ok: boot-{n}: CPUs {online} online"),
        ] {
            assert!(
                out.checks().contains(&check.as_str()),
                "no `{check}`: {}",
                out.summary()
            );
        }
    }
}

#[test]
fn linux_virtio_blk_pattern_checked_on_the_image() {
    let Some(out) = run("blk", &[]) else {
        return;
    };
    assert_eq!(out.status, Some(0), "{}", out.summary());
    for check in [
        "ok: L2's script exits 0 (pattern read back in L2)",
        "ok: the pattern is in the image",
    ] {
        assert!(
            out.checks().contains(&check),
            "no `{check}`: {}",
            out.summary()
        );
    }
}

#[test]
fn linux_virtio_net_pings_a_tap_in_l1() {
    let Some(out) = run("net", &[]) else {
        return;
    };
    assert_eq!(out.status, Some(0), "{}", out.summary());
    assert!(
        out.checks().contains(&"ok: L2 pinged L1 through the TAP"),
        "{}",
        out.summary()
    );
}
