//! `./bench.sh restart`: how long after a restarted vhost-user-blk back-end is ready the guest's
//! I/O goes on: baton-vmm (test guest, KVM) against QEMU (Linux guest, TCG, chardev
//! `reconnect-ms`), both on baton-blk, in the same run.
//!
//! baton: the test guest runs `blk-cont` (depth 8, 1024 blocks: request `seq` writes block
//! `seq mod 1024` with word 0 = `seq`, word 2 = a marker, then reads it back and verifies it).
//! N times (default 20), at a random moment, baton-blk is SIGKILLed and started again on the same
//! socket with `NOTIFY_SOCKET` pointing at a datagram socket of ours; its `READY=1` is "ready".
//! The host then polls the image (a window after the latest sequence number, every 100 µs)
//! until a sequence number newer than any written before the kill shows up: a write done by the
//! new back-end for the reconnected VMM, which the guest sees complete right after. The time
//! between the two is the figure. At the end the guest stops ('q'), its result line must show
//! no I/O, verify or outstanding errors, and the host checks every block of the image.
//!
//! QEMU: the Linux guest of tests/linux-guest (Debian cloud kernel + busybox) under
//! `-accel tcg`, baton-blk as `vhost-user-blk-pci` through `-chardev socket,...,reconnect-ms=R`
//! (default 1 ms, QEMU's best case); a guest script writes 4 KiB blocks with `dd oflag=direct`
//! (depth 1) whose first 16 bytes are an increasing decimal sequence number, block `seq mod
//! 1024`; same kills, same measurement (default 20 restarts). The guests differ (and QEMU's runs
//! under TCG), which the JSON says.
//!
//! One JSON line per figure (`ratio` = peer / ours: > 1 means baton resumes sooner).
//! Usage: baton-restart-bench [--restarts N] [--qemu-restarts N] [--qemu-reconnect-ms N]

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_tests::bench::{self, Rng, arg};
use baton_tests::boot::percentile;
use baton_tests::harness::{Proc, TempDir, bin, guest, result_json};
use baton_tests::linux_guest;
use baton_tests::services::Vmm;
use baton_tests::services::blk_cont_seq;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);
const BLOCKS: u64 = 1024;
const WINDOW: u64 = 64;
const POLL: Duration = Duration::from_micros(100);
const PEER: &str = "qemu-tcg-reconnect";

fn round(x: f64) -> f64 {
    bench::round(x, 3)
}

/// How a guest's workload stamps a 4 KiB block: its sequence number, or `None` for a block
/// that is not (yet) one of its writes.
type Stamp = fn(&[u8]) -> Option<u64>;

/// blk-cont: word 0 = seq (LE), word 2 = "baton-bk".
fn stamp_blk_cont(b: &[u8]) -> Option<u64> {
    blk_cont_seq(b)
}

const LINUX_TAG: &[u8] = b"-baton-restart-";

/// The Linux guest's script: 16 decimal digits of seq, then "-baton-restart-" repeated.
fn stamp_linux(b: &[u8]) -> Option<u64> {
    if &b[16..16 + LINUX_TAG.len()] != LINUX_TAG {
        return None;
    }
    std::str::from_utf8(&b[..16]).ok()?.parse().ok()
}

/// Largest sequence number among `n` blocks from block `first` (wrapping).
fn scan(f: &std::fs::File, first: u64, n: u64, stamp: Stamp, buf: &mut Vec<u8>) -> Option<u64> {
    let mut best = None;
    let mut b = first % BLOCKS;
    let mut left = n.min(BLOCKS);
    while left > 0 {
        let run = left.min(BLOCKS - b);
        buf.resize(usize::try_from(run * 4096).ok()?, 0);
        f.read_exact_at(buf, b * 4096).ok()?;
        for blk in buf.chunks_exact(4096) {
            best = best.max(stamp(blk));
        }
        left -= run;
        b = (b + run) % BLOCKS;
    }
    best
}

/// Polls until the image holds a sequence number above `max`; returns when it was seen.
fn wait_newer(f: &std::fs::File, max: Option<u64>, stamp: Stamp) -> Option<Instant> {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0u64;
    while Instant::now() < deadline {
        let next = max.map_or(0, |m| m + 1);
        // Every 50th poll reads everything, in case the writes jumped past the window.
        let seen = if n % 50 == 49 {
            scan(f, 0, BLOCKS, stamp, &mut buf)
        } else {
            scan(f, next, WINDOW, stamp, &mut buf)
        };
        if seen > max {
            return Some(Instant::now());
        }
        n += 1;
        std::thread::sleep(POLL);
    }
    None
}

/// Checks every block: unwritten, or stamped with a sequence number that maps to it.
/// Returns (blocks written, bad blocks).
fn verify_image(img: &Path, stamp: Stamp) -> (u64, u64) {
    let data = std::fs::read(img).unwrap_or_default();
    let (mut written, mut bad) = (0, 0);
    for (b, block) in (0..BLOCKS).zip(data.chunks_exact(4096)) {
        if block.iter().all(|&x| x == 0) {
            continue;
        }
        match stamp(block) {
            Some(seq) if seq % BLOCKS == b => written += 1,
            _ => bad += 1,
        }
    }
    (written, bad)
}

/// baton-blk on `img` at `sock`, notifying READY=1 to `notify`; returns it and when it was
/// ready.
fn start_blk(img: &Path, sock: &Path, notify: &UnixDatagram) -> anyhow::Result<(Proc, Instant)> {
    let _ = std::fs::remove_file(sock);
    let addr = notify.local_addr()?;
    let path = addr
        .as_pathname()
        .ok_or_else(|| anyhow::anyhow!("unnamed notify socket"))?;
    let mut c = Command::new(bin("baton-blk"));
    c.arg("--socket")
        .arg(sock)
        .arg("--image")
        .arg(img)
        .env("NOTIFY_SOCKET", path);
    let p = Proc::spawn(c)?;
    let mut buf = [0u8; 256];
    loop {
        let n = notify
            .recv(&mut buf)
            .map_err(|e| anyhow::anyhow!("no READY=1 from baton-blk: {e}"))?;
        if buf[..n].split(|&c| c == b'\n').any(|l| l == b"READY=1") {
            return Ok((p, Instant::now()));
        }
    }
}

/// One restart's figures (ms).
struct Restart {
    ready_to_io: f64,
    down: f64,
}

/// Kills `blk` with SIGKILL, starts it again, and measures ready → next new write.
fn restart(
    blk: &mut Proc,
    img: &Path,
    sock: &Path,
    notify: &UnixDatagram,
    stamp: Stamp,
) -> anyhow::Result<Restart> {
    let t_kill = Instant::now();
    // SAFETY: kill(2) on our own, not yet reaped, child.
    unsafe { libc::kill(i32::try_from(blk.child.id())?, libc::SIGKILL) };
    blk.child.wait()?;
    let f = std::fs::File::open(img)?;
    let max = scan(&f, 0, BLOCKS, stamp, &mut Vec::new());
    let (new, ready) = start_blk(img, sock, notify)?;
    let _ = std::mem::replace(blk, new);
    let io = wait_newer(&f, max, stamp)
        .ok_or_else(|| anyhow::anyhow!("no new write within 20 s of the back-end's READY=1"))?;
    Ok(Restart {
        ready_to_io: (io - ready).as_secs_f64() * 1000.0,
        down: (ready - t_kill).as_secs_f64() * 1000.0,
    })
}

fn notify_socket(dir: &TempDir) -> anyhow::Result<UnixDatagram> {
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let s = UnixDatagram::bind(&path)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

#[derive(Default)]
struct Run {
    ready_to_io_ms: Vec<f64>,
    down_ms: Vec<f64>,
    guest_errors: u64,
    host_bad_blocks: u64,
    blocks_verified: u64,
    guest: Value,
    failure: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let restarts = arg("--restarts", 20);
    bench::prefer_tmpfs();
    let qemu_restarts = arg("--qemu-restarts", 20);
    let reconnect_ms = arg("--qemu-reconnect-ms", 1);
    bench::require_kvm_and_guest()?;
    let mut rng = Rng::from_clock();
    let ours = run_baton(restarts, &mut rng)?;
    let peer = match run_qemu(qemu_restarts, reconnect_ms, &mut rng) {
        Ok(r) => r,
        Err(e) => Run {
            failure: Some(format!("{e:#}")),
            ..Run::default()
        },
    };
    if let Some(f) = &peer.failure {
        eprintln!("QEMU: {f}");
    }
    emit(&ours, &peer, reconnect_ms);
    anyhow::ensure!(
        ours.guest_errors == 0 && ours.host_bad_blocks == 0 && ours.guest["result"] == "pass",
        "baton's guest saw errors: {}",
        ours.guest
    );
    Ok(())
}

fn run_baton(restarts: usize, rng: &mut Rng) -> anyhow::Result<Run> {
    let mut r = Run::default();
    let dir = TempDir::new("restart-bench");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)?.set_len(16 << 20)?;
    let sock = dir.join("blk.sock");
    let notify = notify_socket(&dir)?;
    let (mut blk, _) = start_blk(&img, &sock, &notify)?;
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--kernel")
        .arg(guest())
        .args(["--cpus", "2", "--memory", "size=256M", "--serial", "stdio"])
        .args(["--cmdline", "test=blk-cont seconds=0 depth=8 blocks=1024"])
        .arg("--disk")
        .arg(format!("socket={}", sock.display()));
    let mut vm = Vmm::boot(c, dir.join("api.sock"))?;
    vm.proc
        .wait_line(T, |l| l.contains("ready"))
        .ok_or_else(|| anyhow::anyhow!("no ready line:\n{}", vm.proc.transcript()))?;
    std::thread::sleep(Duration::from_millis(300));
    for i in 1..=restarts {
        std::thread::sleep(Duration::from_millis(20 + rng.next(200)));
        let m = restart(&mut blk, &img, &sock, &notify, stamp_blk_cont)?;
        vm.wait_reconnects(0, i as u64)?;
        eprintln!(
            "baton restart {i:2}: back-end down {:.2} ms (kill -> READY=1), READY=1 -> next write {:.3} ms",
            m.down, m.ready_to_io
        );
        r.ready_to_io_ms.push(m.ready_to_io);
        r.down_ms.push(m.down);
    }
    vm.proc.send(b"q")?;
    let code = vm.proc.wait_exit(T);
    let g = result_json(&vm.proc.seen).unwrap_or_default();
    eprintln!("guest result (baton-vmm exited {code:?}): {g}");
    let count = |k: &str| g[k].as_u64().unwrap_or(0);
    r.guest_errors = count("io_errors") + count("verify_errors") + count("outstanding");
    if g["result"] != "pass" {
        r.guest_errors += 1;
    }
    r.guest = g;
    drop(blk);
    (r.blocks_verified, r.host_bad_blocks) = verify_image(&img, stamp_blk_cont);
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// QEMU + Linux guest under TCG.

/// Pass p writes blocks 0..1023 with seq p*1024+i, one 4 KiB O_DIRECT write each.
const SCRIPT: &str = r#"
dev=/dev/vda
[ -b $dev ] || { echo "NO-BLOCK-DEVICE"; exit 1; }
echo START
p=0
while :; do
    awk -v p=$p 'BEGIN { t = "-baton-restart-"; while (length(t) < 4080) t = t t; t = substr(t, 1, 4080);
        for (i = 0; i < 1024; i++) printf "%016d%s", p * 1024 + i, t }' |
        dd of=$dev bs=4096 count=1024 iflag=fullblock oflag=direct 2>/tmp/err || { echo "WRITE-FAILED pass $p"; cat /tmp/err; }
    p=$((p+1))
    echo "PASS $p"
done
"#;

fn run_qemu(restarts: usize, reconnect_ms: usize, rng: &mut Rng) -> anyhow::Result<Run> {
    anyhow::ensure!(
        Path::new("/usr/bin/qemu-system-x86_64").exists(),
        "qemu-system-x86_64 is not installed"
    );
    let guest = linux_guest::build()?;
    let mut r = Run::default();
    let dir = TempDir::new("restart-bench-qemu");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)?.set_len(16 << 20)?;
    let sock = dir.join("blk.sock");
    let notify = notify_socket(&dir)?;
    let (mut blk, _) = start_blk(&img, &sock, &notify)?;
    let mut c = linux_guest::qemu(&guest, 256, 1, SCRIPT);
    c.arg("-chardev")
        .arg(format!(
            "socket,id=c0,path={},reconnect-ms={reconnect_ms}",
            sock.display()
        ))
        .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]);
    let t0 = Instant::now();
    let mut q = Proc::spawn(c)?;
    q.wait_line(Duration::from_secs(180), |l| l.contains("START"))
        .ok_or_else(|| anyhow::anyhow!("the Linux guest did not start:\n{}", q.transcript()))?;
    eprintln!(
        "QEMU TCG: Linux guest writing {:.1} s after start",
        t0.elapsed().as_secs_f64()
    );
    // Let the writer run (the first pass takes a while under TCG).
    let f = std::fs::File::open(&img)?;
    wait_newer(&f, None, stamp_linux)
        .ok_or_else(|| anyhow::anyhow!("the Linux guest never wrote:\n{}", q.transcript()))?;
    std::thread::sleep(Duration::from_millis(500));
    for i in 1..=restarts {
        std::thread::sleep(Duration::from_millis(20 + rng.next(200)));
        let m = restart(&mut blk, &img, &sock, &notify, stamp_linux)?;
        eprintln!(
            "QEMU restart {i:2}: back-end down {:.2} ms, READY=1 -> next write {:.3} ms",
            m.down, m.ready_to_io
        );
        r.ready_to_io_ms.push(m.ready_to_io);
        r.down_ms.push(m.down);
    }
    std::thread::sleep(Duration::from_millis(500));
    // Stop QEMU (SIGTERM) and read what the guest printed.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(i32::try_from(q.child.id())?, libc::SIGTERM) };
    let _ = q.wait_exit(Duration::from_secs(10));
    let out = q.transcript();
    let errors = out
        .lines()
        .filter(|l| l.contains("WRITE-FAILED") || l.contains("I/O error"))
        .count();
    let passes = out.lines().filter(|l| l.contains("PASS ")).count();
    r.guest_errors = errors as u64;
    r.guest = json!({"passes_of_1024_writes": passes, "error_lines": errors});
    drop(blk);
    (r.blocks_verified, r.host_bad_blocks) = verify_image(&img, stamp_linux);
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// Output.

fn emit(o: &Run, p: &Run, reconnect_ms: usize) {
    let pct = |v: &[f64], q: f64| percentile(&mut v.to_vec(), q);
    let have_peer = p.failure.is_none() && !p.ready_to_io_ms.is_empty();
    let note = match &p.failure {
        Some(f) => format!("QEMU could not be measured: {f}"),
        None => format!(
            "the guests differ: baton-vmm runs the freestanding test guest under KVM (blk-cont, \
             depth 8, verified); QEMU runs a Linux guest (Debian cloud kernel, busybox dd \
             oflag=direct, depth 1) under TCG, with -chardev socket,reconnect-ms={reconnect_ms}; \
             both on the same baton-blk binary, SIGKILLed at random moments; 'next I/O' = the \
             host sees a write newer than any before the kill in the image (polled every 0.1 ms)"
        ),
    };
    for (i, (stat, q)) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)]
        .iter()
        .enumerate()
    {
        let ours = pct(&o.ready_to_io_ms, *q);
        let peer_v = have_peer.then(|| pct(&p.ready_to_io_ms, *q));
        let ratio = peer_v.filter(|_| ours > 0.0).map(|v| round(v / ours));
        let mut line = json!({
            "bench": format!("restart-to-next-io-{stat}"), "unit": "ms", "ours": round(ours),
            "peer": PEER, "peer_value": peer_v.map(round), "ratio": ratio,
            "restarts": o.ready_to_io_ms.len(), "peer_restarts": p.ready_to_io_ms.len(),
            "measured_by": "baton-blk's READY=1 (sd_notify) -> the host sees the guest's next new write in the image",
            "goal_ms": 50,
        });
        if i == 0 {
            line["note"] = json!(note);
            line["backend_down_p50_ms"] = json!(round(pct(&o.down_ms, 50.0)));
            line["samples_ms"] = json!(
                o.ready_to_io_ms
                    .iter()
                    .map(|v| (v * 100.0).round() / 100.0)
                    .collect::<Vec<_>>()
            );
            line["backend_down_samples_ms"] = json!(
                o.down_ms
                    .iter()
                    .map(|v| (v * 100.0).round() / 100.0)
                    .collect::<Vec<_>>()
            );
            line["peer_backend_down_p50_ms"] =
                json!(have_peer.then(|| round(pct(&p.down_ms, 50.0))));
        }
        println!("{line}");
    }
    println!(
        "{}",
        json!({"bench": "restart-guest-errors", "unit": "errors",
               "ours": o.guest_errors + o.host_bad_blocks,
               "guest_io_errors": o.guest["io_errors"], "guest_verify_errors": o.guest["verify_errors"],
               "guest_outstanding": o.guest["outstanding"], "guest_result": o.guest["result"],
               "writes_verified_in_guest": o.guest["writes"],
               "host_blocks_checked": o.blocks_verified, "host_bad_blocks": o.host_bad_blocks,
               "peer": PEER, "peer_value": have_peer.then_some(p.guest_errors + p.host_bad_blocks),
               "peer_detail": p.guest.clone(), "peer_host_blocks_checked": p.blocks_verified,
               "peer_host_bad_blocks": p.host_bad_blocks, "ratio": null, "goal": 0})
    );
}
