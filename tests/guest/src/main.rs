//! baton-test-guest: a freestanding PVH guest that boots under baton-vmm (KVM, including
//! PVM) and QEMU from the same image.
//!
//! A tiny CPL0 kernel ([`kernel`]) enters long mode, sets up descriptor tables and traps, and
//! drops to CPL3 at once. Everything else ([`user`]): serial, ACPI, timers, SMP bring-up and
//! the tests selected by the command line, runs at CPL3, where code runs natively under PVM,
//! and enters the kernel only through the small system-call ABI in [`abi`].

#![no_std]
#![no_main]

mod abi;
mod kernel;
mod user;

/// Panic: report and stop the VM. At CPL3 through the user console and the `Crash` system
/// call, at CPL0 through the kernel console and a triple fault.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    if cs & 3 == 3 {
        user::serial::panic_print(info);
        user::sys::crash()
    } else {
        kernel::console::write_str("\n!! kernel panic\n");
        kernel::trap::triple_fault()
    }
}
