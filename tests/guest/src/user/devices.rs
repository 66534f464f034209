//! Shared pieces of the device tests: finding virtio devices, options, waiting for
//! completions (polling or interrupts), stop conditions (deadline or `q` on the serial
//! input).

use super::pci::{self, Function};
use super::pvh::cmdline_value;
use super::{serial, sys, time};

/// virtio 1.x PCI device ids.
pub const VIRTIO_NET: u16 = 0x1041;
/// virtio-blk.
pub const VIRTIO_BLK: u16 = 0x1042;

/// Transitional (legacy + modern) device id of the same device type: 0x1000 net, 0x1001 blk.
fn transitional(device: u16) -> u16 {
    match device {
        VIRTIO_NET => 0x1000,
        VIRTIO_BLK => 0x1001,
        _ => 0,
    }
}

/// The `nth` virtio function with modern device id `device` (or its transitional id; the
/// driver uses the modern interface of either) on bus 0.
pub fn find(device: u16, nth: usize) -> Option<Function> {
    let (fns, n) = pci::enumerate();
    fns[..n]
        .iter()
        .flatten()
        .filter(|f| f.vendor == 0x1af4 && (f.device == device || f.device == transitional(device)))
        .nth(nth)
        .copied()
}

/// Numeric option `key=N` from the command line, or `default`.
pub fn opt(cmdline: &str, key: &str, default: u64) -> u64 {
    cmdline_value(cmdline, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// True with `mode=poll` (busy-polling the used rings), false with `mode=irq`/default.
pub fn poll_mode(cmdline: &str, default_poll: bool) -> bool {
    match cmdline_value(cmdline, "mode") {
        Some("poll") => true,
        Some("irq") => false,
        _ => default_poll,
    }
}

/// Ends a continuous test: after `seconds` (0: never) or when a `q` arrives on COM1.
pub struct Stop {
    deadline: Option<u64>,
    next_serial: u64,
    /// Why it stopped: "seconds" or "serial".
    pub reason: &'static str,
}

/// How often the serial input is checked (each check is an exit under PVM).
const SERIAL_CHECK_US: u64 = 10_000;

impl Stop {
    /// A stop condition starting now.
    pub fn new(seconds: u64) -> Stop {
        let now = sys::rdtsc();
        Stop {
            deadline: (seconds > 0).then(|| now + time::us_to_tsc(seconds * 1_000_000)),
            next_serial: now,
            reason: "",
        }
    }

    /// True once the test should end.
    pub fn due(&mut self) -> bool {
        let now = sys::rdtsc();
        if self.deadline.is_some_and(|d| now >= d) {
            self.reason = "seconds";
            return true;
        }
        if now >= self.next_serial {
            self.next_serial = now + time::us_to_tsc(SERIAL_CHECK_US);
            while let Some(b) = serial::read_byte() {
                if b == b'q' {
                    self.reason = "serial";
                    return true;
                }
            }
        }
        false
    }
}

/// Waits until `ready()` or until an interrupt/timeout: in poll mode spins (checking
/// `ready` ~ every µs) until `ready` or `max_us`; in interrupt mode halts once (woken by a
/// device interrupt, or by the timer after `max_us`).
pub fn wait(poll: bool, max_us: u64, mut ready: impl FnMut() -> bool) {
    if poll {
        let end = sys::rdtsc() + time::us_to_tsc(max_us);
        while !ready() && sys::rdtsc() < end {
            core::hint::spin_loop();
        }
        return;
    }
    let seen = sys::irq_count();
    if ready() {
        return;
    }
    let ticks = u32::try_from(u128::from(max_us.max(1)) * u128::from(time::lapic_hz()) / 1_000_000)
        .unwrap_or(u32::MAX)
        .max(1);
    sys::wait_irq(seen, ticks);
}

/// Percentile `p` (0..=100) of sorted `v`.
pub fn percentile(v: &[u64], p: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() - 1) * p + 50) / 100;
    v[i.min(v.len() - 1)]
}
