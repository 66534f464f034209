//! The sandbox of baton's processes: once set up, a process keeps only the system calls and
//! the file system access it still needs, so that a front-end or guest that finds a bug in it
//! gets little more than the process already had. Used by both back-ends and by baton-vmm
//! (one copy of the mechanism; each binary declares its own thread kinds and rules).
//!
//! Two layers, both from crates (what Firecracker and Cloud Hypervisor use for the first):
//! - **seccomp** ([`seccomp`], `seccompiler`): an allowlist per *thread kind*, installed by each
//!   thread itself once its own set-up is done (image, TAP, io_uring ring, epoll set), so a
//!   thread keeps only what its loop uses. This module holds the mechanism and what every thread
//!   needs (memory, futexes, logging, exit); each binary declares its thread kinds' lists in
//!   its own crate (`seccomp.rs` of baton-blk and of baton-net-tap, `vmm/src/sandbox/`). A
//!   thread spawned *after* its parent installed a filter inherits it: a parent that spawns
//!   later threads must allow what they need (and name their kind with [`inherit`]).
//! - **Landlock** (`fs.rs`, `landlock`): after set-up the process gives up file system access
//!   (every right of Landlock ABI 7) except the few rules it asks for (baton-net-tap:
//!   removing its socket file at exit), TCP bind/connect and, as asked ([`Scopes`]), signals or
//!   abstract UNIX sockets outside the sandbox. Landlock applies to the calling thread and the
//!   threads it spawns afterwards, so [`Sandbox::restrict_fs`] is called before any thread is
//!   started (a thread that exists already restricts itself: [`Sandbox::restrict_fs_scoped`]
//!   may be called on several threads and logs once). Best effort: a kernel without Landlock
//!   (or with an older ABI) gets one warning and as much as it supports.
//!
//! Order in each back-end's `main`: set-up → [`Sandbox::new`] → [`Sandbox::restrict_fs`] →
//! spawn threads (each enters as its kind and reports back before the next step) →
//! `sd_notify` → the main thread's [`Sandbox::enter`] → [`Sandbox::report`] → serve.
//! Threads go through [`Sandbox::spawn`], which waits until the thread has entered.
//!
//! Options (every binary flattens [`SandboxArgs`]): `--seccomp true|false|log` (default true),
//! `--landlock true|false` (default true).

mod fs;
mod names;
pub mod seccomp;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use fs::FsRule;
pub use seccomp::{Syscall, ThreadKind};

/// What a syscall outside a thread's allowlist does (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Enforced: the service stops at once, naming the system call on stderr (exit 159).
    #[value(name = "true")]
    Enforce,
    /// No seccomp filter.
    #[value(name = "false")]
    Off,
    /// Allowed, but the kernel logs it (SECCOMP_RET_LOG: an audit record of type 1326 with
    /// `syscall=N` in `dmesg` or `ausearch -m SECCOMP`): for finding a missing syscall.
    Log,
}

/// Which of Landlock's IPC scopes (ABI 6) a process takes: with a scope set, the process
/// cannot reach processes outside its Landlock domain that way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scopes {
    /// No signals to processes outside the domain.
    pub signals: bool,
    /// No connecting to abstract UNIX sockets created outside the domain.
    pub abstract_unix_sockets: bool,
}

impl Scopes {
    /// The back-ends': signals scoped; abstract UNIX sockets not (`sd_notify` may use one).
    pub const BACKEND: Scopes = Scopes {
        signals: true,
        abstract_unix_sockets: false,
    };
}

/// The sandbox options, the same for every binary (`#[command(flatten)]`).
#[derive(Clone, Debug, clap::Args)]
pub struct SandboxArgs {
    /// seccomp allowlist on every thread once set up: `true` (a forbidden system call stops the
    /// process and is named on stderr), `false`, or `log` (allowed but logged by the kernel:
    /// dmesg / audit, type 1326).
    #[arg(long, value_enum, default_value_t = SeccompMode::Enforce, value_name = "MODE")]
    pub seccomp: SeccompMode,
    /// Landlock once set up: no file system access beyond what the process still needs, no TCP
    /// bind/connect, no IPC outside its sandbox. Best effort: a kernel without Landlock gets a
    /// warning.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub landlock: bool,
    /// Test only: after sandboxing, try something the sandbox forbids (`execve`, or
    /// `open:PATH`) and log what happened, so that tests can see the sandbox is real.
    #[arg(long, hide = true, value_name = "WHAT")]
    pub test_sandbox_violation: Option<Violation>,
}

impl Default for SandboxArgs {
    fn default() -> Self {
        Self {
            seccomp: SeccompMode::Enforce,
            landlock: true,
            test_sandbox_violation: None,
        }
    }
}

/// A forbidden action a test asks for (`--test-sandbox-violation`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// `execve("/bin/true")`: forbidden by seccomp (and by Landlock's EXECUTE right).
    Execve,
    /// Opening a file for reading: forbidden by Landlock (and by seccomp: no `openat`).
    Open(PathBuf),
}

impl std::str::FromStr for Violation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "execve" => Ok(Self::Execve),
            Some(("open", p)) if !p.is_empty() => Ok(Self::Open(p.into())),
            _ => Err("expected `execve` or `open:PATH`".into()),
        }
    }
}

/// Errors setting up the sandbox. Each is fatal at start-up: a service that asked for a sandbox
/// does not run without it (except Landlock where the kernel lacks it: a warning).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A thread kind's allowlist does not compile to BPF (a bug in the list).
    #[error("seccomp: the {kind} filter does not compile: {source}")]
    Compile {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// prctl(PR_SET_NO_NEW_PRIVS) or seccomp(SECCOMP_SET_MODE_FILTER) failed.
    #[error("seccomp: cannot install the {kind} filter: {source}")]
    Install {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("seccomp: cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start the {name} thread: {source}")]
    Spawn {
        /// Thread name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A thread ended (its set-up failed: see the log above) before entering the sandbox.
    #[error("the {0} thread ended before entering the sandbox (see the log above)")]
    ThreadLost(String),
    /// The Landlock ruleset could not be built or enforced (not: the kernel lacks Landlock).
    #[error("landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    /// A path of a Landlock rule could not be opened.
    #[error("landlock: cannot open {path} for a rule: {source}")]
    RulePath {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: landlock::PathFdError,
    },
}

/// The sandbox of one process: its options and which filters are installed.
#[derive(Debug)]
pub struct Sandbox {
    service: &'static str,
    args: SandboxArgs,
    installed: Mutex<Vec<&'static str>>,
    /// Whether the Landlock outcome was logged (it is logged once per process).
    fs_reported: AtomicBool,
}

impl Sandbox {
    /// Prepares the sandbox of `service` (its name on stderr): installs the SIGSYS handler
    /// (when enforcing) and the SIGBUS guard of [`crate::memory`] now, while `rt_sigaction` is
    /// still allowed everywhere.
    pub fn new(service: &'static str, args: &SandboxArgs) -> Result<Self, SandboxError> {
        crate::memory::guard::install();
        Self::bare(service, args)
    }

    /// As [`Sandbox::new`] without the SIGBUS guard: for a process that maps no memory a peer
    /// can truncate under it (baton-vmm owns its guest RAM file). Installs the SIGSYS handler
    /// when enforcing.
    pub fn bare(service: &'static str, args: &SandboxArgs) -> Result<Self, SandboxError> {
        if args.seccomp == SeccompMode::Enforce {
            seccomp::install_sigsys_handler(service).map_err(SandboxError::Handler)?;
        }
        if args.seccomp != SeccompMode::Off {
            shrink_a_thread_heap();
        }
        Ok(Self {
            service,
            args: args.clone(),
            installed: Mutex::new(Vec::new()),
            fs_reported: AtomicBool::new(false),
        })
    }

    /// Restricts the file system (and TCP, and signals) of the calling thread and of every
    /// thread it spawns afterwards to `rules`: call on the main thread, after set-up, before
    /// spawning any thread. Logs the outcome (a warning when the kernel lacks Landlock).
    pub fn restrict_fs(&self, rules: &[FsRule]) -> Result<(), SandboxError> {
        self.restrict_fs_scoped(rules, Scopes::BACKEND)
    }

    /// [`Sandbox::restrict_fs`] with the IPC `scopes` of the caller's choice. May be called on
    /// several threads (each that exists before the restriction and should be under it calls
    /// it itself, with the same rules); the outcome is logged the first time only.
    pub fn restrict_fs_scoped(&self, rules: &[FsRule], scopes: Scopes) -> Result<(), SandboxError> {
        let first = !self.fs_reported.swap(true, Ordering::AcqRel);
        if !self.args.landlock {
            if first {
                tracing::warn!("landlock: disabled (--landlock false)");
            }
            return Ok(());
        }
        fs::restrict(rules, scopes, first)
    }

    /// The options this sandbox was built with.
    pub fn args(&self) -> &SandboxArgs {
        &self.args
    }

    /// Installs the filter of `kind` on the calling thread (nothing with `--seccomp false`).
    /// Call it where the thread's own set-up ends.
    pub fn enter(&self, kind: &ThreadKind) -> Result<(), SandboxError> {
        seccomp::set_thread_kind(kind.name);
        let action = match self.args.seccomp {
            SeccompMode::Off => return Ok(()),
            SeccompMode::Enforce => seccompiler::SeccompAction::Trap,
            SeccompMode::Log => seccompiler::SeccompAction::Log,
        };
        kind.install(action)?;
        self.installed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(kind.name);
        Ok(())
    }

    /// Spawns thread `name` (with `stack` bytes of stack, or std's default) running `body`,
    /// and waits until the thread has set itself up and entered the sandbox as a `kind` thread
    /// ([`Gate::enter`]): every thread is filtered before the service says it is ready, and a
    /// thread that cannot be is a start-up error, not a silent hole.
    pub fn spawn<F>(
        self: &Arc<Self>,
        name: String,
        stack: Option<usize>,
        kind: ThreadKind,
        body: F,
    ) -> Result<JoinHandle<()>, SandboxError>
    where
        F: FnOnce(Gate) + Send + 'static,
    {
        let (tx, rx) = sync_channel(1);
        let gate = Gate {
            sandbox: Arc::clone(self),
            kind,
            tx,
        };
        let mut b = std::thread::Builder::new().name(name.clone());
        if let Some(s) = stack {
            b = b.stack_size(s);
        }
        let handle = b
            .spawn(move || body(gate))
            .map_err(|source| SandboxError::Spawn {
                name: name.clone(),
                source,
            })?;
        match rx.recv() {
            Ok(r) => r.map(|()| handle),
            Err(_) => Err(SandboxError::ThreadLost(name)),
        }
    }

    /// Filters installed so far, by thread kind.
    pub fn installed(&self) -> Vec<&'static str> {
        self.installed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Logs what seccomp enforces (`seccomp: N filters installed (...)`), then performs the
    /// test-only violation if one was asked for. Call once every thread has entered.
    pub fn report(&self) {
        let kinds = self.installed();
        match self.args.seccomp {
            SeccompMode::Off => tracing::warn!("seccomp: disabled (--seccomp false)"),
            SeccompMode::Enforce => tracing::info!(
                "seccomp: {} filters installed ({}); a forbidden system call stops {}",
                kinds.len(),
                kinds.join(", "),
                self.service
            ),
            SeccompMode::Log => tracing::warn!(
                "seccomp: {} filters installed ({}) in log mode: forbidden system calls are \
                 allowed and logged by the kernel (dmesg / audit, type=1326)",
                kinds.len(),
                kinds.join(", ")
            ),
        }
        if let Some(v) = &self.args.test_sandbox_violation {
            violate(v);
        }
    }
}

/// Names the calling thread's kind for the SIGSYS report, for a thread that inherited the
/// filter of the thread that spawned it instead of installing one.
pub fn inherit(kind_name: &'static str) {
    seccomp::set_thread_kind(kind_name);
}

/// A new thread's way into the sandbox (see [`Sandbox::spawn`]).
#[derive(Debug)]
pub struct Gate {
    sandbox: Arc<Sandbox>,
    kind: ThreadKind,
    tx: SyncSender<Result<(), SandboxError>>,
}

/// Makes glibc's malloc do now, before any filter, the one file access it would otherwise do
/// later on whichever thread first gives memory back from a thread's heap (a non-main arena):
/// the first `shrink_heap` reads `/proc/sys/vm/overcommit_memory` (`openat`; glibc caches the
/// answer for the process). Found in baton-vmm's `migration-out` thread, which a live update
/// with a larger state made free enough to trim (strace -k: `free` → `__default_morecore` →
/// `__open64_nocancel`). A thread of its own gets a fresh arena; freeing its top chunk of
/// more than the trim threshold (128 KiB) shrinks that heap.
fn shrink_a_thread_heap() {
    let t = std::thread::spawn(|| {
        // Below the mmap threshold (128 KiB), so on the thread's heap; touched, so real.
        let chunks: Vec<Vec<u8>> = (0..8).map(|i| vec![i; 96 << 10]).collect();
        for c in chunks.into_iter().rev() {
            drop(std::hint::black_box(c));
        }
    });
    let _ = t.join();
}

impl Gate {
    /// Installs the thread's filter (call once the thread's own set-up is done) and lets the
    /// spawner go on. Returns false if that failed: the thread should return (the spawner
    /// reports the error). Dropping the gate without entering reports the thread as lost.
    pub fn enter(self) -> bool {
        let r = self.sandbox.enter(&self.kind);
        let ok = r.is_ok();
        let _ = self.tx.send(r);
        ok
    }
}

/// The test-only violation (`--test-sandbox-violation`): logs what the kernel answered when the
/// sandbox lets the call fail instead of stopping the process. [`Sandbox::report`] performs it
/// on the calling thread; a binary that wants it elsewhere (baton-vmm: on a thread of a given
/// kind) clears the option before building the [`Sandbox`] and calls this where it wants.
pub fn violate(v: &Violation) {
    match v {
        Violation::Execve => {
            tracing::warn!("test: calling execve(/bin/true) inside the sandbox");
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and NULL-terminated argv/envp that outlive the call.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            tracing::warn!("test: execve denied: {}", std::io::Error::last_os_error());
        }
        Violation::Open(p) => match std::fs::File::open(p) {
            Ok(_) => tracing::warn!("test: opened {} inside the sandbox", p.display()),
            Err(e) => tracing::warn!("test: open {} denied: {e}", p.display()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        sandbox: SandboxArgs,
    }

    #[test]
    fn options_parse_with_clear_errors() {
        let d = Cli::try_parse_from(["x"]).unwrap().sandbox;
        assert_eq!((d.seccomp, d.landlock), (SeccompMode::Enforce, true));
        let a = Cli::try_parse_from(["x", "--seccomp", "log", "--landlock", "false"])
            .unwrap()
            .sandbox;
        assert_eq!((a.seccomp, a.landlock), (SeccompMode::Log, false));
        let off = Cli::try_parse_from(["x", "--seccomp", "false"]).unwrap();
        assert_eq!(off.sandbox.seccomp, SeccompMode::Off);
        let e = Cli::try_parse_from(["x", "--seccomp", "yes"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("possible values: true, false, log"), "{e}");
        let e = Cli::try_parse_from(["x", "--landlock", "maybe"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--landlock"), "{e}");
        let v = Cli::try_parse_from(["x", "--test-sandbox-violation", "open:/etc/passwd"])
            .unwrap()
            .sandbox;
        assert_eq!(
            v.test_sandbox_violation,
            Some(Violation::Open("/etc/passwd".into()))
        );
        assert!(Cli::try_parse_from(["x", "--test-sandbox-violation", "fork"]).is_err());
    }
}
