//! Errors talking to a back-end: one variant per vhost-user step, each naming the socket and
//! keeping the cause, and each saying what the caller should do about it ([`ErrorClass`]).

use std::path::PathBuf;

/// What a caller should do after a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Nothing is connected yet (the back-end is not listening, or is still busy with the
    /// previous front-end): try the connection again after a backoff.
    Retry,
    /// The connection broke or the back-end refused a step: hang up, connect again and replay
    /// the whole handshake.
    Reconnect,
    /// Trying again cannot help: this back-end cannot serve the device as the guest set it up
    /// (features or queues missing, rings outside guest RAM).
    Fatal,
}

/// Errors talking to a back-end, one per protocol step; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// connect(2) failed.
    #[error("cannot connect to vhost-user back-end {0}: {1}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// The handshake deadline could not be armed.
    #[error("vhost-user back-end {0}: cannot arm the reply deadline: {1}")]
    Deadline(PathBuf, #[source] std::io::Error),
    /// SET_OWNER failed.
    #[error("vhost-user back-end {0}: SET_OWNER failed: {1}")]
    SetOwner(PathBuf, #[source] vhost::Error),
    /// GET_FEATURES failed.
    #[error("vhost-user back-end {0}: GET_FEATURES failed: {1}")]
    GetFeatures(PathBuf, #[source] vhost::Error),
    /// GET_PROTOCOL_FEATURES failed.
    #[error("vhost-user back-end {0}: GET_PROTOCOL_FEATURES failed: {1}")]
    GetProtocolFeatures(PathBuf, #[source] vhost::Error),
    /// SET_PROTOCOL_FEATURES failed.
    #[error("vhost-user back-end {0}: SET_PROTOCOL_FEATURES failed: {1}")]
    SetProtocolFeatures(PathBuf, #[source] vhost::Error),
    /// GET_QUEUE_NUM failed.
    #[error("vhost-user back-end {0}: GET_QUEUE_NUM failed: {1}")]
    GetQueueNum(PathBuf, #[source] vhost::Error),
    /// GET_CONFIG failed.
    #[error("vhost-user back-end {0}: GET_CONFIG failed: {1}")]
    GetConfig(PathBuf, #[source] vhost::Error),
    /// SET_FEATURES failed.
    #[error("vhost-user back-end {0}: SET_FEATURES failed: {1}")]
    SetFeatures(PathBuf, #[source] vhost::Error),
    /// SET_MEM_TABLE failed.
    #[error("vhost-user back-end {0}: SET_MEM_TABLE failed: {1}")]
    SetMemTable(PathBuf, #[source] vhost::Error),
    /// GET_INFLIGHT_FD failed.
    #[error("vhost-user back-end {0}: GET_INFLIGHT_FD failed: {1}")]
    GetInflightFd(PathBuf, #[source] vhost::Error),
    /// SET_INFLIGHT_FD failed.
    #[error("vhost-user back-end {0}: SET_INFLIGHT_FD failed: {1}")]
    SetInflightFd(PathBuf, #[source] vhost::Error),
    /// SET_VRING_NUM failed.
    #[error("vhost-user back-end {0}: SET_VRING_NUM failed: {1}")]
    SetVringNum(PathBuf, #[source] vhost::Error),
    /// SET_VRING_ADDR failed.
    #[error("vhost-user back-end {0}: SET_VRING_ADDR failed: {1}")]
    SetVringAddr(PathBuf, #[source] vhost::Error),
    /// SET_VRING_BASE failed.
    #[error("vhost-user back-end {0}: SET_VRING_BASE failed: {1}")]
    SetVringBase(PathBuf, #[source] vhost::Error),
    /// SET_VRING_CALL failed.
    #[error("vhost-user back-end {0}: SET_VRING_CALL failed: {1}")]
    SetVringCall(PathBuf, #[source] vhost::Error),
    /// SET_VRING_KICK failed.
    #[error("vhost-user back-end {0}: SET_VRING_KICK failed: {1}")]
    SetVringKick(PathBuf, #[source] vhost::Error),
    /// SET_VRING_ENABLE failed.
    #[error("vhost-user back-end {0}: SET_VRING_ENABLE failed: {1}")]
    SetVringEnable(PathBuf, #[source] vhost::Error),
    /// GET_VRING_BASE failed.
    #[error("vhost-user back-end {0}: GET_VRING_BASE failed: {1}")]
    GetVringBase(PathBuf, #[source] vhost::Error),
    /// A step needs the connection, and there is none.
    #[error("vhost-user back-end {0} is not connected")]
    NotConnected(PathBuf),
    /// A ring address the guest programmed is not in guest RAM.
    #[error("queue {queue}: ring address {addr:#x}: {source}")]
    RingAddress {
        /// Queue index.
        queue: u16,
        /// Guest physical address.
        addr: u64,
        /// Why it cannot be translated.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The back-end lacks features baton needs.
    #[error(
        "vhost-user back-end {0} does not offer required features {1:#x} (VERSION_1 and vhost-user protocol features)"
    )]
    MissingFeatures(PathBuf, u64),
    /// The back-end has fewer queues than asked for.
    #[error("vhost-user back-end {0} serves at most {1} queues, {2} were asked for")]
    TooFewQueues(PathBuf, u64, u64),
}

impl VhostUserError {
    /// What to do about this error: see [`ErrorClass`].
    pub fn class(&self) -> ErrorClass {
        use VhostUserError as E;
        match self {
            // Nobody to talk to yet, or no timer for the talk: the same attempt may work later.
            E::Connect(..) | E::Deadline(..) => ErrorClass::Retry,
            E::MissingFeatures(..) | E::TooFewQueues(..) | E::RingAddress { .. } => {
                ErrorClass::Fatal
            }
            E::SetOwner(..)
            | E::GetFeatures(..)
            | E::GetProtocolFeatures(..)
            | E::SetProtocolFeatures(..)
            | E::GetQueueNum(..)
            | E::GetConfig(..)
            | E::SetFeatures(..)
            | E::SetMemTable(..)
            | E::GetInflightFd(..)
            | E::SetInflightFd(..)
            | E::SetVringNum(..)
            | E::SetVringAddr(..)
            | E::SetVringBase(..)
            | E::SetVringCall(..)
            | E::SetVringKick(..)
            | E::SetVringEnable(..)
            | E::GetVringBase(..)
            | E::NotConnected(..) => ErrorClass::Reconnect,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_classify_themselves() {
        let p = || PathBuf::from("/run/b.sock");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            VhostUserError::Connect(p(), refused).class(),
            ErrorClass::Retry
        );
        let broken = vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::Disconnected);
        let e = VhostUserError::SetVringBase(p(), broken);
        assert_eq!(e.class(), ErrorClass::Reconnect);
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            VhostUserError::MissingFeatures(p(), 1 << 32).class(),
            ErrorClass::Fatal
        );
        assert_eq!(
            VhostUserError::NotConnected(p()).class(),
            ErrorClass::Reconnect
        );
    }
}
