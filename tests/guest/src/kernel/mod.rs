//! The CPL0 kernel: boot, descriptor tables, page tables, trap entry and idle.
//!
//! Every instruction in here is emulated (about 1 µs each) when the guest runs under PVM, so
//! the kernel does as little as possible:
//! - [`boot`]: PVH entry, long-mode switch with prebuilt page tables, per-CPU TSS, then
//!   `iretq` to CPL3 (`user::user_entry`).
//! - [`trap`]: exception, interrupt and system-call entry; the syscall dispatcher.
//! - [`tables`]: fills the IDT. It runs at CPL3 (RAM is user-writable), before the first
//!   kernel entry, because CPL3 code runs natively.
//! - [`console`]: polled serial output used by exception handlers.

pub mod boot;
pub mod console;
pub mod tables;
pub mod trap;

/// Maximum number of CPUs the guest brings up (sizes the per-CPU stacks and TSSes).
pub const MAX_CPUS: usize = 16;

/// 64-bit kernel code selector.
pub const KCODE: u16 = 0x08;

/// Vector of the local APIC timer interrupt.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of the wake-up IPI one CPU sends another.
pub const WAKE_VECTOR: u8 = 0x21;
/// First vector of the device (MSI-X) interrupts.
pub const DEV_VECTOR_FIRST: u8 = 0x30;
/// Number of device vectors (0x30..0x6f).
pub const DEV_VECTOR_COUNT: u8 = 0x40;
/// Vector of the local APIC spurious interrupt.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Physical (= virtual) base of the local APIC registers.
pub const LAPIC_BASE: u64 = 0xfee0_0000;

/// Physical address the AP real-mode trampoline is copied to (SIPI vector 0x08).
pub const AP_TRAMPOLINE: u64 = 0x8000;
