//! Booting the test guest and timing it: used by the demo and the boot benchmark.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Proc, bin, guest};

/// One measured boot.
#[derive(Debug, Clone)]
pub struct Boot {
    /// Milliseconds from exec to the guest's ready line.
    pub ready_ms: f64,
    /// The ready line.
    pub ready_line: String,
    /// Every line the guest printed.
    pub lines: Vec<String>,
    /// Exit code of the VMM.
    pub exit_code: Option<i32>,
    /// VMM memory outside guest RAM (RssAnon + RssFile, KiB), read after the ready line.
    pub rss_beyond_ram_kib: Option<u64>,
}

/// The baton-vmm command that boots the test guest with `cpus`, `memory` (e.g. "256M") and
/// `cmdline`, its console on stdout.
pub fn baton_cmd(cpus: u32, memory: &str, cmdline: &str) -> Command {
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--kernel")
        .arg(guest())
        .args(["--cpus", &cpus.to_string()])
        .args(["--memory", &format!("size={memory}")])
        .args(["--cmdline", cmdline, "--serial", "stdio"]);
    c
}

/// QEMU booting the same test guest by PVH direct boot (`-kernel` with the guest's PVH ELF):
/// `machine` is `pc` (SeaBIOS, then the PVH option ROM) or `microvm` (qboot, QEMU's fast-boot
/// machine), `accel` `kvm` or `tcg`.
pub fn qemu_cmd(accel: &str, machine: &str, cpus: u32, mem_mib: u32, cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        accel,
        "-M",
        machine,
        "-nodefaults",
        "-display",
        "none",
    ])
    .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
    .args(["-smp", &cpus.to_string(), "-m", &mem_mib.to_string()])
    .arg("-kernel")
    .arg(guest())
    .args(["-append", cmdline]);
    c
}

/// Reads RssAnon + RssFile of `pid` (guest RAM is RssShmem and is not counted).
pub fn rss_beyond_shmem_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some(field("RssAnon:")? + field("RssFile:")?)
}

/// Spawns `cmd`, times exec → line containing "ready", then waits for exit.
pub fn timed_boot(cmd: Command, timeout: Duration) -> anyhow::Result<Boot> {
    let t0 = Instant::now();
    let mut p = Proc::spawn(cmd)?;
    let ready_line = p
        .wait_line(timeout, |l| l.contains("ready"))
        .ok_or_else(|| anyhow::anyhow!("no ready line within {timeout:?}:\n{}", p.transcript()))?;
    let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let rss = rss_beyond_shmem_kib(p.child.id());
    let exit_code = p.wait_exit(timeout);
    Ok(Boot {
        ready_ms,
        ready_line,
        lines: p.seen.clone(),
        exit_code,
        rss_beyond_ram_kib: rss,
    })
}

/// Median of a non-empty sample (0 for an empty one).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Percentile (0..=100) by nearest rank.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    // Nearest rank: the first value with at least p% of the sample at or below it.
    let want = p / 100.0 * v.len() as f64;
    let i = (0..v.len())
        .find(|&i| (i + 1) as f64 >= want)
        .unwrap_or(v.len() - 1);
    v[i]
}

/// Whether QEMU can be used with `-accel kvm` here.
pub fn qemu_available() -> bool {
    Path::new("/usr/bin/qemu-system-x86_64").exists()
}
