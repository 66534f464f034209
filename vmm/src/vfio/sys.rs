//! The VFIO calls baton makes (legacy Type1 container and groups), written by hand over
//! vfio-bindings' structures: vfio-ioctls opens a device only through its sysfs path and keeps
//! the group fd to itself, so it can neither hand a device's fds to another VMM nor rebuild a
//! device from fds received over the cpr channel, and it has no `VFIO_DMA_*_FLAG_VADDR`
//! calls, which a live update needs to swap the process behind the DMA mappings without
//! tearing them down. The ioctl numbers are the seccomp table's ([`crate::sandbox::ioctls`]).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_DEVICE_FLAGS_RESET, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_VADDR, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_TYPE1v2_IOMMU, VFIO_UPDATE_VADDR, vfio_device_info,
    vfio_group_status, vfio_iommu_type1_dma_map, vfio_region_info,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val};

use crate::sandbox::ioctls::{
    VFIO_CHECK_EXTENSION, VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_RESET,
    VFIO_DEVICE_SET_IRQS, VFIO_GET_API_VERSION, VFIO_GROUP_GET_DEVICE_FD, VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER, VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA, VFIO_SET_IOMMU,
};

/// A failed VFIO call: which one, and errno.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct SysError {
    /// The call (ioctl name or file).
    pub call: &'static str,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

fn check(call: &'static str, ret: i32) -> Result<i32, SysError> {
    if ret < 0 {
        Err(SysError {
            call,
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(ret)
    }
}

fn argsz<T>() -> u32 {
    u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
}

/// A Type1 container (`/dev/vfio/vfio`).
#[derive(Debug)]
pub struct Container(File);

impl Container {
    /// Opens a new container and checks the API version and Type1v2 support.
    pub fn open() -> Result<Self, SysError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")
            .map_err(|source| SysError {
                call: "open /dev/vfio/vfio",
                source,
            })?;
        let c = Container(f);
        // SAFETY: an ioctl without argument on a container fd we own.
        let v = check("VFIO_GET_API_VERSION", unsafe {
            vmm_sys_util::ioctl::ioctl(&c.0, VFIO_GET_API_VERSION)
        })?;
        if u32::try_from(v).ok() != Some(VFIO_API_VERSION) || !c.has_extension(VFIO_TYPE1v2_IOMMU) {
            return Err(SysError {
                call: "VFIO_CHECK_EXTENSION (Type1v2)",
                source: std::io::Error::from_raw_os_error(libc::ENOTSUP),
            });
        }
        Ok(c)
    }

    /// A container another VMM opened and set up.
    pub fn adopt(fd: OwnedFd) -> Self {
        Container(File::from(fd))
    }

    fn has_extension(&self, ext: u32) -> bool {
        // SAFETY: VFIO_CHECK_EXTENSION takes the extension by value and writes nothing.
        let r = unsafe { ioctl_with_val(&self.0, VFIO_CHECK_EXTENSION, ext.into()) };
        r > 0
    }

    /// Whether DMA mappings can change hands (`VFIO_UPDATE_VADDR`), as a live update needs.
    pub fn can_update_vaddr(&self) -> bool {
        self.has_extension(VFIO_UPDATE_VADDR)
    }

    /// Selects the Type1v2 IOMMU (after the first group joined).
    pub fn set_iommu(&self) -> Result<(), SysError> {
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        check("VFIO_SET_IOMMU", unsafe {
            ioctl_with_val(&self.0, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU.into())
        })
        .map(drop)
    }

    fn dma_map(&self, flags: u32, iova: u64, size: u64, vaddr: u64) -> Result<(), SysError> {
        let m = vfio_iommu_type1_dma_map {
            argsz: argsz::<vfio_iommu_type1_dma_map>(),
            flags,
            vaddr,
            iova,
            size,
        };
        // SAFETY: the kernel reads `m`, which lives across the call.
        check("VFIO_IOMMU_MAP_DMA", unsafe {
            ioctl_with_ref(&self.0, VFIO_IOMMU_MAP_DMA, &m)
        })
        .map(drop)
    }

    /// Maps `size` bytes at `host` for DMA at `iova`.
    ///
    /// # Safety
    /// `host..host + size` must stay a mapping of memory the guest and the device share, not
    /// reached through Rust references, until the container is closed or the mapping's
    /// address is invalidated ([`Container::invalidate_vaddr`]).
    pub unsafe fn map(&self, iova: u64, size: u64, host: u64) -> Result<(), SysError> {
        self.dma_map(
            VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            iova,
            size,
            host,
        )
    }

    /// Gives the existing mapping at `iova..iova + size` a new process address `host` for the
    /// same memory (`VFIO_DMA_MAP_FLAG_VADDR`): the mapping and the device's DMA through it
    /// stay; only the address the kernel would pin more pages through changes.
    ///
    /// # Safety
    /// As [`Container::map`]; `host` must map the same memory as the address it replaces.
    pub unsafe fn update_vaddr(&self, iova: u64, size: u64, host: u64) -> Result<(), SysError> {
        self.dma_map(VFIO_DMA_MAP_FLAG_VADDR, iova, size, host)
    }

    /// Invalidates the process address of the mapping at `iova..iova + size`
    /// (`VFIO_DMA_UNMAP_FLAG_VADDR`): the mapping stays and the device keeps doing DMA
    /// through it, until another process (or this one) supplies an address again.
    pub fn invalidate_vaddr(&self, iova: u64, size: u64) -> Result<(), SysError> {
        // The unmap struct's trailing bitmap is unused with this flag: the header is the
        // argument (vfio_iommu_type1_dma_unmap without it).
        #[repr(C)]
        struct Unmap {
            argsz: u32,
            flags: u32,
            iova: u64,
            size: u64,
        }
        let u = Unmap {
            argsz: argsz::<Unmap>(),
            flags: VFIO_DMA_UNMAP_FLAG_VADDR,
            iova,
            size,
        };
        // SAFETY: the kernel reads and writes back `u` (the size unmapped), which lives
        // across the call.
        check("VFIO_IOMMU_UNMAP_DMA (vaddr)", unsafe {
            ioctl_with_ref(&self.0, VFIO_IOMMU_UNMAP_DMA, &u)
        })
        .map(drop)
    }
}

impl AsFd for Container {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// An IOMMU group (`/dev/vfio/N`) in a container.
#[derive(Debug)]
pub struct Group {
    /// Group number.
    pub id: u32,
    file: File,
}

impl Group {
    /// Opens group `id`, checks that it is viable and puts it in `container`.
    pub fn open(id: u32, container: &Container) -> Result<Self, SysError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/dev/vfio/{id}"))
            .map_err(|source| SysError {
                call: "open /dev/vfio/GROUP",
                source,
            })?;
        let mut status = vfio_group_status {
            argsz: argsz::<vfio_group_status>(),
            flags: 0,
        };
        // SAFETY: the kernel writes `status`, which lives across the call.
        check("VFIO_GROUP_GET_STATUS", unsafe {
            ioctl_with_mut_ref(&file, VFIO_GROUP_GET_STATUS, &mut status)
        })?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(SysError {
                call: "VFIO_GROUP_GET_STATUS (not viable)",
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        let fd = container.as_fd().as_raw_fd();
        // SAFETY: the kernel reads the container fd number from `fd`.
        check("VFIO_GROUP_SET_CONTAINER", unsafe {
            ioctl_with_ref(&file, VFIO_GROUP_SET_CONTAINER, &fd)
        })?;
        Ok(Group { id, file })
    }

    /// A group another VMM opened and put in the container.
    pub fn adopt(id: u32, fd: OwnedFd) -> Self {
        Group {
            id,
            file: File::from(fd),
        }
    }

    /// Opens the device named `bdf` (`DDDD:BB:DD.F`) of this group.
    pub fn device(&self, bdf: &str) -> Result<Device, SysError> {
        let name = CString::new(bdf).map_err(|_| SysError {
            call: "VFIO_GROUP_GET_DEVICE_FD",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: the kernel reads the NUL-terminated name, which lives across the call.
        let fd = check("VFIO_GROUP_GET_DEVICE_FD", unsafe {
            ioctl_with_ptr(&self.file, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr())
        })?;
        // SAFETY: a new fd the kernel just returned, owned by nothing else.
        Device::adopt(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// One region of a device (BARs 0-5, ROM 6, config 7).
#[derive(Debug, Clone, Copy, Default)]
pub struct Region {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Bytes.
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
}

/// A device fd with its region table.
#[derive(Debug)]
pub struct Device {
    file: File,
    flags: u32,
    regions: Vec<Region>,
}

impl Device {
    /// A device fd, opened here or received from another VMM: reads its info and regions.
    pub fn adopt(fd: OwnedFd) -> Result<Self, SysError> {
        let file = File::from(fd);
        let mut info = vfio_device_info {
            argsz: argsz::<vfio_device_info>(),
            ..Default::default()
        };
        // SAFETY: the kernel writes `info`, which lives across the call.
        check("VFIO_DEVICE_GET_INFO", unsafe {
            ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_INFO, &mut info)
        })?;
        let mut regions = Vec::new();
        for index in 0..info.num_regions.min(16) {
            let mut r = vfio_region_info {
                argsz: argsz::<vfio_region_info>(),
                index,
                ..Default::default()
            };
            // SAFETY: the kernel writes `r` (at most argsz bytes), which lives across the call.
            let ret = unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_REGION_INFO, &mut r) };
            // A region the device lacks (vfio-pci's VGA region on a device that is no VGA
            // controller: EINVAL) is an empty one.
            regions.push(if ret < 0 {
                Region::default()
            } else {
                Region {
                    flags: r.flags,
                    size: r.size,
                    offset: r.offset,
                }
            });
        }
        Ok(Device {
            file,
            flags: info.flags,
            regions,
        })
    }

    /// Region `index` (a zero-sized one if the device has none there).
    pub fn region(&self, index: u32) -> Region {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.regions.get(i).copied())
            .unwrap_or_default()
    }

    /// Reads `data.len()` bytes at `off` of region `index`; what is outside it is left as is.
    pub fn region_read(&self, index: u32, data: &mut [u8], off: u64) {
        let r = self.region(index);
        if off.saturating_add(data.len() as u64) <= r.size {
            let _ = self.file.read_exact_at(data, r.offset + off);
        }
    }

    /// Writes `data` at `off` of region `index`; a write outside it is dropped.
    pub fn region_write(&self, index: u32, data: &[u8], off: u64) {
        let r = self.region(index);
        if off.saturating_add(data.len() as u64) <= r.size {
            let _ = self.file.write_all_at(data, r.offset + off);
        }
    }

    /// `VFIO_DEVICE_RESET`, if the device supports one.
    pub fn reset(&self) {
        if self.flags & VFIO_DEVICE_FLAGS_RESET != 0 {
            // SAFETY: an ioctl without argument on a device fd we own.
            let _ = unsafe { vmm_sys_util::ioctl::ioctl(&self.file, VFIO_DEVICE_RESET) };
        }
    }

    fn set_msix(&self, flags: u32, fds: &[RawFd]) -> Result<(), SysError> {
        // struct vfio_irq_set { argsz, flags, index, start, count; s32 data[count] }.
        let count = u32::try_from(fds.len()).unwrap_or(0);
        let mut buf: Vec<u32> = vec![0, flags, VFIO_PCI_MSIX_IRQ_INDEX, 0, count];
        buf.extend(fds.iter().map(|&fd| fd as u32));
        buf[0] = u32::try_from(buf.len() * 4).unwrap_or(u32::MAX);
        // SAFETY: the kernel reads argsz bytes of `buf`, which lives across the call.
        check("VFIO_DEVICE_SET_IRQS", unsafe {
            ioctl_with_ptr(&self.file, VFIO_DEVICE_SET_IRQS, buf.as_ptr())
        })
        .map(drop)
    }

    /// Enables MSI-X with one eventfd per vector, which VFIO signals.
    pub fn enable_msix(&self, fds: &[RawFd]) -> Result<(), SysError> {
        self.set_msix(VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, fds)
    }

    /// Disables MSI-X.
    pub fn disable_msix(&self) -> Result<(), SysError> {
        self.set_msix(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, &[])
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
