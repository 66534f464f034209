//! `--user UID[:GID]`: started as root to open what needs privilege (the image, TAP queues,
//! /dev/kvm, the bound socket), a process drops to an unprivileged uid and gid for good before
//! it starts a thread or enters the sandbox, and checks that the drop held.
//!
//! The drop is `setgroups([])`, `setresgid(g, g, g)`, `setresuid(u, u, u)` (glibc applies each
//! to every thread of the process), then `getresuid`/`getresgid`/`getgroups` and the
//! capability sets in /proc/self/status must show exactly that: no way back to root, no
//! capability left (leaving uid 0 clears the permitted, effective and ambient sets).

use std::path::Path;
use std::str::FromStr;

/// The uid and gid to drop to, parsed from `UID[:GID]` (numbers; GID defaults to UID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    /// The real, effective and saved uid after the drop.
    pub uid: u32,
    /// The real, effective and saved gid after the drop (no supplementary groups).
    pub gid: u32,
}

impl FromStr for User {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num = |p: &str, what: &str| {
            p.parse::<u32>()
                .ok()
                .filter(|n| *n != u32::MAX)
                .ok_or_else(|| format!("'{p}' is not a numeric {what} (UID[:GID], numbers)"))
        };
        let (u, g) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let uid = num(u, "uid")?;
        let gid = g.map_or(Ok(uid), |g| num(g, "gid"))?;
        if uid == 0 {
            return Err("--user 0 would keep root: name an unprivileged uid".into());
        }
        Ok(Self { uid, gid })
    }
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// Why `--user` could not be honoured.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// Only root can change to another uid.
    #[error(
        "--user {0} needs the process to be started as root (it opens what needs privilege, then \
         drops to {0}); it runs as uid {1}"
    )]
    NotRoot(User, u32),
    /// A system call of the drop failed.
    #[error("--user {0}: {1} failed: {2}")]
    Call(User, &'static str, std::io::Error),
    /// The process still holds something after the drop.
    #[error("--user {0}: after the drop {1}")]
    Kept(User, String),
}

/// Refuses `--user` unless the process runs as root; call before opening anything.
pub fn check_can_drop(user: Option<User>) -> Result<(), DropError> {
    let euid = nix::unistd::geteuid().as_raw();
    match user {
        Some(u) if euid != 0 => Err(DropError::NotRoot(u, euid)),
        _ => Ok(()),
    }
}

/// Gives a socket file this process bound to `user`, so that it owns it after the drop.
pub fn chown_socket(path: &Path, user: User) -> Result<(), DropError> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| DropError::Call(user, "chown of the socket", e))
}

/// A back-end's drop once set up (what needs root is open, the socket bound): with `--user`,
/// gives the socket file this process bound (`bound_socket`; none under socket activation) to
/// the user, then drops to it ([`drop_to`], whose conditions apply); without, does nothing.
pub fn drop_after_setup(user: Option<User>, bound_socket: Option<&Path>) -> Result<(), DropError> {
    let Some(user) = user else {
        return Ok(());
    };
    if let Some(path) = bound_socket {
        chown_socket(path, user)?;
    }
    drop_to(user)
}

fn check(user: User, what: &'static str, r: libc::c_int) -> Result<(), DropError> {
    if r == 0 {
        Ok(())
    } else {
        Err(DropError::Call(user, what, std::io::Error::last_os_error()))
    }
}

/// Drops to `user` for good and verifies it; call before any thread is started and before the
/// sandbox (seccomp would not allow these calls, and a thread started earlier with a filter
/// would be killed by glibc's set-id broadcast).
pub fn drop_to(user: User) -> Result<(), DropError> {
    // SAFETY: setgroups with a count of 0 reads no memory.
    check(user, "setgroups([])", unsafe {
        libc::setgroups(0, std::ptr::null())
    })?;
    // SAFETY: plain system calls on integers (glibc runs them on every thread).
    check(user, "setresgid", unsafe {
        libc::setresgid(user.gid, user.gid, user.gid)
    })?;
    // SAFETY: as above.
    check(user, "setresuid", unsafe {
        libc::setresuid(user.uid, user.uid, user.uid)
    })?;
    verify(user)
}

fn verify(user: User) -> Result<(), DropError> {
    let kept = |s: String| Err(DropError::Kept(user, s));
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three pointers are to live u32s.
    check(user, "getresuid", unsafe {
        libc::getresuid(&mut r, &mut e, &mut s)
    })?;
    if (r, e, s) != (user.uid, user.uid, user.uid) {
        return kept(format!("the uids are {r}/{e}/{s} (real/effective/saved)"));
    }
    // SAFETY: as above.
    check(user, "getresgid", unsafe {
        libc::getresgid(&mut r, &mut e, &mut s)
    })?;
    if (r, e, s) != (user.gid, user.gid, user.gid) {
        return kept(format!("the gids are {r}/{e}/{s} (real/effective/saved)"));
    }
    // SAFETY: a count of 0 only asks for the number of groups.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if groups != 0 {
        return kept(format!("{groups} supplementary groups are left"));
    }
    // SAFETY: setuid(0) must fail now; if it succeeded the drop is not final.
    if unsafe { libc::setuid(0) } == 0 {
        return kept("setuid(0) succeeded".into());
    }
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| DropError::Call(user, "reading /proc/self/status", e))?;
    for set in ["CapPrm", "CapEff", "CapAmb"] {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(set)?.strip_prefix(':'))
            .map(str::trim);
        match value {
            Some(v) if v.bytes().all(|b| b == b'0') => {}
            Some(v) => return kept(format!("{set} is {v}")),
            None => return kept(format!("/proc/self/status has no {set}")),
        }
    }
    tracing::info!(
        uid = user.uid,
        gid = user.gid,
        "dropped privileges: no capabilities"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uid_and_gid() {
        assert_eq!(
            "65534".parse::<User>(),
            Ok(User {
                uid: 65534,
                gid: 65534
            })
        );
        assert_eq!(
            "1000:100".parse::<User>(),
            Ok(User {
                uid: 1000,
                gid: 100
            })
        );
        for bad in [
            "",
            "0",
            "0:0",
            "x",
            "1000:",
            ":1000",
            "1000:x",
            "-1",
            "4294967295",
        ] {
            assert!(bad.parse::<User>().is_err(), "{bad}");
        }
    }
}

/// Who may connect and who the service becomes: the options every back-end takes
/// (`#[command(flatten)]`).
#[derive(Clone, Debug, clap::Args)]
pub struct ServiceArgs {
    /// A uid allowed to connect as a front-end (repeatable; default: this service's own uid).
    /// Every connection's SO_PEERCRED is checked; others are closed at once.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Started as root: once the device's files (image, TAP queues) are open and the socket
    /// bound (and given to this uid), drop to UID or UID:GID (numbers; GID defaults to UID)
    /// with no capability, before the sandbox.
    #[arg(long, value_name = "UID[:GID]")]
    pub user: Option<User>,
}
