//! Run control shared by the vCPU threads, the API and the main thread: pause/resume
//! handshakes and the reason the VM stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why the VM stopped. The first reason reported wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off through ACPI.
    PowerOff,
    /// The guest asked for a reset; baton-vmm does not reboot guests, it exits.
    Reset,
    /// `vm.shutdown` through the API.
    Shutdown,
    /// The VM moved to a new VMM (live update).
    LiveUpdated,
    /// The VM died: triple fault, emulation failure, failed entry. The text says what and where.
    Crash(String),
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff
            | ExitReason::Shutdown
            | ExitReason::Reset
            | ExitReason::LiveUpdated => 0,
            ExitReason::Crash(_) => 1,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    exit: Option<ExitReason>,
    pause_requested: bool,
    paused_vcpus: usize,
}

/// Shared run state of one VM.
#[derive(Debug, Default)]
pub struct VmControl {
    state: Mutex<State>,
    changed: Condvar,
    /// Set while a pause is requested or the VM is stopping: the one thing a vCPU thread
    /// checks after every exit, without taking the lock.
    attention: AtomicBool,
}

impl VmControl {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records why the VM stops (if nothing did before) and wakes every waiter.
    pub fn exit(&self, reason: ExitReason) {
        let mut s = self.lock();
        if s.exit.is_none() {
            s.exit = Some(reason);
        }
        self.attention.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// The exit reason, if the VM is stopping.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Blocks until the VM stops and returns why.
    pub fn wait_exit(&self) -> ExitReason {
        let mut s = self.lock();
        loop {
            if let Some(r) = &s.exit {
                return r.clone();
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether vCPUs should stop at their next exit (a pause, or the VM stopping). Lock-free:
    /// vCPU threads call it after every exit.
    pub fn pause_requested(&self) -> bool {
        self.attention.load(Ordering::SeqCst)
    }

    fn request_pause(&self) {
        self.lock().pause_requested = true;
        self.attention.store(true, Ordering::SeqCst);
    }

    /// Called by a vCPU thread that saw a pause request: parks it until resume or exit.
    /// Returns false if the VM is stopping.
    pub fn park_vcpu(&self) -> bool {
        let mut s = self.lock();
        s.paused_vcpus += 1;
        self.changed.notify_all();
        while s.pause_requested && s.exit.is_none() {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.paused_vcpus -= 1;
        s.exit.is_none()
    }

    /// Asks vCPUs to pause. `kick` interrupts KVM_RUN on every vCPU; it is repeated until all
    /// `vcpus` are parked, which closes the race with a vCPU about to enter the guest.
    pub fn pause(&self, vcpus: usize, kick: impl Fn(), timeout: Duration) -> bool {
        self.request_pause();
        let deadline = Instant::now() + timeout;
        loop {
            kick();
            let s = self.lock();
            let (s, _) = self
                .changed
                .wait_timeout(s, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner());
            if s.paused_vcpus >= vcpus {
                return true;
            }
            if s.exit.is_some() || Instant::now() > deadline {
                return false;
            }
        }
    }

    /// Makes vCPUs park as soon as they start (before any guest code runs).
    pub fn hold(&self) {
        self.request_pause();
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.pause_requested = false;
        self.attention.store(s.exit.is_some(), Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Whether a pause is in effect.
    pub fn is_paused(&self) -> bool {
        self.lock().pause_requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_exit_reason_wins() {
        let c = VmControl::default();
        c.exit(ExitReason::PowerOff);
        c.exit(ExitReason::Crash("x".into()));
        assert_eq!(c.wait_exit(), ExitReason::PowerOff);
    }

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let c = Arc::new(VmControl::default());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    while !c.pause_requested() {
                        std::thread::yield_now();
                    }
                    c.park_vcpu()
                })
            })
            .collect();
        assert!(c.pause(2, || {}, Duration::from_secs(5)));
        assert!(c.is_paused());
        c.resume();
        for t in threads {
            assert!(t.join().unwrap());
        }
    }
}
