//! An io_uring a compromised worker cannot turn into a way around its seccomp filter.
//!
//! A ring's operations run in the kernel without passing through seccomp, so a worker allowed
//! `io_uring_enter` could open files or sockets through its ring. [`restricted`] builds the
//! ring disabled, registers the fixed files it may use, restricts it to the listed opcodes and
//! SQE flags (`IORING_REGISTER_RESTRICTIONS`, which also forbids every later
//! `io_uring_register` call), then enables it.

use std::os::fd::RawFd;

use io_uring::IoUring;
use io_uring::register::Restriction;
use io_uring::squeue::Flags;

/// `io_uring_register`'s opcode that drops the fixed files (linux/io_uring.h).
pub const IORING_UNREGISTER_FILES: u8 = 3;

/// What a restricted ring may do.
#[derive(Debug, Clone, Copy)]
pub struct Allowed<'a> {
    /// The opcodes (`io_uring::opcode::*::CODE`) its SQEs may carry.
    pub ops: &'a [u8],
    /// The SQE flags they may carry.
    pub flags: Flags,
    /// The SQE flags every SQE must carry (`FIXED_FILE` with `files`: the ring then reaches
    /// only those files).
    pub required: Flags,
    /// The buffers registered as fixed buffers 0, 1, ... (their memory counts against the
    /// locked-memory limit; the caller keeps them in place as long as the ring lives).
    pub buffers: &'a [libc::iovec],
    /// The files registered as fixed files 0, 1, ... The ring may unregister them (and so
    /// reach none): its owner does, to release them at once when it stops; a ring closed
    /// with files registered releases them later, from a kernel worker.
    pub files: &'a [RawFd],
}

/// Builds a ring of `entries` that can only run what `allowed` lists.
pub fn restricted(entries: u32, allowed: &Allowed<'_>) -> std::io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    if !allowed.files.is_empty() {
        ring.submitter().register_files(allowed.files)?;
    }
    if !allowed.buffers.is_empty() {
        // SAFETY: the caller keeps the buffers alive and in place as long as the ring (see
        // `Allowed::buffers`).
        unsafe { ring.submitter().register_buffers(allowed.buffers)? };
    }
    let mut rules: Vec<Restriction> = allowed
        .ops
        .iter()
        .map(|&op| Restriction::sqe_op(op))
        .collect();
    rules.push(Restriction::sqe_flags_allowed(
        (allowed.flags | allowed.required).bits(),
    ));
    if !allowed.required.is_empty() {
        rules.push(Restriction::sqe_flags_required(allowed.required.bits()));
    }
    if !allowed.files.is_empty() {
        rules.push(Restriction::register_op(IORING_UNREGISTER_FILES));
    }
    ring.submitter().register_restrictions(&mut rules)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, types};
    use std::os::fd::AsRawFd;

    #[test]
    fn a_ring_runs_only_the_allowed_ops_on_its_fixed_files() {
        let (tx, rx) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let allowed = Allowed {
            ops: &[opcode::Writev::CODE],
            flags: Flags::empty(),
            required: Flags::FIXED_FILE,
            files: &[tx.as_raw_fd()],
            buffers: &[],
        };
        let mut ring = match restricted(8, &allowed) {
            Ok(r) => r,
            Err(e) => {
                crate::skip::cannot_run("io_uring", &format!("no io_uring here: {e}"));
                return;
            }
        };
        let data = *b"frame";
        let iov = [libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        }];
        let fixed = opcode::Writev::new(types::Fixed(0), iov.as_ptr(), 1)
            .build()
            .user_data(1);
        // The same write by plain fd: would reach any file the worker holds.
        let by_fd = opcode::Writev::new(types::Fd(tx.as_raw_fd()), iov.as_ptr(), 1)
            .build()
            .user_data(2);
        let nop = opcode::Nop::new().build().user_data(3);
        // (A refused entry ends the submission: one at a time.)
        for (e, want) in [
            (fixed.clone(), 5),
            (by_fd, -libc::EACCES),
            (nop, -libc::EACCES),
        ] {
            // SAFETY: `iov` and `data` outlive the ring's use of them (submit_and_wait below).
            unsafe { ring.submission().push(&e).unwrap() };
            ring.submit_and_wait(1).unwrap();
            let got: Vec<i32> = ring.completion().map(|c| c.result()).collect();
            assert_eq!(got, [want], "entry {}", e.get_user_data());
        }
        let mut buf = [0u8; 8];
        assert_eq!(rx.recv(&mut buf).unwrap(), 5);
        // No further registration: the ring cannot be given another file, only drop its own.
        assert!(ring.submitter().register_files(&[rx.as_raw_fd()]).is_err());
        ring.submitter().unregister_files().unwrap();
        // SAFETY: as above.
        unsafe { ring.submission().push(&fixed).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let got: Vec<i32> = ring.completion().map(|c| c.result()).collect();
        assert_eq!(got, [-libc::EBADF]);
    }
}
