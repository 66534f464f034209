//! Live update: moving a running VM from this `baton-vmm` process to a new one.
//!
//! Guest RAM is not copied: both processes map the same file. What moves is the state in
//! [`baton_protocol::state::VmState`] (vCPUs, in-kernel irqchip/PIT/clock, PCI and virtio-pci
//! registers, each vhost-user ring's position), the vhost-user inflight regions over the cpr
//! channel, and the back-end connections, which the old VMM hangs up and the new one makes.
//! The message sequence and the rollback rule are in [`baton_protocol::handshake`]:
//!
//! 1. old → new `Hello` both ways; old → new `Prepare` (configuration and device layout, sent
//!    while the guest still runs): the new VMM maps RAM and builds the VM, vCPUs and devices.
//! 2. old pauses the vCPUs, saves their state, lets each blk device's rings go idle, stops
//!    every ring with GET_VRING_BASE, waits until the guest's used index reaches each ring's
//!    base (a back-end may complete the requests it had taken after its answer:
//!    [`crate::virtio::drain`]) and hangs up; sends the state and, on the cpr channel, the
//!    inflight fds.
//! 3. new restores, reconnects every back-end (same features, rings configured but not yet
//!    enabled) and answers `Ready`.
//! 4. old sends `Commit`: from here it never runs the guest again. new enables the rings,
//!    signals every vector in use once, resumes the vCPUs and answers `Ack`.
//!
//! Any failure before `Commit` rolls back: the old VMM makes sure the new one is gone, then
//! reconnects the back-ends it had let go at the saved ring positions and resumes the guest.
//!
//! Both sides run under seccomp and Landlock throughout, on threads of their own: the old
//! VMM's `migration-out` thread takes the API's request ([`Outgoing`]), the new VMM's
//! `migration-in` thread accepts the old one and builds the VM ([`take_over`]; see
//! [`crate::sandbox`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_protocol::cpr;
use baton_protocol::handshake::{HandshakeError, Hello, Phase, Role};

mod convert;
mod incoming;
mod outgoing;
mod workers;

pub use incoming::Incoming;
pub use outgoing::outgoing;
pub use workers::{Outgoing, take_over};

use crate::snapshot;
use crate::virtio::pci::{DeviceError, SuspendError};
use crate::vm::VmError;
use baton_service::access;

/// How long each side waits for the other at any step before giving up (and rolling back).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the old VMM waits for the new one to build the VM (the guest runs meanwhile).
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);

/// Our hello; `BATON_LIVE_UPDATE_VERSION` overrides the protocol version (version-mismatch
/// test only).
fn our_hello(role: Role) -> Hello {
    let mut h = Hello::new(role);
    if let Some(v) = std::env::var("BATON_LIVE_UPDATE_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        h.protocol_version = v;
    }
    h
}

/// Errors of a live update, one per step.
#[derive(Debug, thiserror::Error)]
pub enum LiveUpdateError {
    /// The destination socket cannot be reached.
    #[error("cannot connect to the new VMM at {0}: {1}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// A socket operation failed.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// An incoming socket could not be bound.
    #[error("incoming socket: {0}")]
    Bind(#[from] access::BindError),
    /// The peer is not who it must be, or the cpr channel failed.
    #[error("cpr channel: {0}")]
    Cpr(#[from] cpr::CprError),
    /// A handshake message failed.
    #[error("live-update handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// vCPUs did not stop.
    #[error("vCPUs did not pause")]
    Pause,
    /// Reading or writing KVM state failed.
    #[error("KVM state: {0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A device's back-end could not be reconnected or its rings restarted.
    #[error("{0}")]
    Resume(#[source] DeviceError),
    /// A thread reconnecting a back-end panicked.
    #[error("a back-end reconnect thread panicked")]
    ReconnectPanicked,
    /// Failure injection (`refuse-backend`): the back-end counts as refusing.
    #[error("vhost-user back-end {} refused (injected)", .0.display())]
    RefusedInjected(PathBuf),
    /// A device could not be handed over (its rings did not stop, or requests it had taken
    /// did not complete).
    #[error(transparent)]
    Suspend(#[from] SuspendError),
    /// The peer's hello names another process than the one at the end of the socket.
    #[error("the new VMM failed: hello names pid {hello}, the socket's peer is pid {peer}")]
    PeerMismatch {
        /// The pid in the hello.
        hello: u32,
        /// The socket peer's pid (SO_PEERCRED).
        peer: i32,
    },
    /// The new VMM cannot take over something this VM has (an older baton-vmm).
    #[error(
        "the new VMM does not support {0:?} (it is an older baton-vmm): not handing the VM over"
    )]
    PeerLacks(&'static str),
    /// The kernel cannot move VFIO DMA mappings to another process.
    #[error(
        "this kernel's VFIO cannot move DMA mappings to another process (no VFIO_UPDATE_VADDR: the legacy Type1 container is needed, not iommufd's compatibility one): a VM with a passed-through device cannot be live-updated here"
    )]
    VfioNoVaddr,
    /// A passed-through device could not be handed over or taken back.
    #[error("passed-through device: {0}")]
    Vfio(#[from] crate::vfio::VfioError),
    /// Failure injection (`abort-before-ready`): the new VMM aborts.
    #[error("the new VMM failed: aborted (injected)")]
    AbortInjected,
    /// Building the VM on the incoming side failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The saved UART state cannot be loaded.
    #[error("state does not fit: serial: {0}")]
    Serial(#[from] crate::devices::serial::RestoreError),
    /// The state has another number of vCPUs than this VM.
    #[error("state does not fit: {saved} vCPUs in the state, {here} here")]
    VcpuCount {
        /// vCPUs in the state.
        saved: usize,
        /// vCPUs of this VM.
        here: usize,
    },
    /// A vCPU's saved xsave area has another size than this host's.
    #[error("state does not fit: vCPU {vcpu}: xsave area of {len} bytes, expected {expected}")]
    XsaveSize {
        /// The vCPU.
        vcpu: u32,
        /// Bytes in the state.
        len: usize,
        /// Bytes KVM uses here.
        expected: usize,
    },
    /// The state has no entry for one of this VM's devices.
    #[error("state does not fit: no state for device {0}")]
    NoDeviceState(usize),
    /// The update failed and the guest runs on here again.
    #[error("live update failed, rolled back (the guest runs on this VMM): {0}")]
    RolledBack(Box<LiveUpdateError>),
    /// The update failed and rollback failed too.
    #[error("live update failed ({0}) and rollback failed: {1}")]
    RollbackFailed(Box<LiveUpdateError>, Box<LiveUpdateError>),
    /// A live-update thread could not be started or sandboxed.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The thread that runs live updates is gone (it stopped on an earlier error).
    #[error("the live-update thread is gone")]
    Worker,
    /// The VM built for the switch could not be started here.
    #[error("cannot start the VM's threads: {0}")]
    Start(#[source] Box<LiveUpdateError>),
}

/// What one successful switch cost, as measured by both sides.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Old VMM: vCPUs paused → Ack received (the guest runs again before the Ack is sent).
    pub blackout_us: u64,
    /// Steps of the old VMM.
    pub outgoing: Vec<Phase>,
    /// Steps of the new VMM.
    pub incoming: Vec<Phase>,
    /// The new VMM's pid.
    pub new_pid: u32,
    /// Sockets of the back-ends whose rings stopped without draining (they negotiated
    /// GET_VRING_BASE_INFLIGHT): what they had in flight went over in the inflight region. The
    /// others completed it before the switch.
    pub suspended: Vec<String>,
}

struct Timer {
    last: Instant,
    phases: Vec<Phase>,
}

impl Timer {
    fn new() -> Self {
        Timer {
            last: Instant::now(),
            phases: Vec::new(),
        }
    }

    fn lap(&mut self, name: impl Into<String>) {
        self.lap_with_part(name, None);
    }

    /// Ends a step of which `part` (a name and a duration within it) is reported apart.
    fn lap_with_part(&mut self, name: impl Into<String>, part: Option<(String, Duration)>) {
        let now = Instant::now();
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut total = now - self.last;
        let mut part_phase = None;
        if let Some((part_name, d)) = part {
            let d = d.min(total);
            total -= d;
            part_phase = Some(Phase {
                name: part_name,
                micros: us(d),
            });
        }
        self.phases.push(Phase {
            name: name.into(),
            micros: us(total),
        });
        self.phases.extend(part_phase);
        self.last = now;
    }
}

fn io(step: &'static str) -> impl Fn(std::io::Error) -> LiveUpdateError {
    move |e| LiveUpdateError::Io(step, e)
}

/// The cpr channel listens beside the state socket.
pub fn cpr_path(state_path: &Path) -> PathBuf {
    let mut p = state_path.as_os_str().to_owned();
    p.push(".cpr");
    PathBuf::from(p)
}
