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

use baton_service::sandbox::seccomp::vhost_user_connection;
use baton_service::sandbox::{Syscall, ThreadKind};

/// The main thread after set-up.
pub fn control() -> ThreadKind {
    let mut syscalls = vhost_user_connection(&[]);
    syscalls.extend([
        Syscall::any(libc::SYS_accept4),
        // A new inflight region (GET_INFLIGHT_FD), and the final flush.
        Syscall::any(libc::SYS_memfd_create),
        Syscall::any(libc::SYS_ftruncate),
        Syscall::any(libc::SYS_fdatasync),
    ]);
    ThreadKind::new("control", syscalls)
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
