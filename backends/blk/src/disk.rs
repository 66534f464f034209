//! The disk image: opening it, its size, and vectored I/O on host addresses that point into
//! guest memory. This is the only module that hands guest-memory pointers to the kernel.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{FallocateFlags, fallocate};

/// statfs f_type of ramfs (not exported by libc or nix).
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// Errors from opening the image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened.
    #[error("cannot open image {path}: {source}")]
    Open {
        /// Image path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image is neither a regular file nor a block device.
    #[error("image {0} is neither a regular file nor a block device")]
    NotADisk(String),
    /// The image size could not be read.
    #[error("cannot read the size of image {path}: {source}")]
    Size {
        /// Image path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// One guest buffer, as a host address and a length (an `iovec`).
pub type IoVec = libc::iovec;

/// Whether the io_uring engine may run a read or write inline on the queue thread instead of
/// submitting it to the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inline {
    /// Memory-backed file system (tmpfs, ramfs): I/O never waits for a device, and io_uring
    /// would hand every such request to one of its kernel worker threads (these file systems do
    /// not support non-blocking I/O), so running it inline saves two context switches.
    Always,
    /// Reads that hit the page cache are served inline (`preadv2(RWF_NOWAIT)`); the others,
    /// and all writes, go to the ring.
    ReadsNoWait,
    /// O_DIRECT, or no RWF_NOWAIT support: everything goes to the ring.
    Never,
}

/// An open raw image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    size: u64,
    readonly: bool,
    is_block_device: bool,
    inline: Inline,
    /// On FUSE: a request issued from the queue thread may block it for the whole request
    /// (the file system does not honour non-blocking I/O), so every one goes to io_uring's
    /// workers (IOSQE_ASYNC) and none runs inline.
    punt: bool,
}

/// `statfs` type of a FUSE file system.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

impl Disk {
    /// Opens `path` (read-only if `readonly`, with O_DIRECT if `direct`).
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self, DiskError> {
        let name = path.display().to_string();
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|source| DiskError::Open {
            path: name.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| DiskError::Size {
            path: name.clone(),
            source,
        })?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(DiskError::NotADisk(name));
        }
        let size = if is_block_device {
            use std::io::Seek;
            (&file)
                .seek(io::SeekFrom::End(0))
                .map_err(|source| DiskError::Size { path: name, source })?
        } else {
            meta.len()
        };
        let mut disk = Self {
            file,
            size,
            readonly,
            is_block_device,
            inline: Inline::Never,
            punt: false,
        };
        disk.punt = nix::sys::statfs::fstatfs(&disk.file)
            .is_ok_and(|st| st.filesystem_type().0 == FUSE_SUPER_MAGIC);
        disk.inline = if direct || disk.punt {
            Inline::Never
        } else {
            disk.probe_inline()
        };
        Ok(disk)
    }

    fn probe_inline(&self) -> Inline {
        if let Ok(st) = nix::sys::statfs::fstatfs(&self.file) {
            let t = st.filesystem_type();
            if t == nix::sys::statfs::TMPFS_MAGIC || t.0 == RAMFS_MAGIC {
                return Inline::Always;
            }
        }
        if self.size < 512 {
            return Inline::Never;
        }
        let mut buf = [0u8; 512];
        let iov = [IoVec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        match self.nowait(&iov, 0, false) {
            Ok(_) => Inline::ReadsNoWait,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Inline::ReadsNoWait,
            Err(_) => Inline::Never,
        }
    }

    /// Whether every request must go to io_uring's workers (see the field).
    pub fn punt(&self) -> bool {
        self.punt
    }

    /// What the io_uring engine may run inline.
    pub fn inline(&self) -> Inline {
        self.inline
    }

    /// One `preadv2`/`pwritev2` with RWF_NOWAIT: returns the bytes transferred.
    pub fn nowait(&self, iovs: &[IoVec], offset: u64, write: bool) -> io::Result<usize> {
        let cnt =
            i32::try_from(iovs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let off = to_off(offset)?;
        // SAFETY: the iovecs point to memory the caller keeps mapped for the call (guest memory
        // held through the memory map's Arc, or a local buffer); `cnt` is their number.
        let n = unsafe {
            if write {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    iovs.as_ptr(),
                    cnt,
                    off,
                    libc::RWF_NOWAIT,
                )
            } else {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    iovs.as_ptr(),
                    cnt,
                    off,
                    libc::RWF_NOWAIT,
                )
            }
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the disk is exposed read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether the image is a block device.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// The image's file descriptor (for io_uring).
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Reads `offset..` into the buffers, retrying short reads.
    pub fn read_at(&self, iovs: &[IoVec], offset: u64) -> io::Result<()> {
        self.vectored(iovs, offset, false)
    }

    /// Writes the buffers at `offset..`, retrying short writes.
    pub fn write_at(&self, iovs: &[IoVec], offset: u64) -> io::Result<()> {
        self.vectored(iovs, offset, true)
    }

    fn vectored(&self, iovs: &[IoVec], mut offset: u64, write: bool) -> io::Result<()> {
        let mut v: Vec<IoVec> = iovs.iter().filter(|i| i.iov_len > 0).copied().collect();
        let mut start = 0usize;
        while start < v.len() {
            let rest = v.get(start..).unwrap_or_default();
            let cnt = i32::try_from(rest.len().min(1024)).unwrap_or(1024);
            let off =
                i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: every iovec was built from a guest-memory slice that the caller keeps mapped
            // (it holds the memory map's Arc) for the duration of this call; `rest` has at least
            // `cnt` elements. The guest may race on the contents, which is its own problem.
            let n = unsafe {
                if write {
                    libc::pwritev(self.file.as_raw_fd(), rest.as_ptr(), cnt, off)
                } else {
                    libc::preadv(self.file.as_raw_fd(), rest.as_ptr(), cnt, off)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let mut n = usize::try_from(n).unwrap_or(0);
            offset += n as u64;
            while n > 0 {
                let Some(cur) = v.get_mut(start) else { break };
                if n >= cur.iov_len {
                    n -= cur.iov_len;
                    start += 1;
                } else {
                    // SAFETY: advancing within the same buffer, n < iov_len.
                    cur.iov_base = unsafe { cur.iov_base.cast::<u8>().add(n) }.cast();
                    cur.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// fdatasync.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `offset..offset+len` (best effort: unsupported is not an error).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.punch(offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(&self.file, flags, to_off(offset)?, to_off(len)?).map_err(io::Error::from)
    }

    /// Zeroes `offset..offset+len`; with `unmap` the range may be deallocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap && self.punch(offset, len).is_ok() {
            return Ok(());
        }
        let flags = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if fallocate(&self.file, flags, to_off(offset)?, to_off(len)?).is_ok() {
            return Ok(());
        }
        // Fallback: write zeroes (aligned buffer, so that O_DIRECT works too).
        const CHUNK: usize = 1 << 20;
        let layout = std::alloc::Layout::from_size_align(CHUNK, 4096)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let buf = AlignedZeroes::new(layout)?;
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let iov = IoVec {
                iov_base: buf.ptr.cast(),
                iov_len: n,
            };
            self.write_at(&[iov], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn to_off(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

struct AlignedZeroes {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedZeroes {
    fn new(layout: std::alloc::Layout) -> io::Result<Self> {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Self { ptr, layout })
    }
}

impl Drop for AlignedZeroes {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

#[cfg(test)]
impl Disk {
    /// A disk of `size` bytes on `file`, say a pipe whose reads wait until the test writes:
    /// requests that complete when the test says so. Everything goes to the ring.
    pub(crate) fn on(file: File, size: u64) -> Self {
        Self {
            file,
            size,
            readonly: false,
            is_block_device: false,
            inline: Inline::Never,
            punt: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_roundtrip_and_zeroes() {
        let dir = std::env::temp_dir().join(format!("baton-blk-disk-{}", std::process::id()));
        std::fs::write(&dir, vec![7u8; 8192]).unwrap();
        let d = Disk::open(&dir, false, false).unwrap();
        assert_eq!(d.size(), 8192);
        let mut a = vec![1u8; 100];
        let mut b = vec![2u8; 412];
        let iovs = [
            IoVec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            IoVec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        d.write_at(&iovs, 512).unwrap();
        d.write_zeroes(4096, 4096, false).unwrap();
        let data = std::fs::read(&dir).unwrap();
        assert!(data[512..612].iter().all(|&x| x == 1));
        assert!(data[612..1024].iter().all(|&x| x == 2));
        assert!(data[4096..].iter().all(|&x| x == 0));
        let mut c = vec![0u8; 512];
        let iov = [IoVec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: 512,
        }];
        d.read_at(&iov, 0).unwrap();
        assert!(c.iter().all(|&x| x == 7));
        std::fs::remove_file(&dir).unwrap();
    }
}
