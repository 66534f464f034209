//! SMP at CPL3: start the APs with INIT-SIPI-SIPI (the kernel only writes the ICR), let
//! each report itself, then park them in `hlt` until the BSP posts a job.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::acpi::CpuList;
use super::{sys, time};
use crate::kernel::boot::{CPU_INDEX_BY_APIC, ap_trampoline};
use crate::kernel::{AP_TRAMPOLINE, MAX_CPUS, WAKE_VECTOR};
use crate::println;

/// ICR: INIT, level assert.
const ICR_INIT: u32 = 0x4500;
/// ICR: start-up, level assert; the vector is the trampoline's page number.
#[allow(clippy::cast_possible_truncation)] // the trampoline's page number is below 0x100
const ICR_SIPI: u32 = 0x4600 | (AP_TRAMPOLINE >> 12) as u32;
/// ICR: fixed delivery, level assert.
const ICR_FIXED: u32 = 0x4000;

/// `APIC id + 1` of each online CPU by CPU index (0 = not online).
static ONLINE: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Bumped by the BSP to post a job to every AP.
static JOB_SEQ: AtomicU64 = AtomicU64::new(0);
/// Number of AP jobs finished.
static JOB_DONE: AtomicU64 = AtomicU64::new(0);
/// The job the APs run when [`JOB_SEQ`] changes: 0 = [`run_job`], otherwise a `fn(usize)`
/// (called with the CPU index) posted by [`post_job`].
static JOB_FN: AtomicUsize = AtomicUsize::new(0);
/// The shared counter the `smp` job increments.
pub static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Increments per CPU in the `smp` job.
pub const JOB_INCREMENTS: u64 = 100_000;

/// Waits (sleeping) up to `us` microseconds for CPU `cpu` to come online.
fn wait_online(cpu: usize, us: u64) -> bool {
    let deadline = sys::rdtsc() + time::us_to_tsc(us);
    while ONLINE[cpu].load(Ordering::Acquire) == 0 {
        if sys::rdtsc() >= deadline {
            return false;
        }
        time::sleep_us(20);
    }
    true
}

/// The APs being started: APIC id by CPU index (index 0 is the BSP).
pub struct Startup {
    apic: [u32; MAX_CPUS],
    count: usize,
}

/// Starts every CPU in `cpus` except the BSP, all at once: INIT to each, a short delay,
/// SIPI to each. It does not wait for them (see [`finish_startup`]), so their (emulated)
/// trampolines run while the BSP calibrates its clocks. Must run before the TSC is
/// calibrated only in the sense that its one delay is a fixed TSC count (≥ 100 µs up to
/// 3 GHz).
pub fn start_aps(cpus: &CpuList, bsp_apic: u32) -> Startup {
    ONLINE[0].store(bsp_apic + 1, Ordering::Release);
    let mut startup = Startup {
        apic: [bsp_apic; MAX_CPUS],
        count: 1,
    };
    for &apic in cpus.ids[..cpus.len].iter().filter(|&&id| id != bsp_apic) {
        if startup.count < MAX_CPUS && apic < 0xff {
            startup.apic[startup.count] = apic;
            // Both fit: apic < 0xff and count < MAX_CPUS (16).
            let index = u8::try_from(startup.count).unwrap_or(0);
            if let Some(slot) = usize::try_from(apic)
                .ok()
                .and_then(|a| CPU_INDEX_BY_APIC.get(a))
            {
                slot.store(index, Ordering::Relaxed);
            }
            startup.count += 1;
        }
    }
    if startup.count == 1 {
        return startup;
    }
    let code = ap_trampoline();
    // SAFETY: the trampoline page below 1 MiB is RAM that neither the loader (start info,
    // memory map, command line) nor the image uses; it is identity-mapped and user-writable.
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), AP_TRAMPOLINE as *mut u8, code.len()) };
    core::sync::atomic::fence(Ordering::SeqCst);
    for &apic in &startup.apic[1..startup.count] {
        sys::ipi(apic, ICR_INIT);
    }
    let t = sys::rdtsc();
    while sys::rdtsc() - t < 300_000 {
        core::hint::spin_loop();
    }
    for &apic in &startup.apic[1..startup.count] {
        sys::ipi(apic, ICR_SIPI);
    }
    startup
}

/// Waits for the APs [`start_aps`] started (retrying INIT-SIPI-SIPI once for a late one);
/// returns how many CPUs, BSP included, are online. Needs calibrated clocks.
pub fn finish_startup(startup: &Startup) -> usize {
    let mut online = 1;
    for cpu in 1..startup.count {
        let apic = startup.apic[cpu];
        let up = wait_online(cpu, 100_000) || {
            sys::ipi(apic, ICR_INIT);
            time::sleep_us(200);
            sys::ipi(apic, ICR_SIPI);
            time::sleep_us(200);
            sys::ipi(apic, ICR_SIPI);
            wait_online(cpu, 500_000)
        };
        if up {
            online += 1;
        } else {
            println!("baton-test-guest: cpu {cpu} (apic_id={apic}) did not start");
        }
    }
    online
}

/// Entry of an AP at CPL3: report, then run posted jobs, idling in `hlt` in between.
pub fn ap_main(cpu: usize) -> ! {
    let apic = sys::apic_id();
    println!("cpu {cpu} online apic_id={apic}");
    ONLINE[cpu].store(apic + 1, Ordering::Release);
    let mut seen = 0;
    loop {
        let seq = JOB_SEQ.load(Ordering::Acquire);
        if seq != seen {
            seen = seq;
            match JOB_FN.load(Ordering::Acquire) {
                0 => run_job(),
                f => {
                    // SAFETY: a non-zero JOB_FN was stored by `post_job` from a `fn(usize)`.
                    let f: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(f) };
                    f(cpu);
                }
            }
            JOB_DONE.fetch_add(1, Ordering::AcqRel);
        } else {
            sys::idle(0, Some((&JOB_SEQ, seq)));
        }
    }
}

/// The `smp` test's per-CPU job: contended atomic increments of [`COUNTER`].
pub fn run_job() {
    for _ in 0..JOB_INCREMENTS {
        COUNTER.fetch_add(1, Ordering::Relaxed);
    }
}

/// Bumps [`JOB_SEQ`] and wakes the first `aps` APs with an IPI.
fn wake_aps(aps: usize) {
    JOB_SEQ.fetch_add(1, Ordering::AcqRel);
    for slot in ONLINE.iter().take(aps + 1).skip(1) {
        let apic = slot.load(Ordering::Acquire);
        if apic != 0 {
            sys::ipi(apic - 1, ICR_FIXED | u32::from(WAKE_VECTOR));
        }
    }
}

/// Posts `job` to the first `aps` APs (each calls it with its CPU index) and wakes them;
/// does not wait. The job communicates through statics.
pub fn post_job(aps: usize, job: fn(usize)) {
    JOB_FN.store(job as usize, Ordering::Release);
    wake_aps(aps);
}

/// Posts a job to all `aps` APs, wakes them with an IPI, and waits (sleeping, up to
/// `timeout_us`) until they finish; returns how many finished.
pub fn run_on_aps(aps: usize, timeout_us: u64) -> u64 {
    let before = JOB_DONE.load(Ordering::Acquire);
    JOB_FN.store(0, Ordering::Release);
    wake_aps(aps);
    let deadline = sys::rdtsc() + time::us_to_tsc(timeout_us);
    while JOB_DONE.load(Ordering::Acquire) - before < aps as u64 && sys::rdtsc() < deadline {
        time::sleep_us(100);
    }
    JOB_DONE.load(Ordering::Acquire) - before
}
