//! IDT set-up. This runs at CPL3 on the BSP before the first kernel entry: the IDT lies in
//! user-writable RAM and CPL3 code runs natively, while the same loop at CPL0 would be
//! emulated instruction by instruction under PVM. The IDT was already loaded (`lidt`) by
//! `entry64`; the CPU reads gates only when it delivers a vector.

use super::boot::IDT;
use super::trap::{dev_irq_entry, exc_stubs, irq_eoi_entry, spurious_entry, syscall_entry};
use super::{
    DEV_VECTOR_COUNT, DEV_VECTOR_FIRST, KCODE, SPURIOUS_VECTOR, TIMER_VECTOR, WAKE_VECTOR,
};

/// Interrupt gate, present, DPL 0.
const GATE_KERNEL: u64 = 0x8e;
/// Interrupt gate, present, DPL 3 (reachable with `int3` from CPL3).
const GATE_USER: u64 = 0xee;

fn gate(handler: u64, attributes: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(KCODE) << 16)
        | (attributes << 40)
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

/// Fills the IDT: exceptions 0..31, the `int3` system-call gate, timer, wake, device
/// (MSI-X) and spurious.
pub fn init_idt() {
    let stubs = &raw const exc_stubs as u64;
    let idt = &raw mut IDT;
    let set = |vector: u8, handler: u64, attributes: u64| {
        // SAFETY: `vector` indexes the 256-entry IDT; only the BSP writes it, once, before
        // any other CPU starts and before any vector other than an exception can arrive.
        unsafe { (*idt).0[usize::from(vector)] = gate(handler, attributes) };
    };
    for vector in 0..32u8 {
        set(vector, stubs + 16 * u64::from(vector), GATE_KERNEL);
    }
    set(3, &raw const syscall_entry as u64, GATE_USER);
    set(TIMER_VECTOR, &raw const irq_eoi_entry as u64, GATE_KERNEL);
    set(WAKE_VECTOR, &raw const irq_eoi_entry as u64, GATE_KERNEL);
    for vector in DEV_VECTOR_FIRST..DEV_VECTOR_FIRST + DEV_VECTOR_COUNT {
        set(vector, &raw const dev_irq_entry as u64, GATE_KERNEL);
    }
    set(
        SPURIOUS_VECTOR,
        &raw const spurious_entry as u64,
        GATE_KERNEL,
    );
}
