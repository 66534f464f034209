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
}
