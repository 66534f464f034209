//! The nested KVM rig (`tests/nested/`): QEMU/TCG runs L1, Debian's generic kernel with a real
//! `/dev/kvm` (kvm-amd on TCG's emulated SVM), where baton's binaries run an L2 Linux guest.
//! Here: running one of its scenarios (`tests/nested/scenarios/NAME.sh`, in L1) with
//! `tests/nested/run.sh`, on the binaries [`bin`] finds, and reading what it printed.
//!
//! Everything in the rig runs under TCG: use it for correctness with a real Linux guest, never
//! for timings. Runs are serialized within a test process (each is a single-CPU QEMU).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::harness::{Need, bin, can_run_with, repo_root, run_to_end, target_dir};

/// What the rig needs on the host (`scripts/setup.sh` installs it; kind `qemu`). No KVM and no
/// root: L0 is TCG, and baton runs as root inside L1.
pub const NEEDS: &[Need] = &[
    Need::Program("qemu-system-x86_64"),
    Need::Program("busybox"),
    Need::Program("cpio"),
    Need::Program("xz"),
    Need::Program("objcopy"),
    Need::Program("apt-get"),
    Need::Program("dpkg-deb"),
    Need::Program("flock"),
];

/// The wall-time limit of one L0 run (QEMU is killed after it; run.sh then exits 124).
pub const RIG_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a scenario gave no result.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// A prerequisite is missing and `BATON_ALLOW_SKIP` allows it (otherwise the test failed).
    #[error("the nested rig cannot run here: {0}")]
    CannotRun(String),
    /// A baton binary the rig copies into L1 has not been built.
    #[error("{0} is missing (cargo build --release)")]
    MissingBinary(PathBuf),
    /// run.sh could not be started or did not end.
    #[error("running tests/nested/run.sh")]
    Run(#[source] std::io::Error),
}

/// What one L0 run printed.
#[derive(Debug)]
pub struct RigOutput {
    /// run.sh's status: the scenario's, 124 at the time limit, 125 if the rig died without a
    /// result (`None`: killed).
    pub status: Option<i32>,
    /// L0's console: L1's kernel and /init, the scenario's output, each L2's console prefixed
    /// with its name (`boot-2| ...`).
    pub console: String,
    /// run.sh's own messages (the build, the log's path, the status).
    pub stderr: String,
    /// The console log, kept after the run.
    pub log: PathBuf,
    /// Wall time of the whole run (build, L0, L1, L2).
    pub wall: Duration,
}

impl RigOutput {
    /// Console lines with CRs removed.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.console.lines().map(|l| l.trim_end_matches('\r'))
    }

    /// The scenario's checks (`check` in lib.sh): lines starting `ok: ` or `FAIL: `.
    pub fn checks(&self) -> Vec<&str> {
        self.lines()
            .filter(|l| l.starts_with("ok: ") || l.starts_with("FAIL: "))
            .collect()
    }

    /// The checks that failed (`FAIL: ...`).
    pub fn failed_checks(&self) -> Vec<&str> {
        self.lines().filter(|l| l.starts_with("FAIL: ")).collect()
    }

    /// Whether the scenario's check `text` passed (`ok: TEXT` was printed).
    pub fn passed(&self, text: &str) -> bool {
        self.lines()
            .any(|l| l.strip_prefix("ok: ").is_some_and(|t| t == text))
    }

    /// Where Linux in L2 complained: console lines of an L2 (`NAME| ...`) that are a kernel
    /// message of level 0-4 (`NAME| dmesg: ...`, printed by L2's /init after its script) or
    /// carry a call trace, a `BUG:`, a `WARNING:`, an oops, an I/O error, a hung task, a soft
    /// lockup or an RCU stall (see [`is_l2_complaint`]).
    pub fn l2_complaints(&self) -> Vec<&str> {
        self.lines()
            .filter(|l| {
                l2_console_line(l).is_some_and(is_l2_complaint)
                    || l.contains(": L2 complains: ")
                    || l.contains("L2 did not finish its script")
            })
            .collect()
    }

    /// What L1's kernel logged at warning level or worse (`l1-dmesg| ...`, printed by /init).
    pub fn l1_complaints(&self) -> Vec<&str> {
        self.lines()
            .filter_map(|l| l.trim_start().strip_prefix("l1-dmesg| "))
            .collect()
    }

    /// A summary for assertion messages: status, checks, complaints, the log's path.
    pub fn summary(&self) -> String {
        format!(
            "status {:?} after {:.0?}\nchecks:\n  {}\nL2 complaints:\n  {}\nL1 complaints:\n  {}\nconsole log: {}",
            self.status,
            self.wall,
            self.checks().join("\n  "),
            self.l2_complaints().join("\n  "),
            self.l1_complaints().join("\n  "),
            self.log.display()
        )
    }
}

/// The text of an L2 console line (`NAME| TEXT`, NAME without spaces, as lib.sh's `l2_wait`
/// prints it), or `None`.
fn l2_console_line(line: &str) -> Option<&str> {
    let (name, text) = line.split_once("| ")?;
    (!name.is_empty() && name != "l1-dmesg" && !name.contains(char::is_whitespace)).then_some(text)
}

/// Lines Linux prints at warning level that are timing symptoms of TCG (or of a VM pause, as a
/// live update's blackout), not errors: lib.sh's `L2_TOLERATED`.
pub const L2_TOLERATED: &[&str] = &["hrtimer: interrupt took "];

/// Whether a line of L2's console is Linux complaining (lib.sh's `L2_COMPLAINT`, the same
/// patterns, minus [`L2_TOLERATED`]): a kernel message of level 0-4 as L2's /init prints them
/// (`dmesg: ...`), a call trace, `BUG:`, `WARNING:`, an oops, an I/O error, a hung task, a soft
/// lockup, an RCU stall.
pub fn is_l2_complaint(text: &str) -> bool {
    if L2_TOLERATED.iter().any(|t| text.contains(t)) {
        return false;
    }
    const ANYWHERE: &[&str] = &[
        "Call Trace",
        "WARNING:",
        "Oops",
        "I/O error",
        "blk_update_request",
        "end_request",
        "hung_task",
        "soft lockup",
    ];
    let bug = text.match_indices("BUG").any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + 3..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphabetic()) && matches!(after, Some(':' | ' '))
    });
    text.starts_with("dmesg: ")
        || bug
        || ANYWHERE.iter().any(|p| text.contains(p))
        || text
            .find("rcu")
            .is_some_and(|i| text[i..].contains("stall"))
}

static RIG: Mutex<()> = Mutex::new(());

/// Runs scenario `name` with `args` (`tests/nested/run.sh NAME ARGS...`) on the binaries in
/// [`target_dir`]; the console log goes to `target/<profile>/nested/NAME.log`. Fails through
/// [`can_run_with`] (kind `qemu`) only when the host lacks what the rig needs; then returns
/// [`RigError::CannotRun`] if that skip is allowed.
pub fn run_scenario(name: &str, args: &[&str]) -> Result<RigOutput, RigError> {
    run_scenario_with(name, &[], args)
}

/// What the Debian root file system image needs on the host besides [`NEEDS`]
/// (`tests/nested/build-rootfs.sh`; building it also needs root, once: it is cached).
pub const ROOTFS_NEEDS: &[Need] = &[
    Need::Program("mmdebstrap"),
    Need::Program("mkfs.ext4"),
    Need::Program("e2fsck"),
];

/// A fresh copy of the rig's Debian root file system image (`tests/nested/build-rootfs.sh`:
/// built once into the rig's cache, then copied) at `target/<profile>/nested/NAME.ext4`, for
/// `run.sh --disk` (a run writes to it). [`RigError::CannotRun`] as [`run_scenario`] does.
pub fn rootfs_copy(name: &str) -> Result<PathBuf, RigError> {
    if !can_run_with(
        &format!("nested rig ({name}): root file system"),
        ROOTFS_NEEDS,
    ) {
        return Err(RigError::CannotRun(
            "a program the root file system image needs is missing".into(),
        ));
    }
    let dir = target_dir().join("nested");
    std::fs::create_dir_all(&dir).map_err(RigError::Run)?;
    let copy = dir.join(format!("{name}.ext4"));
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("tests/nested/build-rootfs.sh"))
        .arg(&copy);
    let done = run_to_end(cmd, Duration::from_secs(900)).map_err(RigError::Run)?;
    if done.code != Some(0) {
        return Err(RigError::Run(std::io::Error::other(format!(
            "tests/nested/build-rootfs.sh exited {:?}: {}",
            done.code, done.stderr
        ))));
    }
    Ok(copy)
}

/// [`run_scenario`] with options for run.sh before the scenario's name (`--disk IMAGE`,
/// `--file PATH`).
pub fn run_scenario_with(
    name: &str,
    run_options: &[&std::ffi::OsStr],
    args: &[&str],
) -> Result<RigOutput, RigError> {
    if !can_run_with(&format!("nested rig ({name})"), NEEDS) {
        return Err(RigError::CannotRun(
            "a program the rig needs is missing".into(),
        ));
    }
    for b in ["baton-vmm", "baton-blk", "baton-net-tap", "batonctl"] {
        if !bin(b).exists() {
            return Err(RigError::MissingBinary(bin(b)));
        }
    }
    let _one_at_a_time = RIG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let logs = target_dir().join("nested");
    std::fs::create_dir_all(&logs).map_err(RigError::Run)?;
    let log = logs.join(format!("{name}.log"));
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("tests/nested/run.sh"))
        .args(run_options)
        .arg(name)
        .args(args)
        .env("BATON_BIN_DIR", target_dir())
        .env("BATON_RIG_LOG", &log)
        .env("BATON_RIG_TIMEOUT", RIG_TIMEOUT.as_secs().to_string());
    let start = Instant::now();
    // run.sh builds the rig first (cached; the first build downloads the kernel package).
    let done = run_to_end(cmd, RIG_TIMEOUT + Duration::from_secs(120)).map_err(RigError::Run)?;
    Ok(RigOutput {
        status: done.code,
        console: done.stdout,
        stderr: done.stderr,
        log,
        wall: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_read_by_its_prefixes() {
        let out = RigOutput {
            status: Some(0),
            console: "boot-1| dmesg: [ 0.1] acpi: odd\r\nok: boot-1: nproc is 1\r\n\
                      FAIL: boot-1: CPUs 0 online\n  l1-dmesg| [ 5.6] kvm: WRMSR\nBATON-RIG-EXIT 0\n"
                .into(),
            stderr: String::new(),
            log: PathBuf::from("x.log"),
            wall: Duration::ZERO,
        };
        assert_eq!(
            out.checks(),
            ["ok: boot-1: nproc is 1", "FAIL: boot-1: CPUs 0 online"]
        );
        assert_eq!(out.l2_complaints(), ["boot-1| dmesg: [ 0.1] acpi: odd"]);
        assert_eq!(out.failed_checks(), ["FAIL: boot-1: CPUs 0 online"]);
        assert!(out.passed("boot-1: nproc is 1"));
        assert!(!out.passed("boot-1: CPUs 0 online"));
        assert_eq!(out.l1_complaints(), ["[ 5.6] kvm: WRMSR"]);
    }

    #[test]
    fn complaints_anywhere_on_an_l2_console() {
        for c in [
            "[   3.2] Call Trace:",
            "[   3.2] BUG: kernel NULL pointer dereference",
            "[   3.2] WARNING: CPU: 1 PID: 7 at kernel/x.c:1",
            "[   9.1] I/O error, dev vda, sector 8 op 0x1:(WRITE)",
            "[  60.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
            "dmesg: [    0.5] ACPI: odd table",
        ] {
            assert!(is_l2_complaint(c), "{c}");
        }
        for c in [
            "writer: 20 so far",
            "DEBUG: x",
            "BUGS none",
            "ping: 3 packets",
        ] {
            assert!(!is_l2_complaint(c), "{c}");
        }
        let out = RigOutput {
            status: Some(0),
            console: "lu| [ 1.0] WARNING: at x\n  l1-dmesg| [ 2.0] WARNING: l1\nok: x\n\
                      lu: L2 complains: dmesg: y\n"
                .into(),
            stderr: String::new(),
            log: PathBuf::from("x.log"),
            wall: Duration::ZERO,
        };
        assert_eq!(
            out.l2_complaints(),
            ["lu| [ 1.0] WARNING: at x", "lu: L2 complains: dmesg: y"]
        );
    }
}
