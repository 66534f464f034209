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
