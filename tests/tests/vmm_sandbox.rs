//! baton-vmm's sandbox (seccomp per thread kind, Landlock; `vmm/src/sandbox`): on by default
//! and reported per thread kind, controlled by `--seccomp`/`--landlock` with clear errors, and
//! real: a thread that makes a forbidden system call stops the VMM (exit 159) naming the
//! thread and the call, a file outside the rules cannot be opened. A live update and its
//! rollback keep it on, on both sides (the 20-swap tests of `live_update.rs` run with it on
//! too: it is the default).

#![allow(clippy::unwrap_used)] // test code: panics are failures

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_tests::boot::baton_cmd;
use baton_tests::harness::{
    Finished, Proc, TempDir, bin, can_run, cannot_run, default_ram_dir, default_ram_file,
    run_to_end, wait_until,
};
use baton_tests::services::{Vmm, batonctl, log_file, start_blk};

const T: Duration = Duration::from_secs(30);

/// 128 + SIGSYS: what a forbidden system call makes of the VMM's exit status.
const SIGSYS_EXIT: i32 = 159;

fn unique(tag: &str) -> String {
    format!("sb{}-{tag}", std::process::id())
}

/// A VMM booting the ticking test guest (2 vCPUs) named `name`, with its API socket in `dir`
/// and an info-level log in `<api>.log`; `extra` is added to its command line.
fn start(dir: &TempDir, name: &str, cmdline: &str, extra: &[&str]) -> (Proc, PathBuf, PathBuf) {
    let api = dir.join(&format!("{name}.api"));
    let mut c = baton_cmd(2, "128M", cmdline);
    c.args(["--name", name])
        .arg("--api-socket")
        .arg(&api)
        .args(extra)
        .env("BATON_LOG", "info")
        .stderr(log_file(&api).unwrap());
    let p = Proc::spawn(c).unwrap();
    (p, log_path(&api), api)
}

fn log_path(api: &Path) -> PathBuf {
    let mut p = api.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits until the log has a line containing `needle`; returns the whole log.
fn wait_log(log: &Path, needle: &str) -> String {
    wait_until(T, || {
        let text = read(log);
        text.contains(needle).then_some(text)
    })
    .unwrap_or_else(|| panic!("no '{needle}' in the log:\n{}", read(log)))
}

/// Whether this kernel enforces Landlock (the log says so at start either way); a kernel
/// without it cannot run the Landlock checks (see `harness::cannot_run`).
fn landlock_enforced(log: &str) -> bool {
    if log.contains("landlock: enforced") {
        return true;
    }
    assert!(log.contains("landlock: not enforced"), "{log}");
    cannot_run("landlock", "this kernel does not enforce Landlock");
    false
}

fn ctl(api: &Path, cmd: &str) -> (Option<i32>, String) {
    let (code, out, err) = batonctl(api, &[cmd]).unwrap();
    (code, out + &err)
}

/// `baton-vmm ARGS` run to its end (it must fail before booting anything).
fn run_refused(args: &[&str]) -> Finished {
    let mut c = Command::new(bin("baton-vmm"));
    c.args(args);
    run_to_end(c, T).unwrap()
}

#[test]
fn vmm_sandbox_is_on_by_default_and_reported_per_thread_kind() {
    if !can_run("vmm_sandbox_is_on_by_default") {
        return;
    }
    let dir = TempDir::new("vmm-sandbox");
    let name = unique("default");
    let (mut p, log, api) = start(&dir, &name, "test=ticks n=0 ms=20", &[]);
    let text = wait_log(
        &log,
        "seccomp: 8 filters installed (watchdog, stdin, vcpu, vcpu, migration-out, api, signals, \
         control); a forbidden system call stops baton-vmm",
    );
    if landlock_enforced(&text) {
        let want = format!(
            "landlock: enforced (ABI 7): file system access only to remove files in {}, remove \
             files in {}, no TCP bind/connect, no abstract UNIX sockets outside",
            dir.0.display(),
            default_ram_dir().display()
        );
        assert!(text.contains(&want), "{want}\n{text}");
    }
    // The VM runs and answers its API inside the sandbox.
    assert!(p.wait_line(T, |l| l.starts_with("tick 3")).is_some());
    assert_eq!(ctl(&api, "pause").0, Some(0));
    assert!(ctl(&api, "info").1.contains("\"paused\""));
    assert_eq!(ctl(&api, "resume").0, Some(0));
    let before = p.seen.len();
    assert!(p.wait_line(T, |l| l.starts_with("tick")).is_some());
    assert!(p.seen.len() > before);
    assert_eq!(ctl(&api, "shutdown").0, Some(0));
    assert_eq!(p.wait_exit(T), Some(0), "{}", read(&log));
    // Landlock kept what the VMM removes at exit.
    assert!(!api.exists(), "API socket left behind");
    assert!(!default_ram_file(&name).exists(), "RAM file left behind");
    assert!(!read(&log).contains("made a forbidden"), "{}", read(&log));
}

#[test]
fn vmm_sandbox_options_and_their_errors() {
    if !can_run("vmm_sandbox_options") {
        return;
    }
    let f = run_refused(&["--kernel", "k", "--seccomp", "maybe"]);
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(
        f.stderr
            .contains("invalid value 'maybe' for '--seccomp <MODE>'")
            && f.stderr.contains("[possible values: true, false, log]"),
        "{}",
        f.stderr
    );
    let f = run_refused(&["--kernel", "k", "--landlock", "yes"]);
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(
        f.stderr
            .contains("invalid value 'yes' for '--landlock <BOOL>'"),
        "{}",
        f.stderr
    );
    let f = run_refused(&["--kernel", "k", "--test-sandbox-violation-in", "api"]);
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(
        f.stderr.contains("--test-sandbox-violation"),
        "{}",
        f.stderr
    );

    // Each mode says what holds; the guest runs (and powers off) in every one.
    for (extra, needle) in [
        (
            ["--seccomp", "false", "--landlock", "false"].as_slice(),
            "seccomp: disabled (--seccomp false)",
        ),
        (
            ["--seccomp", "log"].as_slice(),
            "seccomp: 8 filters installed (watchdog, stdin, vcpu, vcpu, migration-out, api, \
             signals, control) in log mode",
        ),
        (
            ["--seccomp", "true", "--landlock", "true"].as_slice(),
            "seccomp: 8 filters installed (watchdog, stdin, vcpu, vcpu, migration-out, api, \
             signals, control); a forbidden",
        ),
    ] {
        let dir = TempDir::new("vmm-sandbox-opts");
        let name = unique("opts");
        let mut c = baton_cmd(2, "64M", "test=ticks n=2 ms=10");
        c.args(["--name", &name])
            .arg("--api-socket")
            .arg(dir.join("api"))
            .args(extra)
            .env("BATON_LOG", "info");
        let f = run_to_end(c, T).unwrap();
        assert_eq!(f.code, Some(0), "{extra:?}: {}", f.stderr);
        assert!(f.stderr.contains(needle), "{extra:?}: {}", f.stderr);
        if extra.contains(&"false") {
            assert!(
                f.stderr.contains("landlock: disabled (--landlock false)"),
                "{}",
                f.stderr
            );
        }
    }
}

/// The filters are real: each thread kind that tries `execve` stops the VMM at once with exit
/// status 159, naming the thread and the call.
#[test]
fn a_forbidden_call_stops_the_vmm_naming_the_thread_and_the_call() {
    if !can_run("a_forbidden_call_stops_the_vmm") {
        return;
    }
    let named = |kind: &str| {
        format!(
            "baton-vmm: seccomp: the {kind} thread made a forbidden system call 59 (execve): stopping"
        )
    };
    let dir = TempDir::new("vmm-sandbox-sigsys");
    // The main thread after start-up, and a vCPU thread as it starts.
    for kind in ["control", "vcpu"] {
        let name = unique(kind);
        let (mut p, log, _) = start(
            &dir,
            &name,
            "test=ticks n=0 ms=20",
            &[
                "--test-sandbox-violation",
                "execve",
                "--test-sandbox-violation-in",
                kind,
            ],
        );
        assert_eq!(p.wait_exit(T), Some(SIGSYS_EXIT), "{kind}: {}", read(&log));
        assert!(read(&log).contains(&named(kind)), "{kind}: {}", read(&log));
        // Stopped at once: nothing cleaned up, as after a crash.
        let _ = std::fs::remove_file(default_ram_file(&name));
    }
    // The API thread, on a request.
    let name = unique("api");
    let (mut p, log, api) = start(
        &dir,
        &name,
        "test=ticks n=0 ms=20",
        &[
            "--test-sandbox-violation",
            "execve",
            "--test-sandbox-violation-in",
            "api",
        ],
    );
    assert!(p.wait_line(T, |l| l.starts_with("tick 2")).is_some());
    let (code, out) = ctl(&api, "info");
    assert_ne!(code, Some(0), "{out}");
    assert_eq!(p.wait_exit(T), Some(SIGSYS_EXIT), "{}", read(&log));
    assert!(read(&log).contains(&named("api")), "{}", read(&log));
    let _ = std::fs::remove_file(default_ram_file(&name));
    // The outgoing side of a live update, when it starts.
    let name = unique("out");
    let (mut p, log, api) = start(
        &dir,
        &name,
        "test=ticks n=0 ms=20",
        &[
            "--test-sandbox-violation",
            "execve",
            "--test-sandbox-violation-in",
            "migration-out",
        ],
    );
    assert!(p.wait_line(T, |l| l.starts_with("tick 2")).is_some());
    let (_new, sock) = Vmm::incoming(&dir.0, 0).unwrap();
    let (code, out, err) = batonctl(&api, &["live-update", sock.to_str().unwrap()]).unwrap();
    assert_ne!(code, Some(0), "{out}{err}");
    assert_eq!(p.wait_exit(T), Some(SIGSYS_EXIT), "{}", read(&log));
    assert!(
        read(&log).contains(&named("migration-out")),
        "{}",
        read(&log)
    );
    let _ = std::fs::remove_file(default_ram_file(&name));
    // The incoming side, before it accepts anything.
    let sock = dir.join("in-violation.sock");
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--incoming")
        .arg(&sock)
        .args([
            "--test-sandbox-violation",
            "execve",
            "--test-sandbox-violation-in",
            "migration-in",
        ])
        .stdout(Stdio::null());
    let f = run_to_end(c, T).unwrap();
    assert_eq!(f.code, Some(SIGSYS_EXIT), "{}", f.stderr);
    assert!(f.stderr.contains(&named("migration-in")), "{}", f.stderr);
}

/// Landlock is real: once the VM runs, the VMM cannot open a file (here with seccomp off, so
/// that Landlock alone answers), on a booted VMM and on one that took a VM over.
#[test]
fn landlock_keeps_the_vmm_away_from_files() {
    if !can_run("landlock_keeps_the_vmm_away_from_files") {
        return;
    }
    let dir = TempDir::new("vmm-sandbox-landlock");
    let name = unique("ll");
    let probe = [
        "--seccomp",
        "false",
        "--test-sandbox-violation",
        "open:/etc/hostname",
    ];
    let (mut p, log, api) = start(&dir, &name, "test=ticks n=0 ms=20", &probe);
    let text = wait_log(&log, "test: open /etc/hostname");
    if !landlock_enforced(&text) {
        return;
    }
    assert!(
        text.contains("test: open /etc/hostname denied: Permission denied"),
        "{text}"
    );
    assert!(p.wait_line(T, |l| l.starts_with("tick 2")).is_some());
    // The VMM that takes it over is held to the same once the guest runs there.
    let sock = dir.join("incoming.sock");
    let new_api = dir.join("new.api");
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--incoming")
        .arg(&sock)
        .arg("--api-socket")
        .arg(&new_api)
        .args(probe)
        .env("BATON_LOG", "info")
        .stderr(log_file(&new_api).unwrap());
    let mut new = Proc::spawn(c).unwrap();
    assert!(wait_until(T, || sock.exists().then_some(())).is_some());
    let (code, out, err) = batonctl(&api, &["live-update", sock.to_str().unwrap()]).unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(p.wait_exit(T), Some(0), "{}", read(&log));
    let new_log = log_path(&new_api);
    let text = wait_log(&new_log, "test: open /etc/hostname");
    assert!(
        text.contains("test: open /etc/hostname denied: Permission denied"),
        "{text}"
    );
    // What Landlock kept: removing the incoming sockets, the API socket and the RAM file.
    assert!(!sock.exists(), "incoming socket left behind");
    assert_eq!(ctl(&new_api, "shutdown").0, Some(0));
    assert_eq!(new.wait_exit(T), Some(0), "{}", read(&new_log));
    assert!(!new_api.exists(), "API socket left behind");
    assert!(!default_ram_file(&name).exists(), "RAM file left behind");
}

/// Both sides of a live update keep their filters through the swap, and a rollback (the new
/// VMM dies after the state: the old one kills it through a pidfd and reconnects its
/// back-end) happens under seccomp too.
#[test]
fn live_update_and_rollback_run_inside_the_sandbox_on_both_sides() {
    if !can_run("live_update_and_rollback_inside_the_sandbox") {
        return;
    }
    let dir = TempDir::new("vmm-sandbox-lu");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let blk_sock = dir.join("blk.sock");
    let _blk = start_blk(&img, &blk_sock, &[]).unwrap();
    let name = unique("lu");
    let disk = format!("socket={}", blk_sock.display());
    let (mut old, old_log, old_api) =
        start(&dir, &name, "test=blk-cont seconds=600", &["--disk", &disk]);
    wait_log(
        &old_log,
        "seccomp: 9 filters installed (watchdog, backend-watch, stdin, vcpu, vcpu, migration-out, \
         api, signals, control)",
    );
    assert!(old.wait_line(T, |l| l.contains("ready")).is_some());

    let new_api = dir.join("new.api");
    let sock = dir.join("incoming.sock");
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--incoming")
        .arg(&sock)
        .arg("--api-socket")
        .arg(&new_api)
        .env("BATON_LOG", "info")
        .stderr(log_file(&new_api).unwrap());
    let mut new = Proc::spawn(c).unwrap();
    assert!(wait_until(T, || sock.exists().then_some(())).is_some());
    let (code, out, err) = batonctl(&old_api, &["live-update", sock.to_str().unwrap()]).unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(old.wait_exit(T), Some(0), "{}", read(&old_log));
    let new_log = log_path(&new_api);
    let text = wait_log(
        &new_log,
        "seccomp: 10 filters installed (watchdog, migration-in, backend-watch, stdin, vcpu, vcpu, \
         migration-out, api, signals, control)",
    );
    assert!(text.contains("landlock: "), "{text}");

    // Now a live update from the new VMM that fails after the state was sent.
    let failing_sock = dir.join("failing.sock");
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--incoming")
        .arg(&failing_sock)
        .env("BATON_LIVE_UPDATE_FAIL", "exit-after-state")
        .stderr(Stdio::null());
    let mut failing = Proc::spawn(c).unwrap();
    assert!(wait_until(T, || failing_sock.exists().then_some(())).is_some());
    let (code, out, err) =
        batonctl(&new_api, &["live-update", failing_sock.to_str().unwrap()]).unwrap();
    assert_ne!(code, Some(0), "{out}");
    assert!(err.contains("rolled back"), "{out}{err}");
    assert_ne!(failing.wait_exit(T), Some(0));
    let info = ctl(&new_api, "info").1;
    assert!(info.contains("\"running\""), "{info}");
    let connected = wait_until(T, || {
        ctl(&new_api, "info")
            .1
            .contains("\"backend\":\"connected\"")
            .then_some(())
    });
    assert!(connected.is_some(), "{}", ctl(&new_api, "info").1);
    assert_eq!(ctl(&new_api, "shutdown").0, Some(0));
    assert_eq!(new.wait_exit(T), Some(0), "{}", read(&new_log));
    assert!(
        !read(&new_log).contains("made a forbidden"),
        "{}",
        read(&new_log)
    );
    assert!(!default_ram_file(&name).exists(), "RAM file left behind");
}
