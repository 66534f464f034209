//! Per-queue state and the queue worker thread.
//!
//! Each queue has a `Mutex<Vring>` and a thread. The thread waits for a kick (or a wake-up from
//! the control path), then, holding the lock, pops every available chain, marks it inflight,
//! runs the batch through its I/O engine, writes statuses and used entries, and notifies once.
//! Because a batch runs under the lock, the control path (GET_VRING_BASE, disconnect, SIGTERM)
//! taking the lock waits for in-flight requests to complete; after it clears `started`, the
//! worker writes no guest memory and sends no notification.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
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
        if let Some(inf) = &self.inflight {
            inf.reconcile(used);
            // As libvhost-user: the requests still marked inflight were popped and never
            // completed; resubmit them (oldest first) and resume after them.
            let pending = inf.pending();
            if !pending.is_empty() {
                let n = u16::try_from(pending.len()).unwrap_or(u16::MAX);
                tracing::info!(
                    ?pending,
                    "resubmitting requests left inflight by a previous back-end"
                );
                self.queue.set_next_avail(used.wrapping_add(n));
                self.resubmit = pending;
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
}

impl VringCtl {
    /// New stopped queue of maximum size `max`.
    pub fn new(max: u16) -> std::io::Result<Self> {
        Ok(Self {
            state: Mutex::new(Vring::new(max)?),
            wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            quit: AtomicBool::new(false),
        })
    }

    /// Locks the queue state (waits for a running batch to finish).
    pub fn lock(&self) -> MutexGuard<'_, Vring> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        let kick = ctl.lock().kick.clone();
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
        let mut st = ctl.lock();
        if st.runnable() {
            process(&mut st, &dev, &mut engine);
        }
        drop(st);
        poll_ring(&ctl, &dev, &mut engine);
        baton_service::memory::report_faults();
    }
}

/// After the ring ran dry: watches its avail index for up to [`Device::poll`], with the
/// guest's notifications off (with EVENT_IDX), and processes what comes; turns them back on
/// before the worker sleeps. The ring lock is taken only for each look, so the control path
/// (stopping the ring) is never held up for long.
fn poll_ring(ctl: &VringCtl, dev: &Device, engine: &mut Engine) {
    let budget = dev.poll();
    if budget.is_zero() {
        return;
    }
    let mut deadline = Instant::now() + budget;
    let mut quiet = false;
    loop {
        if ctl.quit.load(Ordering::Relaxed) {
            return;
        }
        let mut st = ctl.lock();
        if !st.runnable() || !st.queue.event_idx_enabled() {
            return;
        }
        let Some(mem) = st.mem.clone() else { return };
        if !quiet {
            let _ = st.queue.disable_notification(&*mem);
            quiet = true;
        }
        let next = st.queue.next_avail();
        let pending = st
            .queue
            .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|i| i.0 != next);
        if pending {
            // process() turns notifications back on when it is done.
            process(&mut st, dev, engine);
            quiet = false;
            deadline = Instant::now() + budget;
        } else if Instant::now() >= deadline {
            // Back on; a request that came meanwhile is processed now, not after a kick.
            if matches!(st.queue.enable_notification(&*mem), Ok(true)) {
                process(&mut st, dev, engine);
            }
            return;
        }
        drop(st);
        std::hint::spin_loop();
    }
}

/// Processes everything available on a started ring (public for the fuzz targets).
pub fn process(st: &mut Vring, dev: &Device, engine: &mut Engine) {
    let Some(mem) = st.mem.clone() else { return };
    let m: &GuestMemoryMmap = &mem;
    let info = dev.info();
    let event_idx = st.queue.event_idx_enabled();
    loop {
        if event_idx {
            let _ = st.queue.disable_notification(m);
        }
        if let Err(e) = baton_service::ring::check(&st.queue, m) {
            tracing::warn!("{e}");
            st.broken = true;
            return;
        }
        let mut batch: Vec<Request> = Vec::new();
        // Heads a previous back-end instance left inflight go first (already marked).
        let table = GuestAddress(st.queue.desc_table());
        for head in std::mem::take(&mut st.resubmit) {
            let descs = crate::chain::walk(m, table, st.queue.size(), head, dev.max_descs());
            batch.push(request::parse(m, head, &descs, info));
        }
        let max = usize::from(st.queue.size());
        while batch.len() < max {
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
            if let Some(inf) = st.inflight.as_mut() {
                inf.begin(chain.head_index());
            }
            let head = chain.head_index();
            batch.push(request::parse(
                m,
                head,
                &crate::chain::descs_of(chain, dev.max_descs()),
                info,
            ));
        }
        if batch.is_empty() {
            if !st.broken && event_idx && matches!(st.queue.enable_notification(m), Ok(true)) {
                continue;
            }
            return;
        }
        if let Some(d) = dev.test_delay() {
            let heads: Vec<u16> = batch.iter().map(|r| r.head).collect();
            tracing::info!(?heads, "test delay: holding a batch marked inflight");
            std::thread::sleep(d);
        }
        engine.run(dev.disk(), &mut batch, !dev.writeback());
        for r in &batch {
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
        if st.broken {
            return;
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
            "4",
            "--io-engine",
            "sync",
        ])
        .unwrap();
        let dev = Arc::new(Device::new(&args).unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let desc = 0x1000;
        // Descriptor 0: a flush header; descriptor 1: the status byte.
        mem.write_obj(4u32, GuestAddress(0x3000)).unwrap();
        let put = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let a = GuestAddress(desc + 16 * i);
            mem.write_obj(addr, a).unwrap();
            mem.write_obj(len, a.unchecked_add(8)).unwrap();
            mem.write_obj(flags, a.unchecked_add(12)).unwrap();
            mem.write_obj(next, a.unchecked_add(14)).unwrap();
        };
        put(0, 0x3000, 16, 1, 1);
        put(1, 0x3100, 1, 2, 0);
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        {
            let mut st = dev.queues()[0].lock();
            st.queue.try_set_size(4).unwrap();
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
}
