//! Time at CPL3: the TSC calibrated against PIT channel 2, the local APIC timer calibrated
//! against the TSC, and sleeping on the APIC timer in `hlt` (never spinning).

use core::sync::atomic::{AtomicU64, Ordering};

use super::sys::{self, inb, outb, rdtsc};

/// PIT input clock.
const PIT_HZ: u64 = 1_193_182;
/// PIT channel 2 count for the calibration window (2 ms).
const PIT_COUNT: u16 = 2386;
/// TSC frequency assumed when the PIT is unusable.
const FALLBACK_TSC_HZ: u64 = 2_000_000_000;
/// Local APIC timer frequency assumed when its calibration fails (KVM and QEMU use 1 GHz).
const FALLBACK_LAPIC_HZ: u64 = 1_000_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(FALLBACK_TSC_HZ);
static LAPIC_HZ: AtomicU64 = AtomicU64::new(FALLBACK_LAPIC_HZ);

/// TSC frequency in Hz.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Local APIC timer frequency in Hz (divide-by-1).
pub fn lapic_hz() -> u64 {
    LAPIC_HZ.load(Ordering::Relaxed)
}

/// Converts TSC ticks to microseconds.
pub fn tsc_to_us(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(tsc_hz().max(1))) as u64
}

/// Converts microseconds to TSC ticks.
pub fn us_to_tsc(us: u64) -> u64 {
    (u128::from(us) * u128::from(tsc_hz()) / 1_000_000) as u64
}

/// Measures the TSC over a PIT channel 2 one-shot window; the TSC ticks it took, or `None`
/// if the PIT never signalled the end (no PIT, or port 0x61 not emulated).
fn pit_window() -> Option<u64> {
    outb(0x61, (inb(0x61) & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, PIT_COUNT as u8);
    outb(0x42, (PIT_COUNT >> 8) as u8);
    let start = rdtsc();
    loop {
        let before = rdtsc();
        if inb(0x61) & 0x20 != 0 {
            let after = rdtsc();
            return Some((before + after) / 2 - start);
        }
        if before - start > 500_000_000 {
            return None;
        }
    }
}

/// Calibrates the TSC (PIT channel 2) and the local APIC timer (against the TSC, over the
/// same window). Returns true if the PIT worked; otherwise fallback frequencies are used.
pub fn calibrate() -> bool {
    let a0 = rdtsc();
    sys::timer(u32::MAX);
    let a1 = rdtsc();
    let window = pit_window();
    let b0 = rdtsc();
    let left = sys::timer(0);
    let b1 = rdtsc();

    let pit_ok = match window {
        Some(ticks) if ticks > 0 => {
            let hz = ticks * PIT_HZ / u64::from(PIT_COUNT);
            let plausible = (50_000_000..20_000_000_000).contains(&hz);
            if plausible {
                TSC_HZ.store(hz, Ordering::Relaxed);
            }
            plausible
        }
        _ => false,
    };
    let lapic_ticks = u64::from(u32::MAX - left);
    let tsc_span = (b0 + b1) / 2 - (a0 + a1) / 2;
    if left != 0 && lapic_ticks > 0 && tsc_span > 0 {
        let hz = (u128::from(lapic_ticks) * u128::from(tsc_hz()) / u128::from(tsc_span)) as u64;
        if (1_000_000..10_000_000_000).contains(&hz) {
            LAPIC_HZ.store(hz, Ordering::Relaxed);
        }
    }
    pit_ok
}

/// Sleeps in `hlt` until the TSC reaches `deadline` (re-arming the APIC timer after early
/// wake-ups).
pub fn sleep_until(deadline: u64) {
    loop {
        let now = rdtsc();
        if now >= deadline {
            return;
        }
        let ticks = u128::from(deadline - now) * u128::from(lapic_hz()) / u128::from(tsc_hz());
        sys::idle(ticks.clamp(1, u128::from(u32::MAX)) as u32, None);
    }
}

/// Sleeps for `us` microseconds.
pub fn sleep_us(us: u64) {
    sleep_until(rdtsc() + us_to_tsc(us));
}
