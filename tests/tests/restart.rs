//! Per-back-end restart under a running guest: the back-end process is killed (SIGKILL at a
//! random moment, or SIGTERM for a graceful upgrade) and started again on the same socket;
//! baton-vmm reconnects and the guest sees no error. baton-net-tap is restarted both by hand
//! (frames that arrive while no process holds the TAP queue are lost) and under
//! baton-supervise, whose fd store keeps the TAP queue attached: nothing is lost.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_tests::bench::Rng;
use baton_tests::boot::baton_cmd;
use baton_tests::harness::{Need, can_run_with};
use baton_tests::harness::{Proc, TempDir, bin, can_run, result_json, run_to_end, wait_until};
use baton_tests::local_users::vmm_user_args;
use baton_tests::netns::{Netns, unique_tap};
use baton_tests::services::{
    kill, service_pid, start_blk as start_blk_service, start_net_tap, start_supervised_net_tap,
    verify_blk_cont_image,
};
use baton_tests::udp::EchoStream;

const T: Duration = Duration::from_secs(30);

fn info(api: &Path) -> serde_json::Value {
    let mut c = Command::new(bin("batonctl"));
    c.arg("--api-socket").arg(api).arg("info");
    let f = run_to_end(c, T).unwrap();
    serde_json::from_str(f.stdout.trim()).unwrap_or(serde_json::Value::Null)
}

/// Waits until device 0 has reconnected `n` times and is connected again.
fn wait_reconnects(api: &Path, n: u64) -> Duration {
    let t0 = Instant::now();
    let ok = wait_until(T, || {
        let i = info(api);
        let d = &i["devices"][0];
        (d["reconnects"] == n && d["backend"] == "connected").then_some(())
    });
    assert!(
        ok.is_some(),
        "device did not reconnect ({n}): {}",
        info(api)
    );
    t0.elapsed()
}

fn start_blk(img: &Path, sock: &Path) -> Proc {
    start_blk_service(img, sock, &[]).unwrap()
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(i32::try_from(p.child.id()).unwrap(), sig) };
}

/// A 16 MiB image with baton-blk on it, and baton-vmm running `cmdline` with that disk
/// (`disk_opts` appended to its --disk option). Returns (dir, image, socket, back-end, VM, API).
fn blk_vm(
    tag: &str,
    cpus: u32,
    cmdline: &str,
    disk_opts: &str,
) -> (
    TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    Proc,
    Proc,
    std::path::PathBuf,
) {
    let dir = TempDir::new(tag);
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = dir.join("blk.sock");
    let blk = start_blk(&img, &sock);
    let api = dir.join("api.sock");
    let mut c = baton_cmd(cpus, "128M", cmdline);
    c.args(vmm_user_args());
    c.arg("--disk")
        .arg(format!("socket={}{disk_opts}", sock.display()))
        .arg("--api-socket")
        .arg(&api);
    let mut vm = Proc::spawn_with_stdin(c).unwrap();
    assert!(
        vm.wait_line(T, |l| l.contains("ready")).is_some(),
        "{}",
        vm.transcript()
    );
    (dir, img, sock, blk, vm, api)
}

/// Stops the guest's blk-cont run ('q'), expects exit 0 and a passing report with no I/O
/// error and nothing outstanding; returns the report.
fn stop_blk_cont(vm: &mut Proc) -> serde_json::Value {
    vm.send(b"q").unwrap();
    assert_eq!(
        vm.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        vm.transcript()
    );
    let r = result_json(&vm.seen).unwrap_or_else(|| panic!("{}", vm.transcript()));
    assert_eq!(r["result"], "pass", "{r}");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert_eq!(r["outstanding"], 0, "{r}");
    r
}

fn blk_restarts(sig: i32, restarts: u64) {
    let (_dir, img, sock, mut blk, mut vm, api) = blk_vm(
        "restart-blk",
        2,
        "test=blk-cont seconds=0 depth=8 blocks=1024",
        "",
    );
    let mut rng = Rng::from_clock();
    let mut back = Vec::new();
    for i in 1..=restarts {
        // A random moment is what is tested: the kill lands anywhere in the I/O.
        std::thread::sleep(Duration::from_millis(20 + rng.next(200)));
        signal(&blk, sig);
        let code = blk.wait_exit(T);
        if sig == libc::SIGTERM {
            assert_eq!(code, Some(0), "baton-blk exits 0 on SIGTERM");
        }
        blk = start_blk(&img, &sock);
        if vm.child.try_wait().ok().flatten().is_some() {
            vm.wait_exit(T);
            panic!("baton-vmm exited during restart {i}:\n{}", vm.transcript());
        }
        back.push(wait_reconnects(&api, i));
    }
    let r = stop_blk_cont(&mut vm);
    assert_eq!(r["verify_errors"], 0, "{r}");
    assert!(r["writes"].as_u64().unwrap() > restarts * 10, "{r}");
    drop(blk);
    let written = verify_blk_cont_image(&img, 1024).unwrap();
    assert!(written > 0);
    back.sort();
    eprintln!(
        "{restarts} restarts (signal {sig}): reconnected after p50 {:?} max {:?}; guest {} writes, max gap {} us; {written} blocks verified on the host",
        back[back.len() / 2],
        back.last().unwrap(),
        r["writes"],
        r["max_gap_us"]
    );
}

/// baton-blk is killed right after the guest booted, so the guest's driver starts the device
/// (DRIVER_OK) while the back-end is away (on this machine nearly always; otherwise the kill
/// lands just after, the ordinary restart): the device waits for the back-end instead of going
/// to NEEDS_RESET, and the guest's verified writes run once it is back.
#[test]
fn blk_backend_away_when_the_guest_starts_the_device() {
    if !can_run("blk_backend_away_when_the_guest_starts_the_device") {
        return;
    }
    let (_dir, img, sock, blk, mut vm, api) = blk_vm(
        "restart-early",
        1,
        "test=blk-cont seconds=0 depth=8 blocks=1024",
        "",
    );
    signal(&blk, libc::SIGKILL);
    let mut blk = blk;
    blk.wait_exit(T);
    // Away for a while: the time is what is tested.
    std::thread::sleep(Duration::from_millis(300));
    let blk = start_blk(&img, &sock);
    wait_reconnects(&api, 1);
    // Some writes after the back-end came back (the final report counts them).
    std::thread::sleep(Duration::from_millis(300));
    let r = stop_blk_cont(&mut vm);
    assert!(r["writes"].as_u64().unwrap() > 0, "{r}");
    drop(blk);
    assert!(verify_blk_cont_image(&img, 1024).unwrap() > 0);
}

#[test]
fn blk_backend_sigkilled_20_times_under_verified_writes() {
    if can_run("blk_backend_sigkilled_20_times") {
        blk_restarts(libc::SIGKILL, 20);
    }
}

#[test]
fn blk_backend_upgraded_with_sigterm() {
    if can_run("blk_backend_upgraded_with_sigterm") {
        blk_restarts(libc::SIGTERM, 5);
    }
}

/// What one run of [`net_restarts`] saw.
struct NetRestarts {
    /// Datagrams sent from the first echo to the end.
    sent: u64,
    /// Of those, never echoed.
    lost: u64,
    /// Lost in each window: first echo → kill 1 → … → kill N → end.
    per_window: Vec<u64>,
    /// Echoed among the last 500 sent.
    tail: u64,
    /// The back-end's log.
    log: String,
}

/// The guest runs a UDP echo (`net-cont`) on baton-net-tap; from a namespace, 1 datagram per
/// ms; `restarts` times, at a random moment, baton-net-tap is SIGKILLed and comes back, either
/// started again by hand on a persistent TAP or by baton-supervise (a TAP baton-net-tap creates,
/// kept by the stored queue). Counts only what is sent after the first echo.
fn net_restarts(supervised: bool, restarts: u64) -> NetRestarts {
    let guest = if supervised {
        "10.213.8.2"
    } else {
        "10.213.7.2"
    };
    let host = if supervised {
        "10.213.8.1"
    } else {
        "10.213.7.1"
    };
    let ns = Netns::new(if supervised { "rsv" } else { "rst" }).unwrap();
    let dir = TempDir::new(if supervised {
        "restart-net-sup"
    } else {
        "restart-net"
    });
    let tap = unique_tap(if supervised { "rv" } else { "rs" });
    let socket = dir.join("net.sock");
    let mut net = if supervised {
        let sup = start_supervised_net_tap(&ns, &tap, &socket, &[]).unwrap();
        ns.exec(&format!(
            "ip addr add {host}/24 dev {tap} && ip link set {tap} up"
        ))
        .unwrap();
        sup
    } else {
        // A persistent TAP, so that it (and its address) outlives each baton-net-tap process.
        ns.persistent_tap(&tap, &format!("{host}/24")).unwrap();
        start_net_tap(&ns, &tap, &socket).unwrap()
    };
    let api = dir.join("api.sock");
    let mut c = baton_cmd(1, "128M", &format!("test=net-cont ip={guest}/24 seconds=0"));
    c.args(vmm_user_args());
    c.arg("--net")
        .arg(format!("socket={}", socket.display()))
        .arg("--api-socket")
        .arg(&api);
    let mut vm = Proc::spawn_with_stdin(c).unwrap();
    assert!(
        vm.wait_line(T, |l| l.contains("ready")).is_some(),
        "{}",
        vm.transcript()
    );
    let echo = EchoStream::start(&ns, format!("{guest}:7"), Duration::from_millis(1));
    let mut marks = vec![echo.wait_first_echo(T).unwrap()];
    let mut rng = Rng::from_clock();
    for i in 1..=restarts {
        // A random moment is what is tested: the kill lands anywhere in the stream.
        std::thread::sleep(Duration::from_millis(300 + rng.next(400)));
        if supervised {
            let pid = service_pid(&net).expect("baton-net-tap runs under baton-supervise");
            // SAFETY: kill(2) on the supervisor's child, a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_reconnects(&api, i);
            assert_ne!(service_pid(&net), Some(pid), "not restarted");
        } else {
            kill(&mut net, libc::SIGKILL);
            net = start_net_tap(&ns, &tap, &socket).unwrap();
            wait_reconnects(&api, i);
        }
        marks.push(echo.mark());
    }
    // 700 more datagrams (1 per ms) after the last restart.
    let last = echo.mark();
    assert!(wait_until(T, || (echo.mark() >= last + 700).then_some(())).is_some());
    let to = echo.mark();
    marks.push(to);
    let stats = echo.stop().unwrap();
    vm.send(b"q").unwrap();
    assert_eq!(vm.wait_exit(T), Some(0), "{}", vm.transcript());
    let r = result_json(&vm.seen).unwrap_or_else(|| panic!("{}", vm.transcript()));
    assert_eq!(r["result"], "pass", "{r}");
    drop(net);
    let from = marks[0];
    let run = NetRestarts {
        sent: to - from,
        lost: stats.lost_between(from, to),
        per_window: marks
            .windows(2)
            .map(|w| stats.lost_between(w[0], w[1]))
            .collect(),
        tail: 500 - stats.lost_between(to.saturating_sub(500), to),
        log: std::fs::read_to_string(dir.join("net.sock.log")).unwrap_or_default(),
    };
    eprintln!(
        "{restarts} baton-net-tap SIGKILLs ({}): {} datagrams sent after the first echo, {} \
         lost (per window first echo → kill 1 → … → end: {:?}), {} duplicated, largest echo \
         gap {:.1} ms",
        if supervised {
            "under baton-supervise"
        } else {
            "started again by hand"
        },
        run.sent,
        run.lost,
        run.per_window,
        stats.duplicates,
        stats.max_gap_ms
    );
    run
}

/// baton-net-tap restarted by hand (SIGKILL, start again on the persistent TAP), no service
/// manager: the guest's network comes back after every restart, but the frames that arrive
/// while no process holds the TAP queue are dropped by the kernel (the figure printed; compare
/// `net_backend_supervised_sigkilled_5_times_loses_no_datagram`).
#[test]
fn net_backend_restarted_under_udp_echo() {
    if !can_run_with(
        "net_backend_restarted_under_udp_echo",
        &[Need::Kvm, Need::Guest, Need::Net],
    ) {
        return;
    }
    let r = net_restarts(false, 5);
    assert!(
        r.tail > 400,
        "echo did not resume: {} of the last 500 came back",
        r.tail
    );
    assert!(r.lost < r.sent / 2, "{} of {} lost", r.lost, r.sent);
}

/// baton-net-tap under baton-supervise, SIGKILLed 5 times under the same stream: the service
/// stored its TAP queue, the supervisor keeps it attached while the service is down, so the
/// frames that arrive meanwhile wait in it and the guest echoes every datagram. The TAP is not
/// even persistent: the stored queue keeps it (and its address) alive.
#[test]
fn net_backend_supervised_sigkilled_5_times_loses_no_datagram() {
    if !can_run_with(
        "net_backend_supervised_sigkilled_5_times_loses_no_datagram",
        &[Need::Kvm, Need::Guest, Need::Net],
    ) {
        return;
    }
    let r = net_restarts(true, 5);
    assert_eq!(
        r.log
            .matches("TAP queues kept by the service manager")
            .count(),
        5,
        "every restart reuses the stored queue:\n{}",
        r.log
    );
    assert_eq!(r.lost, 0, "per window {:?}\n{}", r.per_window, r.log);
}

#[test]
fn reconnect_gives_up_only_when_configured() {
    if !can_run("reconnect_gives_up_only_when_configured") {
        return;
    }
    let (_dir, _img, _sock, mut blk, mut vm, api) = blk_vm(
        "restart-giveup",
        1,
        "test=blk-cont seconds=0",
        ",reconnect_ms=300",
    );
    // Killed at once: the guest may start the device before or after the back-end is gone
    // (a device started while its back-end is away waits for it like a running one).
    signal(&blk, libc::SIGKILL);
    blk.wait_exit(T);
    // The back-end stays away: after 300 ms the device is given up, the VM keeps running.
    let failed = wait_until(T, || {
        (info(&api)["devices"][0]["backend"] == "failed").then_some(())
    });
    assert!(failed.is_some(), "{}", info(&api));
    assert_eq!(info(&api)["state"], "running");
    vm.send(b"q").unwrap();
    assert!(
        vm.wait_exit(Duration::from_secs(60)).is_some(),
        "{}",
        vm.transcript()
    );
}
