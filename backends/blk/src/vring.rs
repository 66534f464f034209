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
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::Device;
use crate::engine::Engine;
use crate::inflight::InflightQueue;
use crate::request::{self, Request};

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
        baton_service::memory::report_faults();
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
        if let Err(e) = baton_service::ring::check_avail(&st.queue, m) {
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
            let Some(chain) = st.queue.pop_descriptor_chain(m) else {
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
            if event_idx && matches!(st.queue.enable_notification(m), Ok(true)) {
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
    }
}
