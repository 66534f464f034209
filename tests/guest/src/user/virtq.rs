//! A split virtqueue (virtio 1.x): descriptor table, available and used rings, a free list
//! of descriptors and any number of outstanding chains. No indirect descriptors, no
//! EVENT_IDX.

use core::sync::atomic::{Ordering, fence};

use super::dma;
use super::sys::{mmio_read, mmio_write};

/// Descriptor flag: the chain continues at `next`.
const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const F_WRITE: u16 = 2;
/// Avail flag: the driver does not want interrupts for this queue.
const AVAIL_NO_INTERRUPT: u16 = 1;

/// One buffer of a chain: (physical address, length, device-writable).
pub type Buf = (u64, u32, bool);

/// A split virtqueue in guest RAM.
pub struct Virtq {
    /// Queue index on its device.
    pub index: u16,
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Notify register address for this queue.
    pub notify: u64,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
}

impl Virtq {
    /// Allocates the rings for `size` descriptors (desc and avail in one page run, used on
    /// its own page-aligned run).
    pub fn new(index: u16, size: u16) -> Option<Virtq> {
        let n = u64::from(size);
        let desc = dma::alloc(16 * n + 6 + 2 * n, 4096)?;
        let used = dma::alloc(6 + 8 * n, 4096)?;
        let mut q = Virtq {
            index,
            size,
            desc,
            avail: desc + 16 * n,
            used,
            notify: 0,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
        };
        for i in 0..size {
            q.set_next(i, i.wrapping_add(1));
        }
        Some(q)
    }

    fn set_next(&mut self, i: u16, next: u16) {
        // SAFETY: `i < size`: inside the descriptor table this queue allocated.
        unsafe { mmio_write(self.desc + 16 * u64::from(i) + 14, next) }
    }

    fn desc_flags_next(&self, i: u16) -> (u16, u16) {
        let d = self.desc + 16 * u64::from(i % self.size);
        // SAFETY: inside this queue's descriptor table.
        unsafe { (mmio_read(d + 12), mmio_read(d + 14)) }
    }

    /// The descriptor the next [`push`](Self::push) will use as its head.
    pub fn peek_free_head(&self) -> u16 {
        self.free_head
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Asks the device not to interrupt for this queue (polling) or to interrupt again.
    pub fn set_interrupts(&mut self, on: bool) {
        let flags = if on { 0 } else { AVAIL_NO_INTERRUPT };
        // SAFETY: the avail ring's flags field.
        unsafe { mmio_write(self.avail, flags) }
    }

    /// Places a chain of buffers in the ring (without notifying); returns its head id, or
    /// `None` when too few descriptors are free.
    pub fn push(&mut self, bufs: &[Buf]) -> Option<u16> {
        let count = u16::try_from(bufs.len()).ok()?;
        if count == 0 || count > self.num_free {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = self.desc + 16 * u64::from(i);
            let (_, next) = self.desc_flags_next(i);
            let mut flags = if write { F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            // SAFETY: `i < size`: a free descriptor of this queue's table.
            unsafe {
                mmio_write(d, addr);
                mmio_write(d + 8, len);
                mmio_write(d + 12, flags);
            }
            if k + 1 < bufs.len() {
                i = next;
            } else {
                self.free_head = next;
            }
        }
        self.num_free -= count;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        // SAFETY: the avail ring's entry and index fields.
        unsafe { mmio_write(slot, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { mmio_write(self.avail + 2, self.avail_idx) };
        Some(head)
    }

    /// Tells the device new chains are available (a write to the notify register).
    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        // SAFETY: the notify address of this queue inside the device's BAR.
        unsafe { mmio_write(self.notify, self.index) }
    }

    /// The used ring's index (for waiting).
    pub fn used_idx(&self) -> u16 {
        // SAFETY: the used ring's idx field.
        unsafe { mmio_read(self.used + 2) }
    }

    /// True if the device has returned chains not yet popped.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes one completed chain: (head id, bytes written by the device); frees its
    /// descriptors.
    pub fn pop(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: the used ring's entry.
        let (id, len): (u32, u32) = unsafe { (mmio_read(e), mmio_read(e + 4)) };
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id).ok().filter(|h| *h < self.size)?;
        // Return the chain to the free list.
        let mut i = head;
        let mut count = 1;
        loop {
            let (flags, next) = self.desc_flags_next(i);
            if flags & F_NEXT == 0 || count >= self.size {
                self.set_next(i, self.free_head);
                break;
            }
            i = next;
            count += 1;
        }
        self.free_head = head;
        self.num_free += count;
        Some((head, len))
    }
}
