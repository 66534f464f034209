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
    u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(tsc_hz().max(1))).unwrap_or(u64::MAX)
}

/// Converts microseconds to TSC ticks.
pub fn us_to_tsc(us: u64) -> u64 {
    u64::try_from(u128::from(us) * u128::from(tsc_hz()) / 1_000_000).unwrap_or(u64::MAX)
}

/// Measures the TSC over a PIT channel 2 one-shot window. Returns the TSC ticks it took and
/// the uncertainty of that figure (a vCPU preempted between `rdtsc` and a port access widens
/// it), or `None` if the PIT never signalled the end (no PIT, or port 0x61 not emulated).
fn pit_window() -> Option<(u64, u64)> {
    outb(0x61, (inb(0x61) & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, PIT_COUNT.to_le_bytes()[0]);
    // Counting starts when the high byte is written: somewhere in [s0, s1].
    let s0 = rdtsc();
    outb(0x42, PIT_COUNT.to_le_bytes()[1]);
    let s1 = rdtsc();
    let mut last_low = s1;
    loop {
        let before = rdtsc();
        let out_high = inb(0x61) & 0x20 != 0;
        let after = rdtsc();
        if out_high {
            // The count ended after the last read that saw OUT low and before this one.
            let ticks = (last_low + after) / 2 - (s0 + s1) / 2;
            return Some((ticks, (s1 - s0) + (after - last_low)));
        }
        last_low = before;
        if before - s0 > 500_000_000 {
            return None;
        }
    }
}

/// Where the clock frequencies came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockSource {
    /// The hypervisor's timing leaf (CPUID 0x40000010: TSC and APIC bus kHz).
    Cpuid,
    /// Measured against PIT channel 2.
    Pit,
    /// Nothing worked: assumed frequencies.
    Guess,
}

/// Frequencies from the hypervisor timing leaf CPUID 0x40000010, if offered:
/// (TSC Hz, APIC bus Hz or 0).
fn cpuid_frequencies() -> Option<(u64, u64)> {
    let [max, ..] = sys::cpuid(0x4000_0000);
    if !(0x4000_0010..0x4001_0000).contains(&max) {
        return None;
    }
    let [tsc_khz, bus_khz, ..] = sys::cpuid(0x4000_0010);
    (tsc_khz != 0).then(|| (u64::from(tsc_khz) * 1000, u64::from(bus_khz) * 1000))
}

/// Sets the TSC and local APIC timer frequencies: from CPUID 0x40000010 when the hypervisor
/// offers it (no waiting), else by measuring over a 2 ms PIT channel 2 window (the APIC timer
/// against the TSC over the same window), else by guessing.
pub fn calibrate() -> ClockSource {
    if let Some((tsc, bus)) = cpuid_frequencies() {
        TSC_HZ.store(tsc, Ordering::Relaxed);
        if bus != 0 {
            LAPIC_HZ.store(bus, Ordering::Relaxed);
            return ClockSource::Cpuid;
        }
    }
    if measure() {
        ClockSource::Pit
    } else {
        ClockSource::Guess
    }
}

/// Measures the TSC against the PIT and the APIC timer against the TSC; false if the PIT
/// did not work.
fn measure() -> bool {
    let a0 = rdtsc();
    sys::timer(u32::MAX);
    let a1 = rdtsc();
    // Up to four windows; keep the most precise, stop once it is within 2%.
    let mut window: Option<(u64, u64)> = None;
    for _ in 0..4 {
        let Some((ticks, slack)) = pit_window() else {
            break;
        };
        if window.is_none_or(|(_, best)| slack < best) {
            window = Some((ticks, slack));
        }
        if slack * 50 < ticks {
            break;
        }
    }
    let b0 = rdtsc();
    let left = sys::timer(0);
    let b1 = rdtsc();

    let pit_ok = match window {
        Some((ticks, _)) if ticks > 0 => {
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
        let hz =
            u64::try_from(u128::from(lapic_ticks) * u128::from(tsc_hz()) / u128::from(tsc_span))
                .unwrap_or(0);
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
        // Aim 1/16 short, so a calibration error costs an extra wake-up, not an overslept tick.
        let ticks =
            u128::from(deadline - now) * u128::from(lapic_hz()) * 15 / 16 / u128::from(tsc_hz());
        sys::idle(u32::try_from(ticks.max(1)).unwrap_or(u32::MAX), None);
    }
}

/// Sleeps for `us` microseconds.
pub fn sleep_us(us: u64) {
    sleep_until(rdtsc() + us_to_tsc(us));
}
