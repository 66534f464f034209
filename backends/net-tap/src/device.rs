//! The device core: rings, TAP queues, negotiated state and the worker threads. It lives for the
//! whole process; front-ends come and go around it (see [`crate::vhost`]).
//!
//! One worker thread per queue pair waits (epoll) on its TAP queue (edge-triggered readable), its
//! RX and TX kick eventfds and a wake eventfd the adapter uses after changing ring state; worker 0
//! also serves the control queue. Every ring sits behind its own mutex: a worker holds it while it
//! processes the ring, so once GET_VRING_BASE has taken the lock and marked the ring stopped, no
//! guest-memory write and no notification can follow until the ring is started again.

use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use baton_service::sandbox::{Sandbox, SandboxError};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::datapath::{self, Scratch};
use crate::stats::Stats;
use crate::tap::{IFF_ATTACH_QUEUE, IFF_DETACH_QUEUE, TUNSETQUEUE, Tap};
use crate::virtio::{Negotiated, config_space, ctrl};

/// Guest memory as mapped from the front-end's memory table.
pub type GuestMem = GuestMemoryMmap<()>;
/// Guest memory that the adapter can swap under the workers.
pub type Mem = GuestMemoryAtomic<GuestMem>;

/// Largest ring size accepted.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Static device configuration from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address offered in the config space.
    pub mac: [u8; 6],
    /// MTU offered in the config space.
    pub mtu: u16,
    /// Number of queue pairs (= TAP queues).
    pub pairs: u16,
}

/// One virtqueue and its vhost-user state.
#[derive(Debug)]
pub struct Vring {
    /// The split ring.
    pub queue: Queue,
    /// Kick eventfd (front-end → us).
    pub kick: Option<Arc<EventFd>>,
    /// Call eventfd (us → front-end).
    pub call: Option<EventFd>,
    /// SET_VRING_ENABLE state.
    pub enabled: bool,
    /// Started by SET_VRING_KICK, stopped by GET_VRING_BASE or a disconnect.
    pub started: bool,
    /// Turned off by the front-end (SET_VRING_ENABLE 0) and not on again since; unlike a ring
    /// that is merely not enabled yet (a front-end connecting or reconnecting), or whose
    /// front-end is gone.
    pub disabled: bool,
    /// The guest broke the ring (see [`baton_service::ring::AvailOverrun`]): left alone until
    /// the front-end starts it again.
    pub broken: bool,
}

impl Vring {
    fn new() -> Self {
        Vring {
            // MAX_QUEUE_SIZE is a power of two: `new` cannot fail.
            queue: Queue::new(MAX_QUEUE_SIZE).unwrap_or_else(|_| unreachable_queue()),
            kick: None,
            call: None,
            enabled: false,
            started: false,
            disabled: false,
            broken: false,
        }
    }

    /// Whether the worker may process this ring.
    pub fn active(&self) -> bool {
        self.started && self.enabled && !self.broken && self.queue.ready()
    }

    /// Notifies the front-end if the driver wants it (EVENT_IDX aware).
    pub fn signal(&mut self, mem: &GuestMem) {
        if self.queue.needs_notification(mem).unwrap_or(true) {
            if let Some(call) = &self.call {
                let _ = call.write(1);
            }
        }
    }

    /// Whether the ring is sane (layout and avail index, see [`baton_service::ring::check`]);
    /// if not, it is marked broken (and the reason counted) so that no worker loops on it.
    pub fn check_avail(
        &mut self,
        mem: &GuestMem,
        stats: &baton_service::ratelimit::ErrorSite,
    ) -> bool {
        match baton_service::ring::check(&self.queue, mem) {
            Ok(()) => true,
            Err(e) => {
                stats.hit("ring", &e);
                self.broken = true;
                false
            }
        }
    }

    /// virtio-queue refused to iterate the ring (not ready, bad index): marks it broken, since
    /// its answer will not change until the front-end restarts the ring, and counts why.
    pub fn refused(
        &mut self,
        what: &str,
        e: &virtio_queue::Error,
        stats: &baton_service::ratelimit::ErrorSite,
    ) {
        stats.hit(what, e);
        self.broken = true;
    }

    /// Stops the ring: no memory access or notification until restarted.
    pub fn stop(&mut self) {
        self.started = false;
        self.kick = None;
        self.call = None;
    }
}

fn unreachable_queue() -> Queue {
    // Queue::new only fails for sizes that are not a power of two; 256 is one.
    #[allow(clippy::unwrap_used)]
    Queue::new(256).unwrap()
}

/// An RX/TX ring pair and its TAP queue.
#[derive(Debug)]
pub struct QueuePair {
    /// Receive ring (TAP → guest), even index.
    pub rx: Mutex<Vring>,
    /// Transmit ring (guest → TAP), odd index.
    pub tx: Mutex<Vring>,
    /// The TAP queue of this pair.
    pub tap: Tap,
    /// Wakes the worker after ring state changed.
    pub wake: EventFd,
}

/// The device core shared by the adapter and the workers.
#[derive(Debug)]
pub struct Device {
    /// Command-line configuration.
    pub cfg: NetConfig,
    /// Queue pairs.
    pub pairs: Vec<QueuePair>,
    /// Control queue (index 2 * pairs).
    pub ctrl: Mutex<Vring>,
    /// Guest memory of the current front-end.
    pub mem: Mem,
    /// Acked virtio features of the current front-end.
    features: AtomicU64,
    /// Queue pairs the driver asked for with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
    pub active_pairs: AtomicUsize,
    /// Error counters.
    pub stats: Stats,
    /// Set on SIGTERM: workers exit.
    pub shutdown: AtomicBool,
    /// Queue workers not yet returned (each lets go of its TAP queue's io_uring first).
    live_workers: std::sync::atomic::AtomicUsize,
    /// How long an idle worker looks for work before it sleeps (`--poll-us`).
    poll: std::sync::atomic::AtomicU64,
}

/// `--poll-us`'s default (QEMU's iothreads poll 32 µs by default too).
pub const DEFAULT_POLL_US: u64 = 32;

/// Locks a mutex, recovering from poisoning (a panicked worker must not take the service down).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The most descriptors a control command may chain (Linux sends at most four: header, two
/// MAC tables, ack).
const MAX_CTRL_DESCS: usize = 64;

impl Device {
    /// How long an idle worker looks for the guest's next TX frame (and the TAP's next RX
    /// frame) before it sleeps: 0 sleeps at once.
    pub fn set_poll(&self, poll: std::time::Duration) {
        let us = u64::try_from(poll.as_micros()).unwrap_or(u64::MAX);
        self.poll.store(us, Ordering::Relaxed);
    }

    fn poll(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.poll.load(Ordering::Relaxed))
    }

    /// Builds the device over already opened TAP queues (one per pair).
    pub fn new(cfg: NetConfig, taps: Vec<Tap>) -> io::Result<Arc<Device>> {
        let mut pairs = Vec::with_capacity(taps.len());
        for tap in taps {
            pairs.push(QueuePair {
                rx: Mutex::new(Vring::new()),
                tx: Mutex::new(Vring::new()),
                tap,
                wake: EventFd::new(EFD_NONBLOCK)?,
            });
        }
        let n = pairs.len();
        Ok(Arc::new(Device {
            cfg,
            pairs,
            ctrl: Mutex::new(Vring::new()),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            features: AtomicU64::new(0),
            active_pairs: AtomicUsize::new(n),
            stats: Stats::default(),
            shutdown: AtomicBool::new(false),
            live_workers: std::sync::atomic::AtomicUsize::new(0),
            poll: std::sync::atomic::AtomicU64::new(DEFAULT_POLL_US),
        }))
    }

    /// Number of virtqueues (data queues plus the control queue).
    pub fn num_queues(&self) -> usize {
        self.pairs.len() * 2 + 1
    }

    /// The ring with vhost-user index `index`.
    pub fn vring(&self, index: usize) -> Option<&Mutex<Vring>> {
        if index == self.pairs.len() * 2 {
            return Some(&self.ctrl);
        }
        let pair = self.pairs.get(index / 2)?;
        Some(if index % 2 == 0 { &pair.rx } else { &pair.tx })
    }

    /// Wakes the worker that serves ring `index` (or all of them).
    pub fn wake(&self, index: Option<usize>) {
        match index.and_then(|i| self.pairs.get(i / 2)) {
            Some(p) => {
                let _ = p.wake.write(1);
            }
            None => {
                for p in &self.pairs {
                    let _ = p.wake.write(1);
                }
            }
        }
    }

    /// The features acked by the current front-end.
    pub fn negotiated(&self) -> Negotiated {
        Negotiated {
            features: self.features.load(Ordering::Acquire),
        }
    }

    /// Applies acked features: TAP header size and offloads, EVENT_IDX on every ring.
    pub fn set_features(&self, features: u64) -> Result<(), crate::tap::TapError> {
        let n = Negotiated { features };
        for p in &self.pairs {
            p.tap.set_vnet_hdr_size(n.hdr_len())?;
            p.tap.set_offload(n.tap_offload())?;
        }
        // A driver without MQ uses the first pair only; one with MQ all of them until it sets
        // the pair count (the control queue).
        let pairs = if n.has(crate::virtio::f::MQ) {
            self.pairs.len()
        } else {
            1
        };
        self.active_pairs.store(pairs, Ordering::Release);
        self.wake(None);
        let event_idx = n.has(crate::virtio::f::EVENT_IDX);
        for i in 0..self.num_queues() {
            if let Some(v) = self.vring(i) {
                lock(v).queue.set_event_idx(event_idx);
            }
        }
        self.features.store(features, Ordering::Release);
        Ok(())
    }

    /// Waits (up to `limit`) until every queue worker has returned, after [`Device::shutdown`]
    /// was set and the workers woken ([`Device::stop_all`]).
    pub fn wait_workers_gone(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.live_workers.load(Ordering::Acquire) > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Stops every ring (front-end gone, RESET_OWNER, or shutdown) and resets per-front-end
    /// state; the TAP queues stay open, so frames wait in them.
    pub fn stop_all(&self) {
        for i in 0..self.num_queues() {
            if let Some(v) = self.vring(i) {
                let mut v = lock(v);
                v.stop();
                v.enabled = false;
                v.disabled = false;
                v.queue.set_ready(false);
            }
        }
        self.active_pairs.store(self.pairs.len(), Ordering::Release);
        self.wake(None);
    }

    /// The config space bytes.
    pub fn config(&self) -> [u8; 12] {
        let pairs = u16::try_from(self.pairs.len()).unwrap_or(u16::MAX);
        config_space(self.cfg.mac, pairs, self.cfg.mtu)
    }

    /// Starts one worker thread per queue pair; returns once each has entered the sandbox.
    pub fn spawn_workers(
        self: &Arc<Self>,
        sandbox: &Arc<Sandbox>,
    ) -> Result<Vec<JoinHandle<()>>, SandboxError> {
        (0..self.pairs.len())
            .map(|i| {
                let dev = Arc::clone(self);
                let kind = crate::seccomp::worker();
                self.live_workers.fetch_add(1, Ordering::AcqRel);
                let spawned = sandbox.spawn(format!("net-q{i}"), None, kind, move |gate| {
                    match Worker::new(&dev, i) {
                        Ok(mut w) if gate.enter() => {
                            if let Err(e) = w.run() {
                                tracing::error!(pair = i, "worker failed: {e}");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(pair = i, "worker set-up failed: {e}"),
                    }
                    dev.live_workers.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    self.live_workers.fetch_sub(1, Ordering::AcqRel);
                }
                spawned
            })
            .collect()
    }

    /// Serves the control queue (public for the fuzz targets).
    pub fn process_ctrl(&self) {
        let mut vr = lock(&self.ctrl);
        if !vr.active() {
            return;
        }
        let mem = self.mem.memory();
        loop {
            let _ = vr.queue.disable_notification(&*mem);
            if !vr.check_avail(&mem, &self.stats.bad_chain) {
                break;
            }
            let mut done: Vec<(u16, u32)> = Vec::new();
            match vr.queue.iter(&*mem) {
                Ok(iter) => {
                    for chain in iter {
                        let head = chain.head_index();
                        let len = self.ctrl_command(chain, &mem);
                        done.push((head, len));
                    }
                }
                Err(e) => {
                    vr.refused("control queue", &e, &self.stats.bad_chain);
                    break;
                }
            }
            for (head, len) in &done {
                let _ = vr.queue.add_used(&*mem, *head, *len);
            }
            if !done.is_empty() {
                vr.signal(&mem);
            }
            if !vr.queue.enable_notification(&*mem).unwrap_or(false) {
                break;
            }
        }
    }

    /// Executes one control command; returns the bytes written (1 for the ack, 0 on a bad chain).
    fn ctrl_command(&self, chain: virtio_queue::DescriptorChain<&GuestMem>, mem: &GuestMem) -> u32 {
        let mut cmd = [0u8; 8];
        let mut have = 0usize;
        let mut ack: Option<GuestAddress> = None;
        for (n, desc) in chain.enumerate() {
            // virtio-queue lets an indirect table chain up to len/16 descriptors (hundreds of
            // millions, in a loop of `next` links): found by fuzzing (net_ctrl), 30 s of CPU
            // per command. Drivers send a handful.
            if n >= MAX_CTRL_DESCS {
                self.stats
                    .bad_ctrl
                    .hit("control queue", &"more descriptors than a command has");
                return 0;
            }
            if desc.is_write_only() {
                if ack.is_none() && desc.len() >= 1 {
                    ack = Some(desc.addr());
                }
            } else if have < cmd.len() {
                let take = (cmd.len() - have).min(usize::try_from(desc.len()).unwrap_or(0));
                if let Some(dst) = cmd.get_mut(have..have + take) {
                    if mem.read_slice(dst, desc.addr()).is_err() {
                        self.stats
                            .bad_ctrl
                            .hit("control queue", &"bad buffer address");
                        return 0;
                    }
                }
                have += take;
            }
        }
        let Some(ack) = ack else {
            self.stats
                .bad_ctrl
                .hit("control queue", &"no writable ack buffer");
            return 0;
        };
        let status = if have < 2 {
            ctrl::ERR
        } else {
            match (cmd[0], cmd[1]) {
                (ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET) if have >= 4 => {
                    let n = usize::from(u16::from_le_bytes([cmd[2], cmd[3]]));
                    if (1..=self.pairs.len()).contains(&n) {
                        self.active_pairs.store(n, Ordering::Release);
                        self.wake(None);
                        ctrl::OK
                    } else {
                        ctrl::ERR
                    }
                }
                (ctrl::CLASS_RX | ctrl::CLASS_MAC | ctrl::CLASS_VLAN | ctrl::CLASS_ANNOUNCE, _) => {
                    ctrl::OK
                }
                _ => ctrl::ERR,
            }
        };
        if status == ctrl::ERR {
            self.stats.bad_ctrl.hit(
                "control queue",
                &format_args!("command {}/{} refused", cmd[0], cmd[1]),
            );
        }
        if mem.write_obj(status, ack).is_err() {
            return 0;
        }
        1
    }
}

const TOKEN_WAKE: u64 = 0;
const TOKEN_TAP: u64 = 1;
const TOKEN_RX: u64 = 2;
const TOKEN_TX: u64 = 3;
const TOKEN_CTRL: u64 = 4;

struct Worker<'a> {
    dev: &'a Device,
    index: usize,
    pair: &'a QueuePair,
    epoll: Epoll,
    kicks: [Option<Arc<EventFd>>; 3],
    attached: bool,
    scratch: Scratch,
}

impl<'a> Worker<'a> {
    fn new(dev: &'a Arc<Device>, index: usize) -> io::Result<Self> {
        let pair = dev
            .pairs
            .get(index)
            .ok_or_else(|| io::Error::other("no such pair"))?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            pair.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            pair.tap.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP),
        )?;
        let mut scratch = Scratch::new();
        match scratch.tx.use_ring(pair.tap.as_raw_fd()) {
            Ok(()) => tracing::info!(pair = index, "TX through io_uring"),
            Err(e) => tracing::warn!(pair = index, "no io_uring ({e}): TX by writev"),
        }
        Ok(Worker {
            dev,
            index,
            pair,
            epoll,
            kicks: [None, None, None],
            attached: pair.tap.attached(),
            scratch,
        })
    }

    /// Re-reads the kick fds of our rings and updates the epoll set and the TAP queue attachment.
    fn resync(&mut self) -> io::Result<()> {
        let rings: [(Option<&Mutex<Vring>>, u64); 3] = [
            (Some(&self.pair.rx), TOKEN_RX),
            (Some(&self.pair.tx), TOKEN_TX),
            (
                if self.index == 0 {
                    Some(&self.dev.ctrl)
                } else {
                    None
                },
                TOKEN_CTRL,
            ),
        ];
        let (mut rx_enabled, mut rx_disabled) = (false, false);
        for (slot, (ring, token)) in self.kicks.iter_mut().zip(rings) {
            let Some(ring) = ring else { continue };
            let (now, enabled, disabled) = {
                let v = lock(ring);
                (v.kick.clone(), v.enabled, v.disabled)
            };
            if token == TOKEN_RX {
                (rx_enabled, rx_disabled) = (enabled, disabled);
            }
            let same = match (&now, &*slot) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            if let Some(old) = slot.take() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    old.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            let mut now = now;
            if let Some(new) = &now {
                let ev = EpollEvent::new(EventSet::IN, token);
                if let Err(e) = self.epoll.ctl(ControlOperation::Add, new.as_raw_fd(), ev) {
                    // E.g. a front-end passed a regular file as kick fd: that ring just never
                    // gets kicked; the worker and the other rings carry on.
                    tracing::warn!(pair = self.index, "kick fd cannot be polled: {e}");
                    now = None;
                }
            }
            *slot = now;
        }
        // Queue 0 is always attached, so that frames wait in the TAP while no front-end is
        // connected. The others follow the guest: attached while it uses the pair (RX ring
        // enabled, within the MQ pair count), detached once it stops (MQ pair count, the
        // front-end turning the ring off); while no front-end says (between front-ends, in a
        // restarted process, before a reconnecting one enables the ring) a queue stays as it
        // is, so frames steered to it keep waiting there: detaching would drop them.
        let active = self.index < self.dev.active_pairs.load(Ordering::Acquire);
        let want = if self.index == 0 {
            true
        } else if !active || rx_disabled {
            false
        } else if rx_enabled {
            true
        } else {
            self.attached
        };
        if want != self.attached {
            let mut req = [0u8; 40];
            let flags = if want {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            };
            req[16..18].copy_from_slice(&flags.to_ne_bytes());
            // SAFETY: TUNSETQUEUE reads an ifreq (40 bytes) from `req`, which outlives the call.
            let r =
                unsafe { libc::ioctl(self.pair.tap.as_raw_fd(), TUNSETQUEUE, req.as_mut_ptr()) };
            if r < 0 {
                tracing::warn!(
                    pair = self.index,
                    "TUNSETQUEUE failed: {}",
                    io::Error::last_os_error()
                );
            } else {
                self.attached = want;
            }
        }
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 8];
        self.resync()?;
        let (mut do_rx, mut do_tx, mut do_ctrl) = (true, true, self.index == 0);
        // Idle, the worker first polls (the TX ring's avail index, and epoll without waiting)
        // until this deadline, then sleeps: a frame that comes meanwhile costs no wake-up.
        let budget = self.dev.poll();
        let mut poll_until = std::time::Instant::now() + budget;
        loop {
            if self.dev.shutdown.load(Ordering::Acquire) {
                return Ok(());
            }
            if do_tx {
                do_tx = datapath::process_tx(self.dev, self.pair, &mut self.scratch);
            }
            if do_rx {
                do_rx = datapath::process_rx(self.dev, self.pair, &mut self.scratch);
            }
            if do_ctrl {
                self.dev.process_ctrl();
                do_ctrl = false;
            }
            baton_service::memory::report_faults();
            let busy = do_rx || do_tx;
            if busy {
                poll_until = std::time::Instant::now() + budget;
            } else if std::time::Instant::now() < poll_until {
                do_tx = datapath::tx_pending(self.dev, self.pair);
            }
            let timeout = if do_rx || do_tx || std::time::Instant::now() < poll_until {
                0
            } else {
                -1
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e),
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    TOKEN_WAKE => {
                        let _ = self.pair.wake.read();
                        self.resync()?;
                        do_rx = true;
                        do_tx = true;
                        do_ctrl = self.index == 0;
                    }
                    TOKEN_TAP => do_rx = true,
                    t => {
                        let slot = usize::try_from(t - TOKEN_RX).unwrap_or(0);
                        if let Some(Some(k)) = self.kicks.get(slot) {
                            let _ = k.read();
                        }
                        match t {
                            TOKEN_RX => do_rx = true,
                            TOKEN_TX => do_tx = true,
                            _ => do_ctrl = true,
                        }
                    }
                }
            }
        }
    }
}

/// Steps a queue's next_avail back by `n` chains (they were looked at but not consumed).
pub fn rewind(queue: &mut Queue, n: usize) {
    let n = u16::try_from(n).unwrap_or(u16::MAX);
    let next = Wrapping(queue.next_avail()) - Wrapping(n);
    queue.set_next_avail(next.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A device without TAP queues (so only the control queue, index 0) whose control ring of 4
    /// is at 0x1000 (descriptors) and `avail`/`used`, holding one command (RX promiscuous on)
    /// with its ack byte, started.
    fn device(avail: u64, used: u64) -> Arc<Device> {
        let cfg = NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            pairs: 0,
        };
        let dev = Device::new(cfg, Vec::new()).unwrap();
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        mem.write_slice(&[ctrl::CLASS_RX, 0, 1], GuestAddress(0x3000))
            .unwrap();
        let put = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let a = GuestAddress(0x1000 + 16 * i);
            mem.write_obj(addr, a).unwrap();
            mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
            mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
        };
        put(0, 0x3000, 3, 1, 1);
        put(1, 0x3100, 1, 2, 0);
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        dev.mem.lock().unwrap().replace(mem);
        let mut v = lock(&dev.ctrl);
        v.queue.try_set_size(4).unwrap();
        v.queue
            .try_set_desc_table_address(GuestAddress(0x1000))
            .unwrap();
        v.queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .unwrap();
        v.queue
            .try_set_used_ring_address(GuestAddress(used))
            .unwrap();
        // As SET_VRING_ADDR does: the used index restarts where the driver's used ring says.
        let used_idx = v
            .queue
            .used_idx(&*dev.mem.memory(), Ordering::Acquire)
            .unwrap();
        v.queue.set_next_used(used_idx.0);
        v.queue.set_ready(true);
        v.started = true;
        v.enabled = true;
        drop(v);
        dev
    }

    /// Whether `process_ctrl` returns within a few seconds (a livelocked thread is left
    /// spinning until the test binary exits).
    fn process_ends(dev: Arc<Device>) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            dev.process_ctrl();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5)).is_ok()
    }

    #[test]
    fn a_control_command_is_acked() {
        let dev = device(0x2000, 0x2400);
        assert!(process_ends(dev.clone()));
        let ack: u8 = dev.mem.memory().read_obj(GuestAddress(0x3100)).unwrap();
        assert_eq!(ack, ctrl::OK);
        assert_eq!(lock(&dev.ctrl).queue.next_used(), 1);
        let used: u16 = dev.mem.memory().read_obj(GuestAddress(0x2402)).unwrap();
        assert_eq!(used, 1);
    }

    /// Found by fuzzing (`fuzz/regressions/net_ctrl/used-ring-on-avail-ring`): with the used
    /// ring on top of the avail ring every completion moves the avail index one further, and
    /// `process_ctrl` never returns, holding the control ring's lock (worker 0 serves queue
    /// pair 0 too).
    #[test]
    fn a_used_ring_on_the_avail_ring_does_not_livelock() {
        assert!(process_ends(device(0x2000, 0x2000)));
    }

    /// Found by fuzzing (`fuzz/regressions/net_ctrl/avail-ring-at-0`): virtio-queue does not
    /// iterate an avail ring at guest address 0 (it reads as "not ready"), but
    /// `enable_notification` still sees the index ahead, so `process_ctrl` loops.
    #[test]
    fn an_avail_ring_at_address_zero_does_not_livelock() {
        assert!(process_ends(device(0, 0x2400)));
    }

    /// Found by fuzzing (`fuzz/regressions/net_ctrl/avail-ring-past-memory`): the ring is
    /// started although `is_valid` fails; an avail entry that cannot be read ends virtio-queue's
    /// iteration without moving next_avail, `enable_notification` still sees the index ahead,
    /// and `process_ctrl` loops. (The TX and RX loops look the same by inspection.)
    #[test]
    fn an_avail_ring_past_the_end_of_memory_does_not_livelock() {
        assert!(process_ends(device(0xfffc, 0x2400)));
    }

    /// Found by fuzzing (`fuzz/corpus/net_ctrl/regression-indirect-chain`): virtio-queue lets
    /// an indirect table chain up to 65535 descriptors (looping `next` links included), so
    /// every command of a full ring cost the worker 65535 steps, again on each pass (30 s of
    /// CPU for one fuzz input). A command with more descriptors than any driver sends is
    /// refused, unanswered.
    #[test]
    fn a_command_chaining_thousands_of_descriptors_is_refused() {
        let dev = device(0x2000, 0x2400);
        {
            let mem = dev.mem.memory();
            let put = |table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
                let a = GuestAddress(table + 16 * i);
                mem.write_obj(addr, a).unwrap();
                mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
                mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
            };
            // Descriptor 0: an indirect table of 65535 entries at 0x4000 ...
            put(0x1000, 0, 0x4000, 0xffff0, 4, 0);
            // ... holding the command, its ack, then an empty descriptor chained to itself.
            put(0x4000, 0, 0x3000, 3, 1, 1);
            put(0x4000, 1, 0x3100, 1, 2 | 1, 2);
            put(0x4000, 2, 0x3200, 0, 1, 2);
            mem.write_obj(0xffu8, GuestAddress(0x3100)).unwrap();
        }
        assert!(process_ends(dev.clone()));
        let ack: u8 = dev.mem.memory().read_obj(GuestAddress(0x3100)).unwrap();
        assert_eq!(ack, 0xff, "a command of 65535 descriptors was executed");
        assert_eq!(
            lock(&dev.ctrl).queue.next_used(),
            1,
            "completed, as a bad chain"
        );
    }
}
