//! The VFIO Type1 container every passed-through device shares, its groups, the KVM-VFIO pseudo
//! device they are registered with, and the DMA mappings: every guest RAM region at IOVA =
//! guest physical address.
//!
//! In a live update the container and its groups move to the new VMM as fds; the mappings are
//! never torn down: the old VMM invalidates its process addresses after the pause
//! ([`Container::release_ram`]) and the new one supplies its own for the same RAM file
//! ([`Container::claim_ram`]), or the old one takes them back on rollback.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use baton_protocol::state::passthrough::{CONTAINER_FD, group_fd_name};

use kvm_bindings::{
    KVM_DEV_VFIO_GROUP, KVM_DEV_VFIO_GROUP_ADD, kvm_create_device, kvm_device_attr,
    kvm_device_type_KVM_DEV_TYPE_VFIO,
};
use kvm_ioctls::{DeviceFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::VfioError;
use super::sys::{self, SysError};

/// The container, its groups, and whether guest RAM is mapped for DMA.
pub struct Container {
    fd: sys::Container,
    groups: Vec<sys::Group>,
    kvm_vfio: DeviceFd,
    dma_mapped: bool,
}

fn kvm_vfio_device(vm: &VmFd) -> Result<DeviceFd, VfioError> {
    let mut create = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    vm.create_device(&mut create)
        .map_err(|e| VfioError::KvmDevice(std::io::Error::from_raw_os_error(e.errno())))
}

impl Container {
    /// Creates the KVM-VFIO device on `vm` and opens a new Type1 container.
    pub fn new(vm: &VmFd) -> Result<Self, VfioError> {
        let kvm_vfio = kvm_vfio_device(vm)?;
        Ok(Container {
            fd: sys::Container::open().map_err(VfioError::Container)?,
            groups: Vec::new(),
            kvm_vfio,
            dma_mapped: false,
        })
    }

    /// The container and groups another VMM set up (received on the cpr channel), guest
    /// RAM already mapped for DMA under that VMM's addresses; the groups join `vm`'s
    /// KVM-VFIO device.
    pub fn adopt(vm: &VmFd, fd: OwnedFd, groups: Vec<(u32, OwnedFd)>) -> Result<Self, VfioError> {
        let mut c = Container {
            fd: sys::Container::adopt(fd),
            groups: Vec::new(),
            kvm_vfio: kvm_vfio_device(vm)?,
            dma_mapped: true,
        };
        for (id, g) in groups {
            let g = sys::Group::adopt(id, g);
            c.register(&g)?;
            c.groups.push(g);
        }
        Ok(c)
    }

    fn register(&self, g: &sys::Group) -> Result<(), VfioError> {
        let fd: i32 = g.as_fd().as_raw_fd();
        let attr = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_VFIO_GROUP,
            attr: u64::from(KVM_DEV_VFIO_GROUP_ADD),
            addr: std::ptr::from_ref(&fd) as u64,
        };
        self.kvm_vfio
            .set_device_attr(&attr)
            .map_err(|e| VfioError::KvmDevice(std::io::Error::from_raw_os_error(e.errno())))
    }

    /// Opens device `bdf` of IOMMU group `group`, opening the group first if no device of it
    /// was opened yet (the first group also selects the Type1v2 IOMMU).
    pub fn open_device(&mut self, group: u32, bdf: &str) -> Result<sys::Device, VfioError> {
        if !self.groups.iter().any(|g| g.id == group) {
            let g = sys::Group::open(group, &self.fd).map_err(VfioError::Open)?;
            if self.groups.is_empty() {
                self.fd.set_iommu().map_err(VfioError::Open)?;
            }
            self.register(&g)?;
            self.groups.push(g);
        }
        let g = self
            .groups
            .iter()
            .find(|g| g.id == group)
            .ok_or(VfioError::NoIommuGroup)?;
        g.device(bdf).map_err(VfioError::Open)
    }

    /// Whether a live update can keep the DMA mappings (the kernel has `VFIO_UPDATE_VADDR`).
    pub fn can_hand_over(&self) -> bool {
        self.fd.can_update_vaddr()
    }

    /// The fds a new VMM needs: the container's and each group's, named (duplicates).
    pub fn fds(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        let mut out = vec![(
            CONTAINER_FD.to_string(),
            self.fd.as_fd().try_clone_to_owned()?,
        )];
        for g in &self.groups {
            out.push((group_fd_name(g.id), g.as_fd().try_clone_to_owned()?));
        }
        Ok(out)
    }

    /// Maps every region of `mem` for DMA at IOVA = guest physical address (once: later
    /// devices share the mappings).
    pub fn map_guest_ram(&mut self, mem: &GuestMemoryMmap) -> Result<(), VfioError> {
        if self.dma_mapped {
            return Ok(());
        }
        for_each_region(mem, |gpa, len, host| {
            // SAFETY: the region is a shared mapping of the RAM file that the VM keeps mapped
            // for as long as the container exists (both live in the `Vm`, and the container
            // is dropped with the devices, before RAM). The guest and the device share it;
            // baton only reaches it through vm-memory's volatile accessors.
            unsafe { self.fd.map(gpa, len, host) }
        })?;
        self.dma_mapped = true;
        Ok(())
    }

    /// Live update, after the pause: this process's addresses of guest RAM are no longer the
    /// mappings' (the device keeps doing DMA through them).
    pub fn release_ram(&self, mem: &GuestMemoryMmap) -> Result<(), VfioError> {
        for_each_region(mem, |gpa, len, _| self.fd.invalidate_vaddr(gpa, len))
    }

    /// Live update: the mappings take this process's addresses of guest RAM (the same RAM
    /// file). If they still have another process's addresses (a rollback after the new VMM
    /// claimed them), those are invalidated first.
    pub fn claim_ram(&self, mem: &GuestMemoryMmap) -> Result<(), VfioError> {
        for_each_region(mem, |gpa, len, host| {
            // SAFETY: as in `map_guest_ram`: `host` maps the same RAM file the mapping was
            // made for, kept mapped by the `Vm` for as long as the container exists.
            let first = unsafe { self.fd.update_vaddr(gpa, len, host) };
            match first {
                Err(e) if e.source.raw_os_error() == Some(libc::EINVAL) => {
                    self.fd.invalidate_vaddr(gpa, len)?;
                    // SAFETY: as above.
                    unsafe { self.fd.update_vaddr(gpa, len, host) }
                }
                r => r,
            }
        })
    }
}

/// Calls `f(gpa, len, host address)` for each region of `mem`; an error names the region.
fn for_each_region(
    mem: &GuestMemoryMmap,
    mut f: impl FnMut(u64, u64, u64) -> Result<(), SysError>,
) -> Result<(), VfioError> {
    for region in mem.iter() {
        let gpa = region.start_addr().0;
        f(gpa, region.len(), region.as_ptr() as u64)
            .map_err(|source| VfioError::DmaMap { gpa, source })?;
    }
    Ok(())
}
