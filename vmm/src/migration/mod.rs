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

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_protocol::cpr;
use baton_protocol::handshake::{
    self, Ack, Commit, HandshakeError, Hello, Phase, Prepare, Ready, Role,
};
use baton_protocol::state::VmState;

mod convert;
mod workers;

pub use workers::{Outgoing, take_over};

use convert::{
    config_state, device_states, inflight_name, restore_kvm, save_kvm, serial_state, vm_config,
};

use crate::access::{self, AllowList};
use crate::config::SerialConfig;
use crate::snapshot;
use crate::vhost_user::RingBase;
use crate::virtio::pci::SuspendError;
use crate::vm::{Devices, Vm, VmError};

/// How long each side waits for the other at any step before giving up (and rolling back).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the old VMM waits for the new one to build the VM (the guest runs meanwhile).
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);

/// Connects to a socket the new VMM may have bound but not yet put in listening state
/// (ECONNREFUSED for a moment): retries for up to a second.
fn connect_retrying(path: &Path) -> Result<UnixStream, LiveUpdateError> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(LiveUpdateError::Connect(path.into(), e)),
        }
    }
}

/// Failure injection for the rollback tests, read by the incoming VMM from
/// `BATON_LIVE_UPDATE_FAIL`: `exit-after-prepare`, `exit-after-state`, `hang-before-ready`,
/// `abort-before-ready`, `refuse-backend`. Unset in normal use.
fn injected_failure(point: &str) -> bool {
    std::env::var("BATON_LIVE_UPDATE_FAIL").is_ok_and(|v| v == point)
}

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
    /// A back-end step failed.
    #[error("{0}")]
    Backend(String),
    /// A device could not be handed over (its rings did not stop, or requests it had taken
    /// did not complete).
    #[error(transparent)]
    Suspend(#[from] SuspendError),
    /// The new VMM failed before resuming the guest.
    #[error("the new VMM failed: {0}")]
    NewVmm(String),
    /// Building the VM on the incoming side failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The state does not fit this VMM.
    #[error("state does not fit: {0}")]
    State(String),
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
    Start(String),
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

// ---------------------------------------------------------------------------------------
// Outgoing side.

/// Moves the VM to the new VMM listening on `dest`. On success the guest runs there and this
/// process should exit; on failure before the commit the guest runs here again.
pub fn outgoing(vm: &Arc<Vm>, dest: &Path, timeout: Duration) -> Result<Report, LiveUpdateError> {
    let mut t = Timer::new();
    let mut s = connect_retrying(dest)?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("socket timeout"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(io("socket timeout"))?;
    let peer = cpr::check_peer(&s)?;
    let cprs = connect_retrying(&cpr_path(dest))?;
    cpr::check_peer(&cprs)?;
    let hello = handshake::exchange_hello(&mut s, &our_hello(Role::Outgoing))?;
    if i64::from(hello.pid) != i64::from(peer.pid) {
        return Err(LiveUpdateError::NewVmm(format!(
            "hello names pid {}, the socket's peer is pid {}",
            hello.pid, peer.pid
        )));
    }
    handshake::send_prepare(
        &mut s,
        &Prepare {
            config: config_state(vm),
            devices: device_states(vm, &[]),
        },
    )?;
    // The guest keeps running while the new VMM builds the VM, so this step may take as long
    // as it takes (creating a KVM VM can stall for seconds on a loaded host); the steps of
    // the switch itself keep the short deadline.
    s.set_read_timeout(Some(PREPARE_TIMEOUT.max(timeout)))
        .map_err(io("socket timeout"))?;
    let prepared = handshake::recv_prepared(&mut s)?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("socket timeout"))?;
    t.lap("prepare (guest running)");

    let paused_at = Instant::now();
    let mut t = Timer::new();
    let user_paused = vm.control.is_paused();
    if !vm.pause() {
        if !user_paused {
            vm.resume();
        }
        return Err(LiveUpdateError::Pause);
    }
    t.lap("pause_vcpus");
    let (vcpus, irqchip, pit, clock) = match save_kvm(vm) {
        Ok(v) => v,
        Err(e) => {
            if !user_paused {
                vm.resume();
            }
            return Err(e);
        }
    };
    t.lap("save_kvm_state");
    let mut bases = Vec::new();
    for (_, dev) in &vm.devices {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        let suspended = d.suspend();
        bases.push(suspended.bases);
        match suspended.outcome {
            Ok(waited) => {
                let socket = d.backend().socket().display().to_string();
                t.lap_with_part(
                    format!("suspend {socket}"),
                    Some((format!("wait_used {socket}"), waited)),
                );
            }
            Err(e) => {
                drop(d);
                return Err(rollback(vm, &bases, user_paused, None, e.into()));
            }
        }
    }
    let serial = serial_state(&vm.serial.lock().unwrap_or_else(|e| e.into_inner()).state());
    let state = VmState {
        config: config_state(vm),
        vcpus,
        irqchip,
        pit,
        clock,
        devices: device_states(vm, &bases),
        serial,
        paused_at_unix_ns: unix_ns(),
        user_paused,
    };
    let sent = (|| -> Result<(), LiveUpdateError> {
        handshake::send_state(&mut s, &state)?;
        // The inflight regions cannot be reopened by path: they travel as fds.
        let guards: Vec<_> = vm
            .devices
            .iter()
            .map(|(slot, d)| {
                (
                    inflight_name(*slot),
                    d.lock().unwrap_or_else(|e| e.into_inner()),
                )
            })
            .collect();
        let fds: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = guards
            .iter()
            .filter_map(|(name, g)| Some((name.as_str(), g.inflight_file()?.as_fd())))
            .collect();
        cpr::send_fds(&cprs, &fds)?;
        Ok(())
    })();
    if let Err(e) = sent {
        return Err(rollback(vm, &bases, user_paused, Some(peer.pid), e));
    }
    t.lap("send_state");
    let ready: Result<Ready, HandshakeError> = handshake::recv_ready(&mut s);
    let ready = match ready {
        Ok(r) => r,
        Err(e) => return Err(rollback(vm, &bases, user_paused, Some(peer.pid), e.into())),
    };
    t.lap("new_vmm_restore");
    // Point of no return: after this the guest must never run here again.
    if let Err(e) = handshake::send_commit(
        &mut s,
        &Commit {
            committed_at_unix_ns: unix_ns(),
        },
    ) {
        return Err(rollback(vm, &bases, user_paused, Some(peer.pid), e.into()));
    }
    vm.handed_over();
    let ack = handshake::recv_ack(&mut s);
    t.lap("commit_to_ack");
    let blackout_us = u64::try_from(paused_at.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut incoming = prepared.phases;
    incoming.extend(ready.phases);
    match ack {
        Ok(a) if a.ok => incoming.extend(a.phases),
        Ok(a) => tracing::error!("new VMM reported failure after commit: {:?}", a.error),
        Err(e) => tracing::error!("no ack after commit (the new VMM owns the guest): {e}"),
    }
    Ok(Report {
        blackout_us,
        outgoing: t.phases,
        incoming,
        new_pid: hello.pid,
    })
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Makes sure the new VMM cannot run the guest, then takes back the back-ends of the devices
/// suspended so far (`bases` has one entry for each, in order; the others were never let go)
/// and resumes (unless the VM was paused through the API before the update).
fn rollback(
    vm: &Vm,
    bases: &[Vec<RingBase>],
    user_paused: bool,
    new_pid: Option<i32>,
    cause: LiveUpdateError,
) -> LiveUpdateError {
    tracing::warn!("live update failed: {cause}; rolling back");
    if let Some(pid) = new_pid.filter(|p| *p > 0) {
        workers::kill_and_wait(pid, Duration::from_secs(5));
    }
    for ((_, dev), b) in vm.devices.iter().zip(bases) {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = d.resume(b, true) {
            return LiveUpdateError::RollbackFailed(
                Box::new(cause),
                Box::new(LiveUpdateError::Backend(e)),
            );
        }
    }
    if !user_paused {
        vm.resume();
    }
    LiveUpdateError::RolledBack(Box::new(cause))
}

// ---------------------------------------------------------------------------------------
// Incoming side.

/// Listening sockets of an incoming VMM.
pub struct Incoming {
    state: UnixListener,
    cpr: UnixListener,
    paths: [PathBuf; 2],
    allow: AllowList,
}

impl Incoming {
    /// Binds `path` (state stream) and `path.cpr` (cpr channel), mode 0600, for the peers
    /// `allow` lets in (see [`crate::access`]). Only a stale socket at either path is
    /// replaced; anything else there is refused and left alone.
    pub fn bind(path: &Path, allow: &AllowList) -> Result<Self, LiveUpdateError> {
        let cpr_p = cpr_path(path);
        // The cpr socket first: the state socket appearing means both are ready.
        let cpr = access::bind_private(&cpr_p, allow)?;
        let state = match access::bind_private(path, allow) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&cpr_p);
                return Err(e.into());
            }
        };
        Ok(Incoming {
            state,
            cpr,
            paths: [path.to_path_buf(), cpr_p],
            allow: allow.clone(),
        })
    }

    /// Waits for the old VMM, takes the VM over and resumes it here. `built` is called with
    /// the VM once it is built (every file it needs is open), before the state arrives: it
    /// starts the VM's threads, parked ([`Vm::start_vcpus_parked`]).
    pub fn accept(
        &self,
        serial: Option<SerialConfig>,
        built: &mut dyn FnMut(&Arc<Vm>) -> Result<(), LiveUpdateError>,
    ) -> Result<Arc<Vm>, LiveUpdateError> {
        let [state_p, cpr_p] = &self.paths;
        let (mut s, peer) =
            access::accept(&self.state, &self.allow, state_p).map_err(io("accept"))?;
        // The cpr channel must come from the same process as the state stream.
        let cprs = loop {
            let (c, p) =
                access::accept(&self.cpr, &self.allow, cpr_p).map_err(io("accept (cpr)"))?;
            if p.pid == peer.pid {
                break c;
            }
            tracing::warn!(
                "closed a connection on {} from pid {}: the state stream comes from pid {}",
                cpr_p.display(),
                p.pid,
                peer.pid
            );
        };
        s.set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(io("socket timeout"))?;
        handshake::exchange_hello(&mut s, &our_hello(Role::Incoming))?;
        let prepare = handshake::recv_prepare(&mut s)?;
        tracing::info!("prepare received; building the VM");
        if injected_failure("exit-after-prepare") {
            std::process::exit(3);
        }
        let mut t = Timer::new();
        let vm = match Vm::build(
            vm_config(&prepare.config, serial),
            Devices::HandedOver(&prepare.devices),
        ) {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                let _ = handshake::send_abort(&mut s, &e.to_string());
                return Err(e.into());
            }
        };
        tracing::info!("VM built; starting parked vCPU threads");
        // vCPU threads start now, parked: resuming after the switch is a wake-up, not a spawn.
        if let Err(e) = built(&vm) {
            let _ = handshake::send_abort(&mut s, &e.to_string());
            return Err(e);
        }
        t.lap("build_vm (guest running on the old VMM)");
        tracing::info!(phases = ?t.phases, "ready for the switch");
        handshake::send_prepared(
            &mut s,
            &Ready {
                phases: std::mem::take(&mut t.phases),
            },
        )?;
        // No step timeout while the old VMM pauses: it may take as long as it likes to
        // decide; the state itself then has STEP_TIMEOUT.
        let state = handshake::recv_state(&mut s)?;
        let mut t = Timer::new();
        let mut fds = cpr::recv_fds(&cprs)?;
        t.lap("receive_state");
        if injected_failure("exit-after-state") {
            std::process::exit(3);
        }
        let restored = (|| -> Result<(), LiveUpdateError> {
            restore_kvm(&vm, &state)?;
            t.lap("restore_kvm_state");
            // Every back-end reconnects at once, each on a thread of its own: the switch
            // waits for the slowest, not for their sum.
            let mut jobs = Vec::new();
            for (i, (_, dev)) in vm.devices.iter().enumerate() {
                let saved = state
                    .devices
                    .get(i)
                    .ok_or_else(|| LiveUpdateError::State(format!("no state for device {i}")))?;
                let inflight = saved
                    .vhost_user
                    .inflight
                    .as_ref()
                    .and_then(|inf| Some((inf, cpr::take_fd(&mut fds, &inf.fd_name)?)));
                jobs.push((dev, saved, inflight));
            }
            let results: Vec<(String, Result<u64, LiveUpdateError>)> = std::thread::scope(|sc| {
                let handles: Vec<_> = jobs
                    .into_iter()
                    .map(|(dev, saved, inflight)| {
                        sc.spawn(move || {
                            // Started by (and filtered as) the migration-in thread.
                            baton_service::sandbox::inherit("migration-in");
                            let t0 = Instant::now();
                            let r = reconnect_device(dev, saved, inflight);
                            let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                            (
                                saved.vhost_user.socket.display().to_string(),
                                r.map(|()| us),
                            )
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            (
                                String::new(),
                                Err(LiveUpdateError::Backend("reconnect thread panicked".into())),
                            )
                        })
                    })
                    .collect()
            });
            for (socket, r) in results {
                let us = r?;
                t.phases.push(Phase {
                    name: format!("reconnect {socket} (in parallel)"),
                    micros: us,
                });
            }
            t.lap("reconnect_backends");
            Ok(())
        })();
        if let Err(e) = restored {
            let _ = handshake::send_ack(&mut s, &Ack::failed(e.to_string()));
            return Err(e);
        }
        if injected_failure("hang-before-ready") {
            loop {
                std::thread::park();
            }
        }
        if injected_failure("abort-before-ready") {
            handshake::send_abort(&mut s, "abort injected before ready")?;
            return Err(LiveUpdateError::NewVmm("aborted (injected)".into()));
        }
        handshake::send_ready(
            &mut s,
            &Ready {
                phases: std::mem::take(&mut t.phases),
            },
        )?;
        // The old VMM may roll back instead of committing (then it kills us): no timeout.
        s.set_read_timeout(None).map_err(io("socket timeout"))?;
        handshake::recv_commit(&mut s)?;
        let mut t = Timer::new();
        for (_, dev) in &vm.devices {
            let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = d.enable_rings() {
                // Past the commit there is no going back: report and keep the guest running.
                tracing::error!("enabling rings after the switch: {e}");
            }
        }
        t.lap("enable_rings_and_signal");
        if !state.user_paused {
            vm.resume();
        }
        vm.take_ownership();
        t.lap("resume_vcpus");
        if let Err(e) = handshake::send_ack(&mut s, &Ack::ok(t.phases)) {
            tracing::warn!("could not acknowledge the switch (the guest runs here): {e}");
        }
        Ok(vm)
    }
}

/// Restores one device's transport state and reconnects its back-end (rings configured,
/// not yet enabled).
fn reconnect_device(
    dev: &std::sync::Mutex<crate::virtio::pci::VirtioPciDevice>,
    saved: &baton_protocol::state::DeviceState,
    inflight: Option<(&baton_protocol::state::InflightState, std::os::fd::OwnedFd)>,
) -> Result<(), LiveUpdateError> {
    let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
    d.restore(&saved.pci, &saved.virtio);
    if let Some((inf, fd)) = inflight {
        d.set_inflight(inf, std::fs::File::from(fd));
    }
    let bases: Vec<RingBase> = saved
        .vhost_user
        .rings
        .iter()
        .map(|r| RingBase {
            index: r.index,
            next_avail: u16::try_from(r.next_avail & 0xffff).unwrap_or(0),
        })
        .collect();
    if injected_failure("refuse-backend") {
        return Err(LiveUpdateError::Backend(format!(
            "vhost-user back-end {} refused (injected)",
            saved.vhost_user.socket.display()
        )));
    }
    d.resume(&bases, false).map_err(LiveUpdateError::Backend)
}

impl Drop for Incoming {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}
