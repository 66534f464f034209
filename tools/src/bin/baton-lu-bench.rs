//! `./bench.sh live-update`: the blackout of a baton-vmm live update under load, against QEMU 10
//! `migrate` in mode cpr-transfer, on the same test guest and the same workload, in the same run.
//!
//! The comparison (same workload, same number of swaps, default 100 each): the test guest (2
//! vCPUs, 256 MiB) runs `blk-cont` (verified disk writes, one after another) — on baton-blk under
//! baton-vmm, on QEMU's own virtio-blk-pci (iothread, `aio=io_uring`, `cache=none`: QEMU cannot
//! keep vhost-user devices across cpr-transfer) under QEMU `-accel kvm`. The one span measured
//! the same way for both: the largest pause between two new completed writes in the disk image
//! (the host polls it every 0.2 ms) that overlaps the swap, beside the same measure over 0.2 s
//! without a swap just before it (the floor of a shared machine). Each side's own view of its
//! blackout is printed too — baton's old VMM pause → ack, QEMU's `query-migrate` `downtime`
//! (stop → state sent) — without a ratio: the spans differ.
//!
//! Then baton alone (default 100 swaps): `io-cont` (disk writes and a UDP echo server on
//! baton-net-tap) while a thread in a network namespace sends one sequence-numbered datagram per
//! ms and keeps when each echo came back: the echo gap across a swap, lost and duplicated
//! datagrams, and the median of every named phase of both VMMs.
//!
//! p99 is printed only over ≥ 100 swaps (below that the column is the maximum).
//! One JSON line per figure, `{"bench":...,"unit":...,"ours":N,"peer":NAME,"peer_value":N,
//! "ratio":N}` (ratio = peer / ours: > 1 means baton's pause is shorter).
//! Usage: baton-lu-bench [--swaps N] [--qemu-swaps N] [--echo-swaps N]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use baton_tests::bench::{self, arg};
use baton_tests::boot::{median, percentile};
use baton_tests::harness::{Proc, TempDir, bin, guest, result_json, wait_until};
use baton_tests::netns::{self, Netns};
use baton_tests::services::blk_cont_seq;
use baton_tests::services::{Vmm, start_blk, start_net_tap};
use serde_json::{Value, json};

const GUEST_IP: &str = "10.213.62.2";
const HOST_IP: &str = "10.213.62.1";
const T: Duration = Duration::from_secs(60);
const PEER: &str = "qemu-cpr-transfer";

fn round(x: f64) -> f64 {
    bench::round(x, 3)
}

/// What baton's run measured.
#[derive(Default)]
struct Ours {
    old_ms: Vec<f64>,
    new_ms: Vec<f64>,
    gap_ms: Vec<f64>,
    disk_gap_ms: Vec<f64>,
    /// The same measures in windows of the same length without a swap (the noise floor).
    disk_gap_control_ms: Vec<f64>,
    gap_control_ms: Vec<f64>,
    /// (side, phase name, one value per swap in µs), in the order first seen.
    phases: Vec<(String, String, Vec<f64>)>,
    sent: u64,
    lost: u64,
    duplicates: u64,
    guest_errors: u64,
    guest: Value,
    workload: String,
}

/// What QEMU's run measured, or why it could not run.
#[derive(Default)]
struct Peer {
    downtime_ms: Vec<f64>,
    disk_gap_ms: Vec<f64>,
    disk_gap_control_ms: Vec<f64>,
    total_ms: Vec<f64>,
    guest_errors: Option<u64>,
    guest: Value,
    failure: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let swaps = arg("--swaps", 100);
    let qemu_swaps = arg("--qemu-swaps", 100);
    let echo_swaps = arg("--echo-swaps", 100);
    bench::prefer_tmpfs();
    bench::require_kvm_and_guest()?;
    let ours = run_baton(swaps, false)?;
    let echo = match netns::unavailable() {
        None if echo_swaps > 0 => Some(run_baton(echo_swaps, true)?),
        None => None,
        Some(why) => {
            eprintln!("no UDP echo run: {why}");
            None
        }
    };
    let peer = if Path::new("/usr/bin/qemu-system-x86_64").exists() {
        run_qemu(qemu_swaps)
    } else {
        Peer {
            failure: Some("qemu-system-x86_64 is not installed".into()),
            ..Peer::default()
        }
    };
    if let Some(f) = &peer.failure {
        eprintln!("QEMU cpr-transfer: {f}");
    }
    emit(&ours, echo.as_ref(), &peer);
    for o in std::iter::once(&ours).chain(echo.as_ref()) {
        anyhow::ensure!(
            o.guest_errors == 0 && o.guest["result"] == "pass",
            "the guest workload did not pass: {}",
            o.guest
        );
    }
    Ok(())
}

/// `swaps` live updates of baton-vmm under `blk-cont`, or (`echo`) under `io-cont` with the
/// UDP echo stream from a network namespace.
fn run_baton(swaps: usize, echo: bool) -> anyhow::Result<Ours> {
    let mut o = Ours::default();
    let dir = TempDir::new("lu-bench");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    let blk_sock = dir.join("blk.sock");
    let net_sock = dir.join("net.sock");
    let _blk = start_blk(&img, &blk_sock, &[])?;
    let ns = if echo { Some(Netns::new("lub")?) } else { None };
    let tap = format!("btlu{}", std::process::id() % 10_000);
    let _net = match &ns {
        Some(ns) => {
            ns.persistent_tap(&tap, &format!("{HOST_IP}/24"))?;
            Some(start_net_tap(ns, &tap, &net_sock)?)
        }
        None => None,
    };
    o.workload = if echo {
        format!("test=io-cont ip={GUEST_IP}/24 seconds=0")
    } else {
        "test=blk-cont seconds=0".into()
    };
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--kernel")
        .arg(guest())
        .args(["--cpus", "2", "--memory", "size=256M", "--serial", "stdio"])
        .args(["--cmdline", &o.workload])
        .args(baton_tests::local_users::vmm_user_args())
        .arg("--disk")
        .arg(format!("socket={}", blk_sock.display()));
    if echo {
        c.arg("--net").arg(format!("socket={}", net_sock.display()));
    }
    let mut vmm = Vmm::boot(c, dir.join("vmm.api"))?;
    vmm.proc
        .wait_line(T, |l| l.contains("ready"))
        .ok_or_else(|| anyhow::anyhow!("no ready line:\n{}", vmm.proc.transcript()))?;
    std::thread::sleep(Duration::from_millis(500));
    let watch = DiskWatch::start(&img, 1024)?;
    let label = |name: &str| -> String {
        name.replace(&blk_sock.display().to_string(), "blk")
            .replace(&net_sock.display().to_string(), "net")
    };
    let mut phases: Vec<(String, String, Vec<f64>)> = Vec::new();
    let mut record = |side: &str, name: String, us: f64| match phases
        .iter_mut()
        .find(|(s, n, _)| s == side && *n == name)
    {
        Some((_, _, v)) => v.push(us),
        None => phases.push((side.into(), name, vec![us])),
    };
    let echo_log = match (&ns, echo) {
        (Some(ns), true) => Some(EchoLog::start(ns, format!("{GUEST_IP}:7"))),
        _ => None,
    };
    std::thread::sleep(Duration::from_millis(300));
    let (mut old_ms, mut new_ms, mut gap_ms) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..swaps {
        let (new, sock) = Vmm::incoming(&dir.0, n)?;
        // Control: the same measures over a quiet stretch without a swap.
        let c0 = Instant::now();
        std::thread::sleep(CONTROL);
        let c1 = Instant::now();
        o.disk_gap_control_ms.push(watch.max_gap_ms(c0, c1));
        if let Some(e) = &echo_log {
            o.gap_control_ms.push(e.max_gap_ms(c0, c1));
        }
        let w0 = Instant::now();
        let report = vmm
            .live_update(&sock)
            .with_context(|| format!("swap {n}"))?;
        let w1 = Instant::now();
        // A stall that began inside the swap is counted to its end.
        std::thread::sleep(Duration::from_millis(150));
        o.disk_gap_ms.push(watch.max_gap_ms(w0, w1));
        if let Some(e) = &echo_log {
            gap_ms.push(e.max_gap_ms(w0, w1));
        }
        let code = vmm.proc.wait_exit(T);
        anyhow::ensure!(
            code == Some(0),
            "swap {n}: old VMM exited {code:?}:\n{}",
            vmm.proc.transcript()
        );
        old_ms.push(report["blackout_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        let mut new_us = 0.0;
        let mut build_ms = 0.0;
        for (side, key) in [("old", "outgoing"), ("new", "incoming")] {
            for p in report[key].as_array().into_iter().flatten() {
                let name = label(p["name"].as_str().unwrap_or("?"));
                let us = p["micros"].as_f64().unwrap_or(f64::NAN);
                if side == "new" && name.starts_with("build_vm") {
                    build_ms = us / 1000.0;
                } else if side == "new" {
                    new_us += us;
                }
                record(side, name, us);
            }
        }
        new_ms.push(new_us / 1000.0);
        eprintln!(
            "swap {:2}: blackout old VMM {:.3} ms, new VMM {:.3} ms; in the swap's {:.0} ms (new VMM built in {build_ms:.1} ms): disk-write gap {:.2} ms, echo gap {}",
            n + 1,
            old_ms[n],
            new_ms[n],
            (w1 - w0).as_secs_f64() * 1000.0,
            o.disk_gap_ms[n],
            gap_ms.get(n).map_or("-".into(), |g| format!("{g:.2} ms")),
        );
        vmm = new;
    }
    if let Some(e) = echo_log {
        (o.sent, o.lost, o.duplicates) = e.stop()?;
    }
    drop(watch);
    o.phases = phases;
    vmm.proc.send(b"q")?;
    let code = vmm.proc.wait_exit(T);
    let r = result_json(&vmm.proc.seen).unwrap_or_default();
    eprintln!("guest result (last VMM exited {code:?}): {r}");
    let count = |k: &str| r[k].as_u64().unwrap_or(0);
    o.guest_errors = count("io_errors") + count("verify_errors") + count("outstanding");
    o.guest = r;
    o.old_ms = old_ms;
    o.new_ms = new_ms;
    o.gap_ms = gap_ms;
    Ok(o)
}

/// Length of the quiet stretch measured before each swap.
const CONTROL: Duration = Duration::from_millis(200);

/// Largest time between two consecutive `events` (sorted) among the pauses that overlap
/// `[from, to]`, in ms; a pause still going on counts up to now.
fn max_overlapping_gap_ms(events: &[Instant], from: Instant, to: Instant) -> f64 {
    let now = Instant::now();
    let mut best: f64 = 0.0;
    for w in events.windows(2) {
        if w[1] >= from && w[0] <= to {
            best = best.max((w[1] - w[0]).as_secs_f64() * 1000.0);
        }
    }
    if let Some(&last) = events.last().filter(|l| **l <= to) {
        best = best.max((now - last).as_secs_f64() * 1000.0);
    }
    best
}

// ---------------------------------------------------------------------------------------
// The echo stream, with the arrival time of every echo.

/// One datagram per ms from inside the namespace to the guest's echo port, for the whole run;
/// keeps when each new sequence number came back.
struct EchoLog {
    stop: Arc<AtomicBool>,
    echoes: Arc<Mutex<Vec<Instant>>>,
    thread: std::thread::JoinHandle<anyhow::Result<(u64, u64, u64)>>,
}

impl EchoLog {
    fn start(ns: &Netns, dst: String) -> EchoLog {
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(Mutex::new(Vec::new()));
        let (flag, log) = (stop.clone(), echoes.clone());
        let thread = ns.thread(move || echo_loop(&dst, &flag, &log));
        EchoLog {
            stop,
            echoes,
            thread,
        }
    }

    fn max_gap_ms(&self, from: Instant, to: Instant) -> f64 {
        let e = self.echoes.lock().unwrap_or_else(|e| e.into_inner());
        max_overlapping_gap_ms(&e, from, to)
    }

    /// Stops sending, waits 0.5 s for late echoes; returns (sent, lost, duplicated).
    fn stop(self) -> anyhow::Result<(u64, u64, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
    }
}

fn echo_loop(
    dst: &str,
    stop: &AtomicBool,
    log: &Mutex<Vec<Instant>>,
) -> anyhow::Result<(u64, u64, u64)> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.set_nonblocking(true)?;
    let interval = Duration::from_millis(1);
    let (mut sent, mut echoed, mut dups) = (0u64, 0u64, 0u64);
    let mut seen: Vec<bool> = Vec::new();
    let mut buf = [0u8; 64];
    let mut receive = |echoed: &mut u64, dups: &mut u64| {
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            if n != 16 {
                continue;
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[..8]);
            let Ok(seq) = usize::try_from(u64::from_le_bytes(a)) else {
                continue;
            };
            if seq >= seen.len() {
                seen.resize(seq + 1, false);
            }
            if seen[seq] {
                *dups += 1;
            } else {
                seen[seq] = true;
                *echoed += 1;
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Instant::now());
            }
        }
    };
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next {
            let mut p = [0u8; 16];
            p[..8].copy_from_slice(&sent.to_le_bytes());
            p[8..].copy_from_slice(b"baton-lu");
            if s.send_to(&p, dst).is_ok() {
                sent += 1;
            }
            next += interval;
            if next < now {
                next = now + interval;
            }
        }
        receive(&mut echoed, &mut dups);
        std::thread::sleep(Duration::from_micros(100));
    }
    let grace = Instant::now() + Duration::from_millis(500);
    while Instant::now() < grace {
        receive(&mut echoed, &mut dups);
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((sent, sent.saturating_sub(echoed), dups))
}

// ---------------------------------------------------------------------------------------
// Disk progress seen from the host.

/// Watches a `blk-cont` image from the host: request `seq` writes block `seq mod blocks`
/// with word 0 = `seq` (little endian) and word 2 = the marker, so the largest sequence number
/// in the image is the guest's latest completed write (the back-end wrote it just before the
/// guest saw it complete). A thread polls a window of blocks after the latest one every
/// `POLL` and records when the image moved on; [`DiskWatch::max_gap_ms`] gives the largest
/// pause between two movements inside a time window.
struct DiskWatch {
    stop: Arc<AtomicBool>,
    advances: Arc<Mutex<Vec<Instant>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const POLL: Duration = Duration::from_micros(200);
const WINDOW: u64 = 64;

fn block_seq(b: &[u8]) -> Option<u64> {
    blk_cont_seq(b)
}

fn scan(f: &std::fs::File, first: u64, n: u64, blocks: u64, buf: &mut Vec<u8>) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut best = None;
    let mut b = first % blocks;
    let mut left = n.min(blocks);
    while left > 0 {
        let run = left.min(blocks - b);
        buf.resize(usize::try_from(run * 4096).ok()?, 0);
        f.read_exact_at(buf, b * 4096).ok()?;
        for blk in buf.chunks_exact(4096) {
            best = best.max(block_seq(blk));
        }
        left -= run;
        b = (b + run) % blocks;
    }
    best
}

impl DiskWatch {
    fn start(image: &Path, blocks: u64) -> anyhow::Result<DiskWatch> {
        let f = std::fs::File::open(image)?;
        let stop = Arc::new(AtomicBool::new(false));
        let advances = Arc::new(Mutex::new(Vec::new()));
        let (st, adv) = (stop.clone(), advances.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut max = scan(&f, 0, blocks, blocks, &mut buf);
            let mut last = Instant::now();
            while !st.load(Ordering::Relaxed) {
                let next = max.map_or(0, |m| m + 1);
                let mut seen = scan(&f, next, WINDOW, blocks, &mut buf);
                if seen <= max && last.elapsed() > Duration::from_millis(5) {
                    // Lost track (the poller was descheduled for long): read everything.
                    seen = scan(&f, 0, blocks, blocks, &mut buf);
                }
                let now = Instant::now();
                if seen > max {
                    max = seen;
                    last = now;
                    adv.lock().unwrap_or_else(|e| e.into_inner()).push(now);
                }
                std::thread::sleep(POLL);
            }
        });
        Ok(DiskWatch {
            stop,
            advances,
            thread: Some(thread),
        })
    }

    /// Largest pause of the image's progress that overlaps `[from, to]` (ms).
    fn max_gap_ms(&self, from: Instant, to: Instant) -> f64 {
        let a = self.advances.lock().unwrap_or_else(|e| e.into_inner());
        max_overlapping_gap_ms(&a, from, to)
    }
}

impl Drop for DiskWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// QEMU cpr-transfer.

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let w = wait_until(Duration::from_secs(30), || UnixStream::connect(path).ok())
            .ok_or_else(|| anyhow::anyhow!("QMP socket {} never accepted", path.display()))?;
        w.set_read_timeout(Some(T))?;
        let mut q = Qmp {
            r: BufReader::new(w.try_clone()?),
            w,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.cmd("qmp_capabilities", None)?;
        Ok(q)
    }

    fn cmd(&mut self, c: &str, args: Option<Value>) -> anyhow::Result<Value> {
        let mut m = json!({ "execute": c });
        if let Some(a) = args {
            m["arguments"] = a;
        }
        writeln!(self.w, "{m}")?;
        loop {
            let mut l = String::new();
            anyhow::ensure!(self.r.read_line(&mut l)? > 0, "QMP closed during {c}");
            let v: Value = serde_json::from_str(&l)?;
            if let Some(e) = v.get("error") {
                anyhow::bail!("QMP {c}: {e}");
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }
}

fn qemu_cmd(dir: &TempDir, ram: &Path, n: usize) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "kvm",
        "-M",
        "pc,memory-backend=ram0,aux-ram-share=on",
    ])
    .arg("-object")
    .arg(format!(
        "memory-backend-file,id=ram0,size=256M,mem-path={},share=on",
        ram.display()
    ))
    .args(["-m", "256", "-smp", "2", "-nodefaults", "-display", "none"])
    .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
    .arg("-kernel")
    .arg(guest())
    .args(["-append", "test=blk-cont seconds=0"])
    .args(["-object", "iothread,id=io0"])
    .arg("-drive")
    .arg(format!(
        "file={},if=none,id=d0,format=raw,cache=none,aio=io_uring",
        dir.join("qdisk.img").display()
    ))
    .args([
        "-device",
        "virtio-blk-pci,drive=d0,iothread=io0,disable-legacy=on",
    ])
    .arg("-qmp")
    .arg(format!(
        "unix:{},server=on,wait=off",
        dir.join(&format!("q{n}.qmp")).display()
    ));
    c
}

fn channel(kind: &str, path: &Path) -> Value {
    json!({"channel-type": kind,
           "addr": {"transport": "socket", "type": "unix", "path": path.display().to_string()}})
}

fn run_qemu(swaps: usize) -> Peer {
    let mut p = Peer::default();
    let dir = TempDir::new("lu-bench-qemu");
    let ram = PathBuf::from(format!(
        "/dev/shm/baton-lu-bench-qemu-{}.ram",
        std::process::id()
    ));
    let r = qemu_swaps(&dir, &ram, swaps, &mut p);
    let _ = std::fs::remove_file(&ram);
    if let Err(e) = r {
        p.failure = Some(format!("{e:#}"));
    }
    p
}

fn qemu_swaps(dir: &TempDir, ram: &Path, swaps: usize, p: &mut Peer) -> anyhow::Result<()> {
    std::fs::File::create(dir.join("qdisk.img"))?.set_len(64 << 20)?;
    let t0 = Instant::now();
    let mut cur = Proc::spawn_with_stdin(qemu_cmd(dir, ram, 0))?;
    cur.wait_line(Duration::from_secs(120), |l| l.contains("ready"))
        .ok_or_else(|| anyhow::anyhow!("QEMU: no ready line:\n{}", cur.transcript()))?;
    eprintln!(
        "QEMU -accel kvm booted the test guest in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_millis(500));
    let watch = DiskWatch::start(&dir.join("qdisk.img"), 1024)?;
    for n in 0..swaps {
        let main_sock = dir.join(&format!("main{n}.sock"));
        let cpr_sock = dir.join(&format!("cpr{n}.sock"));
        let mut c = qemu_cmd(dir, ram, n + 1);
        c.arg("-incoming")
            .arg(channel("main", &main_sock).to_string())
            .arg("-incoming")
            .arg(channel("cpr", &cpr_sock).to_string());
        let mut new = Proc::spawn_with_stdin(c)?;
        wait_until(Duration::from_secs(30), || cpr_sock.exists().then_some(()))
            .ok_or_else(|| anyhow::anyhow!("the new QEMU did not listen on its cpr channel"))?;
        let mut q = Qmp::connect(&dir.join(&format!("q{n}.qmp")))?;
        let c0 = Instant::now();
        std::thread::sleep(CONTROL);
        p.disk_gap_control_ms
            .push(watch.max_gap_ms(c0, Instant::now()));
        q.cmd(
            "migrate-set-parameters",
            Some(json!({"mode": "cpr-transfer"})),
        )?;
        let w0 = Instant::now();
        q.cmd(
            "migrate",
            Some(json!({"channels": [channel("main", &main_sock), channel("cpr", &cpr_sock)]})),
        )?;
        let done = wait_until(Duration::from_secs(60), || {
            let r = q.cmd("query-migrate", None).ok()?;
            matches!(r["status"].as_str(), Some("completed" | "failed")).then_some(r)
        })
        .ok_or_else(|| anyhow::anyhow!("swap {n}: migration did not finish"))?;
        let w1 = Instant::now();
        anyhow::ensure!(
            done["status"] == "completed",
            "swap {n}: migration failed: {done}"
        );
        let down = done["downtime"].as_f64().unwrap_or(f64::NAN);
        let total = done["total-time"].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "QEMU swap {}: downtime {down} ms, total-time {total} ms",
            n + 1
        );
        p.downtime_ms.push(down);
        p.total_ms.push(total);
        let _ = q.cmd("quit", None);
        let _ = cur.wait_exit(Duration::from_secs(10));
        new.wait_line(Duration::from_millis(10), |_| false);
        if let Ok(Some(st)) = new.child.try_wait() {
            anyhow::bail!(
                "swap {n}: the new QEMU exited ({st}):\n{}",
                new.transcript()
            );
        }
        cur = new;
        std::thread::sleep(Duration::from_millis(150));
        let gap = watch.max_gap_ms(w0, w1);
        eprintln!(
            "QEMU swap {}: disk-write gap seen from the host {gap:.2} ms",
            n + 1
        );
        p.disk_gap_ms.push(gap);
    }
    drop(watch);
    cur.send(b"q")?;
    let _ = cur.wait_exit(Duration::from_secs(60));
    let r = result_json(&cur.seen).unwrap_or_default();
    eprintln!("QEMU guest result: {r}");
    let count = |k: &str| r[k].as_u64().unwrap_or(0);
    if !r.is_null() {
        p.guest_errors = Some(count("io_errors") + count("verify_errors") + count("outstanding"));
    }
    p.guest = r;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Output.

/// The three in-blackout phases with the largest medians ("side:name" -> µs), leaving out the
/// old VMM's `new_vmm_restore`, which is the new VMM's phases plus the messages between them.
fn slowest(o: &Ours) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = o
        .phases
        .iter()
        .filter(|(_, n, _)| {
            !(n.starts_with("prepare") || n.starts_with("build_vm") || n == "new_vmm_restore")
        })
        .map(|(side, n, v)| (format!("{side}:{n}"), median(&mut v.clone())))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(3);
    v
}

/// The columns a sample of `n` supports: p99 needs at least 100 values.
fn columns(n: usize) -> Vec<(&'static str, f64)> {
    if n >= 100 {
        vec![("p50", 50.0), ("p99", 99.0), ("max", 100.0)]
    } else {
        vec![("p50", 50.0), ("max", 100.0)]
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    percentile(&mut v.to_vec(), p)
}

const QEMU_CONFIG: &str = "QEMU 10 cpr-transfer, -accel kvm -M pc, 2 vCPUs, 256 MiB in \
    memory-backend-file share=on + aux-ram-share=on on /dev/shm; the guest's disk on QEMU's own \
    virtio-blk-pci with -object iothread, aio=io_uring, cache=none (QEMU cannot keep vhost-user \
    devices across cpr-transfer)";

fn emit(o: &Ours, echo: Option<&Ours>, p: &Peer) {
    let failure = p.failure.as_deref();
    // The one span both sides measure the same way: ratio.
    let both = match p.disk_gap_ms.len() {
        0 => o.disk_gap_ms.len(),
        n => n.min(o.disk_gap_ms.len()),
    };
    for (stat, q) in columns(both) {
        let ours = pct(&o.disk_gap_ms, q);
        let peer_v = (!p.disk_gap_ms.is_empty()).then(|| pct(&p.disk_gap_ms, q));
        println!(
            "{}",
            json!({"bench": format!("live-update-disk-gap-{stat}"), "unit": "ms",
                   "ours": round(ours), "peer": PEER, "peer_value": peer_v.map(round),
                   "ratio": peer_v.filter(|_| ours > 0.0).map(|v| round(v / ours)),
                   "swaps": o.disk_gap_ms.len(), "peer_swaps": p.disk_gap_ms.len(),
                   "workload": o.workload, "peer_config": QEMU_CONFIG, "peer_failure": failure,
                   "control_p50": round(pct(&o.disk_gap_control_ms, 50.0)),
                   "control_max": round(pct(&o.disk_gap_control_ms, 100.0)),
                   "peer_control_p50": (!p.disk_gap_control_ms.is_empty()).then(|| round(pct(&p.disk_gap_control_ms, 50.0))),
                   "peer_control_max": (!p.disk_gap_control_ms.is_empty()).then(|| round(pct(&p.disk_gap_control_ms, 100.0))),
                   "measured_by": "host polls the guest's blk-cont image every 0.2 ms; largest pause between two new completed writes that overlaps the swap (baton: the live-update call, prepare included; QEMU: migrate command to query-migrate 'completed'), counted to its end; control: the same over 0.2 s without a swap just before each"})
        );
    }
    // Each side's own view of its blackout: different spans, no ratio.
    for (stat, q) in columns(o.old_ms.len()) {
        let mut line = json!({"bench": format!("live-update-blackout-{stat}"), "unit": "ms",
               "ours": round(pct(&o.old_ms, q)), "peer": null, "peer_value": null, "ratio": null,
               "swaps": o.old_ms.len(), "workload": o.workload,
               "measured_by": "old VMM: vCPUs paused -> ack of the new VMM (report blackout_us)"});
        if stat == "p50" {
            line["slowest_phases_us"] = json!(slowest(o));
        }
        println!("{line}");
    }
    for (stat, q) in columns(o.new_ms.len()) {
        println!(
            "{}",
            json!({"bench": format!("live-update-blackout-new-vmm-{stat}"), "unit": "ms",
                   "ours": round(pct(&o.new_ms, q)), "peer": null, "peer_value": null, "ratio": null,
                   "measured_by": "new VMM: sum of its phases from the state received to vCPUs resumed (without the ready -> commit round trip)"})
        );
    }
    for (stat, q) in columns(p.downtime_ms.len()) {
        println!(
            "{}",
            json!({"bench": format!("live-update-peer-downtime-{stat}"), "unit": "ms",
                   "ours": null, "peer": PEER, "peer_value": round(pct(&p.downtime_ms, q)), "ratio": null,
                   "peer_swaps": p.downtime_ms.len(),
                   "total_time_p50": round(pct(&p.total_ms, 50.0)),
                   "measured_by": "QEMU's query-migrate 'downtime': the old QEMU's view, stop -> state sent (the new QEMU's load and resume are not in it): not the span of baton's blackout, so no ratio"})
        );
    }
    match echo {
        None => println!(
            "{}",
            json!({"bench": "live-update-echo-gap-p50", "unit": "ms", "ours": null,
                   "peer": null, "peer_value": null, "ratio": null,
                   "note": "no UDP echo run (no network namespace, or --echo-swaps 0)"})
        ),
        Some(e) => {
            for (stat, q) in columns(e.gap_ms.len()) {
                println!(
                    "{}",
                    json!({"bench": format!("live-update-echo-gap-{stat}"), "unit": "ms",
                           "ours": round(pct(&e.gap_ms, q)), "peer": null, "peer_value": null, "ratio": null,
                           "swaps": e.gap_ms.len(), "workload": e.workload,
                           "blackout_p50": round(pct(&e.old_ms, 50.0)),
                           "measured_by": "largest pause between two echoes seen from the namespace (1 datagram/ms, one stream for the whole run) that overlaps the live-update call, counted to its end",
                           "control_p50": round(pct(&e.gap_control_ms, 50.0)),
                           "control_max": round(pct(&e.gap_control_ms, 100.0))})
                );
            }
            println!(
                "{}",
                json!({"bench": "live-update-lost-datagrams", "unit": "datagrams", "ours": e.lost,
                       "sent": e.sent, "duplicates": e.duplicates, "peer": null, "peer_value": null,
                       "ratio": null, "goal": 0})
            );
        }
    }
    for run in std::iter::once(o).chain(echo) {
        println!(
            "{}",
            json!({"bench": "live-update-guest-io-errors", "unit": "errors", "ours": run.guest_errors,
                   "workload": run.workload, "guest_result": run.guest["result"],
                   "writes_verified": run.guest["writes"], "udp_echoed": run.guest["udp_echoed"],
                   "peer": PEER, "peer_value": p.guest_errors, "ratio": null,
                   "counted": "io_errors + verify_errors + outstanding of the guest's result line", "goal": 0})
        );
    }
    let phases_of = echo.unwrap_or(o);
    for (side, name, v) in &phases_of.phases {
        let mut v = v.clone();
        let med = median(&mut v);
        let max = percentile(&mut v, 100.0);
        println!(
            "{}",
            json!({"bench": "live-update-phase", "side": side, "phase": name, "unit": "us",
                   "ours": med, "max": max, "peer": null, "peer_value": null, "ratio": null,
                   "workload": phases_of.workload,
                   "in_blackout": !(name.starts_with("prepare") || name.starts_with("build_vm"))})
        );
    }
}
