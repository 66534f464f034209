//! CPL3 wrappers: system calls (see [`crate::abi`]), port I/O and the TSC.

use core::arch::asm;
use core::sync::atomic::AtomicU64;

use crate::abi::Sys;

/// Raw system call through the `int3` gate.
fn syscall(nr: Sys, a0: u64, a1: u64, a2: u64) -> u64 {
    let ret: u64;
    // SAFETY: the kernel's `int3` gate implements the ABI in `crate::abi`: it returns to the
    // next instruction with `rax` set and may clobber only the caller-saved registers
    // declared here. It may read memory (the `Idle` address), hence no `nomem`.
    unsafe {
        asm!(
            "int3",
            inlateout("rax") nr as u64 => ret,
            inlateout("rdi") a0 => _,
            inlateout("rsi") a1 => _,
            inlateout("rdx") a2 => _,
            lateout("rcx") _, lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Halts until an interrupt arrives, arming the timer with `ticks` first if non-zero. With
/// `wait_on = Some((word, expected))`, returns at once if `word` no longer holds `expected`
/// (checked with interrupts off, so a wake-up IPI sent after a change is never lost).
pub fn idle(ticks: u32, wait_on: Option<(&AtomicU64, u64)>) {
    let (addr, expected) = match wait_on {
        Some((word, expected)) => (word.as_ptr() as u64, expected),
        None => (0, 0),
    };
    syscall(Sys::Idle, u64::from(ticks), addr, expected);
}

/// Arms (or with 0 stops) the one-shot local APIC timer; returns the count it had.
pub fn timer(ticks: u32) -> u32 {
    u32::try_from(syscall(Sys::Timer, u64::from(ticks), 0, 0)).unwrap_or(0)
}

/// This CPU's local APIC id.
pub fn apic_id() -> u32 {
    u32::try_from(syscall(Sys::ApicId, 0, 0, 0)).unwrap_or(u32::MAX)
}

/// Sends an IPI (`icr_low` is the ICR's low word: vector, delivery mode, level).
pub fn ipi(apic_id: u32, icr_low: u32) {
    syscall(Sys::Ipi, u64::from(apic_id), u64::from(icr_low), 0);
}

/// Halts with a CPL3 `hlt`: the kernel catches the #GP, skips the instruction and idles
/// until an interrupt arrives (like [`idle`] without arguments).
pub fn hlt() {
    // SAFETY: the kernel's #GP handler implements this gate and returns after the `hlt`
    // with all registers preserved.
    unsafe { asm!("hlt", options(nomem, nostack)) }
}

/// Stops the VM with a triple fault.
pub fn crash() -> ! {
    syscall(Sys::Crash, 0, 0, 0);
    loop {
        idle(0, None);
    }
}

/// Reads the time-stamp counter (native at CPL3).
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` is allowed at CPL3 (CR4.TSD is clear) and has no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a byte to an I/O port (allowed at CPL3 by the TSS I/O bitmap).
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory-safety effect; the I/O bitmap allows every port.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack)) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) }
    value
}

/// Reads a value of type `T` from a physical address (identity-mapped below 4 GiB).
///
/// # Safety
/// `addr..addr + size_of::<T>()` must be mapped memory below 4 GiB and any bit pattern must
/// be a valid `T`.
pub unsafe fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: the caller guarantees the range is mapped; unaligned reads are allowed.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Executes `cpuid` (leaf, subleaf 0); returns eax, ebx, ecx, edx.
pub fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) }
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack)) }
    value
}

/// Reads a device register (MMIO, in the uncached top GiB).
///
/// # Safety
/// `addr` must be a mapped, naturally aligned device register or RAM location below 4 GiB.
pub unsafe fn mmio_read<T: Copy>(addr: u64) -> T {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Writes a device register (MMIO).
///
/// # Safety
/// As for [`mmio_read`]; the write must not corrupt memory the program relies on.
pub unsafe fn mmio_write<T: Copy>(addr: u64, value: T) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(addr as *mut T, value) }
}

/// Device interrupts taken so far (read before checking used rings, pass to [`wait_irq`]).
pub fn irq_count() -> u64 {
    crate::kernel::trap::DEV_IRQ_COUNT.load(core::sync::atomic::Ordering::Acquire)
}

/// Halts until a device interrupt arrives, unless one arrived since [`irq_count`] returned
/// `seen`; arms the timer with `ticks` first (0: no timeout).
pub fn wait_irq(seen: u64, ticks: u32) {
    idle(ticks, Some((&crate::kernel::trap::DEV_IRQ_COUNT, seen)));
}
