//! The handshake messages and their consistency checks.

use serde::{Deserialize, Serialize};

use super::LIVE_UPDATE_VERSION;
use crate::frame::Validate;
use crate::state::{StateError, validate_devices};

/// Longest free-text field (reasons, errors, versions, phase names).
pub const MAX_TEXT_LEN: usize = 4096;
/// Most timing phases in one message.
pub const MAX_PHASES: usize = 256;

/// Which side of a live update a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The running VMM that hands the guest over.
    Outgoing,
    /// The new VMM, started with `--incoming`, that takes it.
    Incoming,
}

/// First message, sent by both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`LIVE_UPDATE_VERSION`] of the sender.
    pub protocol_version: u16,
    /// Sender's `baton-vmm` version (for logs).
    pub vmm_version: String,
    /// Sender's process id (the old VMM kills it on rollback; check it against SO_PEERCRED).
    pub pid: u32,
    /// Sender's role.
    pub role: Role,
    /// What the sender can take over beyond protocol version 1 (e.g. [`FEATURE_VFIO`]); an
    /// old VMM sends none, and a VM that needs one is not handed to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// [`Hello::features`]: passed-through PCI functions (their fds on the cpr channel right after
/// the prepare, [`crate::state::PassthroughState`] in the state).
pub const FEATURE_VFIO: &str = "vfio";
/// Most entries in [`Hello::features`].
pub const MAX_FEATURES: usize = 16;

impl Hello {
    /// This process's hello in `role`.
    pub fn new(role: Role) -> Self {
        Hello {
            protocol_version: LIVE_UPDATE_VERSION,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            role,
            features: vec![FEATURE_VFIO.to_string()],
        }
    }
}

/// Old → new, while the guest still runs on the old VMM: the VM's configuration and device
/// layout, so the new VMM can map RAM and build the VM, vCPUs and devices before the switch
/// (the switch itself then only moves state). Device ring positions are empty here; they
/// arrive with the [`VmState`](crate::state::VmState).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prepare {
    /// The VM's configuration.
    pub config: crate::state::VmConfigState,
    /// Each device's PCI and virtio layout (slot, BAR, features, queues).
    pub devices: Vec<crate::state::DeviceState>,
}

/// Time spent in one named step, in microseconds (for the blackout breakdown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    /// Step name, e.g. `restore_vcpus` or `backend /run/blk0.sock`.
    pub name: String,
    /// Duration in µs.
    pub micros: u64,
}

/// New → old: the state is restored and the back-ends are reconnected; waiting for [`Commit`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Timings of the restore so far.
    #[serde(default)]
    pub phases: Vec<Phase>,
}

/// Old → new: the old VMM will not resume the guest any more; the new VMM may.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// CLOCK_REALTIME in ns when the old VMM committed (for blackout accounting).
    #[serde(default)]
    pub committed_at_unix_ns: u64,
}

/// New → old: the guest runs on the new VMM (`ok`), or the new VMM failed before resuming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The new VMM resumed the guest.
    pub ok: bool,
    /// Why not, when `ok` is false.
    pub error: Option<String>,
    /// Timings of the whole switch on the new VMM's side.
    #[serde(default)]
    pub phases: Vec<Phase>,
}

impl Ack {
    /// A successful ack with timings.
    pub fn ok(phases: Vec<Phase>) -> Self {
        Ack {
            ok: true,
            error: None,
            phases,
        }
    }

    /// A failure before resuming.
    pub fn failed(error: impl Into<String>) -> Self {
        Ack {
            ok: false,
            error: Some(error.into()),
            phases: Vec::new(),
        }
    }
}

/// Either side: stop the live update; the guest stays with (or returns to) the old VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    /// Why.
    pub reason: String,
}

/// Why a handshake message is inconsistent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    /// A text field is too long.
    #[error("{field} is {len} bytes long (at most {MAX_TEXT_LEN})")]
    TextTooLong {
        /// Field name.
        field: &'static str,
        /// Length found.
        len: usize,
    },
    /// Too many phases.
    #[error("{0} phases (at most {MAX_PHASES})")]
    TooManyPhases(usize),
    /// Too many features in a hello.
    #[error("{0} features (at most {MAX_FEATURES})")]
    TooManyFeatures(usize),
    /// Protocol version zero.
    #[error("protocol version 0 is not valid")]
    ZeroVersion,
    /// `ok` and `error` disagree.
    #[error("ack with ok={ok} must {} an error", if *.ok { "not carry" } else { "carry" })]
    AckError {
        /// The `ok` flag.
        ok: bool,
    },
    /// Abort without a reason.
    #[error("abort without a reason")]
    NoReason,
    /// The configuration or device layout in a [`Prepare`] is inconsistent.
    #[error("prepare: {0}")]
    Prepare(#[from] StateError),
}

fn text(field: &'static str, s: &str) -> Result<(), MessageError> {
    if s.len() > MAX_TEXT_LEN {
        return Err(MessageError::TextTooLong {
            field,
            len: s.len(),
        });
    }
    Ok(())
}

fn phases(p: &[Phase]) -> Result<(), MessageError> {
    if p.len() > MAX_PHASES {
        return Err(MessageError::TooManyPhases(p.len()));
    }
    p.iter().try_for_each(|p| text("phase name", &p.name))
}

impl Validate for Hello {
    type Error = MessageError;
    fn validate(&self) -> Result<(), MessageError> {
        if self.protocol_version == 0 {
            return Err(MessageError::ZeroVersion);
        }
        if self.features.len() > MAX_FEATURES {
            return Err(MessageError::TooManyFeatures(self.features.len()));
        }
        self.features.iter().try_for_each(|f| text("feature", f))?;
        text("vmm_version", &self.vmm_version)
    }
}

impl Validate for Ready {
    type Error = MessageError;
    fn validate(&self) -> Result<(), MessageError> {
        phases(&self.phases)
    }
}

impl Validate for Prepare {
    type Error = MessageError;
    /// The same configuration and device checks as for [`VmState`](crate::state::VmState); rings may be empty.
    fn validate(&self) -> Result<(), MessageError> {
        self.config.validate()?;
        validate_devices(&self.config, &self.devices)?;
        Ok(())
    }
}

impl Validate for Commit {
    type Error = MessageError;
    fn validate(&self) -> Result<(), MessageError> {
        Ok(())
    }
}

impl Validate for Ack {
    type Error = MessageError;
    fn validate(&self) -> Result<(), MessageError> {
        if self.ok == self.error.is_some() {
            return Err(MessageError::AckError { ok: self.ok });
        }
        text("error", self.error.as_deref().unwrap_or_default())?;
        phases(&self.phases)
    }
}

impl Validate for Abort {
    type Error = MessageError;
    fn validate(&self) -> Result<(), MessageError> {
        if self.reason.is_empty() {
            return Err(MessageError::NoReason);
        }
        text("reason", &self.reason)
    }
}
