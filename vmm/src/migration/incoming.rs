//! The incoming side of a live update (the new VMM): steps 1, 3 and 4 of [`super`].

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use baton_protocol::cpr;
use baton_protocol::handshake::{self, Ack, Phase, Ready, Role};

use super::convert::{restore_kvm, vm_config};
use super::{LiveUpdateError, STEP_TIMEOUT, Timer, cpr_path, io, our_hello};
use crate::console::ConsoleChoice;
use crate::vfio;
use crate::vhost_user::RingBase;
use crate::vm::{Devices, Vm};
use baton_service::access::{self, AllowList};

/// Failure injection for the rollback tests, read by the incoming VMM from
/// `BATON_LIVE_UPDATE_FAIL`: `exit-after-prepare`, `exit-after-state`, `hang-before-ready`,
/// `abort-before-ready`, `refuse-backend`. Unset in normal use.
fn injected_failure(point: &str) -> bool {
    std::env::var("BATON_LIVE_UPDATE_FAIL").is_ok_and(|v| v == point)
}

/// Listening sockets of an incoming VMM.
pub struct Incoming {
    state: UnixListener,
    cpr: UnixListener,
    paths: [PathBuf; 2],
    allow: AllowList,
}

impl Incoming {
    /// Binds `path` (state stream) and `path.cpr` (cpr channel), mode 0600, for the peers
    /// `allow` lets in (see [`baton_service::access`]). Only a stale socket at either path is
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
        console: ConsoleChoice,
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
        // Passed-through devices: their fds follow the prepare (crate::vfio::handover).
        let passthrough = &prepare.config.passthrough;
        let source = if passthrough.is_empty() {
            vfio::Source::Open(&[])
        } else {
            let mut fds = cpr::recv_fds(&cprs)?;
            vfio::Source::HandedOver(passthrough, vfio::Received::take(&mut fds, passthrough)?)
        };
        let vm = match Vm::build(
            vm_config(&prepare.config, console),
            Devices::HandedOver(&prepare.devices),
            source,
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
            if !vm.passthrough.is_empty() {
                vm.passthrough.restore(&state.passthrough, &vm.ram.mem)?;
                t.lap("restore_vfio");
            }
            // Every back-end reconnects at once, each on a thread of its own: the switch
            // waits for the slowest, not for their sum.
            let mut jobs = Vec::new();
            for (i, (_, dev)) in vm.devices.iter().enumerate() {
                let saved = state
                    .devices
                    .get(i)
                    .ok_or(LiveUpdateError::NoDeviceState(i))?;
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
                            (String::new(), Err(LiveUpdateError::ReconnectPanicked))
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
            return Err(LiveUpdateError::AbortInjected);
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
        if let Some(hub) = &vm.config.console {
            // Clients attach here from now on; the old VMM's see it close.
            if let Err(e) = hub.take_over() {
                tracing::error!("{e}");
            }
        }
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
        return Err(LiveUpdateError::RefusedInjected(
            saved.vhost_user.socket.clone(),
        ));
    }
    d.resume(&bases, false).map_err(LiveUpdateError::Resume)
}

impl Drop for Incoming {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}
