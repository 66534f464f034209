//! Shared "guest" memory: one memfd region at guest physical address 0.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::{DriverError, Result};

/// Shared memory with a bump allocator.
#[derive(Debug)]
pub struct SharedMemory {
    mem: GuestMemoryMmap,
    file: File,
    size: u64,
    next: AtomicU64,
}

impl SharedMemory {
    /// Creates `size` bytes of memfd-backed memory.
    pub fn new(size: u64) -> Result<Self> {
        let fd =
            nix::sys::memfd::memfd_create(c"baton-vu-mem", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| DriverError::Io(e.into()))?;
        let file = File::from(fd);
        file.set_len(size)?;
        let len = usize::try_from(size).map_err(|e| DriverError::Memory(e.to_string()))?;
        let fo = FileOffset::new(file.try_clone()?, 0);
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, Some(fo))])
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        Ok(Self {
            mem,
            file,
            size,
            next: AtomicU64::new(4096),
        })
    }

    /// The memory, for `Bytes` reads and writes at guest addresses.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd itself (hostile tests shrink it under the back-end).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The memfd (sent with SET_MEM_TABLE).
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Host virtual address of guest address 0 (the "userspace_addr" of the region).
    pub fn host_base(&self) -> u64 {
        self.mem
            .find_region(GuestAddress(0))
            .and_then(|r| r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok())
            .map_or(0, |p| p as u64)
    }

    /// Host virtual address of a guest address.
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.host_base() + gpa
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&self, len: u64, align: u64) -> Result<GuestAddress> {
        loop {
            let cur = self.next.load(Ordering::SeqCst);
            let start = cur.div_ceil(align) * align;
            let end = start
                .checked_add(len)
                .ok_or(DriverError::Exhausted("shared memory"))?;
            if end > self.size {
                return Err(DriverError::Exhausted("shared memory"));
            }
            if self
                .next
                .compare_exchange(cur, end, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Ok(GuestAddress(start));
            }
        }
    }

    /// Writes bytes at a guest address.
    pub fn write(&self, addr: GuestAddress, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, addr)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    /// Reads bytes at a guest address.
    pub fn read(&self, addr: GuestAddress, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, addr)
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        Ok(v)
    }
}
