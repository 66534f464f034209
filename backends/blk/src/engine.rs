//! I/O engines: io_uring (one ring per queue thread, one submission batch per kick) and a
//! synchronous fallback. Both execute a batch of parsed [`Request`]s in place.

use io_uring::register::Restriction;
use io_uring::{IoUring, opcode, types};

use crate::cli::IoEngineKind;
use crate::disk::{Disk, Inline};
use crate::request::{Op, Request};

/// A per-thread I/O engine.
pub enum Engine {
    /// Synchronous pread/pwrite on the calling thread.
    Sync,
    /// io_uring.
    Uring(Box<IoUring>),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Sync => "sync",
            Engine::Uring(_) => "io_uring",
        })
    }
}

impl Engine {
    /// Builds the engine; io_uring falls back to sync when it cannot be set up.
    pub fn new(kind: IoEngineKind, depth: u16) -> Self {
        match kind {
            IoEngineKind::Sync => Engine::Sync,
            IoEngineKind::IoUring => match restricted_ring(u32::from(depth.max(8))) {
                Ok(r) => Engine::Uring(Box::new(r)),
                Err(e) => {
                    tracing::warn!("io_uring unavailable ({e}), using the sync engine");
                    Engine::Sync
                }
            },
        }
    }

    /// Executes every request of the batch; on return each has its final status.
    /// `write_through`: fdatasync after writes (the guest turned the write cache off).
    pub fn run(&mut self, disk: &Disk, reqs: &mut [Request], write_through: bool) {
        match self {
            Engine::Sync => {
                for r in reqs.iter_mut() {
                    run_sync(disk, r);
                }
            }
            Engine::Uring(ring) => run_uring(ring, disk, reqs),
        }
        if write_through && reqs.iter().any(|r| r.op == Op::Write) && disk.flush().is_err() {
            reqs.iter_mut()
                .filter(|r| r.op == Op::Write)
                .for_each(Request::set_ioerr);
        }
    }
}

/// An io_uring that can only ever run what this engine submits (READV, WRITEV, FSYNC, no SQE
/// flags) and accepts no further io_uring_register call. The ring's operations run in the
/// kernel without passing through seccomp, so without this a compromised worker could open
/// files or sockets through its ring; created disabled, restricted, then enabled.
fn restricted_ring(entries: u32) -> std::io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    let mut allowed = [
        Restriction::sqe_op(opcode::Readv::CODE),
        Restriction::sqe_op(opcode::Writev::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
    ];
    ring.submitter().register_restrictions(&mut allowed)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

/// Executes one request synchronously.
pub fn run_sync(disk: &Disk, r: &mut Request) {
    let res = match &r.op {
        Op::Read => disk.read_at(&r.iovecs, r.offset),
        Op::Write => disk.write_at(&r.iovecs, r.offset),
        Op::Flush => disk.flush(),
        Op::Discard(ranges) => ranges.iter().try_for_each(|&(o, l)| disk.discard(o, l)),
        Op::WriteZeroes(ranges) => ranges
            .iter()
            .try_for_each(|&(o, l, unmap)| disk.write_zeroes(o, l, unmap)),
        Op::Done => Ok(()),
    };
    if let Err(e) = res {
        tracing::debug!(head = r.head, "I/O error: {e}");
        r.set_ioerr();
    }
}

fn run_uring(ring: &mut IoUring, disk: &Disk, reqs: &mut [Request]) {
    let fd = types::Fd(disk.raw_fd());
    let mut next = 0usize;
    let mut in_flight = 0usize;
    loop {
        // Queue as many as fit.
        while let Some(r) = reqs.get_mut(next) {
            let entry = match r.op {
                Op::Read | Op::Write if r.iovecs.len() > 1024 => {
                    run_sync(disk, r);
                    next += 1;
                    continue;
                }
                Op::Read | Op::Write if disk.inline() == Inline::Always => {
                    run_sync(disk, r);
                    next += 1;
                    continue;
                }
                Op::Read
                    if disk.inline() == Inline::ReadsNoWait
                        && r.iovecs.len() <= 1024
                        && disk
                            .nowait(&r.iovecs, r.offset, false)
                            .is_ok_and(|n| n as u64 == r.len) =>
                {
                    // Served from the page cache without blocking.
                    next += 1;
                    continue;
                }
                Op::Read => {
                    let n = u32::try_from(r.iovecs.len()).unwrap_or(0);
                    opcode::Readv::new(fd, r.iovecs.as_ptr(), n)
                        .offset(r.offset)
                        .build()
                }
                Op::Write => {
                    let n = u32::try_from(r.iovecs.len()).unwrap_or(0);
                    opcode::Writev::new(fd, r.iovecs.as_ptr(), n)
                        .offset(r.offset)
                        .build()
                }
                Op::Flush => opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                _ => {
                    run_sync(disk, r);
                    next += 1;
                    continue;
                }
            };
            let entry = entry.user_data(next as u64);
            // SAFETY: the iovec arrays and the guest memory they point to stay alive until the
            // completion is reaped below (the batch slice is not touched and the caller holds
            // the memory map) and the file descriptor stays open (borrowed from `disk`).
            if unsafe { ring.submission().push(&entry) }.is_err() {
                break;
            }
            in_flight += 1;
            next += 1;
        }
        if in_flight == 0 {
            return;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // The ring is unusable: finish what is queued synchronously after draining.
            tracing::error!("io_uring submit failed: {e}");
            for r in reqs.iter_mut().take(next) {
                if matches!(r.op, Op::Read | Op::Write | Op::Flush) {
                    run_sync(disk, r);
                }
            }
            return;
        }
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| {
                (
                    usize::try_from(c.user_data()).unwrap_or(usize::MAX),
                    c.result(),
                )
            })
            .collect();
        for (i, res) in done {
            in_flight = in_flight.saturating_sub(1);
            let Some(r) = reqs.get_mut(i) else { continue };
            let expected = if matches!(r.op, Op::Flush) { 0 } else { r.len };
            match u64::try_from(res) {
                Ok(n) if n == expected => {}
                Ok(_) => run_sync(disk, r), // short transfer: redo it synchronously
                Err(_) => {
                    tracing::debug!(
                        head = r.head,
                        "I/O error: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                    r.set_ioerr();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_ring_runs_only_what_the_engine_submits() {
        let Ok(mut ring) = restricted_ring(8) else {
            eprintln!("SKIP the_ring_runs_only_what_the_engine_submits: no io_uring here");
            return;
        };
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let fsync = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .build()
            .user_data(1);
        let nop = opcode::Nop::new().build().user_data(2);
        // SAFETY: neither entry points to memory; the file outlives the ring's use of it.
        unsafe {
            ring.submission().push(&fsync).unwrap();
            ring.submission().push(&nop).unwrap();
        }
        ring.submit_and_wait(2).unwrap();
        let mut results: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        results.sort_unstable();
        assert_eq!(results, [(1, 0), (2, -libc::EACCES)]);
        assert!(
            ring.submitter()
                .register_files(&[file.as_raw_fd()])
                .is_err()
        );
    }
}
