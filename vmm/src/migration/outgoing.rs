//! The outgoing side of a live update (the old VMM): steps 1, 2 and 4 of [`super`], and the
//! rollback.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_protocol::cpr;
use baton_protocol::handshake::{self, Commit, FEATURE_VFIO, HandshakeError, Prepare, Ready, Role};
use baton_protocol::state::VmState;

use super::convert::{config_state, device_states, inflight_name, save_kvm, serial_state};
use super::{LiveUpdateError, PREPARE_TIMEOUT, Report, Timer, cpr_path, io, our_hello, workers};
use crate::vhost_user::{ErrorClass, RingBase};
use crate::vm::Vm;

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
        return Err(LiveUpdateError::PeerMismatch {
            hello: hello.pid,
            peer: peer.pid,
        });
    }
    let vfio = &vm.passthrough;
    if !vfio.is_empty() {
        if !hello.features.iter().any(|f| f == FEATURE_VFIO) {
            return Err(LiveUpdateError::PeerLacks(FEATURE_VFIO));
        }
        if !vfio.can_hand_over() {
            return Err(LiveUpdateError::VfioNoVaddr);
        }
    }
    handshake::send_prepare(
        &mut s,
        &Prepare {
            config: config_state(vm),
            devices: device_states(vm, &[]),
        },
    )?;
    // The new VMM builds its models of passed-through devices over the same fds while the
    // guest still runs here (see crate::vfio::handover).
    if !vfio.is_empty() {
        let fds = vfio.fds().map_err(io("duplicating VFIO fds"))?;
        let named: Vec<(&str, std::os::fd::BorrowedFd<'_>)> =
            fds.iter().map(|(n, fd)| (n.as_str(), fd.as_fd())).collect();
        cpr::send_fds(&cprs, &named)?;
    }
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
    let mut no_drain = Vec::new();
    for (_, dev) in &vm.devices {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        let suspended = d.suspend();
        bases.push(suspended.bases);
        match suspended.outcome {
            Ok(waited) => {
                let socket = d.backend().socket().display().to_string();
                if suspended.without_drain {
                    no_drain.push(socket.clone());
                }
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
    if !vfio.is_empty() {
        vfio.detach_interrupts();
        t.lap("vfio_detach_interrupts");
        if let Err(e) = vfio.release_ram(&vm.ram.mem) {
            return Err(rollback(vm, &bases, user_paused, None, e.into()));
        }
        t.lap("vfio_release_dma_vaddr");
    }
    let mut serial = serial_state(&vm.serial.lock().unwrap_or_else(|e| e.into_inner()).state());
    if let Some(hub) = &vm.config.console {
        serial.console_unread = hub.undelivered();
    }
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
        passthrough: vfio.save(),
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
        suspended: no_drain,
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
///
/// A back-end that cannot be taken back yet (busy, or gone: [`ErrorClass::Retry`] or
/// [`ErrorClass::Reconnect`]) does not stop the guest: its device reconnects in the
/// background as after a back-end crash. Only an error that retrying cannot cure
/// ([`ErrorClass::Fatal`]) fails the rollback.
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
    // Passed-through devices: DMA mappings and interrupts back to this VM (a no-op where
    // they were not let go yet).
    if let Err(e) = vm.passthrough.reclaim(&vm.ram.mem) {
        return LiveUpdateError::RollbackFailed(Box::new(cause), Box::new(e.into()));
    }
    for ((_, dev), b) in vm.devices.iter().zip(bases) {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = d.resume(b, true) {
            match e.class() {
                ErrorClass::Retry | ErrorClass::Reconnect => d.await_backend(&e),
                ErrorClass::Fatal => {
                    return LiveUpdateError::RollbackFailed(
                        Box::new(cause),
                        Box::new(LiveUpdateError::Resume(e)),
                    );
                }
            }
        }
    }
    if !user_paused {
        vm.resume();
    }
    LiveUpdateError::RolledBack(Box::new(cause))
}
