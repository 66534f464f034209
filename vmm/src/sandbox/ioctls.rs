//! The ioctl request numbers the VMM's threads use, for their seccomp allowlists: KVM's (the
//! same definitions as kvm-ioctls, whose own are private) by the fd they go to.

use kvm_bindings::{
    KVMIO, kvm_clock_data, kvm_cpuid2, kvm_create_device, kvm_device_attr, kvm_fpu, kvm_ioeventfd,
    kvm_irq_routing, kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs,
    kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_READ, _IOC_WRITE, ioctl_expr};

/// The size field of an ioctl request (14 bits: every KVM struct used here fits).
#[allow(clippy::cast_possible_truncation)] // checked by the assertion, at compile time
const fn size<T>() -> u32 {
    let s = std::mem::size_of::<T>();
    assert!(s < 1 << 14);
    s as u32
}

const fn io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0)
}

const fn ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size::<T>())
}

const fn iow<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, size::<T>())
}

const fn iowr<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size::<T>())
}

/// VFIO's ioctl type (`;`) and first number (linux/vfio.h).
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

const fn vfio(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, VFIO_TYPE, VFIO_BASE + nr, 0)
}

// The VFIO container, group and device fds (also the numbers `crate::vfio::sys` calls).
/// VFIO_GET_API_VERSION (container).
pub const VFIO_GET_API_VERSION: u64 = vfio(0);
/// VFIO_CHECK_EXTENSION (container).
pub const VFIO_CHECK_EXTENSION: u64 = vfio(1);
/// VFIO_SET_IOMMU (container).
pub const VFIO_SET_IOMMU: u64 = vfio(2);
/// VFIO_GROUP_GET_STATUS.
pub const VFIO_GROUP_GET_STATUS: u64 = vfio(3);
/// VFIO_GROUP_SET_CONTAINER.
pub const VFIO_GROUP_SET_CONTAINER: u64 = vfio(4);
/// VFIO_GROUP_GET_DEVICE_FD.
pub const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio(6);
/// VFIO_DEVICE_GET_INFO.
pub const VFIO_DEVICE_GET_INFO: u64 = vfio(7);
/// VFIO_DEVICE_GET_REGION_INFO.
pub const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio(8);
/// VFIO_DEVICE_SET_IRQS (MSI-X eventfds when the guest enables or disables MSI-X).
pub const VFIO_DEVICE_SET_IRQS: u64 = vfio(10);
/// VFIO_DEVICE_RESET.
pub const VFIO_DEVICE_RESET: u64 = vfio(11);
/// VFIO_IOMMU_MAP_DMA (container; also with VFIO_DMA_MAP_FLAG_VADDR).
pub const VFIO_IOMMU_MAP_DMA: u64 = vfio(13);
/// VFIO_IOMMU_UNMAP_DMA (container; with VFIO_DMA_UNMAP_FLAG_VADDR in a live update).
pub const VFIO_IOMMU_UNMAP_DMA: u64 = vfio(14);

// /dev/kvm.
/// KVM_GET_API_VERSION.
pub const KVM_GET_API_VERSION: u64 = io(0x00);
/// KVM_CREATE_VM.
pub const KVM_CREATE_VM: u64 = io(0x01);
/// KVM_GET_MSR_INDEX_LIST.
pub const KVM_GET_MSR_INDEX_LIST: u64 = iowr::<kvm_msr_list>(0x02);
/// KVM_CHECK_EXTENSION (also on a VM fd).
pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
/// KVM_GET_VCPU_MMAP_SIZE.
pub const KVM_GET_VCPU_MMAP_SIZE: u64 = io(0x04);
/// KVM_GET_SUPPORTED_CPUID.
pub const KVM_GET_SUPPORTED_CPUID: u64 = iowr::<kvm_cpuid2>(0x05);

// A VM fd.
/// KVM_CREATE_VCPU.
pub const KVM_CREATE_VCPU: u64 = io(0x41);
/// KVM_SET_USER_MEMORY_REGION.
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow::<kvm_userspace_memory_region>(0x46);
/// KVM_SET_TSS_ADDR.
pub const KVM_SET_TSS_ADDR: u64 = io(0x47);
/// KVM_SET_IDENTITY_MAP_ADDR.
pub const KVM_SET_IDENTITY_MAP_ADDR: u64 = iow::<u64>(0x48);
/// KVM_CREATE_IRQCHIP.
pub const KVM_CREATE_IRQCHIP: u64 = io(0x60);
/// KVM_GET_IRQCHIP.
pub const KVM_GET_IRQCHIP: u64 = iowr::<kvm_irqchip>(0x62);
/// KVM_SET_IRQCHIP.
pub const KVM_SET_IRQCHIP: u64 = ior::<kvm_irqchip>(0x63);
/// KVM_SET_GSI_ROUTING.
pub const KVM_SET_GSI_ROUTING: u64 = iow::<kvm_irq_routing>(0x6a);
/// KVM_IRQFD (assign and deassign).
pub const KVM_IRQFD: u64 = iow::<kvm_irqfd>(0x76);
/// KVM_CREATE_PIT2.
pub const KVM_CREATE_PIT2: u64 = iow::<kvm_pit_config>(0x77);
/// KVM_IOEVENTFD (assign and deassign).
pub const KVM_IOEVENTFD: u64 = iow::<kvm_ioeventfd>(0x79);
/// KVM_SET_CLOCK.
pub const KVM_SET_CLOCK: u64 = iow::<kvm_clock_data>(0x7b);
/// KVM_GET_CLOCK.
pub const KVM_GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
/// KVM_GET_PIT2.
pub const KVM_GET_PIT2: u64 = ior::<kvm_pit_state2>(0x9f);
/// KVM_SET_PIT2.
pub const KVM_SET_PIT2: u64 = iow::<kvm_pit_state2>(0xa0);

// A vCPU fd.
/// KVM_RUN.
pub const KVM_RUN: u64 = io(0x80);
/// KVM_GET_REGS.
pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
/// KVM_SET_REGS.
pub const KVM_SET_REGS: u64 = iow::<kvm_regs>(0x82);
/// KVM_GET_SREGS.
pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
/// KVM_SET_SREGS.
pub const KVM_SET_SREGS: u64 = iow::<kvm_sregs>(0x84);
/// KVM_GET_MSRS.
pub const KVM_GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
/// KVM_SET_MSRS.
pub const KVM_SET_MSRS: u64 = iow::<kvm_msrs>(0x89);
/// KVM_SET_FPU.
pub const KVM_SET_FPU: u64 = iow::<kvm_fpu>(0x8d);
/// KVM_GET_LAPIC.
pub const KVM_GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
/// KVM_SET_LAPIC.
pub const KVM_SET_LAPIC: u64 = iow::<kvm_lapic_state>(0x8f);
/// KVM_SET_CPUID2.
pub const KVM_SET_CPUID2: u64 = iow::<kvm_cpuid2>(0x90);
/// KVM_GET_MP_STATE.
pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
/// KVM_SET_MP_STATE.
pub const KVM_SET_MP_STATE: u64 = iow::<kvm_mp_state>(0x99);
/// KVM_GET_VCPU_EVENTS.
pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
/// KVM_SET_VCPU_EVENTS.
pub const KVM_SET_VCPU_EVENTS: u64 = iow::<kvm_vcpu_events>(0xa0);
/// KVM_GET_TSC_KHZ.
pub const KVM_GET_TSC_KHZ: u64 = io(0xa3);
/// KVM_GET_XSAVE.
pub const KVM_GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
/// KVM_SET_XSAVE.
pub const KVM_SET_XSAVE: u64 = iow::<kvm_xsave>(0xa5);
/// KVM_GET_XCRS.
pub const KVM_GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
/// KVM_SET_XCRS.
pub const KVM_SET_XCRS: u64 = iow::<kvm_xcrs>(0xa7);
/// KVM_CREATE_DEVICE (VM fd: the KVM-VFIO device).
pub const KVM_CREATE_DEVICE: u64 = iowr::<kvm_create_device>(0xe0);
/// KVM_SET_DEVICE_ATTR (device fd: a VFIO group added to the KVM-VFIO device).
pub const KVM_SET_DEVICE_ATTR: u64 = iow::<kvm_device_attr>(0xe1);

#[cfg(test)]
mod tests {
    use super::*;

    /// Spot checks against the numbers of `linux/kvm.h` on x86_64.
    #[test]
    fn numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_CREATE_VM, 0xae01);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_GET_SUPPORTED_CPUID, 0xc008_ae05);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_SET_IRQCHIP, 0x8208_ae63);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
        assert_eq!(KVM_CREATE_DEVICE, 0xc00c_aee0);
        assert_eq!(KVM_SET_DEVICE_ATTR, 0x4018_aee1);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
    }
}
