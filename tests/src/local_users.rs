//! Clients of another local user, for the tests of who may use the VMM's sockets (the tests
//! run as root; the other user is `nobody`, uid 65534).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{bin, run_to_end};

/// The other user: `nobody`.
pub const NOBODY: u32 = 65534;

/// Whether clients can be run as another uid here (that takes root).
pub fn can_switch_uid() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `cmd` set to run as `uid`, with the same number as its gid and no supplementary groups
/// (std drops them when root sets a uid).
pub fn as_uid(mut cmd: Command, uid: u32) -> Command {
    cmd.uid(uid).gid(uid);
    cmd
}

/// What a client got from a socket ([`probe_as`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// connect() failed, e.g. `PermissionDenied`: the socket's mode keeps the uid out.
    NoConnect(String),
    /// Connected, and was hung up on without a byte.
    Closed,
    /// The first bytes of the answer (escaped).
    Answered(String),
    /// Connected; nothing came within the wait, and the connection stayed open.
    Silent,
    /// The probe itself failed.
    Failed(String),
}

/// Connects to `paths` in order as `uid` (`None`: as ourselves), sends `send` on the first
/// connection and reports what came back within `wait`.
pub fn probe_as(uid: Option<u32>, paths: &[&Path], send: &str, wait: Duration) -> Probe {
    let mut cmd = Command::new(bin("baton-sock-probe"));
    cmd.args(["--send", send])
        .args(["--wait-ms", &wait.as_millis().to_string()])
        .args(paths);
    if let Some(uid) = uid {
        cmd = as_uid(cmd, uid);
    }
    let f = match run_to_end(cmd, wait + Duration::from_secs(10)) {
        Ok(f) => f,
        Err(e) => return Probe::Failed(format!("cannot run baton-sock-probe: {e}")),
    };
    let line = f.stdout.trim();
    if line == "closed" {
        Probe::Closed
    } else if line == "silent" {
        Probe::Silent
    } else if let Some(r) = line.strip_prefix("answered ") {
        // "answered N: TEXT"
        Probe::Answered(r.split_once(": ").map_or(r, |(_, t)| t).to_string())
    } else if let Some(r) = line.strip_prefix("no-connect ") {
        Probe::NoConnect(r.to_string())
    } else {
        Probe::Failed(format!("{f:?}"))
    }
}

/// Makes `dir` reachable (searchable, not writable) by every user, as a socket's directory
/// must be for a client of another uid.
pub fn open_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

/// Permission bits of `path` (not following a symlink).
pub fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0)
}

/// Whom the tests run baton's processes as: when the tests run as root, the unprivileged
/// `nobody` (uid 65534) with the group that owns `/dev/kvm` (a VMM started as that user
/// reaches KVM through it, as a deployment's would), unless `BATON_TEST_AS_ROOT` is set to
/// keep them root (to tell a privilege problem from another while debugging). `None` when the
/// tests do not run as root: the processes run as the tests' own user then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestUser {
    /// The uid (nobody).
    pub uid: u32,
    /// The gid: `/dev/kvm`'s group where that group may read and write it, else nobody's.
    pub gid: u32,
}

/// The [`TestUser`] of this run, if the processes drop privileges in it.
pub fn test_user() -> Option<TestUser> {
    use std::os::unix::fs::MetadataExt;
    if !can_switch_uid() || std::env::var_os("BATON_TEST_AS_ROOT").is_some() {
        return None;
    }
    let gid = std::fs::metadata("/dev/kvm")
        .ok()
        .filter(|m| m.mode() & 0o060 == 0o060)
        .map_or(NOBODY, |m| m.gid());
    Some(TestUser { uid: NOBODY, gid })
}

/// The options that make a baton back-end started as root drop to the [`TestUser`] once its
/// image or TAP is open and its socket bound, still answering root (whose tests and drivers
/// connect to it): `--user UID --allow-uid 0`. None without a test user, or when `given`
/// already says whom to run as or let in (a test of those options).
pub fn backend_user_args(given: &[&str]) -> Vec<String> {
    let Some(u) = test_user() else {
        return Vec::new();
    };
    if given.iter().any(|a| *a == "--user" || *a == "--allow-uid") {
        return Vec::new();
    }
    ["--user", &u.uid.to_string(), "--allow-uid", "0"]
        .map(str::to_string)
        .to_vec()
}

/// Gives a scratch directory to the [`TestUser`], mode 0700, so that the processes the tests
/// start as that user can create their sockets and files in it and open each other's (a new
/// VMM opens the RAM file the old one created); root, running the tests, reaches it anyway.
pub fn give_to_test_user(dir: &Path) -> std::io::Result<()> {
    if let Some(u) = test_user() {
        std::os::unix::fs::chown(dir, Some(u.uid), Some(u.gid))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The options that make a baton-vmm the tests boot as root drop to the [`TestUser`] (its
/// gid the one that reaches `/dev/kvm`) once KVM, the kernel and the RAM file are open,
/// still answering root on its API (the tests and batonctl): `--user UID:GID --allow-uid 0`.
/// None without a test user.
pub fn vmm_user_args() -> Vec<String> {
    test_user().map_or_else(Vec::new, |u| {
        vec![
            "--user".into(),
            format!("{}:{}", u.uid, u.gid),
            "--allow-uid".into(),
            "0".into(),
        ]
    })
}

/// Makes `cmd`, a `baton-vmm --incoming` (which takes no `--user`: it never holds root) or a
/// peer back-end, run as the [`TestUser`] from the start, letting root in where it is a baton
/// process (`--allow-uid 0` unless `given` names uids itself). Nothing without a test user.
pub fn start_as_test_user(cmd: &mut Command, given: &[&str], baton: bool) {
    if let Some(u) = test_user() {
        cmd.uid(u.uid).gid(u.gid);
        if baton && !given.contains(&"--allow-uid") {
            cmd.args(["--allow-uid", "0"]);
        }
    }
}

/// The uid the VMMs the tests start run as: the [`TestUser`]'s, else ours.
pub fn vmm_uid() -> u32 {
    test_user().map_or_else(|| nix::unistd::geteuid().as_raw(), |u| u.uid)
}

/// Where a VMM the tests started ([`vmm_user_args`], [`start_as_test_user`]) keeps the RAM
/// file of VM `name` by default: `/dev/shm/baton-UID/NAME.ram`, UID [`vmm_uid`].
pub fn test_ram_file(name: &str) -> std::path::PathBuf {
    crate::harness::ram_dir_of(vmm_uid()).join(format!("{name}.ram"))
}

/// Gives a socket the test binds itself (a fake back-end standing in for one of the VM's own
/// user) to the [`TestUser`], so that a VMM running as that user can connect to it.
pub fn give_socket_to_test_user(path: &Path) {
    if let Some(u) = test_user() {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// The real uid of process `pid` (from /proc/PID/status).
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().next()?.parse().ok()
}
