//! Who else on the host can reach a VM: baton-vmm's API socket and `--incoming` sockets are
//! 0600 and check every peer's uid (SO_PEERCRED) against `--allow-uid`; `--incoming` replaces
//! only a stale socket; the default guest RAM file lives in a 0700 per-user directory and is
//! never reused. The tests run as root; the other user is `nobody` (uid 65534).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton_tests::boot::baton_cmd;
use baton_tests::harness::{
    Need, Proc, TempDir, bin, can_run, can_run_with, default_ram_dir, default_ram_file, run_to_end,
    wait_until,
};
use baton_tests::local_users::{NOBODY, Probe, as_uid, can_switch_uid, mode, open_dir, probe_as};

const T: Duration = Duration::from_secs(30);
/// How long a probe waits for an answer: an allowed peer is answered at once.
const WAIT: Duration = Duration::from_secs(5);
const HTTP_INFO: &str = "GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n";

fn unique(tag: &str) -> String {
    format!("sec{}-{tag}", std::process::id())
}

fn cpr(sock: &Path) -> PathBuf {
    PathBuf::from(format!("{}.cpr", sock.display()))
}

/// `baton-vmm --incoming dir/in.sock` plus `extra`, its stderr in dir/vmm.err; waits until
/// it listens (it says so once both sockets are bound).
fn incoming(dir: &TempDir, cmd_prefix: Option<Command>, extra: &[&str]) -> (Proc, PathBuf) {
    let sock = dir.join("in.sock");
    let mut c = cmd_prefix.unwrap_or_else(|| Command::new(bin("baton-vmm")));
    c.arg("--incoming").arg(&sock).args(extra);
    c.stderr(std::fs::File::create(dir.join("vmm.err")).unwrap());
    let p = Proc::spawn(c).unwrap();
    assert!(
        wait_until(T, || log(dir).contains("waiting for a VM").then_some(())).is_some(),
        "the incoming VMM never listened: {}",
        log(dir)
    );
    (p, sock)
}

fn log(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.join("vmm.err")).unwrap_or_default()
}

#[test]
fn sockets_are_0600_under_a_permissive_umask() {
    let dir = TempDir::new("sec-mode");
    open_dir(&dir.0).unwrap();
    let api = dir.join("api.sock");
    // umask 0 would make a plain bind 0777.
    let mut sh = Command::new("sh");
    sh.args(["-c", "umask 0 && exec \"$0\" \"$@\""])
        .arg(bin("baton-vmm"));
    let (_vmm, sock) = incoming(&dir, Some(sh), &["--api-socket", api.to_str().unwrap()]);
    for p in [&api, &sock, &cpr(&sock)] {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    if can_run_with("sockets_are_0600 (nobody part)", &[Need::Root]) {
        // The mode alone keeps another user out.
        let got = probe_as(Some(NOBODY), &[&sock], "", WAIT);
        assert!(
            matches!(&got, Probe::NoConnect(e) if e.starts_with("PermissionDenied")),
            "{got:?}"
        );
    }
}

#[test]
fn incoming_refuses_another_uid_and_lets_its_own_in() {
    if !can_run_with("incoming_refuses_another_uid", &[Need::Root]) {
        return;
    }
    let dir = TempDir::new("sec-in");
    open_dir(&dir.0).unwrap();
    let (_vmm, sock) = incoming(&dir, None, &[]);
    // Open the mode by hand: SO_PEERCRED still keeps nobody out, before any handshake.
    for p in [&sock, &cpr(&sock)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let got = probe_as(Some(NOBODY), &[&sock, &cpr(&sock)], "", WAIT);
    assert_eq!(got, Probe::Closed, "{}", log(&dir));
    let logged = wait_until(T, || {
        let l = log(&dir);
        l.contains("refused a connection").then_some(l)
    })
    .unwrap_or_else(|| log(&dir));
    assert!(
        logged.contains(&format!("uid {NOBODY}")) && logged.contains("pid "),
        "the refusal is logged with uid and pid: {logged}"
    );
    // The VMM's own uid gets through: the new VMM says hello.
    let got = probe_as(None, &[&sock, &cpr(&sock)], "", WAIT);
    assert!(matches!(got, Probe::Answered(_)), "{got:?}: {}", log(&dir));
}

#[test]
fn allow_uid_lets_another_uid_into_incoming() {
    if !can_run_with("allow_uid_lets_another_uid_into_incoming", &[Need::Root]) {
        return;
    }
    let dir = TempDir::new("sec-allow");
    open_dir(&dir.0).unwrap();
    let (_vmm, sock) = incoming(&dir, None, &["--allow-uid", &NOBODY.to_string()]);
    // Reachable through the socket's ACL, without opening its mode to everyone.
    assert_eq!(mode(&sock) & 0o007, 0, "others have no access");
    let got = probe_as(Some(NOBODY), &[&sock, &cpr(&sock)], "", WAIT);
    assert!(matches!(got, Probe::Answered(_)), "{got:?}: {}", log(&dir));
}

#[test]
fn root_is_refused_unless_it_is_the_vmm_uid_or_listed() {
    if !can_run_with("root_is_refused", &[Need::Root]) {
        return;
    }
    for (extra, want_in) in [(None, false), (Some("0"), true)] {
        let dir = TempDir::new("sec-root");
        // The VMM runs as nobody: it must be able to create its sockets here.
        std::os::unix::fs::chown(&dir.0, Some(NOBODY), Some(NOBODY)).unwrap();
        let mut c = as_uid(Command::new(bin("baton-vmm")), NOBODY);
        if let Some(uid) = extra {
            c.args(["--allow-uid", uid]);
        }
        let (_vmm, sock) = incoming(&dir, Some(c), &[]);
        // Root passes any file mode; SO_PEERCRED decides.
        let got = probe_as(None, &[&sock, &cpr(&sock)], "", WAIT);
        if want_in {
            assert!(matches!(got, Probe::Answered(_)), "{got:?}: {}", log(&dir));
        } else {
            assert_eq!(got, Probe::Closed, "{}", log(&dir));
        }
    }
}

#[test]
fn incoming_replaces_only_a_stale_socket() {
    let dir = TempDir::new("sec-stale");
    let file = dir.join("file");
    std::fs::write(&file, "keep").unwrap();
    let sub = dir.join("dir");
    std::fs::create_dir(&sub).unwrap();
    let target = dir.join("target");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for (p, what) in [
        (&file, "regular file"),
        (&sub, "directory"),
        (&link, "symlink"),
    ] {
        let mut c = Command::new(bin("baton-vmm"));
        c.arg("--incoming").arg(p);
        let f = run_to_end(c, T).unwrap();
        assert!(matches!(f.code, Some(c) if c != 0), "{what}: {f:?}");
        for needle in [p.to_str().unwrap(), what, "not a socket"] {
            assert!(
                f.stderr.contains(needle),
                "{what}: {needle:?}: {}",
                f.stderr
            );
        }
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    assert!(sub.is_dir());
    assert_eq!(std::fs::read_link(&link).unwrap(), target);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    // A stale socket (nobody listening) is replaced and served.
    let stale = dir.join("in.sock");
    drop(UnixListener::bind(&stale).unwrap());
    drop(UnixListener::bind(cpr(&stale)).unwrap());
    let (_vmm, sock) = incoming(&dir, None, &[]);
    assert_eq!(sock, stale);
    let got = probe_as(None, &[&sock, &cpr(&sock)], "", WAIT);
    assert!(matches!(got, Probe::Answered(_)), "{got:?}: {}", log(&dir));
}

/// The test guest ticking, with an API socket in `dir`; stderr in dir/vmm.err.
fn vm_with_api(dir: &TempDir, name: &str, extra: &[&str]) -> (Proc, PathBuf) {
    let api = dir.join("api.sock");
    let mut c = baton_cmd(1, "64M", "test=ticks n=0 ms=50");
    c.args(["--name", name])
        .arg("--api-socket")
        .arg(&api)
        .args(extra);
    c.stderr(std::fs::File::create(dir.join("vmm.err")).unwrap());
    let mut p = Proc::spawn(c).unwrap();
    assert!(
        p.wait_line(T, |l| l.starts_with("tick 1")).is_some(),
        "{}\n{}",
        p.transcript(),
        log(dir)
    );
    (p, api)
}

fn batonctl_info(api: &Path, uid: Option<u32>) -> (Option<i32>, String) {
    let mut c = Command::new(bin("batonctl"));
    c.arg("--api-socket").arg(api).arg("info");
    if let Some(uid) = uid {
        c = as_uid(c, uid);
    }
    let f = run_to_end(c, T).unwrap();
    (f.code, f.stdout + &f.stderr)
}

#[test]
fn api_refuses_another_uid_unless_allowed() {
    if !can_run_with(
        "api_refuses_another_uid",
        &[Need::Kvm, Need::Guest, Need::Root],
    ) {
        return;
    }
    let dir = TempDir::new("sec-api");
    open_dir(&dir.0).unwrap();
    let (_vm, api) = vm_with_api(&dir, &unique("api"), &[]);
    assert_eq!(mode(&api), 0o600);
    let (code, out) = batonctl_info(&api, None);
    assert_eq!(code, Some(0), "the VMM's own uid is served: {out}");
    let (code, out) = batonctl_info(&api, Some(NOBODY));
    assert_ne!(code, Some(0), "{out}");
    // With the mode opened by hand, nobody connects and is hung up on unanswered.
    std::fs::set_permissions(&api, std::fs::Permissions::from_mode(0o666)).unwrap();
    let got = probe_as(Some(NOBODY), &[&api], HTTP_INFO, WAIT);
    assert_eq!(got, Probe::Closed, "{}", log(&dir));
    let logged = wait_until(T, || {
        let l = log(&dir);
        l.contains("refused a connection").then_some(l)
    })
    .unwrap_or_else(|| log(&dir));
    assert!(logged.contains(&format!("uid {NOBODY}")), "{logged}");
    // The same request from the VMM's uid is answered.
    let got = probe_as(None, &[&api], HTTP_INFO, WAIT);
    assert!(
        matches!(&got, Probe::Answered(a) if a.starts_with("HTTP/1.1 200")),
        "{got:?}"
    );

    let dir = TempDir::new("sec-api-allow");
    open_dir(&dir.0).unwrap();
    let nobody = NOBODY.to_string();
    let (_vm, api) = vm_with_api(&dir, &unique("api-allow"), &["--allow-uid", &nobody]);
    let (code, out) = batonctl_info(&api, Some(NOBODY));
    assert_eq!(code, Some(0), "--allow-uid {NOBODY}: {out}\n{}", log(&dir));
    assert!(out.contains("\"running\""), "{out}");
    let (code, out) = batonctl_info(&api, None);
    assert_eq!(code, Some(0), "the VMM's own uid stays allowed: {out}");
}

/// Runs baton-vmm with the test guest as VM `name`, expecting a refusal naming `needles`.
fn refused_ram(name: &str, needles: &[&str]) {
    let mut c = baton_cmd(1, "64M", "test=boot");
    c.args(["--name", name]);
    let f = run_to_end(c, T).unwrap();
    assert!(matches!(f.code, Some(c) if c != 0), "{name}: {f:?}");
    for n in needles {
        assert!(f.stderr.contains(n), "{name}: {n:?}: {}", f.stderr);
    }
}

#[test]
fn default_ram_file_is_private_and_never_reused() {
    if !can_run("default_ram_file_is_private") {
        return;
    }
    // A VM that runs shows the directory it made (or found) is 0700 and the file 0600.
    let dir = TempDir::new("sec-ram");
    let name = unique("ram-ok");
    let (vm, _api) = vm_with_api(&dir, &name, &[]);
    assert_eq!(mode(&default_ram_dir()), 0o700);
    assert_eq!(mode(&default_ram_file(&name)), 0o600);
    drop(vm);
    assert!(!default_ram_file(&name).exists(), "removed at exit");

    // A file planted at the default path (here by another user) is refused, never opened.
    let planted = unique("ram-planted");
    let p = default_ram_file(&planted);
    std::fs::write(&p, "planted").unwrap();
    if can_switch_uid() {
        std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    refused_ram(&planted, &[p.to_str().unwrap(), "already exists"]);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "planted");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 7, "not resized");
    std::fs::remove_file(&p).unwrap();

    // A symlink at the default path is refused; its target is neither created nor written.
    let linked = unique("ram-link");
    let p = default_ram_file(&linked);
    let target = dir.join("target");
    std::os::unix::fs::symlink(&target, &p).unwrap();
    refused_ram(&linked, &[p.to_str().unwrap(), "symlink"]);
    assert!(!target.exists());
    assert!(std::fs::symlink_metadata(&p).unwrap().is_symlink());
    std::fs::remove_file(&p).unwrap();
}
