//! Moving frames between the rings and the TAP, without per-packet allocation.
//!
//! TX: each available chain's readable descriptors become an iovec array (reused per worker), the
//! virtio-net header is checked against the negotiated features, and the chain goes to the TAP
//! as one write (the TAP parses the same header: IFF_VNET_HDR with TUNSETVNETHDRSZ): a frame of
//! up to [`TX_COPY`] bytes is copied whole, checked header first, into a slot of ours and written
//! from there; a larger one (TSO) goes as our header copy followed by the guest's buffers. Up to
//! [`TX_BATCH`] of those writes go to the kernel in one io_uring submission when the worker has
//! a ring ([`TxBatch::use_ring`]; the slots are registered with it, so the kernel copies from
//! them without going through user memory), one syscall each otherwise. A TAP write never waits
//! (the queue fd is non-blocking, so io_uring runs each write inline, in order, and a full TAP
//! fails it with EAGAIN as `writev` would), and the chains are completed only after the whole
//! batch has been written.
//! RX: the writable descriptors of one chain (or, with MRG_RXBUF, of as many chains as the
//! largest possible frame needs) become the iovec array and the TAP `readv`s the frame straight
//! into guest memory (no bounce buffer). Chains a frame did not need carry over to the next
//! frame, so each chain is walked once; those still unused when the wake-up ends are given back
//! (next_avail rewound) before the ring lock is released. The chains a frame used are dropped by
//! moving a start index (the scratch arrays are compacted only when they fill up), so the cost
//! per frame does not grow with the number of pending chains (a guest with small mergeable
//! buffers has dozens pending for the largest possible frame). A one-byte overflow iovec after the
//! guest's buffers tells a frame that did not fit (the TAP truncates silently) from one that did.
//! RX: every chain popped in one wake-up is completed in one batch and notified once. TX: each
//! batch is completed (and notified) as soon as it is written, before the next is taken, so
//! the guest refills its ring while the worker sends.

use std::io;
use std::os::fd::AsRawFd;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use crate::device::{Device, GuestMem, QueuePair, Vring, lock, rewind};
use crate::virtio::f;

/// Most iovecs used for one frame (well under IOV_MAX).
pub const MAX_IOVS: usize = 512;
/// Most frames moved per ring per wake-up before the worker looks at its other events.
const BUDGET: usize = 256;
/// Most frames handed to the TAP in one io_uring submission.
pub const TX_BATCH: usize = 128;
/// A frame of up to this many bytes, header included (an MTU-sized one: 1514 + 12), is copied
/// whole into a slot of ours: copying it costs less than handing the kernel the guest's
/// buffers to walk (tx-64 1.14 → 1.20M pps, tx-1500 13.6 → 13.9 Gbit/s with the slots
/// registered, `./bench.sh net`).
pub const TX_COPY: usize = 2048;
/// A TX batch is sent once its frames hold this many iovecs (one more frame could then not
/// fit in the array's fixed capacity, `TX_IOVS + MAX_IOVS + 1`).
const TX_IOVS: usize = 1024;

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A buffer is outside guest memory (or the head could not be read).
    #[error("buffer address outside guest memory")]
    BadAddress,
    /// A descriptor has the wrong direction for its ring.
    #[error("descriptor with the wrong direction")]
    WrongDirection,
    /// The chain loops, is longer than the ring, or links to a missing descriptor.
    #[error("chain loops or is longer than the queue")]
    Loop,
    /// Too many segments for one frame (empty descriptors count too: an indirect table may
    /// hold millions of them, and walking those would stall the queue).
    #[error("chain has more than {MAX_IOVS} descriptors")]
    TooManySegments,
    /// Shorter than the virtio-net header.
    #[error("chain shorter than the virtio-net header")]
    TooShort,
}

/// The first few segments of a chain (where the virtio-net header is).
#[derive(Debug, Default, Clone, Copy)]
pub struct Segs {
    n: usize,
    s: [(GuestAddress, u32); 4],
}

impl Segs {
    fn push(&mut self, seg: (GuestAddress, u32)) {
        if let Some(slot) = self.s.get_mut(self.n) {
            *slot = seg;
            self.n += 1;
        }
    }

    fn as_slice(&self) -> &[(GuestAddress, u32)] {
        self.s.get(..self.n).unwrap_or_default()
    }
}

/// An RX chain waiting for a frame.
#[derive(Debug, Clone, Copy)]
struct RxChain {
    head: u16,
    cap: u32,
    /// End (exclusive) of its iovecs in `Scratch::iovs`.
    iov_end: usize,
    hdr: Segs,
}

/// Per-worker buffers, allocated once.
#[derive(Debug)]
pub struct Scratch {
    iovs: Vec<libc::iovec>,
    /// RX chains popped, in ring order; their iovecs are `iovs` in order. Those from `first` on
    /// are pending (not yet used), and their iovecs start at `iov_first`.
    chains: Vec<RxChain>,
    /// First pending RX chain.
    first: usize,
    /// First iovec of the first pending RX chain.
    iov_first: usize,
    /// Total capacity of the pending RX chains.
    pending_cap: u64,
    /// The first segments of a TX chain, to read the header.
    segs: Segs,
    /// TX frames checked and waiting to be written to the TAP.
    pub tx: TxBatch,
    /// (head, len) to complete.
    used: Vec<(u16, u32)>,
    /// One byte after the guest's RX buffers: the TAP truncates a frame that does not fit and
    /// reports only the bytes it copied, so a byte landing here means "did not fit".
    overflow: Box<[u8; 1]>,
}

impl Scratch {
    /// Allocates the buffers.
    pub fn new() -> Self {
        Scratch {
            // Used chains stay in front until compaction: up to MAX_IOVS used plus MAX_IOVS
            // pending iovecs, plus the overflow one.
            iovs: Vec::with_capacity(2 * MAX_IOVS + 1),
            chains: Vec::with_capacity(2 * MAX_IOVS),
            first: 0,
            iov_first: 0,
            pending_cap: 0,
            segs: Segs::default(),
            tx: TxBatch::new(),
            used: Vec::with_capacity(BUDGET),
            overflow: Box::new([0u8; 1]),
        }
    }
}

impl Scratch {
    /// Forgets every RX chain.
    fn clear_rx(&mut self) {
        self.chains.clear();
        self.iovs.clear();
        self.first = 0;
        self.iov_first = 0;
        self.pending_cap = 0;
    }

    /// Number of pending RX chains.
    fn pending(&self) -> usize {
        self.chains.len() - self.first
    }

    /// Drops the used RX chains and their iovecs from the front of the arrays.
    fn compact_rx(&mut self) {
        let cut = self.iov_first;
        self.chains.drain(..self.first);
        self.iovs.drain(..cut);
        for c in &mut self.chains {
            c.iov_end -= cut;
        }
        self.first = 0;
        self.iov_first = 0;
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// TX frames checked and ready for the TAP: each is an iovec for our copy of its header followed
/// by iovecs for the rest of the guest's buffers. Nothing here reallocates while frames are
/// queued (the kernel reads these arrays when the batch is sent).
pub struct TxBatch {
    /// One slot per queued frame: its header as checked (the TAP gets this copy, never the
    /// guest's buffer, so what was checked is what is sent whatever the guest writes
    /// meanwhile), followed by the rest of the frame if it fits.
    slots: Box<[[u8; TX_COPY]; TX_BATCH]>,
    /// The iovecs of the frames too large for their slot; capacity `TX_IOVS + MAX_IOVS + 1`,
    /// never exceeded.
    iovs: Vec<libc::iovec>,
    /// The queued frames, the n-th in slot n.
    frames: Vec<Frame>,
    /// A ring that can only write to the worker's TAP queue (fixed file 0), if the kernel
    /// gave one.
    ring: Option<io_uring::IoUring>,
    /// Whether `slots` are the ring's fixed buffer 0.
    slots_registered: bool,
}

/// A frame queued in a [`TxBatch`].
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// Whole in its slot: this many bytes.
    Copied(usize),
    /// Its header in its slot, then `iovs[first..first + count]` (the first of which points to
    /// that header).
    Iovs { first: usize, count: usize },
}

impl std::fmt::Debug for TxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxBatch")
            .field("frames", &self.frames.len())
            .field("io_uring", &self.ring.is_some())
            .finish()
    }
}

impl Drop for TxBatch {
    /// Lets go of the TAP queue now: a ring closed with it registered would hold it until a
    /// kernel worker tears the ring down, after this process may have exited (a TAP we created
    /// would outlive us for a moment).
    fn drop(&mut self) {
        if let Some(ring) = &self.ring {
            let _ = ring.submitter().unregister_files();
        }
    }
}

impl TxBatch {
    fn new() -> Self {
        TxBatch {
            slots: vec![[0u8; TX_COPY]; TX_BATCH]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| Box::new([[0u8; TX_COPY]; TX_BATCH])),
            iovs: Vec::with_capacity(TX_IOVS + MAX_IOVS + 1),
            frames: Vec::with_capacity(TX_BATCH),
            ring: None,
            slots_registered: false,
        }
    }

    /// Sends batches through a ring restricted to writing to `tap` (as fixed file 0), with the
    /// slots registered as its fixed buffer 0 where the locked-memory limit allows (they take
    /// `TX_COPY * TX_BATCH` bytes); without a ring (an old kernel, io_uring disabled), each
    /// frame is one `write` or `writev`.
    pub fn use_ring(&mut self, tap: std::os::fd::RawFd) -> io::Result<()> {
        use io_uring::opcode::{Write, WriteFixed, Writev};
        let entries = u32::try_from(TX_BATCH).unwrap_or(32);
        let slots = [libc::iovec {
            iov_base: self.slots.as_mut_ptr().cast(),
            iov_len: TX_COPY * TX_BATCH,
        }];
        let mut allowed = baton_service::uring::Allowed {
            ops: &[Writev::CODE, Write::CODE, WriteFixed::CODE],
            flags: io_uring::squeue::Flags::empty(),
            required: io_uring::squeue::Flags::FIXED_FILE,
            files: &[tap],
            buffers: &slots,
        };
        // The slots live in a Box that is never moved nor freed before the ring.
        match baton_service::uring::restricted(entries, &allowed) {
            Ok(ring) => {
                self.ring = Some(ring);
                self.slots_registered = true;
            }
            Err(e) => {
                tracing::info!("TX slots not registered with io_uring ({e}): plain writes");
                allowed.buffers = &[];
                self.ring = Some(baton_service::uring::restricted(entries, &allowed)?);
            }
        }
        Ok(())
    }

    /// Whether batches go through io_uring.
    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// Whether the batch must be sent before another frame is added.
    fn full(&self) -> bool {
        self.frames.len() >= TX_BATCH || self.iovs.len() >= TX_IOVS
    }

    /// Checks a TX chain and queues it as a frame; a refused chain is counted and dropped.
    fn add(
        &mut self,
        chain: DescriptorChain<&GuestMem>,
        mem: &GuestMem,
        dev: &Device,
        s: &mut Segs,
    ) {
        let neg = dev.negotiated();
        let hdr_len = neg.hdr_len();
        let start = self.iovs.len();
        // The header's slot, filled once the header is checked.
        self.iovs.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
        match gather(chain, mem, false, (&mut self.iovs, start + 1), s) {
            Ok(total) if usize::try_from(total).unwrap_or(0) >= hdr_len => {
                let Some(slot) = self.slots.get_mut(self.frames.len()) else {
                    self.iovs.truncate(start);
                    return;
                };
                let len = usize::try_from(total).unwrap_or(0);
                // A frame that fits is copied whole, header first; of a larger one, the header.
                let copied = if len <= TX_COPY { len } else { hdr_len };
                let guest = self.iovs.get(start + 1..).unwrap_or_default();
                let ok = copy_from_iovs(guest, slot.get_mut(..copied).unwrap_or_default());
                let head10 = slot.first_chunk::<10>().copied().unwrap_or_default();
                let checked = if ok {
                    neg.check_tx_header(&head10, len - hdr_len)
                } else {
                    Err("unreadable header")
                };
                match checked {
                    Ok(()) if copied == len => {
                        self.iovs.truncate(start);
                        self.frames.push(Frame::Copied(len));
                        return;
                    }
                    Ok(()) => {
                        let rest = self.iovs.get_mut(start + 1..).unwrap_or_default();
                        skip_bytes(rest, hdr_len);
                        if let Some(v) = self.iovs.get_mut(start) {
                            *v = libc::iovec {
                                iov_base: slot.as_mut_ptr().cast(),
                                iov_len: hdr_len,
                            };
                        }
                        let count = self.iovs.len() - start;
                        self.frames.push(Frame::Iovs {
                            first: start,
                            count,
                        });
                        debug_assert!(self.iovs.len() <= TX_IOVS + MAX_IOVS + 1);
                        return;
                    }
                    Err(why) => dev.stats.bad_tx_header.hit("TX header refused", &why),
                }
            }
            Ok(_) => dev.stats.bad_chain.hit("TX chain", &ChainError::TooShort),
            Err(e) => dev.stats.bad_chain.hit("TX chain", &e),
        }
        self.iovs.truncate(start);
    }

    /// Writes every queued frame to the TAP (`tap`: the worker's queue fd, the ring's fixed
    /// file 0) and empties the batch; counts what was written and what failed.
    fn send(&mut self, tap: std::os::fd::RawFd, dev: &Device) {
        let mut written = 0u64;
        let fail = |e: io::Error| dev.stats.tap_io.hit("TAP write", &e);
        match &mut self.ring {
            Some(ring) => {
                let mut n = 0usize;
                {
                    let mut sq = ring.submission();
                    for (frame, slot) in self.frames.iter().zip(self.slots.iter()) {
                        let tap = io_uring::types::Fixed(0);
                        let e = match *frame {
                            Frame::Copied(len) => {
                                let (buf, len) = (slot.as_ptr(), u32::try_from(len).unwrap_or(0));
                                if self.slots_registered {
                                    io_uring::opcode::WriteFixed::new(tap, buf, len, 0).build()
                                } else {
                                    io_uring::opcode::Write::new(tap, buf, len).build()
                                }
                            }
                            Frame::Iovs { first, count } => {
                                let iovs = self.iovs.get(first..).unwrap_or_default();
                                let count = u32::try_from(count).unwrap_or(u32::MAX);
                                io_uring::opcode::Writev::new(tap, iovs.as_ptr(), count).build()
                            }
                        };
                        // SAFETY: the slots and the iovecs (into guest memory mapped while the
                        // caller holds its memory guard, and into the slots) stay valid and
                        // unchanged until every completion below has been reaped; the ring
                        // has TX_BATCH entries, so it has room for every frame.
                        if unsafe { sq.push(&e) }.is_ok() {
                            n += 1;
                        } else {
                            fail(io::Error::other("TX ring full"));
                        }
                    }
                }
                let mut done = 0usize;
                while done < n {
                    match ring.submit_and_wait(n - done) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                        Err(e) => {
                            // Nothing was submitted (or the ring is broken): give up on the
                            // ring, the next batches use writev.
                            fail(e);
                            break;
                        }
                    }
                    for c in ring.completion() {
                        done += 1;
                        if c.result() < 0 {
                            fail(io::Error::from_raw_os_error(-c.result()));
                        } else {
                            written += 1;
                        }
                    }
                }
                if done < n {
                    self.ring = None;
                }
            }
            None => {
                for (frame, slot) in self.frames.iter().zip(self.slots.iter()) {
                    let r = match *frame {
                        Frame::Copied(len) => {
                            let len = len.min(TX_COPY);
                            // SAFETY: the slot holds `len` bytes; the kernel only reads them.
                            unsafe { libc::write(tap, slot.as_ptr().cast(), len) }
                        }
                        Frame::Iovs { first, count } => {
                            let iovs = self.iovs.get(first..first + count).unwrap_or_default();
                            // SAFETY: every iovec points into guest memory mapped by the
                            // caller's memory guard, or into the slot; the kernel only reads.
                            unsafe { libc::writev(tap, iovs.as_ptr(), iov_count(iovs)) }
                        }
                    };
                    if r < 0 {
                        fail(io::Error::last_os_error());
                    } else {
                        written += 1;
                    }
                }
            }
        }
        dev.stats
            .tx_frames
            .fetch_add(written, std::sync::atomic::Ordering::Relaxed);
        self.frames.clear();
        self.iovs.clear();
    }
}

/// Appends the buffers of `chain` (all of direction `writable`) to `iovs`, of which those from
/// `base` on count towards [`MAX_IOVS`]; records the first few segments in `segs`. Returns the
/// chain's byte count.
pub fn gather(
    chain: DescriptorChain<&GuestMem>,
    mem: &GuestMem,
    writable: bool,
    (iovs, base): (&mut Vec<libc::iovec>, usize),
    segs: &mut Segs,
) -> Result<u32, ChainError> {
    *segs = Segs::default();
    let mut count = 0usize;
    let mut last_has_next = false;
    let mut total: u32 = 0;
    for desc in chain {
        count += 1;
        if count > MAX_IOVS {
            return Err(ChainError::TooManySegments);
        }
        last_has_next = desc.has_next();
        if desc.is_write_only() != writable {
            return Err(ChainError::WrongDirection);
        }
        let len = desc.len();
        if len == 0 {
            continue;
        }
        if iovs.len().saturating_sub(base) >= MAX_IOVS {
            return Err(ChainError::TooManySegments);
        }
        let ulen = usize::try_from(len).map_err(|_| ChainError::BadAddress)?;
        let slice = mem
            .get_slice(desc.addr(), ulen)
            .map_err(|_| ChainError::BadAddress)?;
        total = total.checked_add(len).ok_or(ChainError::BadAddress)?;
        segs.push((desc.addr(), len));
        iovs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: ulen,
        });
    }
    if count == 0 {
        return Err(ChainError::BadAddress);
    }
    if last_has_next {
        return Err(ChainError::Loop);
    }
    Ok(total)
}

/// Copies `buf.len()` bytes at logical offset `off` of the segments to or from guest memory.
fn access_segs(
    mem: &GuestMem,
    segs: &[(GuestAddress, u32)],
    mut off: u64,
    buf: &mut [u8],
    write: bool,
) -> bool {
    let mut done = 0usize;
    for &(addr, len) in segs {
        let len = u64::from(len);
        if off >= len {
            off -= len;
            continue;
        }
        let n = usize::try_from(len - off)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        let Some(part) = buf.get_mut(done..done + n) else {
            return false;
        };
        let Some(at) = addr.0.checked_add(off) else {
            return false;
        };
        let ok = if write {
            mem.write_slice(part, GuestAddress(at)).is_ok()
        } else {
            mem.read_slice(part, GuestAddress(at)).is_ok()
        };
        if !ok {
            return false;
        }
        done += n;
        off = 0;
        if done == buf.len() {
            return true;
        }
    }
    done == buf.len()
}

fn iov_count(iovs: &[libc::iovec]) -> libc::c_int {
    libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX)
}

/// Copies the first `buf.len()` bytes the iovecs (into guest memory, as `gather` made them)
/// point to into `buf`, once each (the guest may be writing them meanwhile: vm-memory's
/// volatile copy); false if they hold fewer.
fn copy_from_iovs(iovs: &[libc::iovec], buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for v in iovs {
        let Some(rest) = buf.get_mut(done..) else {
            break;
        };
        if rest.is_empty() {
            break;
        }
        // SAFETY: the iovec lies in guest memory mapped while the caller holds its memory
        // guard (`gather` took it from a `VolatileSlice` of that memory).
        let slice = unsafe { vm_memory::VolatileSlice::new(v.iov_base.cast(), v.iov_len) };
        done += slice.copy_to(rest);
    }
    done == buf.len()
}

/// Moves the start of `iovs` past their first `n` bytes (iovecs left empty stay, with length 0).
fn skip_bytes(iovs: &mut [libc::iovec], mut n: usize) {
    for v in iovs {
        if n == 0 {
            break;
        }
        let k = n.min(v.iov_len);
        // SAFETY: stays within the iovec's buffer (k <= iov_len); only the pointer moves.
        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(k) }.cast();
        v.iov_len -= k;
        n -= k;
    }
}

/// Sends the guest's frames to the TAP. Returns true if more work may be pending.
pub fn process_tx(dev: &Device, pair: &QueuePair, s: &mut Scratch) -> bool {
    let mut vr = lock(&pair.tx);
    if !vr.active() {
        return false;
    }
    let mem = dev.mem.memory();
    let mem: &GuestMem = &mem;
    let mut sent = 0usize;
    loop {
        let _ = vr.queue.disable_notification(mem);
        if !vr.check_avail(mem, &dev.stats.bad_chain) {
            return false;
        }
        s.used.clear();
        let iter = match vr.queue.iter(mem) {
            Ok(it) => it,
            Err(e) => {
                vr.refused("TX ring", &e, &dev.stats.bad_chain);
                return false;
            }
        };
        let tap = pair.tap.as_raw_fd();
        // One batch at a time, completed before the next is taken: the guest gets its buffers
        // back (and can refill them) while the worker sends the next batch.
        for chain in iter {
            let head = chain.head_index();
            s.tx.add(chain, mem, dev, &mut s.segs);
            s.used.push((head, 0));
            // (Refused chains count too: a guest cannot make one pass walk the whole ring.)
            if s.tx.full() || s.used.len() >= TX_BATCH {
                break;
            }
        }
        s.tx.send(tap, dev);
        for &(head, len) in &s.used {
            let _ = vr.queue.add_used(mem, head, len);
        }
        sent += s.used.len();
        if !s.used.is_empty() {
            vr.signal(mem);
        }
        if sent >= BUDGET * 4 {
            return true;
        }
        if !vr.queue.enable_notification(mem).unwrap_or(false) {
            return false;
        }
    }
}

/// Whether the TX ring holds chains not taken yet (a look at its avail index; for polling).
pub fn tx_pending(dev: &Device, pair: &QueuePair) -> bool {
    let vr = lock(&pair.tx);
    if !vr.active() {
        return false;
    }
    baton_service::ring::has_pending(&vr.queue, &*dev.mem.memory())
}

/// What the RX ring can offer for the next frame.
enum Gathered {
    /// Enough chains are pending in `Scratch::chains`.
    Ready,
    /// No (or not enough) buffers: wait for the guest's kick.
    Empty,
}

/// Completes every pending chain as an empty buffer (used after a bad chain, so that the used
/// ring stays in order and nothing needs rewinding past it).
fn flush_pending(vr: &mut Vring, mem: &GuestMem, s: &mut Scratch) {
    for c in s.chains.get(s.first..).unwrap_or_default() {
        let _ = vr.queue.add_used(mem, c.head, 0);
    }
    s.clear_rx();
}

/// Pops RX chains until the pending ones can hold the largest frame (one chain without
/// MRG_RXBUF). Pending chains carry over from frame to frame within one wake-up, so each chain
/// is walked and translated once.
fn gather_rx(
    dev: &Device,
    vr: &mut Vring,
    mem: &GuestMem,
    s: &mut Scratch,
    mrg: bool,
    hdr_len: usize,
    target: u32,
) -> Gathered {
    let qsize = usize::from(vr.queue.size());
    loop {
        let enough = if mrg {
            s.pending_cap >= u64::from(target) || s.iovs.len() - s.iov_first + 64 > MAX_IOVS
        } else {
            s.pending() > 0
        };
        if enough {
            return Gathered::Ready;
        }
        let chain = match vr.queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                vr.refused("RX ring", &e, &dev.stats.bad_chain);
                return Gathered::Empty;
            }
        };
        let Some(chain) = chain else {
            if s.pending() > 0 && s.pending() >= qsize {
                // The whole ring is ours and still too small: use it (a larger frame is
                // dropped as truncated).
                return Gathered::Ready;
            }
            // Ask for a kick past everything popped so far; if buffers arrived meanwhile, go on
            // (unless the guest's index is bogus: then "more" would be forever).
            if !vr.check_avail(mem, &dev.stats.bad_chain) {
                return Gathered::Empty;
            }
            if vr.queue.enable_notification(mem).unwrap_or(false) {
                let _ = vr.queue.disable_notification(mem);
                continue;
            }
            return Gathered::Empty;
        };
        let head = chain.head_index();
        if s.iovs.len() > MAX_IOVS {
            // Keeps `iovs` within its capacity (no allocation): used iovecs go.
            s.compact_rx();
        }
        let before = s.iovs.len();
        let mut hdr = Segs::default();
        match gather(chain, mem, true, (&mut s.iovs, s.iov_first), &mut hdr).and_then(|c| {
            if usize::try_from(c).unwrap_or(0) < hdr_len {
                Err(ChainError::TooShort)
            } else {
                Ok(c)
            }
        }) {
            Ok(c) => {
                s.pending_cap += u64::from(c);
                s.chains.push(RxChain {
                    head,
                    cap: c,
                    iov_end: s.iovs.len(),
                    hdr,
                });
            }
            Err(e) => {
                s.iovs.truncate(before);
                dev.stats.bad_chain.hit("RX chain", &e);
                flush_pending(vr, mem, s);
                let _ = vr.queue.add_used(mem, head, 0);
            }
        }
    }
}

/// Delivers frames waiting on the TAP into the guest's RX buffers. Returns true if more work
/// may be pending (budget used up).
pub fn process_rx(dev: &Device, pair: &QueuePair, s: &mut Scratch) -> bool {
    let mut vr = lock(&pair.rx);
    if !vr.active() {
        return false;
    }
    let mem = dev.mem.memory();
    let mem: &GuestMem = &mem;
    let neg = dev.negotiated();
    let hdr_len = neg.hdr_len();
    let mrg = neg.has(f::MRG_RXBUF);
    let target = u32::try_from(hdr_len + neg.max_rx_frame(dev.cfg.mtu)).unwrap_or(u32::MAX);
    let mut delivered = 0usize;
    let mut more = false;
    s.clear_rx();
    let _ = vr.queue.disable_notification(mem);
    loop {
        if delivered >= BUDGET {
            more = true;
            break;
        }
        if let Gathered::Empty = gather_rx(dev, &mut vr, mem, s, mrg, hdr_len, target) {
            break;
        }
        // Without MRG_RXBUF a frame gets exactly one chain.
        let Some(head_chain) = s.chains.get(s.first).copied() else {
            break;
        };
        let (cap, niov) = if mrg {
            (
                usize::try_from(s.pending_cap).unwrap_or(usize::MAX),
                s.iovs.len(),
            )
        } else {
            (
                usize::try_from(head_chain.cap).unwrap_or(0),
                head_chain.iov_end,
            )
        };
        let ovf = libc::iovec {
            iov_base: s.overflow.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // The overflow iovec goes right after the frame's; whatever it covers is put back.
        let covered = s.iovs.get(niov).copied();
        match s.iovs.get_mut(niov) {
            Some(slot) => *slot = ovf,
            None => s.iovs.push(ovf),
        }
        let iovs = s.iovs.get(s.iov_first..=niov).unwrap_or_default();
        // SAFETY: every iovec but the overflow one points into guest memory mapped by `mem`
        // (held for the whole call) and was offered by the driver as device-writable; the
        // overflow one is our own one-byte buffer.
        let r = unsafe { libc::readv(pair.tap.as_raw_fd(), iovs.as_ptr(), iov_count(iovs)) };
        match (covered, s.iovs.get_mut(niov)) {
            (Some(iov), Some(slot)) => *slot = iov,
            _ => {
                s.iovs.truncate(niov);
            }
        }
        let n = match usize::try_from(r) {
            Ok(n) => n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    dev.stats.tap_io.hit("TAP read", &e);
                }
                break;
            }
        };
        if n > cap || n < hdr_len {
            dev.stats.rx_too_large.hit(
                "frame larger than the guest's buffers dropped",
                &format_args!("more than {cap} bytes"),
            );
            continue;
        }
        let pending = s.chains.get(s.first..).unwrap_or_default();
        if hdr_len == 12 {
            // num_buffers, before the chains are published as used.
            let mut left = n;
            let used = pending
                .iter()
                .take_while(|c| {
                    let more = left > 0;
                    left = left.saturating_sub(usize::try_from(c.cap).unwrap_or(usize::MAX));
                    more
                })
                .count();
            let mut nb = u16::try_from(used).unwrap_or(u16::MAX).to_le_bytes();
            let _ = access_segs(mem, head_chain.hdr.as_slice(), 10, &mut nb, true);
        }
        let mut left = n;
        let mut used = 0usize;
        for c in pending {
            if left == 0 {
                break;
            }
            let l = left.min(usize::try_from(c.cap).unwrap_or(usize::MAX));
            let _ = vr
                .queue
                .add_used(mem, c.head, u32::try_from(l).unwrap_or(c.cap));
            left -= l;
            used += 1;
            s.pending_cap -= u64::from(c.cap);
            s.iov_first = c.iov_end;
        }
        // The used chains are behind `first` now; the rest carry over to the next frame.
        s.first += used;
        if s.pending() == 0 {
            s.clear_rx();
        }
        delivered += 1;
    }
    // Chains popped but not used go back to the ring.
    rewind(&mut vr.queue, s.pending());
    s.clear_rx();
    if delivered > 0 {
        dev.stats.rx_frames.fetch_add(
            u64::try_from(delivered).unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        vr.signal(mem);
    }
    more
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn run(descs: &[RawDescriptor], writable: bool) -> (Result<u32, ChainError>, usize, usize) {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq.build_multiple_desc_chains(descs).unwrap();
        let mut iovs = Vec::new();
        let mut segs = Segs::default();
        let r = gather(chain, &m, writable, (&mut iovs, 0), &mut segs);
        (r, iovs.len(), segs.as_slice().len())
    }

    #[test]
    fn gathers_a_good_chain() {
        let (r, n, s) = run(
            &[desc(0x10_0000, 12, NEXT, 1), desc(0x10_1000, 1500, 0, 0)],
            false,
        );
        assert_eq!(r, Ok(1512));
        assert_eq!((n, s), (2, 2));
        let (r, _, _) = run(&[desc(0x10_0000, 4096, WRITE, 0)], true);
        assert_eq!(r, Ok(4096));
    }

    #[test]
    fn refuses_bad_chains() {
        // Outside guest memory, or wrapping around.
        assert_eq!(
            run(&[desc(0x30_0000, 64, 0, 0)], false).0,
            Err(ChainError::BadAddress)
        );
        assert_eq!(
            run(&[desc(u64::MAX - 8, 64, 0, 0)], false).0,
            Err(ChainError::BadAddress)
        );
        // Crossing the end of guest memory.
        assert_eq!(
            run(&[desc(0x1f_ff00, 0x200, 0, 0)], false).0,
            Err(ChainError::BadAddress)
        );
        // Wrong direction for the ring.
        assert_eq!(
            run(&[desc(0x10_0000, 64, WRITE, 0)], false).0,
            Err(ChainError::WrongDirection)
        );
        assert_eq!(
            run(&[desc(0x10_0000, 64, 0, 0)], true).0,
            Err(ChainError::WrongDirection)
        );
        // A loop, and a link to a descriptor past the table.
        let looped = [desc(0x10_0000, 64, NEXT, 1), desc(0x10_1000, 64, NEXT, 0)];
        assert_eq!(run(&looped, false).0, Err(ChainError::Loop));
        assert_eq!(
            run(&[desc(0x10_0000, 64, NEXT, 99)], false).0,
            Err(ChainError::Loop)
        );
    }

    #[test]
    fn compaction_keeps_the_pending_rx_chains_and_their_iovecs() {
        let mut s = Scratch::new();
        let iov = |i: usize| libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: i,
        };
        // Three chains of 2, 1 and 3 iovecs; the first two were used by frames.
        for (head, n) in [(7u16, 2usize), (8, 1), (9, 3)] {
            for _ in 0..n {
                let i = s.iovs.len();
                s.iovs.push(iov(i));
            }
            s.chains.push(RxChain {
                head,
                cap: 100,
                iov_end: s.iovs.len(),
                hdr: Segs::default(),
            });
        }
        s.first = 2;
        s.iov_first = 3;
        s.pending_cap = 100;
        s.compact_rx();
        assert_eq!((s.first, s.iov_first, s.pending()), (0, 0, 1));
        assert_eq!((s.chains[0].head, s.chains[0].iov_end), (9, 3));
        let lens: Vec<usize> = s.iovs.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [3, 4, 5]);
        assert_eq!(s.pending_cap, 100);
        s.clear_rx();
        assert_eq!((s.pending(), s.iovs.len(), s.pending_cap), (0, 0, 0));
    }

    #[test]
    fn header_segments_are_read_and_patched_across_descriptors() {
        let m = mem();
        m.write_slice(&[1, 2, 3, 4, 5], GuestAddress(0x10_0000))
            .unwrap();
        m.write_slice(&[6, 7, 8, 9, 10, 11, 12], GuestAddress(0x10_1000))
            .unwrap();
        let segs = [(GuestAddress(0x10_0000), 5), (GuestAddress(0x10_1000), 100)];
        let mut hdr = [0u8; 10];
        assert!(access_segs(&m, &segs, 0, &mut hdr, false));
        assert_eq!(hdr, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(access_segs(&m, &segs, 4, &mut [0xaa, 0xbb], true));
        let mut back = [0u8; 2];
        m.read_slice(&mut back, GuestAddress(0x10_0004)).unwrap();
        assert_eq!(back[0], 0xaa);
        m.read_slice(&mut back, GuestAddress(0x10_1000)).unwrap();
        assert_eq!(back[0], 0xbb);
        assert!(
            !access_segs(&m, &segs[..1], 4, &mut [0; 4], false),
            "past the segments"
        );
    }

    #[test]
    fn the_tap_gets_our_header_copy_and_the_rest_of_the_guest_buffers() {
        let mut guest = *b"HHHHHHHHHHHHframe-bytes";
        let base = guest.as_mut_ptr();
        let iov = |off: usize, len: usize| libc::iovec {
            // SAFETY: test buffers; offsets stay inside `guest`.
            iov_base: unsafe { base.add(off) }.cast(),
            iov_len: len,
        };
        // The guest header spans two descriptors; the second also holds the frame's start.
        let mut iovs = vec![iov(0, 8), iov(8, 6), iov(14, 9)];
        let mut hdr = [0u8; 12];
        assert!(copy_from_iovs(&iovs, &mut hdr));
        assert_eq!(&hdr, b"HHHHHHHHHHHH");
        let mut too_much = [0u8; 24];
        assert!(!copy_from_iovs(&iovs, &mut too_much));
        skip_bytes(&mut iovs, 12);
        let mut copy = *b"cccccccccccc";
        let mut sent = vec![libc::iovec {
            iov_base: copy.as_mut_ptr().cast(),
            iov_len: 12,
        }];
        sent.extend_from_slice(&iovs);
        let bytes: Vec<u8> = sent
            .iter()
            // SAFETY: each iovec points into `guest` or `copy`, both alive.
            .flat_map(|v| unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) })
            .copied()
            .collect();
        assert_eq!(&bytes[..], b"ccccccccccccframe-bytes");
        assert_eq!(
            iovs.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
            [0, 2, 9]
        );
    }

    /// Queues `frames` in `t` as `add` would: header `[k; 12]` in slot k, then the frame's
    /// bytes, in the slot if they fit, else from `frames` itself.
    fn queue_frames(t: &mut TxBatch, frames: &[Vec<u8>]) {
        for (k, f) in frames.iter().enumerate() {
            let hdr = [u8::try_from(k % 256).unwrap(); 12];
            t.slots[k][..12].copy_from_slice(&hdr);
            if let Some(body) = t.slots[k].get_mut(12..12 + f.len()) {
                body.copy_from_slice(f);
                t.frames.push(Frame::Copied(12 + f.len()));
                continue;
            }
            let first = t.iovs.len();
            t.iovs.push(libc::iovec {
                iov_base: t.slots[k].as_mut_ptr().cast(),
                iov_len: 12,
            });
            t.iovs.push(libc::iovec {
                iov_base: f.as_ptr().cast_mut().cast(),
                iov_len: f.len(),
            });
            t.frames.push(Frame::Iovs { first, count: 2 });
        }
    }

    #[test]
    fn a_batch_reaches_the_tap_whole_and_in_order_with_and_without_io_uring() {
        let cfg = crate::device::NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            pairs: 0,
        };
        for ring in [true, false] {
            let dev = Device::new(cfg, Vec::new()).unwrap();
            // A datagram socket keeps each write a message of its own, as a TAP keeps frames;
            // non-blocking as a TAP queue is (so io_uring runs every write inline, in order).
            let (tap, peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
            tap.set_nonblocking(true).unwrap();
            let mut t = TxBatch::new();
            if ring {
                if let Err(e) = t.use_ring(tap.as_raw_fd()) {
                    baton_service::skip::cannot_run("io_uring", &format!("no io_uring: {e}"));
                    continue;
                }
                assert!(t.has_ring());
                assert!(t.slots_registered, "the slots are the ring's fixed buffer");
            }
            // Every 16th frame too large for a slot: both kinds in one batch (and within the
            // socket's buffer).
            let frames: Vec<Vec<u8>> = (0..TX_BATCH)
                .map(|k| {
                    let len = if k % 16 == 0 { TX_COPY + k } else { 20 + k };
                    vec![u8::try_from(k % 256).unwrap(); len]
                })
                .collect();
            queue_frames(&mut t, &frames);
            assert!(t.full());
            t.send(tap.as_raw_fd(), &dev);
            assert_eq!(
                dev.stats
                    .tx_frames
                    .load(std::sync::atomic::Ordering::Relaxed),
                TX_BATCH as u64
            );
            assert!(t.frames.is_empty() && t.iovs.is_empty());
            for (k, f) in frames.iter().enumerate() {
                let mut buf = [0u8; 2 * TX_COPY + 512];
                let n = peer.recv(&mut buf).unwrap();
                let mut want = vec![u8::try_from(k % 256).unwrap(); 12];
                want.extend_from_slice(f);
                assert_eq!(&buf[..n], &want[..], "frame {k} (io_uring: {ring})");
            }
            // A write the TAP refuses is counted, and the rest of the batch still goes.
            drop(peer);
            queue_frames(&mut t, &frames[..2]);
            t.send(tap.as_raw_fd(), &dev);
            assert_eq!(dev.stats.tap_io.total(), 2);
        }
    }
}
