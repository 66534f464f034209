//! The VFIO Type1 container every passed-through device shares, the KVM-VFIO pseudo device it
//! registers its groups with, and the DMA mappings: every guest RAM region at IOVA = guest
//! physical address.

use std::sync::Arc;

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioContainer, VfioDeviceFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::VfioError;

/// The container, with guest RAM mapped for DMA once its first group is attached.
pub struct Container {
    inner: Arc<VfioContainer>,
    dma_mapped: bool,
}

impl Container {
    /// Creates the KVM-VFIO device on `vm` and a Type1 container that adds each group to it.
    pub fn new(vm: &VmFd) -> Result<Self, VfioError> {
        let mut create = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_dev = vm
            .create_device(&mut create)
            .map_err(|e| VfioError::KvmDevice(std::io::Error::from_raw_os_error(e.errno())))?;
        let handle = Arc::new(VfioDeviceFd::new_from_kvm(kvm_dev));
        let inner = VfioContainer::new(Some(handle)).map_err(VfioError::Container)?;
        Ok(Container {
            inner: Arc::new(inner),
            dma_mapped: false,
        })
    }

    /// The container, for opening devices in it.
    pub fn handle(&self) -> Arc<VfioContainer> {
        self.inner.clone()
    }

    /// Maps every region of `mem` for DMA at IOVA = guest physical address (once: the first
    /// device's group set the IOMMU type; later devices share the mappings).
    pub fn map_guest_ram(&mut self, mem: &GuestMemoryMmap) -> Result<(), VfioError> {
        if self.dma_mapped {
            return Ok(());
        }
        for region in mem.iter() {
            let gpa = region.start_addr().0;
            let len = usize::try_from(region.len()).map_err(|_| VfioError::DmaMap {
                gpa,
                source: vfio_ioctls::VfioError::InvalidDmaUnmapSize,
            })?;
            // SAFETY: the region is a shared mapping of the RAM file that the VM keeps mapped
            // for as long as the container exists (both live in the `Vm`, and the container is
            // dropped with the devices, before RAM). The guest and the device share it; baton
            // only reaches it through vm-memory's volatile accessors, never through references.
            unsafe { self.inner.vfio_dma_map(gpa, len, region.as_ptr()) }
                .map_err(|source| VfioError::DmaMap { gpa, source })?;
        }
        self.dma_mapped = true;
        Ok(())
    }
}
