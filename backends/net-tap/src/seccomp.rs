//! baton-net-tap's thread kinds and their seccomp allowlists (on top of what every thread
//! needs: `baton_service::sandbox::seccomp::base`). Found by reading the code and by running the
//! test suites with `--seccomp log` (the kernel's audit records, type 1326) and under
//! `strace -f`.
//!
//! - `control`: the main thread once set up: the accept loop and every vhost-user message of
//!   the connected front-end — fds (SCM_RIGHTS), guest memory mapped from them, the TAP's
//!   header size and offloads (TUNSETVNETHDRSZ, TUNSETOFFLOAD) when features are set. It
//!   spawns no thread after set-up.
//! - `worker`: a queue-pair thread once its epoll set and its TX io_uring exist: epoll,
//!   `readv`/`writev` on the TAP, `io_uring_enter` (the ring is restricted to WRITEV on the TAP
//!   queue before) and the one `io_uring_register` the ring allows (dropping that queue when
//!   the worker stops), eventfd reads and writes, attaching and detaching its TAP queue
//!   (TUNSETQUEUE).
//! - `signals`: the thread that waits for SIGTERM/SIGINT/SIGUSR1: logs counters, stops the
//!   rings, removes the socket file it bound, exits.

use baton_service::sandbox::seccomp::vhost_user_connection;
use baton_service::sandbox::{Syscall, ThreadKind};

use crate::tap::{TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ};

/// The main thread after set-up.
pub fn control() -> ThreadKind {
    let mut syscalls = vhost_user_connection(&[TUNSETOFFLOAD, TUNSETVNETHDRSZ]);
    syscalls.push(Syscall::any(libc::SYS_accept4));
    ThreadKind::new("control", syscalls)
}

/// A queue-pair worker after its epoll set is built.
pub fn worker() -> ThreadKind {
    ThreadKind::new(
        "worker",
        vec![
            Syscall::any(libc::SYS_epoll_wait),
            Syscall::any(libc::SYS_epoll_pwait),
            Syscall::any(libc::SYS_epoll_ctl),
            Syscall::any(libc::SYS_read),
            Syscall::any(libc::SYS_readv),
            Syscall::any(libc::SYS_writev),
            Syscall::any(libc::SYS_io_uring_enter),
            Syscall::arg_in(
                libc::SYS_io_uring_register,
                1,
                &[baton_service::uring::IORING_UNREGISTER_FILES.into()],
            ),
            Syscall::arg_in(libc::SYS_ioctl, 1, &[TUNSETQUEUE]),
        ],
    )
}

/// The signal thread.
pub fn signals() -> ThreadKind {
    ThreadKind::new(
        "signals",
        vec![
            Syscall::any(libc::SYS_rt_sigtimedwait),
            Syscall::any(libc::SYS_unlink),
            Syscall::any(libc::SYS_unlinkat),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_service::sandbox::seccomp::SeccompAction;

    #[test]
    fn thread_kinds_compile_and_keep_least_privilege() {
        for k in [control(), worker(), signals()] {
            assert!(k.program(SeccompAction::Trap).is_ok(), "{}", k.name);
            for nr in [
                libc::SYS_execve,
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_ptrace,
                libc::SYS_io_uring_setup,
            ] {
                assert!(!k.allows(nr), "{} allows {nr}", k.name);
            }
            assert!(!k.allows_any_args(libc::SYS_ioctl), "{}", k.name);
        }
        for k in [control(), worker(), signals()] {
            assert!(
                !k.allows(libc::SYS_clone3) && !k.allows(libc::SYS_clone),
                "{}",
                k.name
            );
        }
        assert!(!worker().allows(libc::SYS_accept4) && !worker().allows(libc::SYS_unlink));
        assert!(!control().allows(libc::SYS_unlink) && !control().allows(libc::SYS_readv));
    }
}
