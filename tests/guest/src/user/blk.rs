//! virtio-blk driver: read, write, flush and get-id requests on any number of queues, with
//! many requests outstanding per queue. Each request uses a 3-descriptor chain (header,
//! data, status); its header, status byte and data buffer are indexed by the chain's head
//! descriptor, so they are free exactly when the chain is.

use super::dma;
use super::pci::Function;
use super::virtio::{VirtioError, VirtioPci};
use super::virtq::Virtq;

/// VIRTIO_BLK_F_FLUSH.
const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_MQ.
const F_MQ: u64 = 1 << 12;
/// VIRTIO_BLK_F_BLK_SIZE (informational).
const F_BLK_SIZE: u64 = 1 << 6;

/// Request types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    /// Read sectors.
    Read = 0,
    /// Write sectors.
    Write = 1,
    /// Flush the write cache.
    Flush = 4,
    /// Device id string (20 bytes).
    GetId = 8,
}

/// Largest data buffer per request.
pub const MAX_IO: u32 = 16 * 1024;
/// Queue size used.
pub const QUEUE_SIZE: u16 = 128;

/// One virtio-blk device.
pub struct Blk {
    /// The transport.
    pub dev: VirtioPci,
    /// The queues in use.
    pub queues: [Option<Queue>; 8],
    /// Number of queues in use.
    pub nq: usize,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether FLUSH was negotiated.
    pub flush: bool,
    /// Queues the device offers (num_queues with MQ, else 1).
    pub max_queues: u16,
}

/// A request queue and its per-descriptor request memory.
pub struct Queue {
    /// The virtqueue.
    pub vq: Virtq,
    /// 16-byte headers + status bytes, 32 bytes per descriptor id.
    hdrs: u64,
    /// Data buffers, [`MAX_IO`] bytes per descriptor id.
    data: u64,
}

/// A completed request.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    /// Request id (head descriptor): [`Blk::buffer`] gives its data.
    pub id: u16,
    /// Status byte (0 = OK).
    pub status: u8,
}

impl Blk {
    /// Initialises the device with up to `want_queues` queues (`poll`: no interrupts).
    pub fn new(pci: Function, want_queues: usize, poll: bool) -> Result<Blk, VirtioError> {
        let mut dev = VirtioPci::new(pci)?;
        dev.reset();
        let f = dev.negotiate(F_FLUSH | F_MQ | F_BLK_SIZE)?;
        let max_queues = if f & F_MQ != 0 {
            dev.config::<u16>(34).max(1)
        } else {
            1
        };
        let nq = want_queues
            .clamp(1, 8)
            .min(usize::from(max_queues))
            .min(usize::from(dev.num_queues()));
        let mut queues = [const { None }; 8];
        for (i, slot) in queues.iter_mut().enumerate().take(nq) {
            let index = u16::try_from(i).unwrap_or(0);
            let mut vq = dev.setup_queue(index, QUEUE_SIZE, false, !poll)?;
            vq.set_interrupts(!poll);
            let n = u64::from(vq.size);
            let hdrs = dma::alloc(32 * n, 4096).ok_or(VirtioError::NoMemory)?;
            let data = dma::alloc(u64::from(MAX_IO) * n, 4096).ok_or(VirtioError::NoMemory)?;
            *slot = Some(Queue { vq, hdrs, data });
        }
        dev.driver_ok()?;
        let lo: u32 = dev.config(0);
        let hi: u32 = dev.config(4);
        Ok(Blk {
            capacity: (u64::from(hi) << 32) | u64::from(lo),
            flush: f & F_FLUSH != 0,
            max_queues,
            dev,
            queues,
            nq,
        })
    }

    /// Queue `q`.
    pub fn queue(&mut self, q: usize) -> &mut Queue {
        match self.queues.get_mut(q).and_then(Option::as_mut) {
            Some(queue) => queue,
            None => panic!("blk queue {q} not set up"),
        }
    }

    /// The data buffer of request `id` on queue `q` ([`MAX_IO`] bytes).
    pub fn buffer(&mut self, q: usize, id: u16) -> &mut [u8] {
        let queue = self.queue(q);
        let addr = queue.data + u64::from(id) * u64::from(MAX_IO);
        // SAFETY: the buffer belongs to descriptor `id` of this queue; callers use it only
        // while they own the request (before submit or after completion).
        unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, MAX_IO as usize) }
    }

    /// Where the next request's data must be placed before [`submit`](Self::submit): the
    /// buffer of the descriptor that will be the chain's head. `None` if the queue is full.
    pub fn next_buffer(&mut self, q: usize) -> Option<&mut [u8]> {
        let queue = self.queue(q);
        if queue.vq.num_free() < 3 {
            return None;
        }
        let id = queue.vq.peek_free_head();
        Some(self.buffer(q, id))
    }

    /// Submits a request of `len` bytes at `sector` on queue `q` (data for writes already
    /// in [`next_buffer`](Self::next_buffer)); returns its id, `None` if the queue is full.
    pub fn submit(&mut self, q: usize, op: Op, sector: u64, len: u32, kick: bool) -> Option<u16> {
        let queue = self.queue(q);
        if queue.vq.num_free() < 3 || len > MAX_IO {
            return None;
        }
        let id = queue.vq.peek_free_head();
        let hdr = queue.hdrs + 32 * u64::from(id);
        let data = queue.data + u64::from(id) * u64::from(MAX_IO);
        // SAFETY: header slot `id` of this queue, free because descriptor `id` is.
        unsafe {
            core::ptr::write_volatile(hdr as *mut u32, op as u32);
            core::ptr::write_volatile((hdr + 4) as *mut u32, 0);
            core::ptr::write_volatile((hdr + 8) as *mut u64, sector);
            core::ptr::write_volatile((hdr + 16) as *mut u8, 0xff);
        }
        let device_writes = matches!(op, Op::Read | Op::GetId);
        let got = if len == 0 {
            queue.vq.push(&[(hdr, 16, false), (hdr + 16, 1, true)])
        } else {
            queue.vq.push(&[
                (hdr, 16, false),
                (data, len, device_writes),
                (hdr + 16, 1, true),
            ])
        };
        if kick {
            queue.vq.kick();
        }
        debug_assert_eq!(got, Some(id));
        got
    }

    /// Notifies queue `q`.
    pub fn kick(&mut self, q: usize) {
        self.queue(q).vq.kick();
    }

    /// Takes one completed request from queue `q`.
    pub fn complete(&mut self, q: usize) -> Option<Done> {
        let queue = self.queue(q);
        let (id, _) = queue.vq.pop()?;
        let hdr = queue.hdrs + 32 * u64::from(id);
        // SAFETY: the status byte of request `id`, written by the device before it returned
        // the chain.
        let status = unsafe { core::ptr::read_volatile((hdr + 16) as *const u8) };
        Some(Done { id, status })
    }

    /// True if queue `q` has completions waiting.
    pub fn has_used(&mut self, q: usize) -> bool {
        self.queue(q).vq.has_used()
    }
}
