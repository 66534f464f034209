//! The system-call ABI between CPL3 (`user`) and the CPL0 kernel.
//!
//! CPL3 executes `int3` (IDT vector 3, a DPL 3 interrupt gate) with the call number in `rax`
//! and up to three arguments in `rdi`, `rsi`, `rdx`; the result comes back in `rax`. The
//! caller treats every caller-saved register (`rcx`, `rdx`, `rsi`, `rdi`, `r8`..`r11`) as
//! clobbered. A CPL3 `hlt` is also accepted (it arrives as #GP) and behaves like
//! `Idle(0, 0, 0)`.

/// System-call numbers.
#[repr(u64)]
#[derive(Clone, Copy, Debug)]
pub enum Sys {
    /// `Idle(ticks, addr, expected)`: if `addr != 0` and the u64 at `addr` differs from
    /// `expected`, return 1 at once. Otherwise, if `ticks != 0`, arm the one-shot local APIC
    /// timer with `ticks`; then `sti; hlt` until any interrupt arrives and return 0.
    Idle = 0,
    /// `Timer(ticks)`: arm (or, with 0, stop) the one-shot local APIC timer without halting;
    /// returns the timer's current count before the write (used for calibration).
    Timer = 1,
    /// `ApicId()`: this CPU's local APIC id.
    ApicId = 2,
    /// `Ipi(apic_id, icr_low)`: send an IPI through the local APIC's ICR (xAPIC).
    Ipi = 3,
    /// `Crash()`: stop the VM with a triple fault (the VMM exits non-zero). Never returns.
    Crash = 4,
}
