//! baton-vmm's sandbox, built on the back-ends' mechanism (`baton_service::sandbox`: seccomp
//! filters per thread kind with a SIGSYS report, Landlock, `--seccomp`/`--landlock`).
//!
//! **seccomp.** Every thread installs the allowlist of its kind ([`kinds`]) before it does its
//! job, and the main thread its own once everything runs; nothing runs unfiltered past
//! start-up, including both sides of a live update and a rollback (unlike Cloud Hypervisor,
//! which turns seccomp off on the source of a live upgrade). Threads are started by the main
//! thread while it is still unfiltered, so that each kind's list holds only what that kind
//! does (a thread started by a filtered thread would be limited by its parent's filter too).
//! The live update's two sides run on threads of their own for the same reason: the outgoing
//! side on `migration-out` (started with the VM, it takes the API's requests), the incoming
//! side on `migration-in`, which hands the VM it built to the main thread to start its threads.
//!
//! **Landlock.** Entered once every file the VMM needs is open: at boot after the VM is built
//! and the kernel and initramfs are loaded; on an incoming VMM once the VM is built from the
//! old VMM's configuration (RAM file and serial file opened by path, /dev/kvm opened) and
//! before the state arrives (the `migration-in` thread, which exists by then, enters it itself;
//! the `watchdog` thread, started first, has no path-based system call in its filter). Kept:
//! removing files in the directories of the API socket, the `--incoming` sockets and the RAM
//! file (each is removed at exit by the VMM that owns it). Abstract UNIX sockets are scoped;
//! signals are not, because a rollback kills the new VMM, which is outside this domain.
//! Connecting to the back-ends' and the new VMM's pathname sockets is not a Landlock right
//! before ABI 9 and is not handled: the new VMM's socket is named only by the live-update
//! request, so no rule could be written for it in advance (see the service's `fs.rs`).

pub mod ioctls;
pub mod kinds;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use baton_service::sandbox::{
    FsRule, Gate, Sandbox, SandboxArgs, SandboxError, Scopes, ThreadKind, Violation,
};

use crate::vm::Vm;

/// The name on stderr when a forbidden system call stops the VMM.
pub const SERVICE: &str = "baton-vmm";

/// Landlock's IPC scopes for the VMM: abstract UNIX sockets, not signals (a rollback kills
/// the new VMM).
pub const SCOPES: Scopes = Scopes {
    signals: false,
    abstract_unix_sockets: true,
};

/// Files this VMM removes when it stops, besides the RAM file: what Landlock must keep.
#[derive(Debug, Clone, Default)]
pub struct Removable {
    /// The API socket.
    pub api_socket: Option<PathBuf>,
    /// The `--incoming` state socket (the cpr socket sits beside it).
    pub incoming: Option<PathBuf>,
    /// The console socket (`--serial socket=PATH`): removed at exit, or renamed over the old
    /// VMM's in a live update.
    pub console_socket: Option<PathBuf>,
}

/// The Landlock rules of a VMM running `ram_file` with the sockets of `keep`.
pub fn fs_rules(keep: &Removable, ram_file: &Path) -> Vec<FsRule> {
    let mut rules: Vec<FsRule> = Vec::new();
    let paths = [
        keep.api_socket.as_deref(),
        keep.incoming.as_deref(),
        Some(ram_file),
    ];
    for p in paths.into_iter().flatten() {
        let r = FsRule::remove_file(p);
        if !rules.contains(&r) {
            rules.push(r);
        }
    }
    if let Some(p) = &keep.console_socket {
        rules.push(FsRule::replace_socket(p));
    }
    rules
}

/// Restricts the calling thread (and the threads it starts afterwards) with Landlock, keeping
/// what `vm` and `keep` need.
pub fn restrict_fs(sandbox: &Sandbox, keep: &Removable, vm: &Vm) -> Result<(), SandboxError> {
    sandbox.restrict_fs_scoped(&fs_rules(keep, &vm.ram.path), SCOPES)
}

/// The thread kinds a test can make misbehave (`--test-sandbox-violation-in`).
pub const VIOLATION_POINTS: [&str; 5] = ["control", "api", "vcpu", "migration-out", "migration-in"];

/// The test-only violation: which thread kind makes it, and what.
static PLANNED: OnceLock<(String, Violation)> = OnceLock::new();

/// Test only: makes the first thread of `kind` that reaches its violation point do `what`.
pub fn plan_violation(kind: &str, what: Violation) {
    tracing::warn!(
        "test: the {kind} thread will try a forbidden call ({what:?}) inside the sandbox"
    );
    let _ = PLANNED.set((kind.to_string(), what));
}

/// A thread of `kind` passes its violation point: the main thread after the start-up report,
/// the API thread on a request, a vCPU thread once in its filter, `migration-out` when a live
/// update starts, `migration-in` once in its filter.
pub fn violation_point(kind: &str) {
    if let Some((k, what)) = PLANNED.get() {
        if k == kind {
            baton_service::sandbox::violate(what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_cover_each_directory_once() {
        let keep = Removable {
            api_socket: Some("/run/baton/vm.sock".into()),
            incoming: Some("/run/baton/vm.incoming".into()),
            console_socket: Some("/run/baton/console/vm.sock".into()),
        };
        let rules = fs_rules(&keep, Path::new("/dev/shm/baton-0/vm.ram"));
        assert_eq!(
            rules,
            vec![
                FsRule::RemoveFileIn("/run/baton".into()),
                FsRule::RemoveFileIn("/dev/shm/baton-0".into()),
                FsRule::ReplaceSocketIn("/run/baton/console".into()),
            ]
        );
        let rel = fs_rules(&Removable::default(), Path::new("vm.ram"));
        assert_eq!(rel, vec![FsRule::RemoveFileIn(".".into())]);
    }
}
