//! Live update of baton-vmm under a running guest: real processes, real sockets, real KVM.
//!
//! Each swap starts a new `baton-vmm --incoming`, asks the running one to move the VM there
//! (`batonctl live-update`), and checks that the old one exits 0 and the guest carries on in
//! the new one. Rollback tests inject a failure into the new VMM at each step before the
//! commit and check that the guest keeps running in the old one.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton_tests::boot::baton_cmd;
use baton_tests::boot::percentile;
use baton_tests::harness::{
    Need, Proc, TempDir, bin, can_run, can_run_with, result_json, run_to_end, wait_until,
};
use baton_tests::local_users::{uid_of, vmm_uid, vmm_user_args};
use baton_tests::netns::{self, Netns};
use baton_tests::services::{Vmm, start_blk_on_new_image, start_net_tap, verify_blk_cont_image};
use baton_tests::udp::EchoStream;

const T: Duration = Duration::from_secs(30);

/// The swap-heavy tests run one at a time: two of them at once saturate the machine's two
/// cores, and on a saturated PVM host creating or tearing down a KVM VM can stall for tens of
/// seconds (measured; see the VMM's "building the VM ... was slow" warnings).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn start_vmm(
    dir: &TempDir,
    name: &str,
    cpus: u32,
    mem: &str,
    cmdline: &str,
    disk: Option<&Path>,
) -> Vmm {
    let api = dir.join(&format!("{name}.api"));
    let mut c = baton_cmd(cpus, mem, cmdline);
    c.args(vmm_user_args());
    c.args(["--name", name]).arg("--api-socket").arg(&api);
    if let Some(d) = disk {
        c.arg("--disk")
            .arg(format!("socket={},queues=1", d.display()));
    }
    let proc = Proc::spawn(c).unwrap();
    Vmm { proc, api }
}

fn start_incoming(dir: &TempDir, n: usize, fail: Option<&str>) -> (Vmm, PathBuf) {
    let sock = dir.join(&format!("incoming{n}.sock"));
    let api = dir.join(&format!("new{n}.api"));
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--incoming").arg(&sock).arg("--api-socket").arg(&api);
    baton_tests::local_users::start_as_test_user(&mut c, &[], true);
    if let Some(f) = fail {
        c.env("BATON_LIVE_UPDATE_FAIL", f);
    }
    let proc = Proc::spawn(c).unwrap();
    assert!(
        wait_until(T, || sock.exists().then_some(())).is_some(),
        "incoming socket never appeared"
    );
    (Vmm { proc, api }, sock)
}

/// `batonctl live-update`; returns (exit code, output).
fn live_update(api: &Path, dest: &Path, timeout_ms: Option<u64>) -> (Option<i32>, String) {
    let mut c = Command::new(bin("batonctl"));
    c.arg("--api-socket").arg(api).arg("live-update").arg(dest);
    if let Some(t) = timeout_ms {
        c.args(["--timeout-ms", &t.to_string()]);
    }
    let f = run_to_end(c, Duration::from_secs(60)).unwrap();
    (f.code, f.stdout + &f.stderr)
}

fn tick_number(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?.trim().parse().ok()
}

/// Swaps the VMM under a ticking guest `swaps` times; ticks must continue in order in each new
/// VMM. Returns the blackouts (ms) the old VMMs measured.
fn swap_under_ticks(mem: &str, swaps: usize) -> Vec<f64> {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("lu-ticks");
    let name = format!("lu{}-{}", std::process::id(), mem.replace(['=', ','], ""));
    let mut cur = start_vmm(&dir, &name, 2, mem, "test=ticks n=0 ms=20", None);
    assert!(
        cur.proc.wait_line(T, |l| l.starts_with("tick 3")).is_some(),
        "{}",
        cur.proc.transcript()
    );
    assert_eq!(
        uid_of(cur.proc.child.id()),
        Some(vmm_uid()),
        "the VMM dropped to the test user"
    );
    let mut blackouts = Vec::new();
    // The tick the current VMM's output began with, when that line was split between it and
    // the VMM before (its first complete tick line may then be its only one).
    let mut start_tick: Option<u64> = None;
    for n in 0..swaps {
        let (new, sock) = start_incoming(&dir, n, None);
        let (code, out) = live_update(&cur.api, &sock, None);
        assert_eq!(code, Some(0), "swap {n}: {out}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        blackouts.push(report["blackout_us"].as_f64().unwrap() / 1000.0);
        assert_eq!(
            cur.proc.wait_exit(T),
            Some(0),
            "old VMM exits 0 after the swap"
        );
        // The guest's output continues where the old VMM's stopped. A line may be split
        // between the two processes' outputs, and its first half may itself look like a tick
        // ("tick 2" of "tick 24"), so both readings are tried.
        let mut old = cur.proc.seen.clone();
        let old_last = old.pop().unwrap_or_default();
        let before = old.iter().rev().find_map(|l| tick_number(l)).or(start_tick);
        let mut new = new;
        assert_eq!(
            uid_of(new.proc.child.id()),
            Some(vmm_uid()),
            "swap {n}: the new VMM runs as the test user"
        );
        let first = new.proc.wait_line(T, |_| true).unwrap();
        let split = tick_number(&format!("{old_last}{first}"));
        let whole = (tick_number(&old_last), tick_number(&first));
        // The tick the new VMM's output continues with, if it is the next one.
        let next = match (split, before, whole) {
            (Some(t), Some(b), _) if t == b + 1 => Some(t),
            (_, _, (Some(a), Some(b))) if b == a + 1 => Some(b),
            (_, _, (Some(a), None)) => new
                .proc
                .wait_line(T, |l| tick_number(l).is_some())
                .and_then(|l| tick_number(&l))
                .filter(|t| *t == a + 1),
            _ => None,
        };
        start_tick = next;
        assert!(
            next.is_some(),
            "swap {n}: ticks do not continue: old ended {old_last:?} (tick before: {before:?}), new began {first:?}"
        );
        cur = new;
    }
    let (code, out) = {
        let mut c = Command::new(bin("batonctl"));
        c.arg("--api-socket").arg(&cur.api).arg("shutdown");
        let f = run_to_end(c, T).unwrap();
        (f.code, f.stderr)
    };
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(cur.proc.wait_exit(T), Some(0));
    assert!(
        !baton_tests::local_users::test_ram_file(&name).exists(),
        "the last VMM removes the RAM file"
    );
    blackouts
}

fn report(what: &str, b: &mut [f64]) {
    eprintln!(
        "{what}: {} swaps, blackout p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        b.len(),
        percentile(b, 50.0),
        percentile(b, 99.0),
        percentile(b, 100.0)
    );
}

#[test]
fn twenty_swaps_256m() {
    if can_run("twenty_swaps_256m") {
        let mut b = swap_under_ticks("256M", 20);
        report("256 MiB", &mut b);
    }
}

#[test]
fn twenty_swaps_2g() {
    if can_run("twenty_swaps_2g") {
        let mut b = swap_under_ticks("2G", 20);
        report("2 GiB", &mut b);
    }
}

/// A baton-blk back-end on a fresh image in `dir`.
fn start_blk(dir: &TempDir, size_mib: u64) -> (Proc, PathBuf, PathBuf) {
    let img = dir.join("disk.img");
    let sock = dir.join("blk.sock");
    let p = start_blk_on_new_image(&img, size_mib << 20, &sock, &[]).unwrap();
    (p, sock, img)
}

/// 20 swaps of a 2-vCPU guest that writes (and verifies) its disk on one CPU and echoes a
/// sequence-numbered UDP stream from a namespace on the other: no I/O error, no datagram
/// lost or duplicated, the image consistent at the end.
fn swaps_under_io(mem: &str, subnet: u8) {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    if !can_run_with(&format!("swaps_under_io {mem}"), &[Need::Net]) {
        return;
    }
    let dir = TempDir::new("lu-io");
    let img = dir.join("disk.img");
    let blk_sock = dir.join("blk.sock");
    let net_sock = dir.join("net.sock");
    let _blk = start_blk_on_new_image(&img, 16 << 20, &blk_sock, &[]).unwrap();
    let ns = Netns::new("lu").unwrap();
    let tap = netns::unique_tap("lu");
    ns.persistent_tap(&tap, &format!("10.213.{subnet}.1/24"))
        .unwrap();
    let _net = start_net_tap(&ns, &tap, &net_sock).unwrap();
    let mut c = baton_cmd(
        2,
        mem,
        &format!("test=io-cont ip=10.213.{subnet}.2/24 seconds=0 blocks=1024"),
    );
    c.args(vmm_user_args());
    c.arg("--disk")
        .arg(format!("socket={}", blk_sock.display()))
        .arg("--net")
        .arg(format!("socket={}", net_sock.display()));
    let mut vmm = Vmm::boot(c, dir.join("vmm.api")).unwrap();
    assert!(
        vmm.proc.wait_line(T, |l| l.contains("ready")).is_some(),
        "{}",
        vmm.proc.transcript()
    );
    let echo = EchoStream::start(
        &ns,
        format!("10.213.{subnet}.2:7"),
        Duration::from_millis(1),
    );
    echo.wait_first_echo(T).unwrap();
    let mut blackouts = Vec::new();
    for n in 0..20 {
        let (new, sock) = Vmm::incoming(&dir.0, n).unwrap();
        let report = vmm
            .live_update(&sock)
            .unwrap_or_else(|e| panic!("swap {n}: {e}"));
        blackouts.push(report["blackout_us"].as_f64().unwrap() / 1000.0);
        assert_eq!(
            vmm.proc.wait_exit(2 * T),
            Some(0),
            "old VMM exits 0 after swap {n}"
        );
        vmm = new;
        // The guest echoes again from the new VMM before the next swap.
        let echoed = echo.echoed();
        assert!(
            wait_until(T, || (echo.echoed() > echoed).then_some(())).is_some(),
            "no echo after swap {n}"
        );
    }
    // 300 more datagrams through the last VMM before the stream stops.
    let last = echo.mark();
    assert!(wait_until(T, || (echo.mark() >= last + 300).then_some(())).is_some());
    let stats = echo.stop().unwrap();
    vmm.proc.send(b"q").unwrap();
    assert_eq!(
        vmm.proc.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        vmm.proc.transcript()
    );
    let r = result_json(&vmm.proc.seen).unwrap_or_else(|| panic!("{}", vmm.proc.transcript()));
    report(&format!("{mem} under blk + net I/O"), &mut blackouts);
    eprintln!(
        "echo: {stats:?}",
        stats = (
            stats.sent,
            stats.echoed,
            stats.lost,
            stats.duplicates,
            stats.max_gap_ms
        )
    );
    assert_eq!(r["result"], "pass", "{r}");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert_eq!(r["verify_errors"], 0, "{r}");
    assert!(r["writes"].as_u64().unwrap() > 1000, "{r}");
    assert_eq!(stats.duplicates, 0, "duplicated datagrams");
    assert_eq!(
        stats.lost, 0,
        "lost datagrams: {} of {}; guest: {r}",
        stats.lost, stats.sent
    );
    assert!(stats.sent > 1000, "{}", stats.sent);
    let written = verify_blk_cont_image(&img, 1024).unwrap();
    assert!(written > 0);
}

#[test]
fn twenty_swaps_under_blk_and_net_io_256m() {
    if can_run("twenty_swaps_under_blk_and_net_io_256m") {
        swaps_under_io("256M", 62);
    }
}

#[test]
fn twenty_swaps_under_blk_and_net_io_2g() {
    if can_run("twenty_swaps_under_blk_and_net_io_2g") {
        swaps_under_io("2G", 63);
    }
}

/// Starts a ticking VM, tries a live update whose new VMM fails at `fail`, and checks that
/// the guest keeps ticking in the old VMM, which still answers its API.
fn rollback(fail: &str, timeout_ms: Option<u64>, with_disk: bool) {
    // A failure before the pause leaves nothing to roll back; after it, the old VMM says so.
    let paused = fail != "exit-after-prepare";
    let dir = TempDir::new("lu-rollback");
    let blk = with_disk.then(|| start_blk(&dir, 16));
    let name = format!("lurb{}-{fail}", std::process::id());
    let cmdline = if with_disk {
        "test=blk-cont seconds=600"
    } else {
        "test=ticks n=0 ms=20"
    };
    let mut old = start_vmm(
        &dir,
        &name,
        2,
        "128M",
        cmdline,
        blk.as_ref().map(|b| b.1.as_path()),
    );
    assert!(old.proc.wait_line(T, |l| l.contains("ready")).is_some());
    let (mut new, sock) = start_incoming(&dir, 0, Some(fail));
    let (code, out) = live_update(&old.api, &sock, timeout_ms);
    assert_ne!(code, Some(0), "{fail}: the update must fail: {out}");
    if paused {
        assert!(out.contains("rolled back"), "{fail}: {out}");
    }
    assert_ne!(
        new.proc.wait_exit(T),
        Some(0),
        "the new VMM must not survive"
    );
    // The guest still runs in the old VMM.
    let mut c = Command::new(bin("batonctl"));
    c.arg("--api-socket").arg(&old.api).arg("info");
    let f = run_to_end(c, T).unwrap();
    assert!(f.stdout.contains("\"running\""), "{f:?}");
    if with_disk {
        // Stop the writer: 'q' is not available (stdin is /dev/null), so shut down once the
        // old VMM has its back-end connected again.
        assert!(
            wait_until(T, || {
                (old.info().ok()?["devices"][0]["backend"] == "connected").then_some(())
            })
            .is_some(),
            "the disk did not come back after the rollback"
        );
    } else {
        let before = old.proc.seen.len();
        assert!(
            old.proc.wait_line(T, |l| l.starts_with("tick")).is_some(),
            "no tick after rollback"
        );
        assert!(old.proc.seen.len() > before);
    }
    let mut c = Command::new(bin("batonctl"));
    c.arg("--api-socket").arg(&old.api).arg("shutdown");
    run_to_end(c, T).unwrap();
    assert_eq!(old.proc.wait_exit(T), Some(0));
}

#[test]
fn rollback_when_the_new_vmm_dies_after_prepare() {
    if can_run("rollback_after_prepare") {
        rollback("exit-after-prepare", None, false);
    }
}

#[test]
fn rollback_when_the_new_vmm_dies_after_the_state() {
    if can_run("rollback_after_state") {
        rollback("exit-after-state", None, true);
    }
}

#[test]
fn rollback_when_a_backend_refuses() {
    if can_run("rollback_backend_refuses") {
        rollback("refuse-backend", None, true);
    }
}

#[test]
fn rollback_when_the_new_vmm_aborts() {
    if can_run("rollback_abort") {
        rollback("abort-before-ready", None, false);
    }
}

#[test]
fn rollback_on_timeout() {
    if can_run("rollback_timeout") {
        rollback("hang-before-ready", Some(1500), true);
    }
}

#[test]
fn rollback_on_protocol_version_mismatch() {
    if !can_run("rollback_version") {
        return;
    }
    let dir = TempDir::new("lu-version");
    let mut old = start_vmm(
        &dir,
        &format!("luver{}", std::process::id()),
        1,
        "128M",
        "test=ticks n=0 ms=20",
        None,
    );
    assert!(old.proc.wait_line(T, |l| l.contains("ready")).is_some());
    let sock = dir.join("incoming.sock");
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--incoming")
        .arg(&sock)
        .env("BATON_LIVE_UPDATE_VERSION", "999");
    baton_tests::local_users::start_as_test_user(&mut c, &[], true);
    let mut new = Proc::spawn(c).unwrap();
    assert!(wait_until(T, || sock.exists().then_some(())).is_some());
    let (code, out) = live_update(&old.api, &sock, None);
    assert_ne!(code, Some(0));
    assert!(out.contains("protocol"), "{out}");
    assert_ne!(new.wait_exit(T), Some(0));
    assert!(
        old.proc.wait_line(T, |l| l.starts_with("tick")).is_some(),
        "old VMM still runs the guest"
    );
    let mut c = Command::new(bin("batonctl"));
    c.arg("--api-socket").arg(&old.api).arg("shutdown");
    run_to_end(c, T).unwrap();
    assert_eq!(old.proc.wait_exit(T), Some(0));
}

#[test]
fn a_paused_vm_stays_paused_across_a_live_update() {
    if !can_run("a_paused_vm_stays_paused") {
        return;
    }
    let dir = TempDir::new("lu-paused");
    let name = format!("lupause{}", std::process::id());
    let mut old = start_vmm(&dir, &name, 1, "128M", "test=ticks n=0 ms=20", None);
    assert!(old.proc.wait_line(T, |l| l.starts_with("tick 2")).is_some());
    let ctl = |api: &Path, cmd: &str| {
        let mut c = Command::new(bin("batonctl"));
        c.arg("--api-socket").arg(api).arg(cmd);
        run_to_end(c, T).unwrap()
    };
    assert_eq!(ctl(&old.api, "pause").code, Some(0));
    let (mut new, sock) = start_incoming(&dir, 0, None);
    let (code, out) = live_update(&old.api, &sock, None);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(old.proc.wait_exit(T), Some(0));
    assert!(ctl(&new.api, "info").stdout.contains("\"paused\""));
    assert!(
        new.proc
            .wait_line(Duration::from_millis(300), |l| l.starts_with("tick"))
            .is_none(),
        "the guest ran while paused"
    );
    assert_eq!(ctl(&new.api, "resume").code, Some(0));
    assert!(
        new.proc.wait_line(T, |l| l.starts_with("tick")).is_some(),
        "no tick after resume"
    );
    assert_eq!(ctl(&new.api, "shutdown").code, Some(0));
    assert_eq!(new.proc.wait_exit(T), Some(0));
}
