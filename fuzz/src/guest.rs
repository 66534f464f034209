//! Synthetic guest memory and split rings laid out from fuzz input.
//!
//! Guest memory is two regions with a 4 KiB hole between them, so that buffers crossing a region
//! edge or falling in the hole are reachable: [`RAM0`] (64 KiB, its contents from the input: the
//! descriptor table, the rings, indirect tables and request headers all live here) and [`RAM1`]
//! (64 KiB of zeros, room for data buffers). A [`RingLayout`] (9 input bytes) places one split
//! ring inside `RAM0`, always at legal alignments so that most inputs get past the queue's own
//! checks; the avail index is whatever the input put at `avail + 2`.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::input::Input;

/// Guest memory as the back-ends see it.
pub type Mem = GuestMemoryMmap<()>;

/// First region: contents from the input.
pub const RAM0: u64 = 0;
/// Size of the first region.
pub const RAM0_LEN: usize = 0x1_0000;
/// Second region, after a 4 KiB hole.
pub const RAM1: u64 = 0x1_1000;
/// Size of the second region.
pub const RAM1_LEN: usize = 0x1_0000;

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: an indirect table.
pub const F_INDIRECT: u16 = 4;

/// The two regions, `RAM0` starting with `image`.
pub fn memory(image: &[u8]) -> Mem {
    let mem = Mem::from_ranges(&[
        (GuestAddress(RAM0), RAM0_LEN),
        (GuestAddress(RAM1), RAM1_LEN),
    ])
    .expect("anonymous guest memory");
    let n = image.len().min(RAM0_LEN);
    mem.write_slice(&image[..n], GuestAddress(RAM0))
        .expect("image fits RAM0");
    mem
}

/// Guest memory after a front-end's new memory table that keeps only the first `len` bytes of
/// `RAM0` (same contents).
pub fn shrunk(mem: &Mem, len: usize) -> Mem {
    let small = Mem::from_ranges(&[(GuestAddress(RAM0), len)]).expect("anonymous guest memory");
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(RAM0))
        .expect("RAM0 contents");
    small.write_slice(&buf, GuestAddress(RAM0)).expect("fits");
    small
}

/// Host address ranges `[start, end)` of the regions of `mem`.
pub fn host_ranges(mem: &Mem) -> Vec<(usize, usize)> {
    mem.iter()
        .filter_map(|r| {
            let start = mem.get_host_address(r.start_addr()).ok()? as usize;
            Some((start, start + usize::try_from(r.len()).ok()?))
        })
        .collect()
}

/// Whether `[ptr, ptr + len)` lies inside one region.
pub fn inside(ranges: &[(usize, usize)], ptr: usize, len: usize) -> bool {
    len == 0
        || ranges
            .iter()
            .any(|&(s, e)| ptr >= s && ptr.checked_add(len).is_some_and(|end| end <= e))
}

/// Where one split ring sits in `RAM0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size (a power of two).
    pub size: u16,
    /// Descriptor table (16-byte aligned).
    pub desc: u64,
    /// Avail ring (2-byte aligned).
    pub avail: u64,
    /// Used ring (4-byte aligned).
    pub used: u64,
    /// The device's next avail index (SET_VRING_BASE).
    pub next_avail: u16,
}

impl RingLayout {
    /// Bytes of input a layout takes.
    pub const LEN: usize = 9;

    /// Reads a layout; the size is capped at `max`.
    pub fn read(inp: &mut Input<'_>, max: u16) -> Self {
        let size = (1u16 << (inp.u8() % 16)).min(max);
        RingLayout {
            size,
            desc: u64::from(inp.u16() & 0x0fff) * 16,
            avail: u64::from(inp.u16() & 0x7fff) * 2,
            used: u64::from(inp.u16() & 0x3fff) * 4,
            next_avail: inp.u16(),
        }
    }

    /// The bytes [`RingLayout::read`] turns into this layout (for seeds).
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = vec![u8::try_from(self.size.trailing_zeros()).unwrap_or(0)];
        for v in [
            self.desc / 16,
            self.avail / 2,
            self.used / 4,
            u64::from(self.next_avail),
        ] {
            b.extend_from_slice(&u16::try_from(v).unwrap_or(0).to_le_bytes());
        }
        b
    }

    /// Programs `q` with this layout (size, addresses, next avail) and marks it ready.
    /// Returns false if virtio-queue refuses a value.
    pub fn program(&self, q: &mut Queue) -> bool {
        let ok = q.try_set_size(self.size).is_ok()
            && q.try_set_desc_table_address(GuestAddress(self.desc))
                .is_ok()
            && q.try_set_avail_ring_address(GuestAddress(self.avail))
                .is_ok()
            && q.try_set_used_ring_address(GuestAddress(self.used)).is_ok();
        q.set_next_avail(self.next_avail);
        q.set_ready(ok);
        ok
    }

    /// A fresh queue (maximum size `max`) programmed with this layout.
    pub fn queue(&self, max: u16) -> Option<Queue> {
        let mut q = Queue::new(max).ok()?;
        self.program(&mut q).then_some(q)
    }
}

/// A `RAM0` image under construction, for seeds.
#[derive(Debug, Clone)]
pub struct Image {
    bytes: Vec<u8>,
}

impl Default for Image {
    fn default() -> Self {
        Self::new()
    }
}

impl Image {
    /// All zeros.
    pub fn new() -> Self {
        Image {
            bytes: vec![0; RAM0_LEN],
        }
    }

    /// Writes `data` at guest address `gpa` (inside `RAM0`).
    pub fn put(&mut self, gpa: u64, data: &[u8]) {
        let at = usize::try_from(gpa).expect("gpa");
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(i), &d);
    }

    /// Writes the avail ring at `avail`: flags, index `idx`, and `heads` from slot `first`.
    pub fn avail(&mut self, ring: &RingLayout, idx: u16, first: u16, heads: &[u16]) {
        self.put(ring.avail, &0u16.to_le_bytes());
        self.put(ring.avail + 2, &idx.to_le_bytes());
        for (k, h) in heads.iter().enumerate() {
            let slot = (usize::from(first) + k) % usize::from(ring.size);
            self.put(ring.avail + 4 + 2 * slot as u64, &h.to_le_bytes());
        }
    }

    /// The image without its trailing zeros (the target zero-fills the rest).
    pub fn trimmed(&self) -> Vec<u8> {
        let end = self
            .bytes
            .iter()
            .rposition(|b| *b != 0)
            .map_or(0, |i| i + 1);
        self.bytes[..end].to_vec()
    }
}
