//! The threads a live update runs on, each under its own seccomp filter (see
//! [`crate::sandbox`]): the old VMM's `migration-out` thread, started with the VM, which runs
//! each update the API asks for ([`Outgoing`]); the new VMM's `migration-in` thread, which
//! accepts the old VMM and builds the VM, then hands it to the main thread to start the VM's
//! threads ([`take_over`]). And stopping the new VMM on rollback without reading /proc
//! (Landlock leaves none of it): a pidfd ([`kill_and_wait`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Sender, SyncSender, channel, sync_channel};
use std::time::Duration;

use super::{Incoming, LiveUpdateError, Report};
use crate::console::ConsoleChoice;
use crate::sandbox::{self, Removable, Sandbox, kinds};
use crate::vm::Vm;

/// One live update the API asked for.
struct Job {
    dest: PathBuf,
    timeout: Duration,
    reply: SyncSender<Result<Report, LiveUpdateError>>,
}

/// The `migration-out` thread: runs the live updates of one VM, one at a time.
#[derive(Clone, Debug)]
pub struct Outgoing {
    jobs: Sender<Job>,
}

impl Outgoing {
    /// Starts the thread for `vm`; it enters `sandbox` as a `migration-out` thread before this
    /// returns.
    pub fn spawn(vm: &Arc<Vm>, sandbox: &Arc<Sandbox>) -> Result<Self, LiveUpdateError> {
        let (jobs, rx) = channel::<Job>();
        let vm = Arc::clone(vm);
        sandbox.spawn(
            "migration-out".into(),
            None,
            kinds::migration_out(),
            move |gate| {
                if !gate.enter() {
                    return;
                }
                for job in rx {
                    sandbox::violation_point("migration-out");
                    let r = vm.live_update(&job.dest, job.timeout);
                    let _ = job.reply.send(r);
                }
            },
        )?;
        Ok(Outgoing { jobs })
    }

    /// Moves the VM to the new VMM on `dest` ([`Vm::live_update`], on the thread) and waits
    /// for the outcome.
    pub fn live_update(&self, dest: &Path, timeout: Duration) -> Result<Report, LiveUpdateError> {
        let (reply, outcome) = sync_channel(1);
        let job = Job {
            dest: dest.to_path_buf(),
            timeout,
            reply,
        };
        self.jobs.send(job).map_err(|_| LiveUpdateError::Worker)?;
        outcome.recv().map_err(|_| LiveUpdateError::Worker)?
    }
}

/// Takes a VM over ([`Incoming::accept`]) on a `migration-in` thread. Once the VM is built,
/// that thread enters Landlock (keeping what `keep` and the RAM file need) and hands the VM
/// to the calling thread, which runs `host` (enter Landlock too, start the VM's threads
/// parked) while the other waits; then the switch goes on there. Returns once the guest runs
/// here, or the error; the `--incoming` sockets are removed either way.
pub fn take_over<H>(
    incoming: Incoming,
    console: ConsoleChoice,
    sandbox: &Arc<Sandbox>,
    keep: Removable,
    host: H,
) -> Result<Arc<Vm>, LiveUpdateError>
where
    H: FnOnce(&Arc<Vm>) -> Result<(), LiveUpdateError>,
{
    // A rendezvous: the VM passes only while both threads are there.
    let (built_tx, built_rx) = sync_channel::<Arc<Vm>>(0);
    let (go_tx, go_rx) = sync_channel::<Result<(), LiveUpdateError>>(1);
    let (done_tx, done_rx) = sync_channel(1);
    let sb = Arc::clone(sandbox);
    sandbox.spawn(
        "migration-in".into(),
        None,
        kinds::migration_in(),
        move |gate| {
            if !gate.enter() {
                return;
            }
            sandbox::violation_point("migration-in");
            let mut built = |vm: &Arc<Vm>| -> Result<(), LiveUpdateError> {
                sandbox::restrict_fs(&sb, &keep, vm)?;
                built_tx
                    .send(Arc::clone(vm))
                    .map_err(|_| LiveUpdateError::Worker)?;
                go_rx
                    .recv()
                    .map_err(|_| LiveUpdateError::Worker)?
                    .map_err(|e| LiveUpdateError::Start(Box::new(e)))
            };
            let r = incoming.accept(console, &mut built);
            drop(incoming);
            let _ = done_tx.send(r);
        },
    )?;
    // Nothing arrives if the thread fails before the VM is built: it then reports below.
    if let Ok(vm) = built_rx.recv() {
        let started = host(&vm);
        let _ = go_tx.send(started);
    }
    done_rx.recv().map_err(|_| LiveUpdateError::Worker)?
}

/// Kills process `pid` (SIGKILL) and waits up to `timeout` until it is gone or a zombie (which
/// holds no sockets). Through a pidfd: no pid reuse race, and no /proc to read.
pub fn kill_and_wait(pid: i32, timeout: Duration) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return;
    };
    if fd < 0 {
        // Gone already (ESRCH), or no pidfds here: a plain kill.
        // SAFETY: kill(2) of the pid the socket's SO_PEERCRED named.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return;
    }
    // SAFETY: pidfd_open just returned this fd; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call; a pidfd is readable once the
    // process has exited.
    unsafe { libc::poll(&mut p, 1, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_and_wait_returns_once_the_process_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        kill_and_wait(i32::try_from(child.id()).unwrap(), Duration::from_secs(10));
        assert!(t0.elapsed() < Duration::from_secs(5));
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }
}
