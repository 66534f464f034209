//! The live-update handshake between the old (outgoing) and the new (incoming) VMM.
//!
//! The new VMM listens on its `--incoming PATH` socket; the old VMM connects to it. Every
//! message is one frame ([`crate::frame`]) with its own magic, so a reader that expects one
//! message and gets another says so.
//!
//! ```text
//!  old VMM (outgoing)                                  new VMM (incoming)
//!  ──────────────────                                  ──────────────────
//!  connect(PATH), connect(cpr socket) ─────────────▶  accept both; check_peer (SO_PEERCRED)
//!  check_peer; Hello{role: outgoing}  ─────────────▶
//!                 ◀─────────────────────────────────  Hello{role: incoming}
//!  both: protocol_version must be equal, roles opposite (else Abort and stop);
//!  old: Hello.pid must equal the SO_PEERCRED pid
//!  Prepare{config, devices} (BLUP) ────────────────▶  guest still runs on the old VMM:
//!                                                     map RAM by path, create VM, vCPUs,
//!                 ◀─────────────────────────────────  irqchip, devices; Prepared{phases} (BLUQ)
//!  pause vCPUs; save state; GET_VRING_BASE per ring
//!  VmState (BLUS)  ────────────────────────────────▶  validate; VmState.config == Prepare.config
//!  cpr channel: manifest + fds (if any) ───────────▶  restore vCPUs, irqchip, PIT, clock,
//!                                                     devices; reconnect back-ends (same
//!                                                     features), rings, inflight; enable
//!                 ◀─────────────────────────────────  Ready{phases} (BLUR)  (or Ack{ok: false})
//!  Commit (BLUC)  ─────────────────────────────────▶  (point of no return for the old VMM)
//!                                                     signal every vector in use; resume vCPUs
//!                 ◀─────────────────────────────────  Ack{ok: true, phases} (BLUA)
//!  exit 0
//! ```
//!
//! **Rollback.** Until the old VMM has written [`Commit`], any failure — an error or [`Abort`]
//! from the new VMM, `Ack{ok: false}`, a broken connection, a timeout — means the old VMM
//! rolls back: it makes sure the new VMM cannot run the guest (it kills the pid from
//! [`Hello::pid`], checked against the socket's SO_PEERCRED, and waits for it to exit), then
//! reconnects to the back-ends, restores its rings and resumes the guest. The new VMM never
//! resumes vCPUs before it has read `Commit`; if it gets `Abort` or loses the connection
//! first, it disconnects from the back-ends and exits non-zero. After `Commit` the old VMM
//! never resumes the guest: a lost `Ack` is logged, not rolled back, because the new VMM may
//! already be running it (two VMMs on the same RAM would corrupt the guest).
//!
//! The split into `Ready` and `Commit` costs one round trip on a local socket (tens of µs)
//! and closes the window in which both VMMs could run the guest.
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use baton_protocol::handshake::*;
//! use baton_protocol::state::VmState;
//!
//! let (mut old, mut new) = UnixStream::pair().unwrap();
//! let incoming = std::thread::spawn(move || {
//!     exchange_hello(&mut new, &Hello::new(Role::Incoming)).unwrap();
//!     let prepare = recv_prepare(&mut new).unwrap();
//!     // ... map RAM, build the VM and devices ...
//!     send_prepared(&mut new, &Ready::default()).unwrap();
//!     let state = recv_state(&mut new).unwrap();
//!     prepare.check_state(&state).unwrap();
//!     // ... restore, reconnect back-ends ...
//!     send_ready(&mut new, &Ready::default()).unwrap();
//!     recv_commit(&mut new).unwrap();
//!     // ... resume vCPUs ...
//!     send_ack(&mut new, &Ack::ok(vec![])).unwrap();
//!     state
//! });
//! let peer = exchange_hello(&mut old, &Hello::new(Role::Outgoing)).unwrap();
//! assert_eq!(peer.role, Role::Incoming);
//! let state = VmState::example(2);
//! send_prepare(&mut old, &Prepare { config: state.config.clone(), devices: state.devices.clone() })
//!     .unwrap();
//! recv_prepared(&mut old).unwrap();
//! // ... pause vCPUs, save state ...
//! send_state(&mut old, &state).unwrap();
//! recv_ready(&mut old).unwrap();
//! send_commit(&mut old, &Commit::default()).unwrap();
//! assert!(recv_ack(&mut old).unwrap().ok);
//! assert_eq!(incoming.join().unwrap(), VmState::example(2));
//! ```

use std::io::{Read, Write};

use crate::frame::{FrameError, FrameKind, Validate, read_any_frame, write_frame};
use crate::state::{MAX_STATE_LEN, STATE_KIND, VmState};

mod messages;

pub use messages::{
    Abort, Ack, Commit, FEATURE_VFIO, Hello, MAX_FEATURES, MAX_PHASES, MAX_TEXT_LEN, MessageError,
    Phase, Prepare, Ready, Role,
};

/// Frame kind of [`Prepare`]: magic `BLUP`, version 1 (capped at [`MAX_STATE_LEN`]).
pub const PREPARE_KIND: FrameKind = FrameKind::new("live-update prepare", *b"BLUP", 1);
/// Frame kind of the answer to [`Prepare`] (a [`Ready`] payload): magic `BLUQ`, version 1.
pub const PREPARED_KIND: FrameKind = FrameKind::new("live-update prepared", *b"BLUQ", 1);

/// Version of the live-update protocol as a whole (the handshake and the state stream).
pub const LIVE_UPDATE_VERSION: u16 = 1;
/// Frame kind of [`Hello`]: magic `BLUH`, version 1.
pub const HELLO_KIND: FrameKind = FrameKind::new("live-update hello", *b"BLUH", 1);
/// Frame kind of [`Ready`]: magic `BLUR`, version 1.
pub const READY_KIND: FrameKind = FrameKind::new("live-update ready", *b"BLUR", 1);
/// Frame kind of [`Commit`]: magic `BLUC`, version 1.
pub const COMMIT_KIND: FrameKind = FrameKind::new("live-update commit", *b"BLUC", 1);
/// Frame kind of [`Ack`]: magic `BLUA`, version 1.
pub const ACK_KIND: FrameKind = FrameKind::new("live-update ack", *b"BLUA", 1);
/// Frame kind of [`Abort`]: magic `BLUX`, version 1.
pub const ABORT_KIND: FrameKind = FrameKind::new("live-update abort", *b"BLUX", 1);
/// Largest handshake message (everything but the state) a reader accepts.
pub const MAX_MESSAGE_LEN: usize = 64 << 10;

impl Prepare {
    /// New VMM: checks that the state belongs to the VM it prepared (same configuration).
    pub fn check_state(&self, state: &VmState) -> Result<(), HandshakeError> {
        if state.config != self.config {
            return Err(HandshakeError::ConfigChanged);
        }
        Ok(())
    }
}

/// Errors in the handshake; [`HandshakeError::Frame`] carries transport and format errors.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing a message failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer speaks another live-update protocol version.
    #[error(
        "peer (baton-vmm {peer_vmm}, pid {peer_pid}) speaks live-update protocol {theirs}, \
         this build speaks {ours}"
    )]
    VersionMismatch {
        /// Our [`LIVE_UPDATE_VERSION`].
        ours: u16,
        /// Theirs.
        theirs: u16,
        /// Peer's VMM version.
        peer_vmm: String,
        /// Peer's pid.
        peer_pid: u32,
    },
    /// Both sides claim the same role (e.g. two outgoing VMMs).
    #[error("peer (pid {peer_pid}) is also {role:?}: connected to the wrong socket?")]
    SameRole {
        /// The role both claim.
        role: Role,
        /// Peer's pid.
        peer_pid: u32,
    },
    /// The state's configuration differs from the one sent in [`Prepare`].
    #[error("the state's VM configuration differs from the prepared one")]
    ConfigChanged,
    /// The peer aborted.
    #[error("peer aborted: {0}")]
    Aborted(String),
    /// The new VMM failed before resuming the guest.
    #[error("new VMM failed before resuming: {0}")]
    Refused(String),
}

impl HandshakeError {
    /// True when the peer went away or the stream broke (the peer may be dead or stuck), as
    /// opposed to the peer answering with a refusal. Before `Commit` either one means rollback.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, HandshakeError::Frame(f) if f.is_disconnect())
    }
}

/// Sends `ours`, reads the peer's hello, and checks version and roles.
///
/// On a mismatch the caller should [`send_abort`] with the error's text and stop; the peer
/// detects the same mismatch on its own.
pub fn exchange_hello<S: Read + Write>(s: &mut S, ours: &Hello) -> Result<Hello, HandshakeError> {
    write_frame(s, &HELLO_KIND, ours)?;
    let theirs: Hello = read_expected(s, &HELLO_KIND, MAX_MESSAGE_LEN)?;
    if theirs.protocol_version != ours.protocol_version {
        return Err(HandshakeError::VersionMismatch {
            ours: ours.protocol_version,
            theirs: theirs.protocol_version,
            peer_vmm: theirs.vmm_version,
            peer_pid: theirs.pid,
        });
    }
    if theirs.role == ours.role {
        return Err(HandshakeError::SameRole {
            role: ours.role,
            peer_pid: theirs.pid,
        });
    }
    Ok(theirs)
}

/// Reads a `T` of `kind`, or an [`Abort`] (→ [`HandshakeError::Aborted`]).
fn read_expected<R, T>(r: &mut R, kind: &FrameKind, max_len: usize) -> Result<T, HandshakeError>
where
    R: Read,
    T: serde::de::DeserializeOwned + Validate,
{
    let raw = read_any_frame(r, &[*kind, ABORT_KIND], max_len)?;
    if raw.kind == ABORT_KIND {
        let abort: Abort = raw.decode()?;
        return Err(HandshakeError::Aborted(abort.reason));
    }
    Ok(raw.decode()?)
}

/// Old VMM: sends the configuration before pausing (see [`Prepare`]).
pub fn send_prepare<W: Write>(w: &mut W, p: &Prepare) -> Result<(), HandshakeError> {
    write_frame(w, &PREPARE_KIND, p)?;
    Ok(())
}

/// New VMM: reads [`Prepare`].
pub fn recv_prepare<R: Read>(r: &mut R) -> Result<Prepare, HandshakeError> {
    read_expected(r, &PREPARE_KIND, MAX_STATE_LEN)
}

/// New VMM: the VM is built; the old VMM may pause. Carries the build's timings.
pub fn send_prepared<W: Write>(w: &mut W, ready: &Ready) -> Result<(), HandshakeError> {
    write_frame(w, &PREPARED_KIND, ready)?;
    Ok(())
}

/// Old VMM: waits until the new VMM has built the VM.
pub fn recv_prepared<R: Read>(r: &mut R) -> Result<Ready, HandshakeError> {
    read_expected(r, &PREPARED_KIND, MAX_MESSAGE_LEN)
}

/// Old VMM: sends the paused VM's state. Returns the bytes written.
pub fn send_state<W: Write>(w: &mut W, state: &VmState) -> Result<usize, HandshakeError> {
    Ok(write_frame(w, &STATE_KIND, state)?)
}

/// New VMM: reads and validates the state (capped at [`MAX_STATE_LEN`]).
pub fn recv_state<R: Read>(r: &mut R) -> Result<VmState, HandshakeError> {
    read_expected(r, &STATE_KIND, MAX_STATE_LEN)
}

/// New VMM: restored and reconnected; asks for [`Commit`].
pub fn send_ready<W: Write>(w: &mut W, ready: &Ready) -> Result<(), HandshakeError> {
    write_frame(w, &READY_KIND, ready)?;
    Ok(())
}

/// Old VMM: waits for [`Ready`]; `Ack{ok: false}` becomes [`HandshakeError::Refused`].
pub fn recv_ready<R: Read>(r: &mut R) -> Result<Ready, HandshakeError> {
    let raw = read_any_frame(r, &[READY_KIND, ACK_KIND, ABORT_KIND], MAX_MESSAGE_LEN)?;
    if raw.kind == READY_KIND {
        return Ok(raw.decode()?);
    }
    if raw.kind == ACK_KIND {
        let ack: Ack = raw.decode()?;
        return Err(HandshakeError::Refused(ack.error.unwrap_or_default()));
    }
    let abort: Abort = raw.decode()?;
    Err(HandshakeError::Aborted(abort.reason))
}

/// Old VMM: the point of no return; after this it never resumes the guest.
pub fn send_commit<W: Write>(w: &mut W, commit: &Commit) -> Result<(), HandshakeError> {
    write_frame(w, &COMMIT_KIND, commit)?;
    Ok(())
}

/// New VMM: waits for [`Commit`]; only then may it resume the vCPUs.
pub fn recv_commit<R: Read>(r: &mut R) -> Result<Commit, HandshakeError> {
    read_expected(r, &COMMIT_KIND, MAX_MESSAGE_LEN)
}

/// New VMM: reports that the guest runs ([`Ack::ok`]) or that it failed ([`Ack::failed`]).
pub fn send_ack<W: Write>(w: &mut W, ack: &Ack) -> Result<(), HandshakeError> {
    write_frame(w, &ACK_KIND, ack)?;
    Ok(())
}

/// Old VMM: waits for the final [`Ack`]; `ok: false` becomes [`HandshakeError::Refused`].
pub fn recv_ack<R: Read>(r: &mut R) -> Result<Ack, HandshakeError> {
    let ack: Ack = read_expected(r, &ACK_KIND, MAX_MESSAGE_LEN)?;
    if !ack.ok {
        return Err(HandshakeError::Refused(ack.error.unwrap_or_default()));
    }
    Ok(ack)
}

/// Either side: stops the live update with a reason (truncated to [`MAX_TEXT_LEN`] bytes).
pub fn send_abort<W: Write>(w: &mut W, reason: &str) -> Result<(), HandshakeError> {
    let mut end = reason.len().min(MAX_TEXT_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = match reason.get(..end) {
        Some("") | None => "unspecified",
        Some(r) => r,
    };
    write_frame(
        w,
        &ABORT_KIND,
        &Abort {
            reason: reason.to_string(),
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{StateError, VmState};
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    fn prepare_of(state: &VmState) -> Prepare {
        let mut devices = state.devices.clone();
        for d in &mut devices {
            d.vhost_user.rings.clear();
        }
        Prepare {
            config: state.config.clone(),
            devices,
        }
    }

    #[test]
    fn prepare_is_validated_like_the_state() {
        let state = VmState::example(1);
        prepare_of(&state).validate().unwrap();
        let mut p = prepare_of(&state);
        p.devices.pop();
        assert!(matches!(
            p.validate(),
            Err(MessageError::Prepare(StateError::DeviceCount {
                config: 2,
                state: 1
            }))
        ));
        let mut p = prepare_of(&state);
        p.config.memory.size = 0;
        assert_eq!(
            p.validate(),
            Err(MessageError::Prepare(StateError::MemorySize(0)))
        );
        // And the reader applies it.
        let (mut old, mut new) = pair();
        send_prepare(&mut old, &p).unwrap();
        let e = recv_prepare(&mut new).unwrap_err();
        assert!(e.to_string().contains("memory size 0"), "{e}");
    }

    #[test]
    fn state_must_match_the_prepared_config() {
        let state = VmState::example(2);
        let p = prepare_of(&state);
        p.check_state(&state).unwrap();
        let mut other = state.clone();
        other.config.cmdline.push_str(" quiet");
        assert!(matches!(
            p.check_state(&other),
            Err(HandshakeError::ConfigChanged)
        ));
    }

    #[test]
    fn full_sequence_carries_state_and_phases() {
        let (mut old, mut new) = pair();
        let incoming = thread::spawn(move || {
            let peer = exchange_hello(&mut new, &Hello::new(Role::Incoming)).unwrap();
            assert_eq!(peer.role, Role::Outgoing);
            let prepare = recv_prepare(&mut new).unwrap();
            send_prepared(&mut new, &Ready::default()).unwrap();
            let state = recv_state(&mut new).unwrap();
            prepare.check_state(&state).unwrap();
            let phase = |name: &str, micros| Phase {
                name: name.into(),
                micros,
            };
            send_ready(
                &mut new,
                &Ready {
                    phases: vec![phase("restore", 800)],
                },
            )
            .unwrap();
            let c = recv_commit(&mut new).unwrap();
            assert_eq!(c.committed_at_unix_ns, 42);
            send_ack(&mut new, &Ack::ok(vec![phase("resume", 30)])).unwrap();
            state
        });
        let peer = exchange_hello(&mut old, &Hello::new(Role::Outgoing)).unwrap();
        assert_eq!(peer.pid, std::process::id());
        let state = VmState::example(2);
        send_prepare(&mut old, &prepare_of(&state)).unwrap();
        assert!(recv_prepared(&mut old).unwrap().phases.is_empty());
        assert!(send_state(&mut old, &state).unwrap() > 0);
        assert_eq!(recv_ready(&mut old).unwrap().phases[0].micros, 800);
        send_commit(
            &mut old,
            &Commit {
                committed_at_unix_ns: 42,
            },
        )
        .unwrap();
        let ack = recv_ack(&mut old).unwrap();
        assert_eq!(ack.phases[0].name, "resume");
        assert_eq!(incoming.join().unwrap(), state);
    }

    #[test]
    fn version_mismatch_is_detected_by_both_sides() {
        let (mut old, mut new) = pair();
        let incoming = thread::spawn(move || {
            let hello = Hello {
                protocol_version: 2,
                ..Hello::new(Role::Incoming)
            };
            exchange_hello(&mut new, &hello).unwrap_err()
        });
        let e = exchange_hello(&mut old, &Hello::new(Role::Outgoing)).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(
                e,
                HandshakeError::VersionMismatch {
                    ours: 1,
                    theirs: 2,
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains("protocol 2") && text.contains("speaks 1"),
            "{text}"
        );
        let e = incoming.join().unwrap();
        assert!(
            matches!(
                e,
                HandshakeError::VersionMismatch {
                    ours: 2,
                    theirs: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn same_role_rejected() {
        let (mut a, mut b) = pair();
        let t = thread::spawn(move || exchange_hello(&mut b, &Hello::new(Role::Outgoing)));
        let e = exchange_hello(&mut a, &Hello::new(Role::Outgoing)).unwrap_err();
        assert!(
            matches!(
                e,
                HandshakeError::SameRole {
                    role: Role::Outgoing,
                    ..
                }
            ),
            "{e}"
        );
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn failure_before_ready_is_refused() {
        let (mut old, mut new) = pair();
        send_ack(
            &mut new,
            &Ack::failed("back-end /run/blk0.sock refused SET_FEATURES"),
        )
        .unwrap();
        let e = recv_ready(&mut old).unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Refused(r) if r.contains("SET_FEATURES")),
            "{e}"
        );
        send_ack(&mut new, &Ack::failed("resume failed")).unwrap();
        assert!(matches!(
            recv_ack(&mut old),
            Err(HandshakeError::Refused(_))
        ));
    }

    #[test]
    fn abort_is_reported_wherever_it_arrives() {
        let (mut old, mut new) = pair();
        send_abort(&mut old, "operator cancelled").unwrap();
        let e = recv_state(&mut new).unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Aborted(r) if r == "operator cancelled"),
            "{e}"
        );
        send_abort(&mut old, "timeout").unwrap();
        assert!(matches!(
            recv_commit(&mut new),
            Err(HandshakeError::Aborted(_))
        ));
        send_abort(&mut new, "cannot map RAM").unwrap();
        assert!(matches!(
            recv_ready(&mut old),
            Err(HandshakeError::Aborted(_))
        ));
        send_abort(&mut new, "").unwrap();
        assert!(
            matches!(recv_ack(&mut old), Err(HandshakeError::Aborted(r)) if r == "unspecified")
        );
        let long = "é".repeat(MAX_TEXT_LEN);
        send_abort(&mut new, &long).unwrap();
        assert!(
            matches!(recv_ack(&mut old), Err(HandshakeError::Aborted(r)) if r.len() == MAX_TEXT_LEN)
        );
    }

    #[test]
    fn new_vmm_dying_is_a_disconnect() {
        let (mut old, new) = pair();
        drop(new);
        let e = recv_ready(&mut old).unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Frame(f) if f.is_disconnect()),
            "{e}"
        );
    }

    #[test]
    fn out_of_order_message_rejected() {
        let (mut old, mut new) = pair();
        send_commit(&mut old, &Commit::default()).unwrap();
        let e = recv_state(&mut new).unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Frame(FrameError::BadMagic { found, .. }) if found == b"BLUC"),
            "{e}"
        );
    }

    #[test]
    fn inconsistent_messages_rejected() {
        let bad_ack = Ack {
            ok: true,
            error: Some("x".into()),
            phases: vec![],
        };
        assert_eq!(bad_ack.validate(), Err(MessageError::AckError { ok: true }));
        let bad_ack = Ack {
            ok: false,
            error: None,
            phases: vec![],
        };
        assert!(
            bad_ack
                .validate()
                .unwrap_err()
                .to_string()
                .contains("must carry")
        );
        let hello = Hello {
            protocol_version: 0,
            ..Hello::new(Role::Incoming)
        };
        assert_eq!(hello.validate(), Err(MessageError::ZeroVersion));
        let many = Ready {
            phases: vec![
                Phase {
                    name: "p".into(),
                    micros: 1
                };
                MAX_PHASES + 1
            ],
        };
        assert!(matches!(
            many.validate(),
            Err(MessageError::TooManyPhases(_))
        ));
        assert_eq!(
            Abort {
                reason: String::new()
            }
            .validate(),
            Err(MessageError::NoReason)
        );
        // And the reader applies them.
        let (mut old, mut new) = pair();
        write_frame(
            &mut new,
            &ACK_KIND,
            &Ack {
                ok: false,
                error: None,
                phases: vec![],
            },
        )
        .unwrap();
        assert!(matches!(
            recv_ack(&mut old),
            Err(HandshakeError::Frame(FrameError::Invalid { .. }))
        ));
    }

    #[test]
    fn messages_round_trip() {
        let (mut a, mut b) = pair();
        for hello in [Hello::new(Role::Incoming), Hello::new(Role::Outgoing)] {
            write_frame(&mut a, &HELLO_KIND, &hello).unwrap();
            assert_eq!(
                crate::frame::read_frame::<_, Hello>(&mut b, &HELLO_KIND, MAX_MESSAGE_LEN).unwrap(),
                hello
            );
        }
        let ack = Ack::ok(vec![Phase {
            name: "x".into(),
            micros: 5,
        }]);
        send_ack(&mut a, &ack).unwrap();
        assert_eq!(recv_ack(&mut b).unwrap(), ack);
    }
}
