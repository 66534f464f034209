//! A split virtqueue, driver side.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::memory::SharedMemory;
use super::{DriverError, Result};

/// Descriptor flag: the chain continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: indirect table.
pub const DESC_F_INDIRECT: u16 = 4;

/// A raw split descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags (`DESC_F_*`).
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

impl RawDesc {
    /// Encodes the descriptor (little endian).
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A used-ring element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head id.
    pub id: u16,
    /// Bytes written by the device.
    pub len: u32,
}

/// A split virtqueue in shared memory.
#[derive(Debug)]
pub struct SplitQueue {
    mem: Arc<SharedMemory>,
    /// Queue index.
    pub index: u16,
    size: u16,
    /// Descriptor table address.
    pub desc: GuestAddress,
    /// Avail ring address.
    pub avail: GuestAddress,
    /// Used ring address.
    pub used: GuestAddress,
    avail_idx: u16,
    last_used: u16,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    /// Kick eventfd (driver → device).
    pub kick: EventFd,
    /// Call eventfd (device → driver).
    pub call: EventFd,
}

impl SplitQueue {
    /// Allocates the rings of queue `index` with `size` entries.
    pub fn new(mem: Arc<SharedMemory>, index: u16, size: u16) -> Result<Self> {
        let s = u64::from(size);
        let desc = mem.alloc(16 * s, 4096)?;
        let avail = mem.alloc(6 + 2 * s, 4096)?;
        let used = mem.alloc(6 + 8 * s, 4096)?;
        for a in [desc, avail, used] {
            let len = usize::try_from(16 * s + 16).unwrap_or(0);
            mem.write(a, &vec![0u8; len.min(4096 * 4)])?;
        }
        Ok(Self {
            mem,
            index,
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The shared memory.
    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.mem
    }

    /// Next avail index the driver will publish.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Used index the driver has consumed up to.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Used index as written by the device.
    pub fn device_used_idx(&self) -> u16 {
        self.mem
            .mem()
            .load::<u16>(self.used.unchecked_add(2), Ordering::Acquire)
            .map_or(0, u16::from_le)
    }

    /// Number of chains published and not yet reaped.
    pub fn outstanding(&self) -> usize {
        self.chains.len()
    }

    /// Takes `n` free descriptor indices (for raw chains).
    pub fn alloc_descs(&mut self, n: usize) -> Result<Vec<u16>> {
        if self.free.len() < n {
            return Err(DriverError::Exhausted("descriptors"));
        }
        Ok((0..n).filter_map(|_| self.free.pop()).collect())
    }

    /// Writes descriptor `i` verbatim (anything goes: loops, bad addresses, bad flags).
    pub fn write_desc(&self, i: u16, d: RawDesc) -> Result<()> {
        let a = self.desc.unchecked_add(16 * u64::from(i % self.size));
        self.mem.write(a, &d.to_bytes())
    }

    /// Builds a well-formed chain from `bufs`; returns its head.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> Result<u16> {
        let ids = self.alloc_descs(bufs.len())?;
        for (k, (b, &i)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(k + 1).copied();
            let mut flags = if b.write { DESC_F_WRITE } else { 0 };
            if next.is_some() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(
                i,
                RawDesc {
                    addr: b.addr.0,
                    len: b.len,
                    flags,
                    next: next.unwrap_or(0),
                },
            )?;
        }
        let head = ids
            .first()
            .copied()
            .ok_or(DriverError::Exhausted("descriptors"))?;
        self.chains.insert(head, ids);
        Ok(head)
    }

    /// Records that `descs` (head first) belong to a published raw chain, so that reaping
    /// frees them.
    pub fn track(&mut self, descs: Vec<u16>) {
        if let Some(&h) = descs.first() {
            self.chains.insert(h, descs);
        }
    }

    /// Puts `head` in the avail ring and publishes the new index (no kick).
    pub fn publish(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write(self.avail.unchecked_add(4 + 2 * slot), &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.mem
            .mem()
            .store(
                self.avail_idx.to_le(),
                self.avail.unchecked_add(2),
                Ordering::Release,
            )
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        // used_event (EVENT_IDX): ask for a notification on every completion.
        let ue = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        self.mem.write(ue, &self.last_used.to_le_bytes())?;
        Ok(())
    }

    /// Sets the avail index written in the ring (raw: lets tests lie about it).
    pub fn write_avail_idx_raw(&self, idx: u16) -> Result<()> {
        self.mem
            .write(self.avail.unchecked_add(2), &idx.to_le_bytes())
    }

    /// Notifies the device.
    pub fn kick(&self) -> Result<()> {
        fence(Ordering::SeqCst);
        self.kick.write(1)?;
        Ok(())
    }

    /// Reaps the used ring without waiting.
    pub fn reap(&mut self) -> Vec<Used> {
        let dev = self.device_used_idx();
        let mut out = Vec::new();
        while self.last_used != dev {
            let slot = u64::from(self.last_used % self.size);
            let a = self.used.unchecked_add(4 + 8 * slot);
            let (id, len) = match self.mem.read(a, 8) {
                Ok(b) => (
                    u16::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(u16::MAX),
                    u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                ),
                Err(_) => (u16::MAX, 0),
            };
            if let Some(ds) = self.chains.remove(&id) {
                self.free.extend(ds);
            }
            out.push(Used { id, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        if !out.is_empty() {
            let ue = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
            let _ = self.mem.write(ue, &self.last_used.to_le_bytes());
        }
        out
    }

    /// Waits until at least one used element arrives (or `timeout`), then reaps.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.reap();
            if !got.is_empty() {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout("used ring"));
            }
            let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            // SAFETY: the call eventfd is owned by `self` and outlives this borrow.
            let fd = unsafe { BorrowedFd::borrow_raw(self.call.as_raw_fd()) };
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(ms));
            let _ = self.call.read();
        }
    }
}
