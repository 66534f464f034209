//! A virtio-net driver on top of the host-side vhost-user driver: RX buffer pools that are
//! refilled as frames arrive (MRG_RXBUF frames reassembled), TX from a fixed pool of buffers,
//! and the control queue (MQ pair count). Used by the baton-net-tap tests and benchmark.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::GuestAddress;

use super::frontend::{Connection, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};
use super::memory::SharedMemory;
use super::virtq::{Buf, SplitQueue};
use super::{DriverError, Result};

/// virtio-net feature bits.
pub mod f {
    /// Device completes partial checksums (guest → host).
    pub const CSUM: u64 = 1 << 0;
    /// Driver accepts partial checksums.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// MTU in config.
    pub const MTU: u64 = 1 << 3;
    /// MAC in config.
    pub const MAC: u64 = 1 << 5;
    /// Driver accepts TSOv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// Driver accepts TSOv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// Device accepts TSOv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// Device accepts TSOv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Mergeable receive buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// Status in config.
    pub const STATUS: u64 = 1 << 16;
    /// Control queue.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// Multiqueue.
    pub const MQ: u64 = 1 << 22;
    /// Everything the tests normally want.
    pub const ALL: u64 = CSUM
        | GUEST_CSUM
        | MTU
        | MAC
        | GUEST_TSO4
        | GUEST_TSO6
        | HOST_TSO4
        | HOST_TSO6
        | MRG_RXBUF
        | STATUS
        | CTRL_VQ
        | MQ
        | super::F_VERSION_1
        | super::F_EVENT_IDX
        | super::F_INDIRECT_DESC;
}

/// Options for [`NetDriver::connect`].
#[derive(Debug, Clone, Copy)]
pub struct NetOptions {
    /// Queue pairs to set up.
    pub pairs: u16,
    /// Ring size.
    pub queue_size: u16,
    /// Features wanted (intersected with the offer).
    pub features: u64,
    /// Size of each RX buffer.
    pub rx_buf: u32,
    /// Size of each TX buffer (header + largest frame).
    pub tx_buf: u32,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            pairs: 1,
            queue_size: 256,
            features: f::ALL,
            rx_buf: 4096,
            tx_buf: 65_562 + 14,
        }
    }
}

/// A received frame: virtio-net header and the Ethernet frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The header (10 or 12 bytes).
    pub hdr: Vec<u8>,
    /// The frame.
    pub data: Vec<u8>,
    /// How many buffers it used.
    pub buffers: usize,
}

/// RX ring with its buffer pool.
#[derive(Debug)]
pub struct RxQueue {
    /// The ring.
    pub q: SplitQueue,
    free: Vec<GuestAddress>,
    posted: HashMap<u16, GuestAddress>,
    buf_len: u32,
    hdr_len: usize,
    mrg: bool,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    event_idx: bool,
    partial: Option<(Frame, usize)>,
}

impl RxQueue {
    /// Posts every free buffer and kicks if the device asked for it (as a Linux guest does:
    /// EVENT_IDX `avail_event`, or the used ring's NO_NOTIFY flag without EVENT_IDX).
    pub fn refill(&mut self) -> Result<()> {
        let old = self.q.avail_idx();
        let mut any = false;
        while let Some(addr) = self.free.pop() {
            match self.q.add_chain(&[Buf {
                addr,
                len: self.buf_len,
                write: true,
            }]) {
                Ok(head) => {
                    self.posted.insert(head, addr);
                    self.q.publish(head)?;
                    any = true;
                }
                Err(_) => {
                    self.free.push(addr);
                    break;
                }
            }
        }
        if any && kick_needed(&self.q, self.event_idx, old) {
            self.q.kick()?;
        }
        Ok(())
    }

    /// Asks for no used-buffer notification while the driver is polling anyway (what a Linux
    /// guest's NAPI poll does with `virtqueue_disable_cb`); [`RxQueue::wait_used`] asks again
    /// before sleeping.
    fn suppress_notifications(&self) {
        let used_event = GuestAddress(self.q.avail.0 + 4 + 2 * u64::from(self.q.size()));
        let far = self.q.last_used().wrapping_add(0x8000);
        let _ = self.q.memory().write(used_event, &far.to_le_bytes());
    }

    /// Sleeps until the device adds a used buffer (or `t` passes): asks for a notification at
    /// the current used index, re-checks, then waits on the call eventfd. False if `t` passed
    /// without a used buffer.
    pub fn wait_used(&self, t: Duration) -> bool {
        wait_call(&self.q, t);
        self.q.device_used_idx() != self.q.last_used()
    }

    /// Reaps whatever frames have arrived (no waiting), refilling the ring.
    pub fn poll(&mut self) -> Result<Vec<Frame>> {
        let mut out = Vec::new();
        for u in self.q.reap() {
            let Some(addr) = self.posted.remove(&u.id) else {
                continue;
            };
            let len = usize::try_from(u.len.min(self.buf_len)).unwrap_or(0);
            let bytes = self.q.memory().read(addr, len)?;
            self.free.push(addr);
            if let Some((mut fr, left)) = self.partial.take() {
                fr.data.extend_from_slice(&bytes);
                fr.buffers += 1;
                if left > 1 {
                    self.partial = Some((fr, left - 1));
                } else {
                    out.push(fr);
                }
                continue;
            }
            if bytes.len() < self.hdr_len {
                continue;
            }
            let (hdr, data) = bytes.split_at(self.hdr_len);
            let nb = if self.mrg && self.hdr_len >= 12 {
                usize::from(u16::from_le_bytes([hdr[10], hdr[11]]))
            } else {
                1
            };
            let fr = Frame {
                hdr: hdr.to_vec(),
                data: data.to_vec(),
                buffers: 1,
            };
            if nb > 1 {
                self.partial = Some((fr, nb - 1));
            } else {
                out.push(fr);
            }
        }
        self.refill()?;
        Ok(out)
    }

    /// Reaps arrived frames without copying them out: returns the length of each complete
    /// frame (header excluded), refilling the ring. For benchmarks.
    pub fn poll_lengths(&mut self, lens: &mut Vec<usize>) -> Result<()> {
        for u in self.q.reap() {
            let Some(addr) = self.posted.remove(&u.id) else {
                continue;
            };
            self.free.push(addr);
            let len = usize::try_from(u.len.min(self.buf_len)).unwrap_or(0);
            if let Some((fr, left)) = self.partial.as_mut() {
                fr.buffers += len;
                *left -= 1;
                if *left == 0 {
                    lens.push(fr.buffers);
                    self.partial = None;
                }
                continue;
            }
            let nb = if self.mrg {
                let h = self.q.memory().read(GuestAddress(addr.0 + 10), 2)?;
                usize::from(u16::from_le_bytes([h[0], h[1]]))
            } else {
                1
            };
            let data = len.saturating_sub(self.hdr_len);
            if nb > 1 {
                // `buffers` accumulates the length here.
                let fr = Frame {
                    hdr: Vec::new(),
                    data: Vec::new(),
                    buffers: data,
                };
                self.partial = Some((fr, nb - 1));
            } else {
                lens.push(data);
            }
        }
        self.refill()?;
        if self.event_idx {
            self.suppress_notifications();
        }
        Ok(())
    }

    /// Waits until at least one frame arrives (or the deadline).
    pub fn recv(&mut self, timeout: Duration) -> Result<Vec<Frame>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.poll()?;
            if !got.is_empty() {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout("RX frame"));
            }
            // Wait for a used-ring entry (does not consume it: `wait` reaps, so poll the call fd).
            wait_call(&self.q, left.min(Duration::from_millis(100)));
        }
    }

    /// Waits for a frame that satisfies `pred`, dropping others.
    pub fn recv_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Frame) -> bool,
    ) -> Result<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            for fr in self.recv(left)? {
                if pred(&fr) {
                    return Ok(fr);
                }
            }
        }
    }
}

/// Whether the device wants a kick after the driver moved the avail index from `old` to the
/// current one: `vring_need_event` on `avail_event` with EVENT_IDX, else unless the device set
/// VRING_USED_F_NO_NOTIFY.
fn kick_needed(q: &SplitQueue, event_idx: bool, old: u16) -> bool {
    use vm_memory::Bytes;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let new = q.avail_idx();
    let mem = q.memory().mem();
    if event_idx {
        let at = GuestAddress(q.used.0 + 4 + 8 * u64::from(q.size()));
        let Ok(event) = mem.read_obj::<u16>(at).map(u16::from_le) else {
            return true;
        };
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    } else {
        mem.read_obj::<u16>(q.used)
            .map_or(true, |flags| u16::from_le(flags) & 1 == 0)
    }
}

/// Waits for the device's next used entry: asks for a notification at the current used index
/// (EVENT_IDX `used_event`), re-checks, then polls the call eventfd for at most `t`.
fn wait_call(q: &SplitQueue, t: Duration) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    use vm_memory::Bytes;
    let used_event = GuestAddress(q.avail.0 + 4 + 2 * u64::from(q.size()));
    let _ = q
        .memory()
        .mem()
        .write_obj(q.last_used().to_le(), used_event);
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if q.device_used_idx() != q.last_used() {
        return;
    }
    // SAFETY: the call eventfd is owned by `q` and outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(q.call.as_raw_fd()) };
    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
    let ms = u16::try_from(t.as_millis()).unwrap_or(u16::MAX);
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
    let _ = q.call.read();
}

/// TX ring with its buffer pool.
#[derive(Debug)]
pub struct TxQueue {
    /// The ring.
    pub q: SplitQueue,
    free: Vec<GuestAddress>,
    posted: HashMap<u16, GuestAddress>,
    buf_len: u32,
    hdr_len: usize,
    /// Frames completed by the device so far.
    pub completed: u64,
}

impl TxQueue {
    /// Frees completed buffers; returns how many completed.
    pub fn reap(&mut self) -> usize {
        let used = self.q.reap();
        self.completed += used.len() as u64;
        for u in &used {
            if let Some(a) = self.posted.remove(&u.id) {
                self.free.push(a);
            }
        }
        used.len()
    }

    /// Queues one frame with header `hdr` (padded/truncated to the header size) without
    /// kicking; waits for a free buffer up to `timeout`.
    pub fn queue(&mut self, hdr: &[u8], frame: &[u8], timeout: Duration) -> Result<u16> {
        let deadline = Instant::now() + timeout;
        let addr = loop {
            if let Some(a) = self.free.pop() {
                break a;
            }
            if self.reap() == 0 {
                if Instant::now() > deadline {
                    return Err(DriverError::Timeout("TX buffer"));
                }
                self.q.kick()?;
                wait_call(&self.q, Duration::from_millis(10));
            }
        };
        let total = self.hdr_len + frame.len();
        if total > usize::try_from(self.buf_len).unwrap_or(0) {
            self.free.push(addr);
            return Err(DriverError::Exhausted("TX buffer space"));
        }
        let mut h = vec![0u8; self.hdr_len];
        for (d, s) in h.iter_mut().zip(hdr) {
            *d = *s;
        }
        let mem = self.q.memory().clone();
        mem.write(addr, &h)?;
        mem.write(GuestAddress(addr.0 + self.hdr_len as u64), frame)?;
        let len = u32::try_from(total).unwrap_or(u32::MAX);
        let head = self.q.add_chain(&[Buf {
            addr,
            len,
            write: false,
        }])?;
        self.posted.insert(head, addr);
        self.q.publish(head)?;
        Ok(head)
    }

    /// Writes `hdr` + `frame` into every TX buffer once, for [`TxQueue::queue_prefilled`].
    pub fn prefill(&mut self, hdr: &[u8], frame: &[u8]) -> Result<()> {
        self.flush(Duration::from_secs(10))?;
        let mut h = vec![0u8; self.hdr_len];
        for (d, s) in h.iter_mut().zip(hdr) {
            *d = *s;
        }
        for a in &self.free {
            self.q.memory().write(*a, &h)?;
            self.q
                .memory()
                .write(GuestAddress(a.0 + self.hdr_len as u64), frame)?;
        }
        Ok(())
    }

    /// Queues a buffer already holding a frame of `len` bytes (see [`TxQueue::prefill`])
    /// without copying; false if no buffer is free.
    pub fn queue_prefilled(&mut self, len: usize) -> Result<bool> {
        let Some(addr) = self.free.pop() else {
            return Ok(false);
        };
        let len = u32::try_from(self.hdr_len + len).unwrap_or(u32::MAX);
        let head = self.q.add_chain(&[Buf {
            addr,
            len,
            write: false,
        }])?;
        self.posted.insert(head, addr);
        self.q.publish(head)?;
        Ok(true)
    }

    /// Sends one frame and kicks.
    pub fn send(&mut self, hdr: &[u8], frame: &[u8]) -> Result<()> {
        self.queue(hdr, frame, Duration::from_secs(10))?;
        self.q.kick()
    }

    /// Waits until every queued frame has been completed.
    pub fn flush(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.posted.is_empty() {
            if self.reap() == 0 {
                if Instant::now() > deadline {
                    return Err(DriverError::Timeout("TX completion"));
                }
                wait_call(&self.q, Duration::from_millis(10));
            }
        }
        Ok(())
    }
}

/// A connected virtio-net device.
#[derive(Debug)]
pub struct NetDriver {
    /// The vhost-user connection.
    pub conn: Connection,
    /// The shared memory.
    pub mem: Arc<SharedMemory>,
    /// RX queues, one per pair.
    pub rx: Vec<RxQueue>,
    /// TX queues, one per pair.
    pub tx: Vec<TxQueue>,
    /// The control queue, if CTRL_VQ was negotiated.
    pub ctrl: Option<SplitQueue>,
    /// Header length in use (12 with VERSION_1 or MRG_RXBUF).
    pub hdr_len: usize,
}

impl NetDriver {
    /// Connects to a vhost-user-net back-end and starts `pairs` queue pairs (and the control
    /// queue if negotiated), with RX rings full.
    pub fn connect(path: &Path, o: NetOptions) -> Result<Self> {
        let proto = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
        let conn = Connection::connect(path, u64::from(o.pairs) * 2 + 1, o.features, proto)?;
        Self::start(conn, o)
    }

    /// Same over an already connected socket.
    pub fn start(mut conn: Connection, o: NetOptions) -> Result<Self> {
        let feats = conn.features;
        let hdr_len = if feats & (F_VERSION_1 | f::MRG_RXBUF) != 0 {
            12
        } else {
            10
        };
        let qs = u64::from(o.queue_size);
        let size =
            qs * (u64::from(o.rx_buf) + u64::from(o.tx_buf) + 128) * u64::from(o.pairs) + (8 << 20);
        let mem = Arc::new(SharedMemory::new(size.next_multiple_of(1 << 21))?);
        conn.set_mem_table(&mem)?;
        let mut rx = Vec::new();
        let mut tx = Vec::new();
        for p in 0..o.pairs {
            let rq = SplitQueue::new(mem.clone(), 2 * p, o.queue_size)?;
            let tq = SplitQueue::new(mem.clone(), 2 * p + 1, o.queue_size)?;
            let mut rfree = Vec::new();
            let mut tfree = Vec::new();
            for _ in 0..o.queue_size {
                rfree.push(mem.alloc(u64::from(o.rx_buf), 64)?);
                tfree.push(mem.alloc(u64::from(o.tx_buf), 64)?);
            }
            rx.push(RxQueue {
                q: rq,
                free: rfree,
                posted: HashMap::new(),
                buf_len: o.rx_buf,
                hdr_len,
                mrg: feats & f::MRG_RXBUF != 0,
                event_idx: feats & F_EVENT_IDX != 0,
                partial: None,
            });
            tx.push(TxQueue {
                q: tq,
                free: tfree,
                posted: HashMap::new(),
                buf_len: o.tx_buf,
                hdr_len,
                completed: 0,
            });
        }
        for r in &mut rx {
            r.refill()?;
        }
        for (r, t) in rx.iter().zip(&tx) {
            conn.start_queue(&r.q, 0)?;
            conn.start_queue(&t.q, 0)?;
        }
        let ctrl = if feats & f::CTRL_VQ != 0 {
            let q = SplitQueue::new(mem.clone(), 2 * o.pairs, 64)?;
            conn.start_queue(&q, 0)?;
            Some(q)
        } else {
            None
        };
        Ok(NetDriver {
            conn,
            mem,
            rx,
            tx,
            ctrl,
            hdr_len,
        })
    }

    /// Sends a control command (class, command, data); returns the device's ack byte.
    pub fn ctrl_command(&mut self, class: u8, cmd: u8, data: &[u8]) -> Result<u8> {
        let q = self
            .ctrl
            .as_mut()
            .ok_or(DriverError::Exhausted("control queue"))?;
        let cmd_addr = self.mem.alloc(64, 64)?;
        let ack_addr = self.mem.alloc(64, 64)?;
        let mut c = vec![class, cmd];
        c.extend_from_slice(data);
        self.mem.write(cmd_addr, &c)?;
        self.mem.write(ack_addr, &[0xff])?;
        let len = u32::try_from(c.len()).unwrap_or(0);
        let head = q.add_chain(&[
            Buf {
                addr: cmd_addr,
                len,
                write: false,
            },
            Buf {
                addr: ack_addr,
                len: 1,
                write: true,
            },
        ])?;
        q.publish(head)?;
        q.kick()?;
        q.wait(Duration::from_secs(10))?;
        Ok(self.mem.read(ack_addr, 1)?.first().copied().unwrap_or(0xff))
    }

    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
    pub fn set_queue_pairs(&mut self, n: u16) -> Result<u8> {
        self.ctrl_command(4, 0, &n.to_le_bytes())
    }
}
