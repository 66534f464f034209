//! Checks on a split ring that a guest controls, made before a worker processes it.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// The guest's avail index claims more entries than the ring holds.
///
/// virtio-queue refuses to iterate such a ring (and logs an error), but its
/// `enable_notification` still reports "more work" because the index differs from ours: a worker
/// that loops on that answer spins forever holding the ring. A ring in this state is broken
/// until the front-end restarts it (the virtio spec's answer is a device reset); the worker
/// must leave it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the guest's avail index {avail} is {ahead} entries ahead of the device's {next} \
     on a ring of {size}: ring ignored until restarted"
)]
pub struct AvailOverrun {
    /// The guest's avail index.
    pub avail: u16,
    /// The device's next avail index.
    pub next: u16,
    /// Entries claimed.
    pub ahead: u16,
    /// Ring size.
    pub size: u16,
}

/// A ring the guest laid out so that the device's writes land on the driver's parts: the used
/// ring overlapping the descriptor table or the avail ring. Every completion then rewrites
/// what the device reads next (with the used ring on the avail ring, each completion moves
/// the avail index one further: a worker never runs out of work).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the guest put the used ring ({used:#x}) over the {other} ({other_addr:#x}) on a ring of \
     {size}: ring ignored until restarted"
)]
pub struct Overlap {
    /// Used ring address.
    pub used: u64,
    /// Which driver part it overlaps.
    pub other: &'static str,
    /// That part's address.
    pub other_addr: u64,
    /// Ring size.
    pub size: u16,
}

/// Why a worker must leave a ring alone until the front-end restarts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// See [`AvailOverrun`].
    #[error(transparent)]
    Overrun(#[from] AvailOverrun),
    /// See [`Overlap`].
    #[error(transparent)]
    Overlap(#[from] Overlap),
    /// A part of the ring is not (or no longer, after a new memory table) inside guest memory:
    /// an avail entry that cannot be read ends virtio-queue's iteration without consuming it,
    /// while `enable_notification` keeps reporting it.
    #[error("a part of the ring lies outside guest memory: ring ignored until restarted")]
    OutsideMemory,
}

/// Fails if the used ring overlaps the descriptor table or the avail ring.
pub fn check_layout(queue: &Queue) -> Result<(), Overlap> {
    let size = u64::from(queue.size());
    let span = |start: u64, len: u64| (start, start.saturating_add(len));
    let used = span(queue.used_ring(), 6 + 8 * size);
    for (other, part) in [
        ("descriptor table", span(queue.desc_table(), 16 * size)),
        ("avail ring", span(queue.avail_ring(), 6 + 2 * size)),
    ] {
        if used.0 < part.1 && part.0 < used.1 {
            return Err(Overlap {
                used: used.0,
                other,
                other_addr: part.0,
                size: queue.size(),
            });
        }
    }
    Ok(())
}

/// [`check_layout`], the ring inside guest memory, and [`check_avail`]: what a worker checks
/// before each pass over a ring.
pub fn check<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<(), RingError> {
    check_layout(queue)?;
    if !queue.is_valid(mem) {
        return Err(RingError::OutsideMemory);
    }
    check_avail(queue, mem)?;
    Ok(())
}

/// Fails if the guest's avail index is more than the ring size ahead of the device. An
/// unreadable avail ring is left to virtio-queue's own checks (it fails the iteration).
pub fn check_avail<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<(), AvailOverrun> {
    let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) else {
        return Ok(());
    };
    let next = queue.next_avail();
    let ahead = avail.0.wrapping_sub(next);
    if ahead > queue.size() {
        return Err(AvailOverrun {
            avail: avail.0,
            next,
            ahead,
            size: queue.size(),
        });
    }
    Ok(())
}

/// Whether the guest's avail index is past the device's: chains wait to be taken (a look for
/// a polling worker; an unreadable avail ring counts as nothing pending).
pub fn has_pending<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    let next = queue.next_avail();
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|i| i.0 != next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn an_avail_index_past_the_ring_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        q.set_next_avail(65530);
        for (idx, ok) in [(65530u16, true), (10, true), (11, false), (65529, false)] {
            mem.write_obj(idx.to_le(), GuestAddress(0x2002)).unwrap();
            assert_eq!(check_avail(&q, &mem).is_ok(), ok, "avail {idx}");
        }
    }

    #[test]
    fn a_used_ring_over_the_driver_parts_is_refused() {
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        assert!(check_layout(&q).is_ok());
        // Used ring (6 + 8 * 16 bytes) ending inside the avail ring, or on it, or on the table.
        for used in [0x2000 - 0x80, 0x2000, 0x1000 + 0xf0] {
            q.set_used_ring_address(Some(used), Some(0));
            assert!(check_layout(&q).is_err(), "used at {used:#x}");
        }
        // Just past the avail ring (6 + 2 * 16 = 38 bytes, aligned to 4).
        q.set_used_ring_address(Some(0x2028), Some(0));
        assert!(check_layout(&q).is_ok());
    }
}
