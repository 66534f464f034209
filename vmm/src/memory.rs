//! Guest RAM: a MAP_SHARED mapping of a file that a second VMM process (live update) and the
//! vhost-user back-ends can map by path.

use std::fs::File;
use std::path::PathBuf;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::config::MemoryConfig;
use crate::layout;
use crate::ram_file::{self, RamFileError};

/// Errors setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The backing file could not be created or opened safely.
    #[error(transparent)]
    File(#[from] RamFileError),
    /// The backing file could not be duplicated for a mapping.
    #[error("cannot open guest RAM file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The filesystem of the backing file has too little room.
    #[error(
        "guest RAM of {want} MiB does not fit: {path} has {free} MiB free (the host does not allow it)"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// MiB asked for.
        want: u64,
        /// MiB free.
        free: u64,
    },
    /// Huge pages asked for but the file is not on hugetlbfs.
    #[error("hugepages=on needs a file on hugetlbfs; {0} is not (mount one on /dev/hugepages)")]
    NotHugetlbfs(PathBuf),
    /// ftruncate or fstatfs failed.
    #[error("cannot size guest RAM file {path}: {source}")]
    Size {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map guest RAM: {0}")]
    Map(#[from] vm_memory::mmap::MmapRegionError),
    /// The regions overlap (a bug in the layout).
    #[error("bad guest memory layout: {0}")]
    Layout(#[from] vm_memory::GuestRegionCollectionError),
}

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Guest RAM and the file behind it. Removes the file on drop if this process created it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped memory.
    pub mem: GuestMemoryMmap,
    /// The backing file's path (what a second VMM maps).
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Whether this process removes the file at exit (it created it, or took the VM over).
    owned: std::sync::atomic::AtomicBool,
}

impl GuestRam {
    /// Creates (or opens, when `path=` names an existing file of ours) and maps guest RAM.
    /// See [`crate::ram_file`] for what is refused.
    pub fn new(cfg: &MemoryConfig, vm_name: &str) -> Result<Self, MemoryError> {
        let ram_file::RamFile {
            file,
            path,
            created,
        } = ram_file::open(cfg.path.as_deref(), vm_name, cfg.hugepages)?;
        // From here on the guard removes a file we created if anything fails.
        let mut ram = GuestRam {
            mem: GuestMemoryMmap::default(),
            path,
            size: cfg.size,
            owned: std::sync::atomic::AtomicBool::new(created),
        };
        ram.check_room(&file, cfg)?;
        let current = file
            .metadata()
            .map_err(|source| ram.size_error(source))?
            .len();
        if current < cfg.size {
            file.set_len(cfg.size)
                .map_err(|source| ram.size_error(source))?;
        }
        ram.mem = map(&file, cfg)?;
        Ok(ram)
    }

    fn size_error(&self, source: std::io::Error) -> MemoryError {
        MemoryError::Size {
            path: self.path.clone(),
            source,
        }
    }

    fn check_room(&self, file: &File, cfg: &MemoryConfig) -> Result<(), MemoryError> {
        let st = nix_statfs(file).map_err(|source| self.size_error(source))?;
        if cfg.hugepages && st.0 != HUGETLBFS_MAGIC {
            return Err(MemoryError::NotHugetlbfs(self.path.clone()));
        }
        let have = file.metadata().map(|m| m.len()).unwrap_or(0);
        let need = cfg.size.saturating_sub(have);
        if need > st.1 {
            return Err(MemoryError::TooLarge {
                path: self.path.clone(),
                want: cfg.size >> 20,
                free: st.1 >> 20,
            });
        }
        Ok(())
    }
}

impl GuestRam {
    /// Removes the backing file if this process created it (the mapping stays valid).
    /// Called when the VM stops, even if other threads still hold references.
    pub fn remove_file(&self) {
        if self.owned.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Sets whether this process removes the file at exit.
    pub fn set_owned(&self, owned: bool) {
        self.owned.store(owned, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        self.remove_file();
    }
}

/// (filesystem magic, bytes available) of the filesystem holding `file`.
fn nix_statfs(file: &File) -> std::io::Result<(i64, u64)> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes a statfs into the buffer we own; the fd is open for the call.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstatfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    Ok((
        st.f_type,
        st.f_bavail
            .saturating_mul(u64::try_from(st.f_bsize).unwrap_or(0)),
    ))
}

fn map(file: &File, cfg: &MemoryConfig) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (gpa, len, offset) in layout::ram_ranges(cfg.size) {
        let fo = FileOffset::new(
            file.try_clone().map_err(|source| MemoryError::Open {
                path: PathBuf::new(),
                source,
            })?,
            offset,
        );
        let len = usize::try_from(len).map_err(|_| MemoryError::TooLarge {
            path: PathBuf::new(),
            want: cfg.size >> 20,
            free: 0,
        })?;
        let region = vm_memory::mmap::MmapRegionBuilder::new(len)
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .with_hugetlbfs(cfg.hugepages)
            .build()?;
        regions.push(region_at(region, gpa)?);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

fn region_at(region: MmapRegion, gpa: u64) -> Result<GuestRegionMmap, MemoryError> {
    GuestRegionMmap::new(region, GuestAddress(gpa)).ok_or(MemoryError::Layout(
        vm_memory::GuestRegionCollectionError::NoMemoryRegion,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ram_is_shared_through_the_file() {
        let dir = std::env::temp_dir().join(format!("baton-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram");
        let cfg = MemoryConfig {
            size: 1 << 20,
            path: Some(path.clone()),
            hugepages: false,
        };
        let a = GuestRam::new(&cfg, "t").unwrap();
        a.mem
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // A second mapping of the same path (as a second VMM would do) sees the write.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let b = map(&file, &cfg).unwrap();
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(b.num_regions(), 1);
        drop(a);
        assert!(!path.exists(), "the creator removes the RAM file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn too_large_is_refused_and_leaves_nothing() {
        let path = std::env::temp_dir().join(format!("baton-mem-big-{}", std::process::id()));
        let cfg = MemoryConfig {
            size: 1 << 50,
            path: Some(path.clone()),
            hugepages: false,
        };
        let err = GuestRam::new(&cfg, "t").unwrap_err();
        assert!(matches!(err, MemoryError::TooLarge { .. }), "{err}");
        assert!(!path.exists());
    }
}
