//! I/O engines: io_uring (one ring per queue thread) and a synchronous fallback.
//!
//! The engine is a pipeline: [`Engine::start`] takes a parsed request and returns at once,
//! [`Engine::take_done`] gives back the requests that have finished since (in completion order)
//! and [`Engine::wait`] sleeps until one finishes or the guest kicks. The queue worker
//! (`vring.rs`) thus keeps up to a queue's worth of requests in flight across kicks, and a slow
//! request holds up only itself.
//!
//! The only orders virtio-blk asks for:
//! - A FLUSH is a barrier: it, and every request after it, waits until every request started
//!   before it has completed; then its fdatasync goes to the ring, and later requests overlap
//!   with it.
//! - Write-through (the guest turned its write cache off): finished writes are given back only
//!   after an fdatasync that started once they had completed (one per [`Engine::take_done`]),
//!   and fail if it fails.
//!
//! Memory: a request in the ring keeps the iovec array the kernel was given (the request's own
//! `Vec`, whose buffer does not move with it) and an `Arc` of the guest memory its iovecs point
//! into until its completion is reaped; dropping the engine waits for what the kernel still
//! holds. The sync engine finishes each request inside `start`, and so does io_uring for the
//! requests a ring would not speed up (tmpfs, page-cache hits, discard, write-zeroes, more
//! than 1024 segments).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vm_memory::GuestMemoryMmap;

use crate::cli::IoEngineKind;
use crate::disk::{Disk, Inline};
use crate::request::{Op, Request};

/// A request the engine holds: in the ring or behind a flush.
struct InFlight {
    req: Request,
    /// Keeps the guest memory the iovecs point into mapped.
    _mem: Arc<GuestMemoryMmap>,
}

/// A per-thread I/O engine.
pub struct Engine {
    /// `None`: the sync engine.
    ring: Option<Box<IoUring>>,
    /// Requests in the ring, indexed by their `user_data`.
    slots: Vec<Option<InFlight>>,
    /// Free indices of `slots`.
    free: Vec<usize>,
    /// Requests in the ring.
    submitted: usize,
    /// Requests held behind a FLUSH barrier (the flush first), not yet in the ring.
    held: VecDeque<InFlight>,
    /// Finished requests not yet given back.
    done: Vec<Request>,
    /// How many of the requests above are marked suspended ([`Engine::suspend_all`]).
    suspended: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.ring.is_some() {
            "io_uring"
        } else {
            "sync"
        })
    }
}

impl Engine {
    /// Builds the engine; io_uring falls back to sync when it cannot be set up. `depth`: ring
    /// entries, at least the most requests that can be in flight (the queue size).
    pub fn new(kind: IoEngineKind, depth: u16) -> Self {
        let ring = match kind {
            IoEngineKind::Sync => None,
            IoEngineKind::IoUring => match restricted_ring(u32::from(depth.max(8))) {
                Ok(r) => Some(Box::new(r)),
                Err(e) => {
                    tracing::warn!("io_uring unavailable ({e}), using the sync engine");
                    None
                }
            },
        };
        Self {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            submitted: 0,
            held: VecDeque::new(),
            done: Vec::new(),
            suspended: 0,
        }
    }

    /// Requests started and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.submitted + self.held.len()
    }

    /// Requests marked suspended ([`Engine::suspend_all`]) not given back yet.
    pub fn suspended(&self) -> usize {
        self.suspended
    }

    /// Requests finished and not given back yet.
    pub fn finished(&self) -> usize {
        self.done.len()
    }

    /// Marks every request started and not given back yet as suspended (its ring stopped
    /// without waiting for it) and returns their heads.
    pub fn suspend_all(&mut self) -> Vec<u16> {
        let mut heads = Vec::new();
        let in_flight = self.slots.iter_mut().flatten().chain(self.held.iter_mut());
        for r in in_flight.map(|f| &mut f.req).chain(self.done.iter_mut()) {
            r.suspended = true;
            heads.push(r.head);
        }
        self.suspended = heads.len();
        heads
    }

    /// Starts a request; it comes back from [`Engine::take_done`] with its final status.
    pub fn start(&mut self, disk: &Disk, req: Request, mem: &Arc<GuestMemoryMmap>) {
        let r = InFlight {
            req,
            _mem: mem.clone(),
        };
        if !self.held.is_empty() || (r.req.op == Op::Flush && self.submitted > 0) {
            self.held.push_back(r);
        } else {
            self.dispatch(disk, r);
        }
    }

    /// Submits what was started, reaps what completed and gives back every finished request.
    /// `write_through`: fdatasync after writes (the guest turned the write cache off).
    pub fn take_done(&mut self, disk: &Disk, write_through: bool) -> Vec<Request> {
        self.enter(disk);
        self.reap(disk);
        // The ring may have emptied: start what waited behind a flush.
        while let Some(r) = self.held.front() {
            if r.req.op == Op::Flush && self.submitted > 0 {
                break;
            }
            if let Some(r) = self.held.pop_front() {
                self.dispatch(disk, r);
            }
        }
        self.enter(disk);
        if write_through && self.done.iter().any(|r| r.op == Op::Write) && disk.flush().is_err() {
            self.done
                .iter_mut()
                .filter(|r| r.op == Op::Write)
                .for_each(Request::set_ioerr);
        }
        let done = std::mem::take(&mut self.done);
        if self.suspended > 0 {
            let back = done.iter().filter(|r| r.suspended).count();
            self.suspended = self.suspended.saturating_sub(back);
        }
        done
    }

    /// Waits until a request in the ring completes, `kick` (the guest's kick eventfd, whose
    /// count it consumes) fires or `wake` becomes readable (left as it is): first by watching
    /// the completion queue for up to `spin` (`--poll-us`: a completion that comes within it
    /// costs no sleep and wake-up), then asleep. Returns at once if nothing is in the ring.
    pub fn wait(
        &mut self,
        kick: Option<&File>,
        spin: std::time::Duration,
        wake: Option<std::os::fd::BorrowedFd<'_>>,
    ) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        if self.submitted == 0 || !ring.completion().is_empty() {
            return;
        }
        if ring.submission().is_empty() && !spin.is_zero() {
            let until = std::time::Instant::now() + spin;
            while std::time::Instant::now() < until {
                if !ring.completion().is_empty() {
                    return;
                }
                std::hint::spin_loop();
            }
        }
        // Entries the kernel refused for now (EAGAIN, EBUSY) are retried after a short nap.
        let timeout = if ring.submission().is_empty() {
            PollTimeout::NONE
        } else {
            PollTimeout::from(1u8)
        };
        let mut fds = vec![PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
        if let Some(k) = kick {
            fds.push(PollFd::new(k.as_fd(), PollFlags::POLLIN));
        }
        if let Some(w) = wake {
            fds.push(PollFd::new(w, PollFlags::POLLIN));
        }
        let _ = poll(&mut fds, timeout);
        let kicked = fds
            .get(1)
            .and_then(PollFd::revents)
            .is_some_and(|r| r.intersects(PollFlags::POLLIN));
        if let (true, Some(mut k)) = (kicked, kick) {
            let _ = k.read(&mut [0u8; 8]);
        }
    }

    /// Runs `r` now, or queues it to the ring (submitted by the next [`Engine::enter`]).
    fn dispatch(&mut self, disk: &Disk, mut r: InFlight) {
        let Some(ring) = self.ring.as_mut() else {
            run_sync(disk, &mut r.req);
            self.done.push(r.req);
            return;
        };
        let Some(entry) = entry(disk, &mut r.req) else {
            self.done.push(r.req);
            return;
        };
        let slot = self.free.pop().unwrap_or(self.slots.len());
        let entry = entry.user_data(slot as u64);
        let entry = if disk.punt() {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        // SAFETY: the iovec array (the request's `Vec`, whose buffer stays put when the request
        // moves into `slots`) and the guest memory it points into (mapped as long as the slot
        // holds its `Arc`) live until the completion is reaped or the engine is dropped, which
        // waits for the ring; the file descriptor is the disk's, which outlives the engine.
        let pushed = unsafe { ring.submission().push(&entry) }.is_ok() || {
            // Full: make room and try once more.
            let _ = ring.submit();
            // SAFETY: as above.
            unsafe { ring.submission().push(&entry) }.is_ok()
        };
        if !pushed {
            if slot < self.slots.len() {
                self.free.push(slot);
            }
            run_sync(disk, &mut r.req);
            self.done.push(r.req);
            return;
        }
        match self.slots.get_mut(slot) {
            Some(s) => *s = Some(r),
            None => self.slots.push(Some(r)),
        }
        self.submitted += 1;
    }

    /// Submits the queued entries without waiting.
    fn enter(&mut self, disk: &Disk) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        if ring.submission().is_empty() {
            return;
        }
        match ring.submit() {
            Ok(_) => {}
            // Not now: they stay queued, and the next call submits them.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) => {
                // The ring is unusable: finish everything synchronously from now on. The kernel
                // may still own some of its entries, so the ring is never unmapped or closed.
                tracing::error!("io_uring submit failed: {e}; using the sync engine");
                if let Some(ring) = self.ring.take() {
                    std::mem::forget(ring);
                }
                for mut r in self.slots.drain(..).flatten() {
                    run_sync(disk, &mut r.req);
                    self.done.push(r.req);
                }
                self.free.clear();
                self.submitted = 0;
                for mut r in self.held.drain(..) {
                    run_sync(disk, &mut r.req);
                    self.done.push(r.req);
                }
            }
        }
    }

    /// Moves the completed requests of the ring to `done`.
    fn reap(&mut self, disk: &Disk) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        for c in ring.completion() {
            let i = usize::try_from(c.user_data()).unwrap_or(usize::MAX);
            let Some(mut r) = self.slots.get_mut(i).and_then(Option::take) else {
                continue;
            };
            self.free.push(i);
            self.submitted = self.submitted.saturating_sub(1);
            let req = &mut r.req;
            let expected = if req.op == Op::Flush { 0 } else { req.len };
            match u64::try_from(c.result()) {
                Ok(n) if n == expected => {}
                Ok(_) => run_sync(disk, req), // short transfer: redo it synchronously
                Err(_) => {
                    tracing::debug!(
                        head = req.head,
                        "I/O error: {}",
                        std::io::Error::from_raw_os_error(-c.result())
                    );
                    req.set_ioerr();
                }
            }
            self.done.push(r.req);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Only if the worker unwinds with requests in the ring: the kernel still holds their
        // iovecs and buffers, which must outlive it.
        if let Some(ring) = &self.ring {
            if self.submitted > 0 {
                let _ = ring.submit_and_wait(self.submitted);
            }
        }
    }
}

/// The ring entry for `r`, or `None` once `r` has run on the calling thread (the ring would
/// not speed it up, or cannot run it).
fn entry(disk: &Disk, r: &mut Request) -> Option<squeue::Entry> {
    let fd = types::Fd(disk.raw_fd());
    let segs = u32::try_from(r.iovecs.len()).ok().filter(|&n| n <= 1024);
    match (&r.op, segs) {
        (Op::Read | Op::Write, _) if disk.inline() == Inline::Always => {}
        (Op::Read, Some(n)) => {
            if disk.inline() == Inline::ReadsNoWait
                && disk
                    .nowait(&r.iovecs, r.offset, false)
                    .is_ok_and(|done| done as u64 == r.len)
            {
                // Served from the page cache without blocking.
                return None;
            }
            return Some(
                opcode::Readv::new(fd, r.iovecs.as_ptr(), n)
                    .offset(r.offset)
                    .build(),
            );
        }
        (Op::Write, Some(n)) => {
            return Some(
                opcode::Writev::new(fd, r.iovecs.as_ptr(), n)
                    .offset(r.offset)
                    .build(),
            );
        }
        (Op::Flush, _) => {
            return Some(
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            );
        }
        _ => {}
    }
    run_sync(disk, r);
    None
}

/// An io_uring that can only ever run what this engine submits: READV, WRITEV, FSYNC, and of
/// the SQE flags only ASYNC (for a disk on FUSE); see [`baton_service::uring`].
fn restricted_ring(entries: u32) -> std::io::Result<IoUring> {
    baton_service::uring::restricted(
        entries,
        &baton_service::uring::Allowed {
            ops: &[
                opcode::Readv::CODE,
                opcode::Writev::CODE,
                opcode::Fsync::CODE,
            ],
            flags: squeue::Flags::ASYNC,
            required: squeue::Flags::empty(),
            files: &[],
            buffers: &[],
        },
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_ring_runs_only_what_the_engine_submits() {
        let mut ring = match restricted_ring(8) {
            Ok(r) => r,
            Err(e) => {
                baton_service::skip::cannot_run("io_uring", &format!("no io_uring here: {e}"));
                return;
            }
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
