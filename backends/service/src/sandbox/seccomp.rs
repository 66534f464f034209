//! seccomp filters: a thread kind's allowlist ([`ThreadKind`]) on top of what every thread of a
//! Rust service needs ([`base`]), compiled with `seccompiler` and installed on the calling
//! thread; and the SIGSYS handler that names a forbidden system call.
//!
//! How a violation is reported: the filter's default action is SECCOMP_RET_TRAP, not
//! SECCOMP_RET_KILL_PROCESS. KILL_PROCESS stops the process without running any code of ours, so
//! the service manager only sees "killed by SIGSYS" and nobody learns which call it was (unless
//! audit is set up). TRAP delivers SIGSYS to the thread instead; the handler installed here
//! writes `<service>: seccomp: the <kind> thread made a forbidden system call N (name)` to
//! stderr with write(2) only (async-signal-safe: no allocation, no lock, a stack buffer) and
//! ends the process with `_exit(159)` (128 + SIGSYS, what a shell reports for a SIGSYS death).
//! The forbidden call itself never runs either way. TRAP is as strict as KILL: a compromised
//! thread that replaced the handler still cannot make the call (it returns, failed), and one
//! that blocked or ignored SIGSYS is killed by the kernel (a forced SIGSYS that cannot be
//! delivered kills the process).
//!
//! Arguments are checked where that is cheap and closes something real: `mmap`/`mprotect`
//! never get PROT_EXEC (no new executable memory), `ioctl` only with the request numbers a
//! thread uses, `getsockopt` only SO_PEERCRED and SO_SNDBUF, `fcntl` only F_DUPFD_CLOEXEC, `prctl` only
//! PR_SET_NAME, `rt_sigaction` only SIGBUS (the SIGBUS guard's reset). Pointer arguments (paths,
//! iovecs, clone3's struct) cannot be checked: seccomp sees only the pointer. Descriptor
//! arguments are not checked either: which fd is the TAP or the image is only known at run
//! time, and a thread's few fds are all ones it legitimately uses.
//!
//! io_uring operations do not pass through seccomp at all: baton-blk restricts its rings to the
//! opcodes it submits (IORING_REGISTER_RESTRICTIONS) before its workers enter the sandbox.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

pub use seccompiler::SeccompAction;
use seccompiler::{
    BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use super::{SandboxError, names};

/// Exit status of a service stopped by a forbidden system call: 128 + SIGSYS.
pub const SIGSYS_EXIT: i32 = 128 + libc::SIGSYS;

/// One check on a system call argument (compared as 32 bits: every argument checked here is an
/// int, a flag word or an ioctl request, which the kernel truncates to 32 bits too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cond {
    /// `arg == value`.
    Eq { arg: u8, value: u64 },
    /// `arg & mask == value`.
    Masked { arg: u8, mask: u64, value: u64 },
}

/// An allowed system call: always, or when one of its argument rules matches (each rule is a
/// conjunction of checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Syscall {
    nr: i64,
    /// Empty: always allowed.
    rules: Vec<Vec<Cond>>,
}

impl Syscall {
    /// `nr`, whatever its arguments.
    pub fn any(nr: i64) -> Self {
        Self { nr, rules: vec![] }
    }

    /// `nr` when argument `arg` is one of `values`.
    pub fn arg_in(nr: i64, arg: u8, values: &[u64]) -> Self {
        Self {
            nr,
            rules: values
                .iter()
                .map(|&value| vec![Cond::Eq { arg, value }])
                .collect(),
        }
    }

    /// `nr` when every `(arg, value)` pair holds.
    pub fn args_eq(nr: i64, args: &[(u8, u64)]) -> Self {
        Self {
            nr,
            rules: vec![
                args.iter()
                    .map(|&(arg, value)| Cond::Eq { arg, value })
                    .collect(),
            ],
        }
    }

    /// `nr` when `arg & mask == value`.
    pub fn arg_masked(nr: i64, arg: u8, mask: u64, value: u64) -> Self {
        Self {
            nr,
            rules: vec![vec![Cond::Masked { arg, mask, value }]],
        }
    }

    /// The system call number.
    pub fn nr(&self) -> i64 {
        self.nr
    }
}

/// What every thread of a back-end needs, whatever its job: memory (malloc, thread stacks,
/// mapping guest memory, the SIGBUS guard's page replacement; never executable), futexes
/// (locks, channels), writing its log to stderr, closing fds, time, signal returns and
/// masks, the per-thread random keys of std's hash maps, and exiting (a thread, the process).
pub fn base() -> Vec<Syscall> {
    let no_exec = |nr| Syscall::arg_masked(nr, 2, libc::PROT_EXEC as u64, 0);
    vec![
        Syscall::any(libc::SYS_brk),
        no_exec(libc::SYS_mmap),
        no_exec(libc::SYS_mprotect),
        Syscall::any(libc::SYS_munmap),
        Syscall::any(libc::SYS_madvise),
        Syscall::any(libc::SYS_mremap),
        Syscall::any(libc::SYS_futex),
        Syscall::any(libc::SYS_sched_yield),
        Syscall::any(libc::SYS_write),
        Syscall::any(libc::SYS_close),
        Syscall::any(libc::SYS_clock_gettime),
        Syscall::any(libc::SYS_clock_nanosleep),
        Syscall::any(libc::SYS_nanosleep),
        Syscall::any(libc::SYS_gettimeofday),
        Syscall::any(libc::SYS_getrandom),
        Syscall::any(libc::SYS_rt_sigreturn),
        Syscall::any(libc::SYS_rt_sigprocmask),
        Syscall::any(libc::SYS_sigaltstack),
        Syscall::arg_in(libc::SYS_rt_sigaction, 0, &[libc::SIGBUS as u64]),
        Syscall::any(libc::SYS_restart_syscall),
        Syscall::any(libc::SYS_exit),
        Syscall::any(libc::SYS_exit_group),
    ]
}

/// What a thread serving a vhost-user front-end through [`crate::vhost::serve_connection`]
/// needs: waiting for and reading messages (the deadline's FIONREAD and peek), fds received
/// with SCM_RIGHTS, replies and the check that the front-end reads them (TIOCOUTQ,
/// SO_SNDBUF), the peer check, duplicating the connection, inspecting the memory
/// and inflight fds before mapping them ([`crate::memory::map_file`]: fstat, fstatfs).
/// `ioctls`: the device's own ioctl requests besides FIONREAD and TIOCOUTQ.
pub fn vhost_user_connection(ioctls: &[u64]) -> Vec<Syscall> {
    let mut ioctl = vec![libc::FIONREAD, libc::TIOCOUTQ];
    ioctl.extend_from_slice(ioctls);
    vec![
        Syscall::any(libc::SYS_poll),
        Syscall::any(libc::SYS_ppoll),
        Syscall::any(libc::SYS_read),
        Syscall::any(libc::SYS_recvfrom),
        Syscall::any(libc::SYS_recvmsg),
        Syscall::any(libc::SYS_sendmsg),
        Syscall::any(libc::SYS_sendto),
        Syscall::args_eq(
            libc::SYS_getsockopt,
            &[(1, libc::SOL_SOCKET as u64), (2, libc::SO_PEERCRED as u64)],
        ),
        Syscall::args_eq(
            libc::SYS_getsockopt,
            &[(1, libc::SOL_SOCKET as u64), (2, libc::SO_SNDBUF as u64)],
        ),
        Syscall::arg_in(libc::SYS_ioctl, 1, &ioctl),
        // UnixStream::try_clone.
        Syscall::arg_in(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64]),
        Syscall::any(libc::SYS_fstat),
        Syscall::any(libc::SYS_newfstatat),
        Syscall::any(libc::SYS_statx),
        Syscall::any(libc::SYS_fstatfs),
    ]
}

/// A kind of thread and its allowlist (on top of [`base`]).
#[derive(Clone, Debug)]
pub struct ThreadKind {
    /// Its name in logs and in the SIGSYS report.
    pub name: &'static str,
    syscalls: Vec<Syscall>,
}

impl ThreadKind {
    /// A kind allowed [`base`] plus `syscalls`.
    pub fn new(name: &'static str, syscalls: Vec<Syscall>) -> Self {
        let mut all = base();
        all.extend(syscalls);
        Self {
            name,
            syscalls: all,
        }
    }

    /// Whether `nr` is allowed in some form (for tests of the lists).
    pub fn allows(&self, nr: i64) -> bool {
        self.syscalls.iter().any(|s| s.nr == nr)
    }

    /// Whether `nr` is allowed whatever its arguments.
    pub fn allows_any_args(&self, nr: i64) -> bool {
        self.syscalls
            .iter()
            .any(|s| s.nr == nr && s.rules.is_empty())
    }

    /// Compiles the allowlist; `otherwise` is what any other system call does.
    pub fn program(&self, otherwise: SeccompAction) -> Result<BpfProgram, SandboxError> {
        let compile = |source| SandboxError::Compile {
            kind: self.name,
            source,
        };
        // Merge the entries of one syscall: unconditional wins, otherwise any rule may match.
        let mut merged: BTreeMap<i64, Option<Vec<Vec<Cond>>>> = BTreeMap::new();
        for s in &self.syscalls {
            let e = merged.entry(s.nr).or_insert_with(|| Some(Vec::new()));
            match (e.as_mut(), s.rules.is_empty()) {
                (Some(_), true) => *e = None,
                (Some(rules), false) => rules.extend(s.rules.iter().cloned()),
                (None, _) => {}
            }
        }
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (nr, conds) in merged {
            let mut chain = Vec::new();
            for rule in conds.unwrap_or_default() {
                let c = rule
                    .iter()
                    .map(|c| condition(*c))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| compile(e.into()))?;
                chain.push(SeccompRule::new(c).map_err(|e| compile(e.into()))?);
            }
            rules.insert(nr, chain);
        }
        let filter = SeccompFilter::new(rules, otherwise, SeccompAction::Allow, arch())
            .map_err(|e| compile(e.into()))?;
        BpfProgram::try_from(filter).map_err(|e| compile(e.into()))
    }

    /// Compiles and installs the filter on the calling thread (PR_SET_NO_NEW_PRIVS first, which
    /// seccompiler sets: it is what lets a process without CAP_SYS_ADMIN install a filter).
    pub(super) fn install(&self, otherwise: SeccompAction) -> Result<(), SandboxError> {
        let prog = self.program(otherwise)?;
        apply(self.name, &prog)
    }
}

/// Installs a compiled filter on the calling thread.
fn apply(kind: &'static str, prog: &BpfProgram) -> Result<(), SandboxError> {
    seccompiler::apply_filter(prog).map_err(|source| SandboxError::Install { kind, source })
}

fn condition(c: Cond) -> Result<SeccompCondition, seccompiler::BackendError> {
    match c {
        Cond::Eq { arg, value } => {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        }
        Cond::Masked { arg, mask, value } => SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        ),
    }
}

#[cfg(target_arch = "x86_64")]
fn arch() -> TargetArch {
    TargetArch::x86_64
}

#[cfg(target_arch = "aarch64")]
fn arch() -> TargetArch {
    TargetArch::aarch64
}

/// The service's name in the SIGSYS report.
static SERVICE: OnceLock<&'static str> = OnceLock::new();

thread_local! {
    /// The calling thread's kind, for the SIGSYS report (const-initialised and without a
    /// destructor: reading it in a signal handler is a plain TLS load).
    static KIND: Cell<&'static str> = const { Cell::new("unsandboxed") };
}

/// Records the calling thread's kind for the SIGSYS report.
pub(super) fn set_thread_kind(name: &'static str) {
    KIND.with(|k| k.set(name));
}

/// Installs the process-wide SIGSYS handler (see the module doc).
pub(super) fn install_sigsys_handler(service: &'static str) -> std::io::Result<()> {
    let _ = SERVICE.set(service);
    // SAFETY: a zeroed sigaction is valid; the handler and flags are set before use.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset inside `sa`.
    unsafe { libc::sigemptyset(&raw mut sa.sa_mask) };
    // SAFETY: installs a handler that only uses async-signal-safe operations.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The start of a `siginfo_t` for SIGSYS (`_sigsys` in the kernel's union; the libc crate has no
/// accessor for it).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer a message is assembled in, inside a signal handler.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + u8::try_from(v % 10).unwrap_or(0);
            }
            v /= 10;
            if v == 0 || i == 0 {
                break;
            }
        }
        self.push(digits.get(i..).unwrap_or_default());
    }
}

/// The message written for a forbidden system call (async-signal-safe).
fn sigsys_message(service: &str, kind: &str, nr: i64) -> Line {
    let mut l = Line {
        buf: [0; 256],
        len: 0,
    };
    l.push(service.as_bytes());
    l.push(b": seccomp: the ");
    l.push(kind.as_bytes());
    l.push(b" thread made a forbidden system call ");
    l.push_num(nr);
    l.push(b" (");
    l.push(names::name(nr).as_bytes());
    l.push(b"): stopping\n");
    l
}

/// Async-signal-safe: TLS and static reads, a stack buffer, write(2) and _exit(2).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; for SIGSYS its
    // first bytes are laid out as `SigsysInfo`, which is smaller than siginfo_t.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let service = SERVICE.get().copied().unwrap_or("baton");
    let kind = KIND.try_with(Cell::get).unwrap_or("exiting");
    let l = sigsys_message(service, kind, i64::from(nr));
    // SAFETY: writes bytes of our stack buffer to stderr, then ends the process without
    // running anything else (no destructor, no atexit handler).
    unsafe {
        libc::write(2, l.buf.as_ptr().cast(), l.len);
        libc::_exit(SIGSYS_EXIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_merge_and_compile() {
        let k = ThreadKind::new(
            "test",
            vec![
                Syscall::arg_in(libc::SYS_ioctl, 1, &[libc::FIONREAD]),
                Syscall::arg_in(libc::SYS_ioctl, 1, &[libc::FIONBIO]),
                Syscall::any(libc::SYS_write),
                Syscall::args_eq(libc::SYS_getsockopt, &[(1, 1), (2, 17)]),
            ],
        );
        assert!(k.allows(libc::SYS_ioctl) && !k.allows_any_args(libc::SYS_ioctl));
        assert!(k.allows_any_args(libc::SYS_write));
        assert!(!k.allows(libc::SYS_execve));
        let prog = k.program(SeccompAction::Trap).unwrap();
        assert!(!prog.is_empty() && prog.len() < 4096, "{}", prog.len());
        let bad = ThreadKind::new("bad", vec![Syscall::arg_in(libc::SYS_ioctl, 9, &[1])]);
        assert!(matches!(
            bad.program(SeccompAction::Trap),
            Err(SandboxError::Compile { kind: "bad", .. })
        ));
    }

    #[test]
    fn the_sigsys_message_names_the_call() {
        let l = sigsys_message("baton-blk", "worker", libc::SYS_execve);
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert_eq!(
            s,
            "baton-blk: seccomp: the worker thread made a forbidden system call 59 (execve): \
             stopping\n"
        );
        let l = sigsys_message("x", "y", 0);
        assert!(
            std::str::from_utf8(&l.buf[..l.len])
                .unwrap()
                .contains(" 0 (read)")
        );
        let long = "k".repeat(400);
        assert_eq!(sigsys_message("x", &long, 1).len, 256);
    }

    /// The filter is real: a forked child installs a filter without getppid, calls it, and
    /// dies with status 159 after naming it on its stderr (a pipe). The child only makes
    /// async-signal-safe calls (the program is compiled before the fork).
    #[test]
    fn a_forbidden_call_stops_the_process_and_is_named() {
        let kind = ThreadKind::new("probe", vec![Syscall::any(libc::SYS_getpid)]);
        let prog = kind.program(SeccompAction::Trap).unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child below only calls async-signal-safe functions and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: child: dup2/sigaction/prctl/seccomp/syscalls, then _exit.
            unsafe {
                libc::dup2(fds[1], 2);
                if install_sigsys_handler("probe-service").is_err()
                    || apply("probe", &prog).is_err()
                {
                    libc::_exit(1);
                }
                set_thread_kind("probe");
                libc::syscall(libc::SYS_getpid); // allowed
                libc::syscall(libc::SYS_getppid); // forbidden: does not return
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end; reading into a local buffer.
        unsafe { libc::close(fds[1]) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
        let mut buf = [0u8; 512];
        // SAFETY: reads at most buf.len() bytes into buf.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
        let msg = String::from_utf8_lossy(&buf[..usize::try_from(n).unwrap_or(0)]).into_owned();
        assert!(libc::WIFEXITED(status), "status {status:#x}: {msg}");
        assert_eq!(libc::WEXITSTATUS(status), SIGSYS_EXIT, "{msg}");
        assert!(
            msg.contains("probe-service: seccomp: the probe thread made a forbidden system call 110 (getppid)"),
            "{msg}"
        );
    }
}
