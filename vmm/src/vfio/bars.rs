//! A passed-through device's BARs: sized from VFIO's region info, placed in the guest's MMIO
//! window, and either mapped into the guest (a KVM memory slot over an mmap of the region: guest
//! accesses never leave KVM) or trapped (each access a region read or write on the device fd).
//! A BAR holding the MSI-X table or pending bits is always trapped: the table is baton's.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use super::VfioError;
use super::config::{CONFIG_SIZE, GuestBar, MsixCap};
use super::sys::Device;

/// VFIO region flag: the region can be mmap()ed.
const REGION_FLAG_MMAP: u32 = 1 << 2;
/// The smallest BAR baton gives the guest: a page, so that slots and traps never share one.
const MIN_BAR: u64 = 4096;
/// KVM memory slots of mapped BARs start here (guest RAM uses the first few).
const FIRST_BAR_SLOT: u32 = 64;

/// One guest-visible BAR of a passed-through device.
pub struct Bar {
    /// Guest placement.
    pub guest: GuestBar,
    /// The device region's real size (accesses beyond it read as all ones).
    pub region_size: u64,
    /// The mmap of the region and its KVM slot, if the BAR is mapped rather than trapped.
    mapping: Option<Mapping>,
}

/// An mmap of a device region, seen by the guest through a KVM memory slot.
struct Mapping {
    host: usize,
    len: usize,
    slot: u32,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `host..host + len` is the mapping this struct created and owns; KVM's slot
        // over it was removed first (or the VM is gone), and nothing else refers to it.
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.len) };
    }
}

impl Bar {
    /// Whether guest accesses reach this process (a trapped BAR).
    pub fn trapped(&self) -> bool {
        self.mapping.is_none()
    }
}

/// The BAR registers of the device's configuration space `raw` and its VFIO regions: the memory
/// BARs, each with its guest size (I/O BARs are not offered to the guest; they are logged).
pub fn discover(name: &str, dev: &Device, raw: &[u8; CONFIG_SIZE]) -> Vec<(usize, u64, u64, bool)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < 6 {
        let off = 0x10 + 4 * i;
        let reg = u32::from_le_bytes([raw[off], raw[off + 1], raw[off + 2], raw[off + 3]]);
        let size = dev.region(u32::try_from(i).unwrap_or(0)).size;
        let is_64bit = reg & 1 == 0 && (reg >> 1) & 3 == 2;
        if size > 0 {
            if reg & 1 == 1 {
                tracing::warn!(
                    device = name,
                    "BAR{i} is an I/O BAR: not offered to the guest"
                );
            } else {
                let guest_size = size.next_power_of_two().max(MIN_BAR);
                out.push((i, size, guest_size, is_64bit));
            }
        }
        i += if is_64bit { 2 } else { 1 };
    }
    out
}

/// Maps BAR `guest` of `dev` (region size `region_size`) into the guest if VFIO allows it and it
/// holds no MSI-X structure; otherwise it stays trapped. `next_slot` hands out KVM slots.
pub fn place(
    vm: &VmFd,
    dev: &Arc<Device>,
    guest: GuestBar,
    region_size: u64,
    msix: &MsixCap,
    next_slot: &mut u32,
) -> Result<Bar, VfioError> {
    let index = u32::try_from(guest.index).unwrap_or(0);
    let region = dev.region(index);
    let mappable = region.flags & REGION_FLAG_MMAP != 0
        && region_size % MIN_BAR == 0
        && !msix.overlaps(guest.index, 0, guest.size);
    let mut bar = Bar {
        guest,
        region_size,
        mapping: None,
    };
    if !mappable {
        return Ok(bar);
    }
    let offset = libc::off_t::try_from(region.offset).map_err(|_| {
        VfioError::MapBar(guest.index, std::io::Error::from_raw_os_error(libc::EINVAL))
    })?;
    let len = usize::try_from(region_size).map_err(|_| {
        VfioError::MapBar(guest.index, std::io::Error::from_raw_os_error(libc::EINVAL))
    })?;
    // SAFETY: a new shared mapping of the device fd's region (no fixed address, so nothing
    // existing is replaced); the result is checked, and `Mapping` unmaps it.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            dev.as_fd().as_raw_fd(),
            offset,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(VfioError::MapBar(
            guest.index,
            std::io::Error::last_os_error(),
        ));
    }
    let mapping = Mapping {
        host: host as usize,
        len,
        slot: *next_slot,
    };
    *next_slot += 1;
    set_slot(vm, &mapping, guest.addr).map_err(|e| {
        VfioError::MapBar(guest.index, std::io::Error::from_raw_os_error(e.errno()))
    })?;
    bar.mapping = Some(mapping);
    Ok(bar)
}

fn set_slot(vm: &VmFd, m: &Mapping, gpa: u64) -> Result<(), kvm_ioctls::Error> {
    let r = kvm_userspace_memory_region {
        slot: m.slot,
        guest_phys_addr: gpa,
        memory_size: m.len as u64,
        userspace_addr: m.host as u64,
        flags: 0,
    };
    // SAFETY: `m` is a live mapping of the device region that the device model keeps until
    // the slot is removed or the VM is gone.
    unsafe { vm.set_user_memory_region(r) }
}

fn clear_slot(vm: &VmFd, m: &Mapping) -> Result<(), kvm_ioctls::Error> {
    let r = kvm_userspace_memory_region {
        slot: m.slot,
        guest_phys_addr: 0,
        memory_size: 0,
        userspace_addr: m.host as u64,
        flags: 0,
    };
    // SAFETY: a zero size deletes the slot; no memory is handed to KVM.
    unsafe { vm.set_user_memory_region(r) }
}

impl Bar {
    /// The guest moved this BAR to `to`: move its slot (a trapped BAR follows the bus).
    pub fn moved(&mut self, vm: &VmFd, to: u64) -> Result<(), kvm_ioctls::Error> {
        self.guest.addr = to;
        if let Some(m) = &self.mapping {
            clear_slot(vm, m)?;
            set_slot(vm, m, to)?;
        }
        Ok(())
    }
}

/// The first KVM slot for mapped BARs.
pub fn first_slot() -> u32 {
    FIRST_BAR_SLOT
}
