//! Passed-through PCI functions (VFIO): what the new VMM needs to take one over. The device
//! itself is never re-opened: its container, group and device fds and its vectors' eventfds
//! arrive on the cpr channel under the names below, right after the
//! [`Prepare`](crate::handshake::Prepare), so that the new VMM builds the device model while
//! the guest still runs; this state follows with the rest of the [`VmState`](super::VmState).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Blob, MsixState};

/// Name of the VFIO container's fd on the cpr channel.
pub const CONTAINER_FD: &str = "vfio-container";

/// Name of IOMMU group `id`'s fd on the cpr channel.
pub fn group_fd_name(id: u32) -> String {
    format!("vfio-group-{id}")
}

/// Name of passed-through function `index`'s device fd on the cpr channel.
pub fn device_fd_name(index: usize) -> String {
    format!("vfio-device-{index}")
}

/// Name of the eventfd of MSI-X vector `vector` of function `index` on the cpr channel.
pub fn vector_fd_name(index: usize, vector: u16) -> String {
    format!("vfio-{index}-vector-{vector}")
}

/// A passed-through function in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassthroughConfigState {
    /// Its sysfs path as given (`/sys/bus/pci/devices/DDDD:BB:DD.F`).
    pub path: PathBuf,
    /// Its IOMMU group (the fd `vfio-group-<group>`).
    pub group: u32,
}

/// A passed-through function's state: what the guest programmed into baton's virtualised
/// configuration space and MSI-X table. The device's own registers need no copy: the device
/// stays as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassthroughState {
    /// Device number on bus 0.
    pub slot: u8,
    /// The 256-byte configuration space as the guest sees it.
    pub config: Blob,
    /// Guest address of each guest-visible BAR, in BAR order.
    pub bars: Vec<u64>,
    /// MSI-X table, PBA and control word as the guest programmed them.
    pub msix: MsixState,
    /// VFIO has the vectors' eventfds (the guest enabled MSI-X).
    pub msix_on_device: bool,
}
