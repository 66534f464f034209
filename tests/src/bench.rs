//! Small pieces every benchmark binary (`tools/src/bin/*-bench.rs`) uses: options, rounding, where
//! scratch files go, and the checks before a run.

use std::path::Path;

use crate::harness::{guest, kvm_available};

/// The value after `--name` on the command line, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `x` rounded to `decimals` places (for JSON output).
pub fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Puts images and sockets on tmpfs unless TMPDIR says otherwise: a host disk shared with
/// builds adds stalls of its own to a back-end's writes. Call before any thread starts.
pub fn prefer_tmpfs() {
    if std::env::var_os("TMPDIR").is_none() && Path::new("/dev/shm").is_dir() {
        // SAFETY: called while the process is single-threaded: nothing reads the environment
        // concurrently.
        unsafe { std::env::set_var("TMPDIR", "/dev/shm") };
    }
}

/// Fails unless /dev/kvm can be used and the test guest is built.
pub fn require_kvm_and_guest() -> anyhow::Result<()> {
    anyhow::ensure!(kvm_available(), "/dev/kvm is not accessible");
    anyhow::ensure!(
        guest().exists(),
        "test guest missing at {} (cd tests/guest && cargo build --release)",
        guest().display()
    );
    Ok(())
}

/// A small deterministic xorshift generator (for random moments: which instant a back-end is
/// killed), seeded from the clock and printed so a run can be repeated.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from the wall clock; prints the seed.
    pub fn from_clock() -> Rng {
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::from(d.subsec_nanos()) ^ d.as_secs())
            | 1;
        eprintln!("random seed {s}");
        Rng(s)
    }

    /// A number below `below` (which must be non-zero).
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below.max(1)
    }
}
