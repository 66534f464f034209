//! baton-blk's thread kinds and their seccomp allowlists (on top of what every thread needs:
//! `baton_service::sandbox::seccomp::base`). Found by reading the code and by running the test
//! suites with `--seccomp log` (the kernel's audit records, type 1326) and under `strace -f`.
//!
//! - `control`: the main thread once set up: the accept loop, SIGTERM (signalfd), and every
//!   vhost-user message of the connected front-end — messages with fds (SCM_RIGHTS), guest
//!   memory and inflight regions mapped from them (fstat/fstatfs first), a memfd for a new
//!   inflight region, and the final fdatasync. It spawns no thread after set-up.
//! - `worker`: a queue thread once its io_uring ring exists: waiting for kicks, the ring
//!   (io_uring_enter only: the ring is set up and restricted to READV/WRITEV/FSYNC before), the
//!   synchronous fallbacks and inline reads (preadv2/pwritev2), flush, discard and write-zeroes
//!   (fallocate), notifications (eventfd writes).

use baton_service::sandbox::{Syscall, ThreadKind};

const F_DUPFD_CLOEXEC: u64 = libc::F_DUPFD_CLOEXEC as u64;

/// The main thread after set-up.
pub fn control() -> ThreadKind {
    ThreadKind::new(
        "control",
        vec![
            Syscall::any(libc::SYS_poll),
            Syscall::any(libc::SYS_ppoll),
            Syscall::any(libc::SYS_accept4),
            Syscall::any(libc::SYS_read),
            Syscall::any(libc::SYS_recvfrom),
            Syscall::any(libc::SYS_recvmsg),
            Syscall::any(libc::SYS_sendmsg),
            Syscall::any(libc::SYS_sendto),
            Syscall::args_eq(
                libc::SYS_getsockopt,
                &[(1, libc::SOL_SOCKET as u64), (2, libc::SO_PEERCRED as u64)],
            ),
            Syscall::arg_in(libc::SYS_ioctl, 1, &[libc::FIONREAD]),
            // UnixStream::try_clone.
            Syscall::arg_in(libc::SYS_fcntl, 1, &[F_DUPFD_CLOEXEC]),
            Syscall::any(libc::SYS_fstat),
            Syscall::any(libc::SYS_newfstatat),
            Syscall::any(libc::SYS_statx),
            Syscall::any(libc::SYS_fstatfs),
            Syscall::any(libc::SYS_memfd_create),
            Syscall::any(libc::SYS_ftruncate),
            Syscall::any(libc::SYS_fdatasync),
        ],
    )
}

/// A queue worker after its engine is set up.
pub fn worker() -> ThreadKind {
    ThreadKind::new(
        "worker",
        vec![
            Syscall::any(libc::SYS_poll),
            Syscall::any(libc::SYS_ppoll),
            Syscall::any(libc::SYS_read),
            Syscall::any(libc::SYS_io_uring_enter),
            Syscall::any(libc::SYS_preadv),
            Syscall::any(libc::SYS_pwritev),
            Syscall::any(libc::SYS_preadv2),
            Syscall::any(libc::SYS_pwritev2),
            Syscall::any(libc::SYS_fdatasync),
            Syscall::any(libc::SYS_fallocate),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_service::sandbox::seccomp::SeccompAction;

    #[test]
    fn thread_kinds_compile_and_keep_least_privilege() {
        for k in [control(), worker()] {
            assert!(k.program(SeccompAction::Trap).is_ok(), "{}", k.name);
            for nr in [
                libc::SYS_execve,
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_io_uring_setup,
                libc::SYS_io_uring_register,
                libc::SYS_ptrace,
                libc::SYS_unlink,
            ] {
                assert!(!k.allows(nr), "{} allows {nr}", k.name);
            }
        }
        assert!(!worker().allows(libc::SYS_accept4));
        assert!(!worker().allows(libc::SYS_recvmsg));
        assert!(!control().allows(libc::SYS_io_uring_enter));
        assert!(!control().allows_any_args(libc::SYS_ioctl));
        assert!(!control().allows_any_args(libc::SYS_mmap));
    }
}
