//! Device state: PCI function, MSI-X, virtio-pci registers and the vhost-user back-end's rings.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Blob;

/// One vhost-user device: its PCI function, virtio-pci transport and back-end rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// PCI configuration space and MSI-X.
    pub pci: PciDeviceState,
    /// virtio-pci common configuration registers.
    pub virtio: VirtioPciState,
    /// What the back-end was told, to replay on the new connection.
    pub vhost_user: VhostUserState,
}

/// PCI function state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceState {
    /// Device number on bus 0.
    pub slot: u8,
    /// The 256-byte configuration space as the guest sees it (BARs as programmed).
    pub config: Blob,
    /// Guest-physical base of the device's memory BAR as currently mapped.
    pub bar_base: u64,
    /// MSI-X table, PBA and control word.
    pub msix: MsixState,
}

/// One MSI-X table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryState {
    /// Message address, low 32 bits.
    pub addr_lo: u32,
    /// Message address, high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

/// MSI-X capability state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// Table entries (1 to 2048).
    pub table: Vec<MsixEntryState>,
    /// Pending bits, 64 vectors per word (`ceil(table.len() / 64)` words).
    pub pba: Vec<u64>,
    /// Message control word (bit 15 enable, bit 14 function mask).
    pub control: u16,
}

/// virtio-pci common configuration (virtio 1.x section 4.1.4.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// Features the device offers.
    pub device_features: u64,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `device_feature_select` register.
    pub device_feature_select: u32,
    /// `driver_feature_select` register.
    pub driver_feature_select: u32,
    /// MSI-X vector for configuration changes (0xffff: none).
    pub config_msix_vector: u16,
    /// Device status byte.
    pub status: u8,
    /// Configuration generation counter.
    pub config_generation: u8,
    /// `queue_select` register.
    pub queue_select: u16,
    /// Per-queue registers.
    pub queues: Vec<VirtioQueueState>,
}

/// Registers of one virtqueue as the driver programmed them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioQueueState {
    /// Ring size (a power of two; 0 when the driver left the queue unused).
    pub size: u16,
    /// MSI-X vector (0xffff: none).
    pub msix_vector: u16,
    /// `queue_enable`.
    pub enabled: bool,
    /// Descriptor table guest address.
    pub desc: u64,
    /// Available ring guest address.
    pub avail: u64,
    /// Used ring guest address.
    pub used: u64,
}

/// The back-end side of one device: negotiated features and the started rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserState {
    /// Back-end socket (equal to the device's configured socket).
    pub socket: PathBuf,
    /// Virtio features set with `SET_FEATURES`; the new connection must get the same.
    pub features: u64,
    /// Protocol features set with `SET_PROTOCOL_FEATURES`.
    pub protocol_features: u64,
    /// Rings that were started, by queue index.
    pub rings: Vec<VringState>,
    /// Inflight region shared with the back-end, if negotiated.
    pub inflight: Option<InflightState>,
}

/// One started vhost-user ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VringState {
    /// Queue index.
    pub index: u16,
    /// Ring size (`SET_VRING_NUM`).
    pub size: u16,
    /// Descriptor table guest address.
    pub desc: u64,
    /// Available ring guest address.
    pub avail: u64,
    /// Used ring guest address.
    pub used: u64,
    /// What `GET_VRING_BASE` returned: next available index to process (split rings: < 65536).
    pub next_avail: u32,
    /// The ring was enabled (`SET_VRING_ENABLE 1`).
    pub enabled: bool,
}

/// The inflight region (`GET_INFLIGHT_FD`); its fd travels on the cpr channel as `fd_name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightState {
    /// Size of the mapping.
    pub mmap_size: u64,
    /// Offset of the mapping in the fd.
    pub mmap_offset: u64,
    /// Queues covered.
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Name of the fd in the cpr manifest (e.g. `inflight-disk0`).
    pub fd_name: String,
}
