//! Trap entry: exception stubs, interrupt stubs, the system-call gate and its dispatcher.
//!
//! - Vectors 0..31 (except 3) enter `exc_common`, which saves all registers and calls
//!   [`exception`]. A CPL3 `hlt` arrives here as #GP and is treated as "idle"; everything
//!   else prints a report and triple-faults.
//! - Vector 3 (`int3`, gate DPL 3) is the system-call gate: number in `rax`, arguments in
//!   `rdi`, `rsi`, `rdx`, result in `rax`. The user-side wrapper declares every caller-saved
//!   register clobbered, so the entry saves nothing (each CPL0 instruction is emulated under
//!   PVM).
//! - The timer and wake vectors only acknowledge the local APIC: their purpose is to end a
//!   `hlt`. Device vectors ([`DEV_VECTOR_FIRST`](super::DEV_VECTOR_FIRST) and up) also
//!   increment [`DEV_IRQ_COUNT`].

use core::arch::{asm, global_asm};

use super::{LAPIC_BASE, console};
use crate::abi::Sys;

/// Registers saved by `exc_common`, in stack order.
#[repr(C)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

global_asm!(
    r#"
    .macro EXC_NOERR n
    .balign 16
    pushq $0
    pushq $\n
    jmp exc_common
    .endm
    .macro EXC_ERR n
    .balign 16
    pushq $\n
    jmp exc_common
    .endm

    .pushsection .text.trap, "ax"
    .balign 16
    .globl exc_stubs
exc_stubs:
    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR 8
    EXC_NOERR 9
    EXC_ERR 10
    EXC_ERR 11
    EXC_ERR 12
    EXC_ERR 13
    EXC_ERR 14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR 17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR 21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR 29
    EXC_ERR 30
    EXC_NOERR 31

exc_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call {exception}
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    /* int3 from CPL3: rax = number, rdi/rsi/rdx = arguments */
    .balign 16
    .globl syscall_entry
syscall_entry:
    mov %rax, %rcx
    sub $8, %rsp
    call {dispatch}
    add $8, %rsp
    iretq

    /* timer and wake-up IPI: acknowledge the local APIC and return */
    .balign 16
    .globl irq_eoi_entry
irq_eoi_entry:
    push %rax
    mov $0xfee000b0, %eax
    movl $0, (%rax)
    pop %rax
    iretq

    /* device MSI-X vectors: count, acknowledge the local APIC, return */
    .balign 16
    .globl dev_irq_entry
dev_irq_entry:
    lock incq {irq_count}(%rip)
    push %rax
    mov $0xfee000b0, %eax
    movl $0, (%rax)
    pop %rax
    iretq

    .balign 16
    .globl spurious_entry
spurious_entry:
    iretq
    .popsection
    "#,
    exception = sym exception,
    dispatch = sym syscall_dispatch,
    irq_count = sym DEV_IRQ_COUNT,
    options(att_syntax),
);

unsafe extern "C" {
    /// 32 exception stubs, 16 bytes apart.
    pub static exc_stubs: u8;
    /// The `int3` system-call gate.
    pub static syscall_entry: u8;
    /// Entry of the timer and wake vectors.
    pub static irq_eoi_entry: u8;
    /// Entry of the device (MSI-X) vectors: increments [`DEV_IRQ_COUNT`] and acknowledges.
    pub static dev_irq_entry: u8;
    /// Entry of the spurious vector.
    pub static spurious_entry: u8;
}

/// Number of device (MSI-X) interrupts taken on any CPU. CPL3 drivers read it before
/// checking their used rings and pass it to `Idle`, so an interrupt that arrives between the
/// check and the halt is never lost.
pub static DEV_IRQ_COUNT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Local APIC register offsets used by the kernel.
mod lapic {
    pub const ID: u64 = 0x20;
    pub const ICR_LOW: u64 = 0x300;
    pub const ICR_HIGH: u64 = 0x310;
    pub const TIMER_INITIAL: u64 = 0x380;
    pub const TIMER_CURRENT: u64 = 0x390;
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the local APIC page is identity-mapped (uncached) and its registers are 32 bits.
    unsafe { core::ptr::read_volatile((LAPIC_BASE + reg) as *const u32) }
}

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: as in `lapic_read`; writing these registers has no memory-safety effect.
    unsafe { core::ptr::write_volatile((LAPIC_BASE + reg) as *mut u32, value) }
}

/// Enables interrupts, halts until one arrives, and disables them again.
fn idle() {
    // SAFETY: `sti; hlt` is the idle sequence (the `sti` shadow covers `hlt`, so an interrupt
    // pending since the caller's checks still ends the halt); handlers preserve all state.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

/// System-call dispatcher, called from `syscall_entry` with interrupts disabled.
// Register arguments carry 32-bit APIC values: truncation is the ABI.
#[allow(clippy::cast_possible_truncation)]
extern "C" fn syscall_dispatch(a0: u64, a1: u64, a2: u64, nr: u64) -> u64 {
    match nr {
        n if n == Sys::Idle as u64 => {
            if a1 != 0 {
                // SAFETY: CPL3 passes the address of an aligned u64 (an AtomicU64); all RAM
                // below 4 GiB is mapped. A bad address faults here and is reported.
                let now = unsafe { core::ptr::read_volatile(a1 as *const u64) };
                if now != a2 {
                    return 1;
                }
            }
            if a0 != 0 {
                lapic_write(lapic::TIMER_INITIAL, a0 as u32);
            }
            idle();
            0
        }
        n if n == Sys::Timer as u64 => {
            let current = lapic_read(lapic::TIMER_CURRENT);
            lapic_write(lapic::TIMER_INITIAL, a0 as u32);
            u64::from(current)
        }
        n if n == Sys::ApicId as u64 => u64::from(lapic_read(lapic::ID) >> 24),
        n if n == Sys::Ipi as u64 => {
            lapic_write(lapic::ICR_HIGH, (a0 as u32) << 24);
            lapic_write(lapic::ICR_LOW, a1 as u32);
            0
        }
        n if n == Sys::Crash as u64 => triple_fault(),
        _ => u64::MAX,
    }
}

/// Exception handler, called from `exc_common`.
extern "C" fn exception(f: &mut TrapFrame) {
    let cpl = f.cs & 3;
    if f.vector == 13 && cpl == 3 {
        // SAFETY: `rip` is the faulting CPL3 instruction inside the identity-mapped image.
        let byte = unsafe { core::ptr::read_volatile(f.rip as *const u8) };
        if byte == 0xf4 {
            // CPL3 `hlt`: the idle gate. Skip the instruction and sleep.
            f.rip += 1;
            idle();
            return;
        }
    }
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    console::write_str("\n!! exception vector=");
    console::write_dec(f.vector);
    console::write_str(" error=");
    console::write_hex(f.error);
    console::write_str(" rip=");
    console::write_hex(f.rip);
    console::write_str(" cr2=");
    console::write_hex(cr2);
    console::write_str(" cpl=");
    console::write_dec(cpl);
    console::write_str(" rsp=");
    console::write_hex(f.rsp);
    console::write_str(" apic_id=");
    console::write_dec(u64::from(lapic_read(lapic::ID) >> 24));
    console::write_str("\n!! stopping the VM (triple fault)\n");
    triple_fault()
}

/// Stops the VM: loads an empty IDT and raises #UD, which escalates to a triple fault (the
/// VMM exits non-zero; QEMU with `-no-reboot` exits too).
pub fn triple_fault() -> ! {
    let empty = [0u16; 5];
    // SAFETY: this deliberately ends the VM; nothing runs after it.
    unsafe {
        asm!("lidt [{}]", "ud2", in(reg) empty.as_ptr(), options(noreturn, nostack));
    }
}
