//! Memory a front-end shares by fd (the guest memory table, the inflight region), mapped so
//! that a hostile front-end cannot kill the back-end with it.
//!
//! Two ways a shared file kills a process that maps it: it is shorter than the size the
//! front-end declares (every access past its end raises SIGBUS), or it is truncated after the
//! mapping was made. The first is refused at map time ([`map_file`] checks `fstat`). The second
//! cannot be refused — the file is the front-end's — so every mapping is registered with a
//! SIGBUS handler ([`guard`]) that replaces the vanished page with a private zero page and
//! counts the fault: the access completes (reads see zeros, writes go nowhere the front-end can
//! see), the back-end keeps running and [`report_faults`] logs it. No crate does this; the
//! handler is a few lines of async-signal-safe code.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Why a shared region was not mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// fstat or fstatfs on the front-end's fd failed.
    #[error("cannot inspect the {what} fd: {source}")]
    Stat {
        /// Which region.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (memfd, tmpfs or hugetlbfs file).
    #[error("the {what} fd is not a regular file or memfd")]
    NotAFile {
        /// Which region.
        what: &'static str,
    },
    /// The file ends before the declared region does: any access past its end would SIGBUS.
    #[error(
        "the {what} file is {file_size} bytes, shorter than the declared region \
         (offset {offset} + size {size})"
    )]
    TooShort {
        /// Which region.
        what: &'static str,
        /// The file's size.
        file_size: u64,
        /// Declared offset into the file.
        offset: u64,
        /// Declared size.
        size: u64,
    },
    /// Zero-sized, or offset + size overflows.
    #[error("the {what} region has a bad size or offset (offset {offset}, size {size})")]
    BadRange {
        /// Which region.
        what: &'static str,
        /// Declared offset.
        offset: u64,
        /// Declared size.
        size: u64,
    },
    /// mmap failed.
    #[error("cannot map the {what} region: {reason}")]
    Map {
        /// Which region.
        what: &'static str,
        /// vm-memory's reason.
        reason: String,
    },
    /// The regions overlap or wrap around the guest address space.
    #[error("bad guest memory table: {0}")]
    Table(String),
}

/// Maps `size` bytes of `file` from `offset`, shared, after checking that the file covers them,
/// and registers the mapping with the SIGBUS guard. `what` names the region in errors.
pub fn map_file(
    what: &'static str,
    file: File,
    offset: u64,
    size: u64,
) -> Result<MmapRegion<()>, MapError> {
    let end = offset
        .checked_add(size)
        .filter(|_| size > 0)
        .ok_or(MapError::BadRange { what, offset, size })?;
    let meta = file
        .metadata()
        .map_err(|source| MapError::Stat { what, source })?;
    if !meta.file_type().is_file() {
        return Err(MapError::NotAFile { what });
    }
    if meta.len() < end {
        return Err(MapError::TooShort {
            what,
            file_size: meta.len(),
            offset,
            size,
        });
    }
    let page = page_size(&file).map_err(|source| MapError::Stat { what, source })?;
    let len = usize::try_from(size).map_err(|_| MapError::BadRange { what, offset, size })?;
    let region = MmapRegion::<()>::from_file(FileOffset::new(file, offset), len).map_err(|e| {
        MapError::Map {
            what,
            reason: e.to_string(),
        }
    })?;
    guard::register(region.as_ptr() as usize, len, page);
    Ok(region)
}

/// Page size of the file system the file lives on (hugetlbfs pages are larger).
fn page_size(file: &File) -> std::io::Result<usize> {
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes a statfs into the buffer we own; the fd is open.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    let huge = st.f_type as i64 == HUGETLBFS_MAGIC;
    Ok(if huge {
        usize::try_from(st.f_bsize).unwrap_or(4096).max(4096)
    } else {
        4096
    })
}

/// Where one guest memory region lives in the front-end's address space (for translating the
/// ring addresses of SET_VRING_ADDR, which are front-end virtual addresses).
#[derive(Debug, Clone, Copy)]
pub struct Mapping {
    /// Front-end virtual address.
    pub va: u64,
    /// Size in bytes.
    pub size: u64,
    /// Guest physical address.
    pub gpa: u64,
}

/// A guest memory table from SET_MEM_TABLE: every region checked against its file and guarded.
#[derive(Debug)]
pub struct MemoryTable {
    /// The guest memory.
    pub mem: GuestMemoryMmap,
    /// The front-end's view of each region.
    pub mappings: Vec<Mapping>,
}

impl MemoryTable {
    /// Maps the regions of a SET_MEM_TABLE message with their fds.
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Self, MapError> {
        if regions.len() != files.len() {
            return Err(MapError::Table(format!(
                "{} regions but {} fds",
                regions.len(),
                files.len()
            )));
        }
        let mut mapped = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        for (r, file) in regions.iter().zip(files) {
            let map = map_file("guest memory", file, r.mmap_offset, r.memory_size)?;
            let region = GuestRegionMmap::new(map, GuestAddress(r.guest_phys_addr))
                .ok_or_else(|| MapError::Table("a region wraps around".into()))?;
            mapped.push(region);
            mappings.push(Mapping {
                va: r.user_addr,
                size: r.memory_size,
                gpa: r.guest_phys_addr,
            });
        }
        let mem =
            GuestMemoryMmap::from_regions(mapped).map_err(|e| MapError::Table(e.to_string()))?;
        Ok(Self { mem, mappings })
    }

    /// The guest address of front-end virtual address `va`.
    pub fn gpa(&self, va: u64) -> Option<GuestAddress> {
        self.mappings
            .iter()
            .find(|m| va >= m.va && va - m.va < m.size)
            .map(|m| GuestAddress(m.gpa + (va - m.va)))
    }
}

/// Logs (once per new fault) that a front-end shrank a shared file under our mapping. Cheap:
/// call it from the workers' loops.
pub fn report_faults() {
    static REPORTED: AtomicU64 = AtomicU64::new(0);
    let n = guard::faults();
    if n != REPORTED.swap(n, Ordering::Relaxed) {
        tracing::warn!(
            faults = n,
            "a front-end truncated shared memory under a mapping: the lost pages read as zeros"
        );
    }
}

/// The SIGBUS handler for shared mappings.
///
/// Mappings are recorded in a fixed table of atomics (the handler may not allocate or lock).
/// Slots are reused round-robin and never cleared: a stale slot only names address space that
/// is either unmapped or mapped anew by a later registration, and anonymous memory does not
/// raise SIGBUS, so a stale slot cannot make the handler swallow a fault it should not.
pub mod guard {
    use super::*;

    const SLOTS: usize = 64;
    static START: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static LEN: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static PAGE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(4096) }; SLOTS];
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    static FAULTS: AtomicU64 = AtomicU64::new(0);
    static INSTALL: std::sync::Once = std::sync::Once::new();

    /// Installs the SIGBUS handler now (otherwise the first [`register`] does): a sandboxed
    /// service does it before its seccomp filters, which allow `rt_sigaction` only for the
    /// handler's reset to the default action.
    pub fn install() {
        INSTALL.call_once(install_handler);
    }

    /// Records `[start, start + len)` (pages of `page` bytes) as a guarded mapping.
    pub fn register(start: usize, len: usize, page: usize) {
        install();
        let i = NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS;
        if let (Some(s), Some(l), Some(p)) = (START.get(i), LEN.get(i), PAGE.get(i)) {
            l.store(0, Ordering::Release);
            s.store(start, Ordering::Relaxed);
            p.store(page, Ordering::Relaxed);
            l.store(len, Ordering::Release);
        }
    }

    /// SIGBUS faults absorbed so far.
    pub fn faults() -> u64 {
        FAULTS.load(Ordering::Relaxed)
    }

    fn install_handler() {
        // SAFETY: a zeroed sigaction is valid; we set the handler and flags before use.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sa_mask is a valid sigset inside `sa`.
        unsafe { libc::sigemptyset(&raw mut sa.sa_mask) };
        // SAFETY: installs a handler that only uses async-signal-safe operations.
        if unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) } != 0 {
            tracing::warn!(
                "cannot install the SIGBUS guard: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Async-signal-safe: atomics and mmap only.
    extern "C" fn on_sigbus(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as usize;
        for i in 0..SLOTS {
            let (Some(s), Some(l), Some(p)) = (START.get(i), LEN.get(i), PAGE.get(i)) else {
                break;
            };
            let len = l.load(Ordering::Acquire);
            let start = s.load(Ordering::Relaxed);
            if len == 0 || addr < start || addr - start >= len {
                continue;
            }
            let page = p.load(Ordering::Relaxed).max(4096);
            let base = addr & !(page - 1);
            // SAFETY: replaces the faulting page of a mapping we own (registered above) with a
            // private anonymous one; nothing else refers to that page's old contents.
            let r = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                FAULTS.fetch_add(1, Ordering::Relaxed);
                return;
            }
            break;
        }
        // Not one of ours (or the remap failed): the default action, as if we had no handler.
        // SAFETY: resetting a signal disposition is async-signal-safe; returning re-executes
        // the faulting access, which then terminates the process as an unhandled SIGBUS does.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn memfd(len: u64) -> File {
        let fd =
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let f = File::from(fd);
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn refuses_a_file_shorter_than_the_region() {
        let e = map_file("guest memory", memfd(4096), 0, 8192);
        assert!(
            matches!(
                e,
                Err(MapError::TooShort {
                    file_size: 4096,
                    ..
                })
            ),
            "{e:?}"
        );
        let e = map_file("guest memory", memfd(8192), 4096, 8192);
        assert!(matches!(e, Err(MapError::TooShort { .. })), "{e:?}");
        let e = map_file("guest memory", memfd(8192), u64::MAX, 2);
        assert!(matches!(e, Err(MapError::BadRange { .. })), "{e:?}");
        let e = map_file("guest memory", memfd(8192), 0, 0);
        assert!(matches!(e, Err(MapError::BadRange { .. })), "{e:?}");
        assert!(map_file("guest memory", memfd(8192), 4096, 4096).is_ok());
    }

    #[test]
    fn a_file_truncated_under_the_mapping_reads_zeros_instead_of_killing_us() {
        let f = memfd(4 * 4096);
        let region = map_file("guest memory", f.try_clone().unwrap(), 0, 4 * 4096).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![
            GuestRegionMmap::new(region, GuestAddress(0)).unwrap(),
        ])
        .unwrap();
        mem.write_obj(0xabu8, GuestAddress(3 * 4096)).unwrap();
        f.set_len(4096).unwrap();
        let before = guard::faults();
        let v: u8 = mem.read_obj(GuestAddress(3 * 4096 + 1)).unwrap();
        assert_eq!(v, 0);
        mem.write_obj(7u8, GuestAddress(2 * 4096)).unwrap();
        assert!(guard::faults() >= before + 2);
        // The page still inside the file is the shared one.
        mem.write_obj(5u8, GuestAddress(0)).unwrap();
        assert!(mem.find_region(GuestAddress(0)).is_some());
    }
}
