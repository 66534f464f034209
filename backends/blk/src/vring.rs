//! Per-queue state and the queue worker thread.
//!
//! Each queue has a `Mutex<Vring>` and a thread. The thread waits for a kick (or a wake-up from
//! the control path), then, holding the lock, runs the ring as a pipeline ([`process`]): it pops
//! a few of the available requests (see `pop_batch`; marking each head inflight), starts them
//! on its I/O engine, completes to the used ring whatever has finished (in completion order, as
//! virtio allows), signals the guest per EVENT_IDX, and pops again; it sleeps, still holding
//! the lock, only when nothing can progress, until a request finishes or the guest kicks. Up to
//! a queue's worth of requests are in flight, so a slow request holds up only itself.
//!
//! The lock is never released with a request in flight: the pipeline returns only once the
//! engine is empty. A control-path caller of [`VringCtl::lock`] (GET_VRING_BASE, a new memory
//! table, disconnect, SIGTERM) announces itself first; the worker then stops popping, drains
//! what is in flight (one disk latency), releases the lock and wakes itself to resume once the
//! caller is done. So taking the lock waits for in-flight requests to complete, and not longer;
//! after the caller clears `started`, the worker writes no guest memory and sends no
//! notification.
//!
//! Except for a ring *suspended* ([`VringCtl::lock_suspending`]: GET_VRING_BASE when the
//! front-end negotiated VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT): the worker lets go
//! without waiting for what is in flight. Those requests stay marked in the inflight region and
//! keep executing in the engine; their status byte and used entry are written only once a
//! front-end restarts the ring with an inflight region that still lists them (the new VMM of a
//! live update, or the old one after a rollback, which hand the region over), and never
//! otherwise: they are not resubmitted either, so each completes exactly once. Their data
//! buffers may still be written after the stop — the spec asks a back-end to cancel such I/O
//! instead, which the kernel cannot do for a read it has started on a disk or a FUSE file; it
//! is harmless here because both VMMs share the guest memory and a buffer belongs to the device
//! until its used entry is written, but it would not be in a migration that copies the memory.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use baton_service::sandbox::Gate;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::time::Instant;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::Device;
use crate::engine::Engine;
use crate::request::{self, Request};
use baton_service::inflight::InflightQueue;

/// Mutable state of one virtqueue.
#[derive(Debug)]
pub struct Vring {
    /// The split queue (addresses, size, next_avail/next_used, event_idx).
    pub queue: Queue,
    /// Guest memory of the current front-end.
    pub mem: Option<Arc<GuestMemoryMmap>>,
    /// Kick eventfd from the front-end.
    pub kick: Option<Arc<File>>,
    /// Call eventfd to the front-end.
    pub call: Option<File>,
    /// SET_VRING_ENABLE state.
    pub enabled: bool,
    /// Started by SET_VRING_KICK, stopped by GET_VRING_BASE or a disconnect.
    pub started: bool,
    /// Inflight tracking, when the front-end set a region.
    pub inflight: Option<InflightQueue>,
    /// Requests completed on this queue (for logs and tests).
    pub completed: u64,
    /// Inflight heads to resubmit before popping new ones.
    pub resubmit: Vec<u16>,
    /// The guest broke the ring (see [`baton_service::ring::AvailOverrun`]): left alone until
    /// the front-end starts it again.
    pub broken: bool,
    /// Heads still in the engine when the ring was suspended (see the module doc).
    pub suspended: Vec<u16>,
    /// Suspended heads the front-end that restarted the ring lists inflight: completed when
    /// they finish. A suspended request not in here is dropped when it finishes.
    pub adopted: Vec<u16>,
}

impl Vring {
    fn new(max: u16) -> std::io::Result<Self> {
        let queue = Queue::new(max)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(Self {
            queue,
            mem: None,
            kick: None,
            call: None,
            enabled: false,
            started: false,
            inflight: None,
            completed: 0,
            resubmit: Vec::new(),
            broken: false,
            suspended: Vec::new(),
            adopted: Vec::new(),
        })
    }

    /// Stops the ring: no guest memory access and no notification until restarted.
    pub fn stop(&mut self) {
        self.started = false;
        self.resubmit.clear();
        self.queue.set_ready(false);
        self.kick = None;
        self.call = None;
    }

    fn runnable(&self) -> bool {
        self.started && self.enabled && !self.broken && self.mem.is_some() && self.queue.ready()
    }

    /// Starts the ring after SET_VRING_KICK: next_used is re-read from the guest's used ring.
    pub fn start(&mut self) -> bool {
        let Some(mem) = self.mem.clone() else {
            return false;
        };
        self.queue.set_ready(true);
        if !self.queue.is_valid(&*mem) {
            self.queue.set_ready(false);
            tracing::warn!("ring addresses are not valid in guest memory; not starting");
            return false;
        }
        let used_idx_addr = GuestAddress(self.queue.used_ring()).checked_add(2);
        let used: u16 = used_idx_addr
            .and_then(|a| mem.read_obj::<u16>(a).ok())
            .map(u16::from_le)
            .unwrap_or(0);
        self.queue.set_next_used(used);
        self.resubmit.clear();
        let suspended = std::mem::take(&mut self.suspended);
        self.adopted.clear();
        if let Some(inf) = &self.inflight {
            inf.reconcile(used);
            // As libvhost-user: the requests still marked inflight were popped and never
            // completed; resubmit them (oldest first) and resume after them. Those still in
            // our engine since a suspension are not resubmitted: they complete when done.
            let pending = inf.pending();
            if !pending.is_empty() {
                let n = u16::try_from(pending.len()).unwrap_or(u16::MAX);
                self.queue.set_next_avail(used.wrapping_add(n));
                let (adopted, resubmit) = pending.into_iter().partition(|h| suspended.contains(h));
                (self.adopted, self.resubmit) = (adopted, resubmit);
                if !self.resubmit.is_empty() {
                    tracing::info!(
                        pending = ?self.resubmit,
                        "resubmitting requests left inflight by a previous back-end"
                    );
                }
                if !self.adopted.is_empty() {
                    tracing::info!(
                        heads = ?self.adopted,
                        "completing the requests still executing since the ring was suspended"
                    );
                }
            }
        }
        self.queue.set_ready(true);
        self.broken = false;
        self.started = true;
        true
    }
}

/// A queue: its state and the wake-up eventfd of its worker.
#[derive(Debug)]
pub struct VringCtl {
    state: Mutex<Vring>,
    wake: EventFd,
    quit: AtomicBool,
    /// Control-path callers waiting for the lock: the worker drains and lets go.
    waiting: AtomicUsize,
    /// The caller waiting suspends the ring: the worker lets go without draining.
    suspending: AtomicBool,
}

impl VringCtl {
    /// New stopped queue of maximum size `max`.
    pub fn new(max: u16) -> std::io::Result<Self> {
        Ok(Self {
            state: Mutex::new(Vring::new(max)?),
            wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            quit: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            suspending: AtomicBool::new(false),
        })
    }

    /// Locks the queue state for the control path: the worker finishes the requests in flight
    /// and lets go.
    pub fn lock(&self) -> MutexGuard<'_, Vring> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let st = self.state();
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        st
    }

    /// Locks the queue state to suspend the ring: the worker lets go without waiting for the
    /// requests in flight (see the module doc); the caller then stops the ring.
    pub fn lock_suspending(&self) -> MutexGuard<'_, Vring> {
        self.suspending.store(true, Ordering::SeqCst);
        // The worker may sleep until a request completes: wake it.
        self.wake();
        let st = self.lock();
        self.suspending.store(false, Ordering::SeqCst);
        st
    }

    /// The worker's [`run`]: cut short when the control path waits for the lock, without
    /// waiting for the requests in flight when it suspends the ring.
    fn run(&self, st: &mut Vring, dev: &Device, engine: &mut Engine) -> bool {
        run_until(
            st,
            dev,
            engine,
            &|| self.contended(),
            &|| self.suspending.load(Ordering::SeqCst),
            Some(self.wake.as_fd()),
        )
    }

    /// After a run cut short: if the ring is being suspended, records what stays in the engine.
    fn let_go(&self, st: &mut Vring, engine: &mut Engine) {
        if self.suspending.load(Ordering::SeqCst) && engine.in_flight() + engine.finished() > 0 {
            st.suspended = engine.suspend_all();
            st.adopted.clear();
            tracing::info!(heads = ?st.suspended, "ring suspended with requests in flight");
        }
    }

    /// Locks the queue state for the worker.
    fn state(&self) -> MutexGuard<'_, Vring> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the worker should drain and let go of the lock (someone waits for it, or quit).
    fn contended(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0 || self.quit.load(Ordering::Relaxed)
    }

    /// Wakes the worker (new kick fd, ring started or enabled).
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Asks the worker to exit.
    pub fn quit(&self) {
        self.quit.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// The queue worker loop; it enters the sandbox (`gate`) once its engine is set up.
pub fn worker(ctl: Arc<VringCtl>, dev: Arc<Device>, index: u16, gate: Gate) {
    let span = tracing::debug_span!("queue", index);
    let _e = span.enter();
    let mut engine = Engine::new(dev.engine_kind(), dev.queue_size().saturating_mul(2));
    if !gate.enter() {
        return;
    }
    tracing::debug!(?engine, "worker started");
    loop {
        let kick = ctl.state().kick.clone();
        let mut fds = vec![PollFd::new(ctl.wake.as_fd(), PollFlags::POLLIN)];
        if let Some(k) = &kick {
            fds.push(PollFd::new(k.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("poll failed: {e}");
                return;
            }
        }
        let kicked = fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|r| r.intersects(PollFlags::POLLIN));
        drop(fds);
        let _ = ctl.wake.read();
        if kicked {
            if let Some(k) = &kick {
                let mut b = [0u8; 8];
                let _ = (&**k).read(&mut b);
            }
        }
        if ctl.quit.load(Ordering::SeqCst) {
            return;
        }
        let mut st = ctl.state();
        let cut_short = st.runnable() && ctl.run(&mut st, &dev, &mut engine);
        if cut_short {
            ctl.let_go(&mut st, &mut engine);
        }
        drop(st);
        // Cut short, the ring may hold requests the guest will not kick for: look again once
        // the control path is done.
        if cut_short || poll_ring(&ctl, &dev, &mut engine) {
            ctl.wake();
        }
        baton_service::memory::report_faults();
    }
}

/// After the ring ran dry: watches its avail index for up to [`Device::poll`], with the
/// guest's notifications off (with EVENT_IDX), and processes what comes; turns them back on
/// before the worker sleeps. The ring lock is taken only for each look, and not at all once the
/// control path waits for it. Returns true if cut short that way (the worker must look again).
fn poll_ring(ctl: &VringCtl, dev: &Device, engine: &mut Engine) -> bool {
    let budget = dev.poll();
    if budget.is_zero() {
        return false;
    }
    let mut deadline = Instant::now() + budget;
    let mut quiet = false;
    loop {
        if ctl.contended() {
            return true;
        }
        let mut st = ctl.state();
        if !st.runnable() || !st.queue.event_idx_enabled() {
            return false;
        }
        let Some(mem) = st.mem.clone() else {
            return false;
        };
        if !quiet {
            let _ = st.queue.disable_notification(&*mem);
            quiet = true;
        }
        if baton_service::ring::has_pending(&st.queue, &*mem) {
            // run() turns notifications back on when it is done.
            if ctl.run(&mut st, dev, engine) {
                ctl.let_go(&mut st, engine);
                return true;
            }
            quiet = false;
            deadline = Instant::now() + budget;
        } else if Instant::now() >= deadline {
            // Back on; a request that came meanwhile is processed now, not after a kick.
            let cut_short = matches!(st.queue.enable_notification(&*mem), Ok(true))
                && ctl.run(&mut st, dev, engine);
            if cut_short {
                ctl.let_go(&mut st, engine);
            }
            return cut_short;
        }
        drop(st);
        std::hint::spin_loop();
    }
}

/// How many requests the worker pops at a time before it starts them (the ring's are then
/// submitted) and completes those done (and notifies the guest). Popping all that is available
/// first holds back the first completion until the last request is done: the front-end then
/// refills the ring only once the worker has run dry, and the two take turns instead of
/// overlapping. Measured with the host-side driver, 4 KiB random reads at QD 32 on one queue
/// (`baton-vu-bench blk`): on tmpfs (requests run inline) 447k IOPS popping all, 552k by 2,
/// 650k by 8, 616k by 16; on the disk with O_DIRECT (requests go to the ring) 93k popping all,
/// ~122k by 1 or 2, ~112k by 4 or 8, against the disk's own 134k.
fn pop_batch(disk: &crate::disk::Disk) -> usize {
    if disk.inline() == crate::disk::Inline::Never {
        2
    } else {
        8
    }
}

/// Processes a started ring until nothing is available and nothing is in flight (public for
/// the fuzz targets).
pub fn process(st: &mut Vring, dev: &Device, engine: &mut Engine) {
    run(st, dev, engine, &|| false);
}

/// The pipeline (see the module doc). Once `cut_short` says so, it stops popping, finishes
/// what is in flight (unless the ring is being suspended) and returns true: the ring may still
/// hold requests.
fn run(st: &mut Vring, dev: &Device, engine: &mut Engine, cut_short: &dyn Fn() -> bool) -> bool {
    run_until(st, dev, engine, cut_short, &|| false, None)
}

/// [`run`], letting go without waiting for what is in flight — nor for the write-through
/// fdatasync of what finished — once `suspend` says so too; its sleeps end early when `wake`
/// becomes readable (the control path announces itself there).
fn run_until(
    st: &mut Vring,
    dev: &Device,
    engine: &mut Engine,
    cut_short: &dyn Fn() -> bool,
    suspend: &dyn Fn() -> bool,
    wake: Option<std::os::fd::BorrowedFd<'_>>,
) -> bool {
    let Some(mem) = st.mem.clone() else {
        return false;
    };
    let m: &GuestMemoryMmap = &mem;
    let event_idx = st.queue.event_idx_enabled();
    let mut stopped = false;
    loop {
        stopped = stopped || cut_short();
        if stopped && suspend() && engine.in_flight() + engine.finished() > 0 {
            return true;
        }
        let mut popped = 0;
        // Requests suspended with the ring that the front-end which restarted it does not
        // list (they are dropped when done) may still write the guest's buffers: nothing new
        // is taken from the ring until they are done, since the guest may meanwhile get some
        // of those buffers back through requests taken again.
        let stale = engine.suspended() > st.adopted.len();
        if !stopped && !st.broken && !stale {
            if event_idx {
                let _ = st.queue.disable_notification(m);
            }
            let room = usize::from(st.queue.size())
                .saturating_sub(engine.in_flight())
                .min(pop_batch(dev.disk()));
            let batch = pop(st, dev, m, room);
            popped = batch.len();
            if let Some(d) = dev.test_delay().filter(|_| popped > 0) {
                let heads: Vec<u16> = batch.iter().map(|r| r.head).collect();
                tracing::info!(?heads, "test delay: holding a batch marked inflight");
                std::thread::sleep(d);
            }
            for r in batch {
                engine.start(dev.disk(), r, &mem);
            }
        }
        let finished = engine.take_done(dev.disk(), !dev.writeback());
        let moved = popped > 0 || !finished.is_empty();
        let done = adopt(st, finished);
        complete(st, m, &done);
        if moved {
            continue;
        }
        // Nothing moved: sleep until something does, with the guest's notifications on if
        // there is room for more requests.
        let watch =
            !stopped && !st.broken && !stale && engine.in_flight() < usize::from(st.queue.size());
        if watch && event_idx && matches!(st.queue.enable_notification(m), Ok(true)) {
            continue;
        }
        if engine.in_flight() == 0 {
            return stopped;
        }
        engine.wait(st.kick.as_deref().filter(|_| watch), dev.poll(), wake);
    }
}

/// The finished requests that go to the used ring: all but those suspended with an earlier
/// ring that the front-end which restarted it did not list inflight (dropped).
fn adopt(st: &mut Vring, done: Vec<Request>) -> Vec<Request> {
    if done.iter().all(|r| !r.suspended) {
        return done;
    }
    done.into_iter()
        .filter(|r| {
            if !r.suspended {
                return true;
            }
            match st.adopted.iter().position(|h| *h == r.head) {
                Some(i) => {
                    st.adopted.swap_remove(i);
                    true
                }
                None => {
                    tracing::info!(
                        head = r.head,
                        "dropping a request suspended with its ring: the front-end that \
                         restarted the ring does not list it inflight"
                    );
                    false
                }
            }
        })
        .collect()
}

/// Pops up to `room` requests (after the heads a previous back-end instance left inflight,
/// already marked), marks each inflight and parses it. A broken ring is marked and left alone.
fn pop(st: &mut Vring, dev: &Device, m: &GuestMemoryMmap, room: usize) -> Vec<Request> {
    if let Err(e) = baton_service::ring::check(&st.queue, m) {
        tracing::warn!("{e}");
        st.broken = true;
        return Vec::new();
    }
    let info = dev.info();
    let table = GuestAddress(st.queue.desc_table());
    let mut batch: Vec<Request> = std::mem::take(&mut st.resubmit)
        .into_iter()
        .map(|head| {
            let descs = crate::chain::walk(m, table, st.queue.size(), head, dev.max_descs());
            request::parse(m, head, &descs, info)
        })
        .collect();
    while batch.len() < room {
        // virtio-queue's refusal to iterate (not ready, bad index) does not change until the
        // front-end restarts the ring: leave it alone rather than ask again forever.
        let chain = match st.queue.iter(m) {
            Ok(mut it) => it.next(),
            Err(e) => {
                tracing::warn!("ring refused: {e}; ignored until restarted");
                st.broken = true;
                break;
            }
        };
        let Some(chain) = chain else {
            break;
        };
        let head = chain.head_index();
        if let Some(inf) = st.inflight.as_mut() {
            inf.begin(head);
        }
        let descs = crate::chain::descs_of(chain, dev.max_descs());
        batch.push(request::parse(m, head, &descs, info));
    }
    batch
}

/// Writes the statuses and used entries of finished requests, and notifies the guest if it
/// asked for it.
fn complete(st: &mut Vring, m: &GuestMemoryMmap, done: &[Request]) {
    if done.is_empty() {
        return;
    }
    for r in done {
        if !r.write_status(m) {
            tracing::debug!(head = r.head, "no status byte for this request");
        }
        if let Some(inf) = &st.inflight {
            inf.pre_put(r.head);
        }
        if st.queue.add_used(m, r.head, r.used_len()).is_err() {
            tracing::debug!(head = r.head, "could not add to the used ring");
        }
        if let Some(inf) = &st.inflight {
            inf.post_put(r.head, st.queue.next_used());
        }
        st.completed += 1;
    }
    if st.queue.needs_notification(m).unwrap_or(true) {
        if let Some(call) = &st.call {
            let _ = (&*call).write(&1u64.to_ne_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::Duration;

    /// A device with one queue of 4 on a memfd disk, its ring at `desc`/`avail`/`used` in 64 KiB
    /// of guest memory whose avail index is 1 (one request, head 0: a flush), started.
    fn device(avail: u64, used: u64, event_idx: bool) -> Arc<Device> {
        device_on(None, 4, avail, used, event_idx)
    }

    /// [`device`] with queues of `size`, on `image` if given (a 1 MiB memfd otherwise).
    fn device_on(
        image: Option<crate::disk::Disk>,
        size: u16,
        avail: u64,
        used: u64,
        event_idx: bool,
    ) -> Arc<Device> {
        let fd =
            nix::sys::memfd::memfd_create(c"disk", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let disk = File::from(fd);
        disk.set_len(1 << 20).unwrap();
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&disk));
        let args = crate::cli::Args::try_parse_from([
            "baton-blk",
            "--image",
            &path,
            "--queue-size",
            &size.to_string(),
            "--io-engine",
            "sync",
        ])
        .unwrap();
        let dev = Device::new(&args).unwrap();
        let dev = Arc::new(match image {
            Some(d) => dev.with_disk(d),
            None => dev,
        });
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let desc = 0x1000;
        // Descriptor 0: a flush header; descriptor 1: the status byte.
        mem.write_obj(4u32, GuestAddress(0x3000)).unwrap();
        let put = |i, addr, len, flags, next| put_desc(&mem, i, addr, len, flags, next);
        put(0, 0x3000, 16, 1, 1);
        put(1, 0x3100, 1, 2, 0);
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        {
            let mut st = dev.queues()[0].lock();
            st.queue.try_set_size(size).unwrap();
            st.queue
                .try_set_desc_table_address(GuestAddress(desc))
                .unwrap();
            st.queue
                .try_set_avail_ring_address(GuestAddress(avail))
                .unwrap();
            st.queue
                .try_set_used_ring_address(GuestAddress(used))
                .unwrap();
            st.queue.set_event_idx(event_idx);
            st.mem = Some(Arc::new(mem));
            st.enabled = true;
            assert!(st.start());
        }
        drop(disk);
        dev
    }

    /// Writes descriptor `i` of the table at 0x1000.
    fn put_desc(mem: &GuestMemoryMmap, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(0x1000 + 16 * i);
        mem.write_obj(addr, a).unwrap();
        mem.write_obj(len, a.unchecked_add(8)).unwrap();
        mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    /// Head 0 (descriptors 0-2): read sector 0 (512 bytes at 0x4000), status at 0x3100.
    fn read_at_head_0(mem: &GuestMemoryMmap) {
        mem.write_obj(request::T_IN, GuestAddress(0x3000)).unwrap();
        put_desc(mem, 0, 0x3000, 16, 1, 1);
        put_desc(mem, 1, 0x4000, 512, 3, 2);
        put_desc(mem, 2, 0x3100, 1, 2, 0);
    }

    /// Whether this kernel gives the io_uring engine a ring. If not, the test cannot run: a
    /// failure unless skipping it is allowed ([`baton_service::skip::cannot_run`]).
    fn io_uring_here() -> bool {
        let e = Engine::new(crate::cli::IoEngineKind::IoUring, 16);
        if format!("{e:?}") == "io_uring" {
            return true;
        }
        baton_service::skip::cannot_run("io_uring", "no io_uring here");
        false
    }

    /// Whether `process` on queue 0 returns within a few seconds (a livelocked worker thread is
    /// left spinning until the test binary exits).
    fn process_ends(dev: Arc<Device>) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ctl = dev.queues()[0].clone();
            let mut engine = Engine::new(crate::cli::IoEngineKind::Sync, 8);
            process(&mut ctl.lock(), &dev, &mut engine);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5)).is_ok()
    }

    #[test]
    fn a_well_formed_ring_is_processed() {
        let dev = device(0x2000, 0x2400, false);
        assert!(process_ends(dev.clone()));
        assert_eq!(dev.queues()[0].lock().completed, 1);
    }

    /// Sixteen requests available at once on a disk served inline: the guest is notified of
    /// the first ones before the last are read (see [`pop_batch`]), not once after all.
    #[test]
    fn completions_go_back_while_the_rest_of_a_batch_waits() {
        let dev = device_on(None, 32, 0x2000, 0x2400, false);
        assert_eq!(pop_batch(dev.disk()), 8, "a memfd disk is served inline");
        let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        {
            let mut st = dev.queues()[0].lock();
            let mem = st.mem.clone().unwrap();
            for i in 0..16u16 {
                let hdr = 0x3000 + 0x20 * u64::from(i);
                mem.write_obj(4u32, GuestAddress(hdr)).unwrap();
                let d = u64::from(2 * i);
                put_desc(&mem, d, hdr, 16, 1, 2 * i + 1);
                put_desc(&mem, d + 1, hdr + 0x10, 1, 2, 0);
                let slot = GuestAddress(0x2000 + 4 + 2 * u64::from(i));
                mem.write_obj(2 * i, slot).unwrap();
            }
            mem.write_obj(16u16, GuestAddress(0x2002)).unwrap();
            // SAFETY: a dup of the eventfd, owned by nothing else.
            let dup = unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(&call)) };
            assert!(dup >= 0);
            // SAFETY: `dup` is a fresh fd this File now owns.
            st.call = Some(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup) });
        }
        assert!(process_ends(dev.clone()));
        assert_eq!(dev.queues()[0].lock().completed, 16);
        // Without EVENT_IDX every completed group notifies: two groups of 8.
        assert_eq!(call.read().unwrap(), 2);
    }

    /// Found by fuzzing (`fuzz/regressions/blk_ring/used-ring-on-avail-ring`): with the used
    /// ring on top of the avail ring, every completion moves the avail index one further, and
    /// `process` (which loops until nothing is available) never returns, holding the ring lock:
    /// GET_VRING_BASE, live update and SIGTERM wait forever.
    #[test]
    fn a_used_ring_on_the_avail_ring_does_not_livelock() {
        assert!(process_ends(device(0x2000, 0x2000, false)));
    }

    /// Found by fuzzing (`fuzz/regressions/blk_ring/avail-ring-at-0-event-idx`): virtio-queue
    /// does not iterate an avail ring at guest address 0 (it reads as "not ready"), but its
    /// `enable_notification` still sees the index ahead, so with EVENT_IDX `process` loops.
    #[test]
    fn an_avail_ring_at_address_zero_does_not_livelock() {
        assert!(process_ends(device(0, 0x2400, true)));
    }

    /// Found by fuzzing (`fuzz/regressions/blk_ring/avail-ring-cut-by-set-mem-table`): the
    /// ring was valid at SET_VRING_KICK, then the front-end's next SET_MEM_TABLE leaves part of
    /// the avail ring outside guest memory. An entry that cannot be read ends virtio-queue's
    /// iteration without moving next_avail, `enable_notification` still sees the index ahead,
    /// and with EVENT_IDX `process` loops.
    #[test]
    fn an_avail_ring_cut_by_a_new_memory_table_does_not_livelock() {
        let dev = device(0x1ff8, 0x1800, true);
        {
            let mut st = dev.queues()[0].lock();
            let old = st.mem.clone().unwrap();
            // The new table covers 8 KiB: the used ring and the avail index (0x1ffa) are there,
            // avail entry 2 (0x2000) is not.
            let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
            let mut buf = vec![0u8; 0x2000];
            old.read_slice(&mut buf, GuestAddress(0)).unwrap();
            small.write_slice(&buf, GuestAddress(0)).unwrap();
            small.write_obj(3u16, GuestAddress(0x1ffa)).unwrap();
            st.queue.set_next_avail(2);
            st.mem = Some(Arc::new(small));
        }
        assert!(process_ends(dev));
    }

    /// Polls `f` for up to 5 s.
    fn eventually(f: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// The pipeline: a request that completes late (head 0, a read from a pipe the test writes
    /// into last) holds up neither a request the guest posts while it is in flight (head 3,
    /// GET_ID, with a kick) nor the ring's lock holder's return once it completes.
    #[test]
    fn a_late_request_does_not_hold_up_later_ones() {
        if !io_uring_here() {
            return;
        }
        let uring = || Engine::new(crate::cli::IoEngineKind::IoUring, 16);
        let (slow, feed) = nix::unistd::pipe().unwrap();
        let disk = crate::disk::Disk::on(File::from(slow), 1 << 20);
        let (avail, used) = (0x2000u64, 0x2400u64);
        let dev = device_on(Some(disk), 8, avail, used, true);
        let (kick_rx, kick_tx) = nix::unistd::pipe().unwrap();
        let ctl = dev.queues()[0].clone();
        let mem = {
            let mut st = ctl.lock();
            st.kick = Some(Arc::new(File::from(kick_rx)));
            st.mem.clone().unwrap()
        };
        let put = |i, addr, len, flags, next| put_desc(&mem, i, addr, len, flags, next);
        read_at_head_0(&mem);
        // Head 3: GET_ID with no data, status at 0x3300.
        mem.write_obj(request::T_GET_ID, GuestAddress(0x3200))
            .unwrap();
        put(3, 0x3200, 16, 1, 4);
        put(4, 0x3300, 1, 2, 0);
        mem.write_obj(0xffu8, GuestAddress(0x3100)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x3300)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (d, c) = (dev.clone(), ctl.clone());
        std::thread::spawn(move || {
            process(&mut c.lock(), &d, &mut uring());
            let _ = tx.send(());
        });
        let used_idx = || mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
        // Head 0 is in flight once the worker asks to be kicked for avail entry 1.
        let avail_event = GuestAddress(used + 4 + 8 * 8);
        assert!(
            eventually(|| mem.read_obj::<u16>(avail_event).unwrap() == 1),
            "the worker did not go on while head 0 was in flight"
        );
        assert_eq!(used_idx(), 0);
        mem.write_obj(3u16, GuestAddress(avail + 4 + 2)).unwrap();
        mem.write_obj(2u16, GuestAddress(avail + 2)).unwrap();
        nix::unistd::write(&kick_tx, &1u64.to_ne_bytes()).unwrap();
        assert!(eventually(|| used_idx() == 1), "head 3 waited for head 0");
        assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 4)).unwrap(), 3);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3300)).unwrap(), 0);
        nix::unistd::write(&feed, &[7u8; 512]).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
        assert_eq!(used_idx(), 2);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 4 + 8)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3100)).unwrap(), 0);
        assert_eq!(
            mem.read_obj::<[u8; 8]>(GuestAddress(0x4000)).unwrap(),
            [7; 8]
        );
        assert_eq!(ctl.lock().completed, 2);
    }

    /// GET_VRING_BASE_INFLIGHT: a ring suspended while a read is in flight (from a pipe the
    /// test feeds later) writes nothing while stopped; restarted with the inflight region that
    /// lists the read, it completes it exactly once (not resubmitted); restarted with a fresh
    /// region (another front-end's), it drops it.
    #[test]
    fn a_suspended_request_completes_once_if_the_next_region_lists_it() {
        use baton_service::inflight::InflightRegion;
        if !io_uring_here() {
            return;
        }
        let uring = || Engine::new(crate::cli::IoEngineKind::IoUring, 16);
        for same_region in [true, false] {
            let (slow, feed) = nix::unistd::pipe().unwrap();
            let disk = crate::disk::Disk::on(File::from(slow), 1 << 20);
            let (avail, used) = (0x2000u64, 0x2400u64);
            let dev = device_on(Some(disk), 8, avail, used, false);
            let ctl = dev.queues()[0].clone();
            let (region, _fd, _) = InflightRegion::create(1, 8).unwrap();
            let mut st = ctl.lock();
            let mem = st.mem.clone().unwrap();
            read_at_head_0(&mem);
            mem.write_obj(0xffu8, GuestAddress(0x3100)).unwrap();
            st.inflight = region.queue(0);
            assert!(st.start());
            let mut engine = uring();
            // Pop and start the read, then be suspended (what the worker does for
            // VringCtl::lock_suspending, and GET_VRING_BASE after it).
            let looks = std::cell::Cell::new(0);
            let cut = || {
                looks.set(looks.get() + 1);
                looks.get() > 1
            };
            assert!(run_until(&mut st, &dev, &mut engine, &cut, &|| true, None));
            assert_eq!(engine.in_flight(), 1);
            st.suspended = engine.suspend_all();
            st.stop();
            assert_eq!(st.suspended, [0]);
            assert_eq!(st.queue.next_avail(), 1);
            nix::unistd::write(&feed, &[7u8; 512]).unwrap();
            let used_idx = || mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
            assert_eq!(used_idx(), 0, "a suspended ring got a used entry");
            // The next front-end.
            let next = if same_region {
                region.clone()
            } else {
                InflightRegion::create(1, 8).unwrap().0
            };
            st.inflight = next.queue(0);
            assert!(st.start());
            assert!(st.resubmit.is_empty(), "resubmitted: {:?}", st.resubmit);
            process(&mut st, &dev, &mut engine);
            assert_eq!(engine.in_flight(), 0);
            if same_region {
                assert_eq!(used_idx(), 1);
                assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 4)).unwrap(), 0);
                assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3100)).unwrap(), 0);
                assert_eq!(st.completed, 1);
                assert!(next.queue(0).unwrap().pending().is_empty());
            } else {
                assert_eq!(
                    used_idx(),
                    0,
                    "completed into a front-end that did not list it"
                );
                assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3100)).unwrap(), 0xff);
                assert_eq!(st.completed, 0);
            }
            // Nothing comes back later either.
            process(&mut st, &dev, &mut engine);
            assert_eq!(used_idx(), u16::from(same_region));
        }
    }
}
