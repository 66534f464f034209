//! The HTTP API between `baton-vmm` and its clients (`batonctl`, `curl --unix-socket`).
//!
//! Bodies are JSON. The API path prefix carries the version.

use serde::{Deserialize, Serialize};

/// Path prefix of every API endpoint; the version of the API is part of it.
pub const API_PREFIX: &str = "/api/v1";

/// The lifecycle state of a VM as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// vCPUs are running guest code.
    Running,
    /// vCPUs are stopped by `vm.pause`.
    Paused,
    /// The VM is being torn down.
    ShuttingDown,
}

/// Answer to `GET /api/v1/vm.info`.
///
/// ```
/// use baton_protocol::api::{VmInfo, VmState};
/// let info = VmInfo { state: VmState::Running, cpus: 2, memory_bytes: 256 << 20,
///     memory_path: "/dev/shm/baton-vm".into(), kernel: "/k".into(), cmdline: String::new(),
///     pid: 1, uptime_ms: 5, devices: vec![], console: Some("/run/vm.console".into()),
///     passthrough: vec![] };
/// let json = serde_json::to_string(&info).unwrap();
/// assert_eq!(serde_json::from_str::<VmInfo>(&json).unwrap(), info);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Current lifecycle state.
    pub state: VmState,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM size in bytes.
    pub memory_bytes: u64,
    /// Path of the file that backs guest RAM (a second VMM maps the same path).
    pub memory_path: String,
    /// Path of the guest kernel.
    pub kernel: String,
    /// Guest kernel command line.
    pub cmdline: String,
    /// Process id of the VMM.
    pub pid: u32,
    /// Milliseconds since the VMM started the guest.
    pub uptime_ms: u64,
    /// The vhost-user devices.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
    /// Where to attach to the console: the socket (`--serial socket=PATH`) or the pty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// The host PCI functions passed through with VFIO (`--device`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passthrough: Vec<PassthroughInfo>,
}

/// One passed-through PCI function in `vm.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassthroughInfo {
    /// Device name (`vfio0`, ...).
    pub name: String,
    /// The host device's sysfs path.
    pub path: String,
    /// Where the guest sees it (`0000:00:SS.0`).
    pub guest_address: String,
    /// MSI-X vectors.
    pub vectors: u16,
    /// Whether the guest's driver enabled MSI-X.
    pub msix_enabled: bool,
    /// Memory BARs mapped into the guest (KVM memory slots over the device's regions).
    pub mapped_bars: u32,
    /// Memory BARs whose accesses baton forwards (those with the MSI-X table or pending bits,
    /// and regions VFIO does not let it map).
    pub trapped_bars: u32,
}

/// Connection state of a vhost-user device's back-end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Connected; the rings run if the guest started the device.
    Connected,
    /// The back-end went away; the VMM is reconnecting.
    Reconnecting,
    /// Handed over to another VMM (live update in progress).
    HandedOver,
    /// The back-end stayed away longer than the device's `reconnect_ms`: the device is in
    /// NEEDS_RESET and the VMM stopped trying.
    Failed,
}

/// One vhost-user device in `vm.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device name (`disk0`, `net1`, ...).
    pub name: String,
    /// The back-end's socket.
    pub socket: String,
    /// Connection state.
    pub backend: BackendState,
    /// Whether the guest driver has started the device.
    pub started: bool,
    /// How many times the VMM reconnected after the back-end went away.
    pub reconnects: u64,
}

/// Error body returned with every non-2xx status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Human-readable reason.
    pub error: String,
}

/// Body of `PUT /api/v1/vm.live-update`.
///
/// The answer (200) is a JSON report with `blackout_us` and the timed steps of both VMMs; an
/// error (500) says whether the guest was rolled back to the old VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveUpdateRequest {
    /// The new VMM's `--incoming` socket.
    pub destination: String,
    /// How long to wait for the new VMM at each step (default 10 s); past it, roll back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}
