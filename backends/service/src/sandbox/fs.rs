//! Landlock: once set up, a process gives up the file system (every access right of Landlock
//! ABI 7, the newest this code is tested with), TCP bind/connect, and whatever IPC scopes it
//! asks for ([`Scopes`]), keeping only the rules it asks for.
//!
//! The back-ends scope signals but not abstract UNIX sockets, because `sd_notify` may target
//! one (`NOTIFY_SOCKET=@...`) after this restriction; seccomp denies `socket` and `connect` once
//! set-up is over anyway. baton-vmm scopes abstract UNIX sockets but not signals: a live update
//! that rolls back kills the new VMM, a process outside its domain.
//! Descriptors opened before the restriction (image, TAP queues, listening socket, guest RAM)
//! keep working: Landlock checks at open time.
//!
//! Connecting to a *pathname* UNIX socket is not a right of ABI 7 (ABI 9 adds
//! `LANDLOCK_ACCESS_FS_RESOLVE_UNIX`); it is not handled here, so it stays allowed on every
//! kernel. Which threads may connect at all is seccomp's business.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

use super::{SandboxError, Scopes};

/// The Landlock ABI whose rights are handled (the newest tested; a newer kernel enforces these,
/// an older one as many as it knows).
const ABI_TESTED: ABI = ABI::V7;

/// File system access a back-end keeps after set-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsRule {
    /// Removing files in this directory (and below: Landlock rules cover a hierarchy): a
    /// back-end that bound its socket removes the socket file when it stops.
    RemoveFileIn(PathBuf),
    /// Removing files and making sockets in this directory: renaming a socket bound beside
    /// another over it (baton-vmm's console socket in a live update).
    ReplaceSocketIn(PathBuf),
}

impl FsRule {
    /// Removing `file` (a relative path is taken from the current directory, as unlink takes
    /// it): the rule covers its directory, the narrowest Landlock allows.
    pub fn remove_file(file: &Path) -> Self {
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self::RemoveFileIn(dir.to_path_buf())
    }

    /// Renaming a socket over `file` (and removing it): the rule covers its directory.
    pub fn replace_socket(file: &Path) -> Self {
        match Self::remove_file(file) {
            Self::RemoveFileIn(dir) | Self::ReplaceSocketIn(dir) => Self::ReplaceSocketIn(dir),
        }
    }
}

impl std::fmt::Display for FsRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsRule::RemoveFileIn(d) => write!(f, "remove files in {}", d.display()),
            FsRule::ReplaceSocketIn(d) => {
                write!(f, "remove files and make sockets in {}", d.display())
            }
        }
    }
}

/// Restricts the calling thread (and the threads it spawns afterwards) to `rules` and
/// `scopes`; logs the outcome if `log`. Where the kernel lacks Landlock or some of its rights:
/// one warning, no error.
pub(super) fn restrict(rules: &[FsRule], scopes: Scopes, log: bool) -> Result<(), SandboxError> {
    let mut scope = landlock::BitFlags::<Scope>::EMPTY;
    if scopes.signals {
        scope |= Scope::Signal;
    }
    if scopes.abstract_unix_sockets {
        scope |= Scope::AbstractUnixSocket;
    }
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI_TESTED))?
        .handle_access(AccessNet::from_all(ABI_TESTED))?;
    if !scope.is_empty() {
        ruleset = ruleset.scope(scope)?;
    }
    let mut ruleset = ruleset.create()?;
    for rule in rules {
        match rule {
            FsRule::RemoveFileIn(dir) => {
                let fd = PathFd::new(dir).map_err(|source| SandboxError::RulePath {
                    path: dir.clone(),
                    source,
                })?;
                ruleset = ruleset.add_rule(PathBeneath::new(fd, AccessFs::RemoveFile))?;
            }
            FsRule::ReplaceSocketIn(dir) => {
                let fd = PathFd::new(dir).map_err(|source| SandboxError::RulePath {
                    path: dir.clone(),
                    source,
                })?;
                let access = AccessFs::RemoveFile | AccessFs::MakeSock;
                ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
            }
        }
    }
    let status = ruleset.restrict_self()?;
    if !log {
        return Ok(());
    }
    let mut ipc = String::from("no TCP bind/connect");
    if scopes.signals {
        ipc.push_str(", no signals outside");
    }
    if scopes.abstract_unix_sockets {
        ipc.push_str(", no abstract UNIX sockets outside");
    }
    let kept = if rules.is_empty() {
        "no file system access".to_string()
    } else {
        let r: Vec<String> = rules.iter().map(ToString::to_string).collect();
        format!("file system access only to {}", r.join(", "))
    };
    match (status.ruleset, status.landlock) {
        (RulesetStatus::FullyEnforced, _) => tracing::info!(
            "landlock: enforced (ABI {}): {kept}, {ipc}",
            ABI_TESTED as i32
        ),
        (RulesetStatus::PartiallyEnforced, LandlockStatus::Available { effective_abi, .. }) => {
            tracing::warn!(
                "landlock: partially enforced: the kernel has Landlock ABI {effective_abi}, \
                 baton asks for ABI {} ({kept}); the rights the kernel lacks are not restricted",
                ABI_TESTED as i32
            )
        }
        (_, LandlockStatus::NotImplemented) => tracing::warn!(
            "landlock: not enforced: this kernel is built without Landlock; continuing \
             without it (--landlock false silences this)"
        ),
        (_, LandlockStatus::NotEnabled) => tracing::warn!(
            "landlock: not enforced: Landlock is not enabled at boot (lsm=...); continuing \
             without it (--landlock false silences this)"
        ),
        (s, l) => tracing::warn!("landlock: not fully enforced ({s:?}, {l:?}); continuing"),
    }
    Ok(())
}
