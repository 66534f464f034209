//! Guest-visible block request latency through the VMM's vhost-user front-end: the test guest
//! runs `test=blk-lat` (sequential 4 KiB reads at queue depth 1, completion by polling the used
//! ring or by MSI-X interrupt) on baton-vmm and on QEMU `-accel kvm` with vhost-user-blk-pci,
//! both on the same baton-blk process (it serves one front-end after another), in the same run.
//!
//! Prints one JSON line per case and statistic (ratio = QEMU / baton: > 1 means baton is
//! faster), e.g.
//! `{"bench":"frontend-blk-read-4k-lat-poll","unit":"us","ours":3.1,"peer":"qemu-kvm","peer_value":21.3,"ratio":6.87,"stat":"median"}`.
//! Each figure is the median over `--repeat` boots of the guest's own per-boot statistic.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use baton_tests::bench::round;
use baton_tests::harness::{bin, guest, result_json, run_to_end, wait_until};
use clap::Parser;
use serde_json::{Value, json};

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "blk-lat in the test guest: baton-vmm vs QEMU -accel kvm, same baton-blk")]
struct Args {
    /// Reads per boot.
    #[arg(long, default_value_t = 5000)]
    n: u32,
    /// Boots per platform and mode (the median of the per-boot figures is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Image size in MiB (filled with data, on /dev/shm).
    #[arg(long, default_value_t = 64)]
    image_mib: usize,
    /// Skip the QEMU runs.
    #[arg(long)]
    no_qemu: bool,
}

/// A scratch directory on /dev/shm, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The back-end process, terminated on drop.
struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let done = wait_until(Duration::from_secs(2), || self.0.try_wait().ok().flatten());
        if done.is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Fills `path` with `mib` MiB of xorshift data, so reads return real data, not holes.
fn write_image(path: &Path, mib: usize) -> Result<()> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(mib << 20);
    while data.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// One boot's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    median: f64,
    p99: f64,
    kick: f64,
}

/// Runs `cmd` (a VMM booting the test guest) and takes the figures from its result line.
fn run(what: &str, cmd: Command, n: u32) -> Result<Figures> {
    let t0 = Instant::now();
    let f = run_to_end(cmd, Duration::from_secs(90)).with_context(|| format!("starting {what}"))?;
    let lines: Vec<String> = f.stdout.lines().map(str::to_string).collect();
    let Some(r) = result_json(&lines) else {
        bail!(
            "{what}: no result line (exit {:?}); stderr: {}",
            f.code,
            f.stderr.trim()
        );
    };
    if r["result"] != "pass" || r["n"] != n || r["io_errors"] != 0 {
        bail!("{what}: {r}");
    }
    let num = |k: &str| {
        r[k].as_f64()
            .with_context(|| format!("{what}: no {k} in {r}"))
    };
    let fig = Figures {
        median: num("median_us")?,
        p99: num("p99_us")?,
        kick: num("kick_median_us")?,
    };
    eprintln!(
        "{what}: median {:.1} us, p99 {:.1} us, notify {:.1} us ({:.1} s)",
        fig.median,
        fig.p99,
        fig.kick,
        t0.elapsed().as_secs_f64()
    );
    Ok(fig)
}

fn baton_vmm(sock: &Path, cmdline: &str, name: &str) -> Command {
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--kernel")
        .arg(guest())
        .args(["--serial", "stdio", "--memory", "size=256M", "--name", name])
        .args(["--cmdline", cmdline])
        .arg("--disk")
        .arg(format!("socket={}", sock.display()))
        .env("RUST_LOG", "warn");
    c
}

fn qemu_kvm(sock: &Path, cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "kvm", "-M", "pc", "-m", "256", "-nodefaults"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(guest())
        .args(["-append", cmdline])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-machine", "memory-backend=mem", "-chardev"])
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0"]);
    c
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let k = v.len().checked_sub(1)? / 2;
    v.get(k).copied()
}

fn line(bench: &str, stat: &str, ours: Option<f64>, peer: Option<f64>, n: u32, runs: usize) {
    let ratio = match (ours, peer) {
        (Some(o), Some(p)) if o > 0.0 => Some(round(p / o, 2)),
        _ => None,
    };
    let v: Value = json!({
        "bench": bench,
        "unit": "us",
        "ours": ours.map(|x| round(x, 2)),
        "peer": "qemu-kvm",
        "peer_value": peer.map(|x| round(x, 2)),
        "ratio": ratio,
        "stat": stat,
        "n": n,
        "runs": runs,
    });
    println!("{v}");
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !guest().exists() {
        bail!(
            "test guest missing at {} (cd tests/guest && cargo build --release)",
            guest().display()
        );
    }
    for b in ["baton-vmm", "baton-blk"] {
        if !bin(b).exists() {
            bail!("{} missing: cargo build --release", bin(b).display());
        }
    }
    let dir = Scratch(PathBuf::from(format!(
        "/dev/shm/baton-frontend-bench-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).context("creating the scratch directory")?;
    let image = dir.0.join("disk.img");
    let sock = dir.0.join("blk.sock");
    write_image(&image, args.image_mib)?;
    let child = Command::new(bin("baton-blk"))
        .arg("--socket")
        .arg(&sock)
        .arg("--image")
        .arg(&image)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting baton-blk")?;
    let mut blk = Backend(child);
    if wait_until(Duration::from_secs(10), || sock.exists().then_some(())).is_none() {
        bail!("baton-blk did not create {}", sock.display());
    }
    let qemu_ok = !args.no_qemu
        && Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !args.no_qemu && !qemu_ok {
        eprintln!("qemu-system-x86_64 not found: peer values are null");
    }

    let modes = ["poll", "irq"];
    // [mode][platform] -> figures of each boot; platforms interleaved so drift hits both.
    let mut figs: Vec<[Vec<Figures>; 2]> = modes.iter().map(|_| [vec![], vec![]]).collect();
    let mut qemu_failed = false;
    for rep in 0..args.repeat {
        for (m, mode) in modes.iter().enumerate() {
            let cmdline = format!("test=blk-lat mode={mode} n={}", args.n);
            let name = format!("febench-{}-{rep}-{mode}", std::process::id());
            let f = run(
                &format!("baton-vmm {mode} #{rep}"),
                baton_vmm(&sock, &cmdline, &name),
                args.n,
            )?;
            if let Some(v) = figs.get_mut(m) {
                v[0].push(f);
            }
            if qemu_ok && !qemu_failed {
                match run(
                    &format!("qemu-kvm {mode} #{rep}"),
                    qemu_kvm(&sock, &cmdline),
                    args.n,
                ) {
                    Ok(f) => {
                        if let Some(v) = figs.get_mut(m) {
                            v[1].push(f);
                        }
                    }
                    Err(e) => {
                        eprintln!("QEMU -accel kvm failed, peer values are null: {e:#}");
                        qemu_failed = true;
                    }
                }
            }
            if let Ok(Some(st)) = blk.0.try_wait() {
                bail!("baton-blk exited ({st}) during the benchmark");
            }
        }
    }
    for (mode, [ours, peer]) in modes.iter().zip(&figs) {
        let stat = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
        let peer_or_none = |f: fn(&Figures) -> f64| {
            if qemu_failed { None } else { stat(peer, f) }
        };
        let base = format!("frontend-blk-read-4k-lat-{mode}");
        let runs = ours.len();
        line(
            &base,
            "median",
            stat(ours, |f| f.median),
            peer_or_none(|f| f.median),
            args.n,
            runs,
        );
        line(
            &format!("{base}-p99"),
            "p99",
            stat(ours, |f| f.p99),
            peer_or_none(|f| f.p99),
            args.n,
            runs,
        );
        if *mode == "poll" {
            // The notify write alone (an ioeventfd exit on both VMMs).
            line(
                "frontend-blk-notify-lat",
                "median",
                stat(ours, |f| f.kick),
                peer_or_none(|f| f.kick),
                args.n,
                runs,
            );
        }
    }
    Ok(())
}
