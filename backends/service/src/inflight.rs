//! The vhost-user inflight region (INFLIGHT_SHMFD), split-virtqueue layout, kept as the spec's
//! "Inflight I/O tracking" section and libvhost-user do: per queue
//! `{features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16,
//! desc[desc_num] {inflight u8, pad[5], next u16, counter u64}}`, each queue's area
//! `align_up(16 * queue_size + 2, 64)` bytes.
//!
//! Per request: `begin(head)` (counter, inflight = 1) when the head is popped, before any I/O;
//! `pre_put(head)` (last_batch_head) before the used-ring update; `post_put(head, used_idx)`
//! (inflight = 0, used_idx) after it.
//!
//! Nothing here depends on the device: a back-end that offers INFLIGHT_SHMFD keeps the region
//! alive as its [`crate::vhost::VhostUserDevice::Inflight`] and tracks each ring with an
//! [`InflightQueue`].

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, VolatileMemory};

/// Errors of the inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the inflight memfd: {0}")]
    Create(#[source] std::io::Error),
    /// mmap failed, or the file does not cover the region.
    #[error("cannot map the inflight region: {0}")]
    Map(#[source] crate::memory::MapError),
    /// The region the front-end gave is too small for its queues.
    #[error("inflight region too small: {size} bytes for {queues} queues of {queue_size}")]
    TooSmall {
        /// Size given.
        size: u64,
        /// Queues.
        queues: u16,
        /// Queue size.
        queue_size: u16,
    },
}

const HDR: usize = 16;
const DESC: usize = 16;

/// Bytes per queue in the region.
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = DESC as u64 * u64::from(queue_size) + 2;
    raw.div_ceil(64) * 64
}

/// How many requests queue `index`'s area of the inflight region in `file` (at `offset`, for
/// queues of `queue_size`) marks inflight. Only reads (pread), so a front-end can check what a
/// back-end recorded without mapping the region or touching it.
pub fn count_inflight(
    file: &File,
    offset: u64,
    queue_size: u16,
    index: u16,
) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let start = offset + queue_region_size(queue_size) * u64::from(index);
    let mut area = vec![0u8; HDR + DESC * usize::from(queue_size)];
    let mut got = 0;
    while got < area.len() {
        match file.read_at(&mut area[got..], start + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(area[..got]
        .get(HDR..)
        .unwrap_or_default()
        .chunks_exact(DESC)
        .filter(|d| d[0] == 1)
        .count())
}

/// A mapped inflight region shared with the front-end.
#[derive(Debug, Clone)]
pub struct InflightRegion {
    map: Arc<MmapRegion<()>>,
    queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Creates a zeroed memfd-backed region (GET_INFLIGHT_FD).
    pub fn create(queues: u16, queue_size: u16) -> Result<(Self, File, u64), InflightError> {
        let size = queue_region_size(queue_size) * u64::from(queues);
        let fd = nix::sys::memfd::memfd_create(
            c"baton-inflight",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(size).map_err(InflightError::Create)?;
        let region = Self::map(
            file.try_clone().map_err(InflightError::Create)?,
            0,
            size,
            queues,
            queue_size,
        )?;
        Ok((region, file, size))
    }

    /// Maps a region given by the front-end (SET_INFLIGHT_FD).
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        if size < queue_region_size(queue_size) * u64::from(queues)
            || queues == 0
            || queue_size == 0
        {
            return Err(InflightError::TooSmall {
                size,
                queues,
                queue_size,
            });
        }
        let map =
            crate::memory::map_file("inflight", file, offset, size).map_err(InflightError::Map)?;
        Ok(Self {
            map: Arc::new(map),
            queues,
            queue_size,
        })
    }

    /// The tracker of queue `index`, initialised (version 1, desc_num) if the area is new.
    pub fn queue(&self, index: u16) -> Option<InflightQueue> {
        if index >= self.queues {
            return None;
        }
        let base = usize::try_from(queue_region_size(self.queue_size) * u64::from(index)).ok()?;
        let mut q = InflightQueue {
            map: self.map.clone(),
            base,
            desc_num: self.queue_size,
            counter: 0,
        };
        if q.get::<u16>(8) == 0 {
            q.set::<u16>(8, 1);
            q.set::<u16>(10, self.queue_size);
        }
        q.counter = (0..self.queue_size)
            .filter(|&i| q.get::<u8>(q.desc(i)) == 1)
            .map(|i| q.get::<u64>(q.desc(i) + 8))
            .max()
            // The counters are the front-end's (a previous back-end's) bytes: never trust them
            // not to be u64::MAX.
            .map_or(0, |c| c.wrapping_add(1));
        Some(q)
    }
}

/// One queue's tracking area.
#[derive(Debug)]
pub struct InflightQueue {
    map: Arc<MmapRegion<()>>,
    base: usize,
    desc_num: u16,
    counter: u64,
}

impl InflightQueue {
    fn desc(&self, head: u16) -> usize {
        HDR + DESC * usize::from(head)
    }

    fn get<T: vm_memory::ByteValued + Default>(&self, off: usize) -> T {
        self.map
            .as_volatile_slice()
            .read_obj(self.base + off)
            .unwrap_or_default()
    }

    fn set<T: vm_memory::ByteValued>(&self, off: usize, v: T) {
        let _ = self.map.as_volatile_slice().write_obj(v, self.base + off);
    }

    fn fence() {
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// A descriptor head was taken from the avail ring: mark it inflight.
    pub fn begin(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let d = self.desc(head);
        self.set::<u64>(d + 8, self.counter);
        self.counter = self.counter.wrapping_add(1);
        Self::fence();
        self.set::<u8>(d, 1);
    }

    /// About to put `head` into the used ring.
    pub fn pre_put(&self, head: u16) {
        if head < self.desc_num {
            self.set::<u16>(12, head);
        }
    }

    /// `head` is in the used ring whose index is now `used_idx`.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            Self::fence();
            self.set::<u8>(self.desc(head), 0);
            Self::fence();
            self.set::<u16>(14, used_idx);
        }
    }

    /// Heads still marked inflight, oldest first.
    pub fn pending(&self) -> Vec<u16> {
        let mut v: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&i| self.get::<u8>(self.desc(i)) == 1)
            .map(|i| (self.get::<u64>(self.desc(i) + 8), i))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// Reconciles the region with the guest's used index (libvhost-user's check): if the
    /// used ring moved past what the region recorded, the last batch head did complete.
    pub fn reconcile(&self, guest_used_idx: u16) {
        if self.get::<u16>(14) != guest_used_idx {
            let h = self.get::<u16>(12);
            if h < self.desc_num {
                self.set::<u8>(self.desc(h), 0);
            }
            self.set::<u16>(14, guest_used_idx);
        }
    }

    #[cfg(test)]
    /// Raw fields for tests: (version, desc_num, last_batch_head, used_idx).
    pub fn header(&self) -> (u16, u16, u16, u16) {
        (self.get(8), self.get(10), self.get(12), self.get(14))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_put_cycle() {
        let (r, _f, size) = InflightRegion::create(2, 8).unwrap();
        assert_eq!(size, 2 * 192);
        let mut q = r.queue(1).unwrap();
        assert_eq!(q.header(), (1, 8, 0, 0));
        q.begin(3);
        q.begin(5);
        assert_eq!(q.pending(), vec![3, 5]);
        q.pre_put(5);
        q.post_put(5, 1);
        assert_eq!(q.pending(), vec![3]);
        assert_eq!(q.header(), (1, 8, 5, 1));
        q.begin(200); // out of range: ignored
        let q2 = r.queue(1).unwrap();
        assert_eq!(q2.pending(), vec![3]);
    }

    /// Found by fuzzing (fuzz target `blk_ring`): a region whose inflight descriptor carries
    /// counter u64::MAX (or u64::MAX - 1) overflowed the next counter, a panic in builds with
    /// overflow checks.
    #[test]
    fn counters_from_the_front_end_do_not_overflow() {
        for last in [u64::MAX, u64::MAX - 1] {
            let (r, f, _) = InflightRegion::create(1, 8).unwrap();
            let mut d = [0u8; 16];
            d[0] = 1; // inflight
            d[8..].copy_from_slice(&last.to_le_bytes());
            std::os::unix::fs::FileExt::write_all_at(&f, &d, 16 + 16 * 2).unwrap();
            let mut q = r.queue(0).unwrap();
            assert_eq!(q.pending(), vec![2]);
            q.begin(4);
            q.begin(5);
            assert_eq!(q.pending().len(), 3);
        }
    }
}
