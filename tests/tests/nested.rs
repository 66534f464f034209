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

use baton_tests::nested::{RigError, RigOutput, rootfs_copy, run_scenario, run_scenario_with};

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

#[test]
fn linux_boots_a_debian_root_fs_on_baton_blk() {
    // A Debian bookworm image (mmdebstrap minbase + systemd, tests/nested/build-rootfs.sh),
    // L1's /dev/vda, served by baton-blk as L2's root: systemd to multi-user.target, then a
    // unit powers it off; the file system must be clean afterwards.
    let image = match rootfs_copy("rootfs") {
        Ok(image) => image,
        Err(RigError::CannotRun(_)) => return,
        Err(e) => panic!("rootfs: {e}"),
    };
    let out = match run_scenario_with("rootfs", &["--disk".as_ref(), image.as_os_str()], &[]) {
        Ok(out) => {
            eprintln!("rootfs: {}", out.summary());
            out
        }
        Err(RigError::CannotRun(_)) => return,
        Err(e) => panic!("rootfs: {e}"),
    };
    assert_passes(
        &out,
        &[
            "baton-vmm exits 0",
            "rootfs: L2's script exits 0",
            "rootfs: L2's kernel logs no warning, error or call trace",
            "systemd reached multi-user.target",
            "the unit after multi-user.target ran",
            "no systemd unit failed",
            "L2 powered off through systemd (poweroff.target, then the kernel's power-off)",
            "the file system's journal needs no recovery (clean unmount)",
            "the file system's state is valid, without errors",
            "L1 mounts it without a journal recovery",
            "the boot's writes are in the image (/var/lib/baton-rig/done)",
        ],
    );
    // And on the host, after L0 exited: a forced read-only check finds nothing to fix.
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&image)
        .output()
        .expect("running e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn {}: {}\n{}{}",
        image.display(),
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let _ = std::fs::remove_file(&image);
}

#[test]
fn linux_uses_a_passed_through_nvme() {
    // L0 gets an IOMMU and an NVMe controller backed by a file here; L1 boots with the IOMMU on,
    // binds the controller to vfio-pci and passes it to L2 (`baton-vmm --device path=...`),
    // whose nvme driver writes two patterns and reads them back (scenarios/vfio-nvme.sh). Then
    // the patterns must be in the file, where the device's DMA put them. Twice: with the MSI-X
    // table in BAR0 (QEMU's default: BAR0 trapped, doorbells forwarded by baton), and in a BAR
    // of its own (BAR0 mapped into the guest through a KVM memory slot).
    for exclusive_msix_bar in [false, true] {
        if !nvme_passthrough_run(exclusive_msix_bar) {
            return;
        }
    }
}

/// A fresh 64 MiB NVMe image in target/.../nested, and the L0 options that give L1 an IOMMU
/// and an NVMe controller over it (`msix-exclusive-bar` as given).
fn nvme_rig(file: &str, exclusive_msix_bar: bool) -> (std::path::PathBuf, Vec<String>) {
    let dir = baton_tests::harness::target_dir().join("nested");
    std::fs::create_dir_all(&dir).expect("creating target/.../nested");
    let image = dir.join(file);
    let _ = std::fs::remove_file(&image);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("creating the NVMe image");
    let drive = format!("if=none,id=nv0,file={},format=raw", image.display());
    let nvme = format!("nvme,serial=baton,drive=nv0,msix-exclusive-bar={exclusive_msix_bar}");
    let mut options = Vec::new();
    for (flag, value) in [
        ("--qemu", "-device"),
        ("--qemu", "intel-iommu,intremap=on"),
        ("--qemu", "-drive"),
        ("--qemu", &drive),
        ("--qemu", "-device"),
        ("--qemu", &nvme),
        ("--append", "intel_iommu=on"),
    ] {
        options.push(flag.to_string());
        options.push(value.to_string());
    }
    (image, options)
}

/// One L0 run of scenarios/vfio-nvme.sh; false if the rig cannot run here.
fn nvme_passthrough_run(exclusive_msix_bar: bool) -> bool {
    let what = if exclusive_msix_bar {
        "vfio-nvme, MSI-X in BAR4"
    } else {
        "vfio-nvme, MSI-X in BAR0"
    };
    let (image, options) = nvme_rig("vfio-nvme.img", exclusive_msix_bar);
    let options: Vec<&std::ffi::OsStr> = options.iter().map(|s| s.as_ref()).collect();
    let mapped = if exclusive_msix_bar { "1" } else { "0" };
    let out = match run_scenario_with("vfio-nvme", &options, &[mapped]) {
        Ok(out) => {
            eprintln!("{what}: {}", out.summary());
            out
        }
        Err(RigError::CannotRun(_)) => return false,
        Err(e) => panic!("{what}: {e}"),
    };
    let mapped_check = format!("vm.info: {mapped} BAR(s) mapped into the guest, 1 trapped");
    assert_passes(
        &out,
        &[
            "L0 gave L1 an NVMe controller",
            "the NVMe controller has an IOMMU group (intel_iommu=on)",
            "bad input: a device not bound to vfio-pci is refused, named",
            "the NVMe controller is bound to vfio-pci",
            "bad input: a missing device is refused, named",
            "bad input: the same device twice is refused, named",
            "vm.info lists the passed-through device with MSI-X on",
            &mapped_check,
            "baton-vmm exits 0",
            "vfio-l2: L2's script exits 0",
            "vfio-l2: L2's kernel logs no warning, error or call trace",
            "L2 read both patterns back from the NVMe",
            "the NVMe controller is still bound to vfio-pci",
            "no RAM file is left behind",
        ],
    );
    // On the host, after L0 exited: A = `seq 1 100000` at 64 KiB, B = `seq 200001 300000` at
    // 32 MiB, as L2 wrote them.
    let data = std::fs::read(&image).expect("reading the NVMe image");
    for (name, range, at) in [
        ("A", 1..=100_000, 16 * 4096),
        ("B", 200_001..=300_000, 8192 * 4096),
    ] {
        let want: String = range.map(|n| format!("{n}\n")).collect();
        let got = data.get(at..at + want.len());
        assert!(
            got == Some(want.as_bytes()),
            "{what}: pattern {name} is not at {at:#x} of {}",
            image.display()
        );
    }
    let _ = std::fs::remove_file(&image);
    true
}

#[test]
fn linux_on_a_passed_through_nvme_through_10_live_updates_and_two_rollbacks() {
    // L2 writes verified blocks to the passed-through NVMe (and pings over baton-net-tap) while
    // L1 moves it to a new baton-vmm 10 times, then rolls back twice: once before and once
    // after the new VMM took the DMA mappings and the vectors (scenarios/vfio-live-update.sh).
    // BAR0 mapped into the guest (MSI-X in a BAR of its own), so that the doorbells go
    // straight to the device through a KVM slot of whichever VMM runs the guest.
    let what = "vfio-live-update";
    let (image, options) = nvme_rig("vfio-live-update.img", true);
    let options: Vec<&std::ffi::OsStr> = options.iter().map(|s| s.as_ref()).collect();
    let out = match run_scenario_with(what, &options, &["10"]) {
        Ok(out) => {
            eprintln!("{what}: {}", out.summary());
            out
        }
        Err(RigError::CannotRun(_)) => return,
        Err(e) => panic!("{what}: {e}"),
    };
    let mut checks = vec![
        "the NVMe controller is bound to vfio-pci".to_string(),
        "the writer runs on the NVMe".to_string(),
    ];
    for n in 1..=10 {
        checks.push(format!("swap {n}: batonctl live-update exits 0"));
        checks.push(format!("swap {n}: the old VMM exits 0"));
        checks.push(format!("swap {n}: the writer goes on"));
    }
    for why in ["fds", "switch"] {
        checks.push(format!("rollback {why}: the old VMM says it rolled back"));
        checks.push(format!("rollback {why}: the writer goes on"));
    }
    checks.extend(
        [
            "the last VMM lists the device with MSI-X on",
            "rollback switch: the new VMM restores the device",
            "after the rollbacks: a live update succeeds",
            "after the rollbacks: the writer goes on",
            "the last VMM exits 0",
            "vlu: L2's writer had no write error and no verify error",
            "no nvme timeout, abort or reset in L2's log",
            "the NVMe controller is still bound to vfio-pci",
        ]
        .map(String::from),
    );
    let checks: Vec<&str> = checks.iter().map(String::as_str).collect();
    assert_passes(&out, &checks);
    // On the host: block 16 + i holds the last of L2's writes to it ("blk B seq N", right
    // aligned in 4095 bytes and a newline; write N goes to block 16 + N mod 1024).
    let writes: u64 = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("image: writer: ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .expect("no writer count on L1's console");
    assert!(writes > 0, "{what}: no write");
    let data = std::fs::read(&image).expect("reading the NVMe image");
    const BLOCKS: u64 = 1024;
    for i in 0..writes.min(BLOCKS) {
        let last = i + BLOCKS * ((writes - 1 - i) / BLOCKS);
        let want = format!("{:>4095}\n", format!("blk {} seq {last}", 16 + i));
        let at = usize::try_from((16 + i) * 4096).unwrap();
        assert!(
            data.get(at..at + 4096) == Some(want.as_bytes()),
            "{what}: block {} of {} does not hold write {last} of {writes}",
            16 + i,
            image.display()
        );
    }
    let _ = std::fs::remove_file(&image);
}
