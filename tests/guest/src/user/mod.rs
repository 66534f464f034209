//! CPL3: the guest's drivers, boot sequence and tests. Code here runs natively under PVM and
//! enters the kernel only through [`sys`] (the `int3` system-call gate).
//!
//! BSP boot sequence ([`bsp_main`]): fill the IDT, set up the serial port, read the PVH start
//! info, find ACPI (CPUs, power-off), send INIT-SIPI to the APs, calibrate the clocks while
//! they boot, wait for them, print the `ready` line, run the test named by `test=` on the
//! command line, print its JSON result and power off.

pub mod acpi;
pub mod blk;
pub mod blktests;
pub mod devices;
pub mod dma;
pub mod iotests;
pub mod net;
pub mod nettests;
pub mod pci;
pub mod pvh;
pub mod serial;
pub mod smp;
pub mod sys;
pub mod tests;
pub mod time;
pub mod virtio;
pub mod virtq;

use crate::kernel;
use crate::println;

/// First CPL3 code on every CPU, entered from `entry64` by `iretq`.
pub extern "C" fn user_entry(cpu: u64, start_info: u64) -> ! {
    match usize::try_from(cpu) {
        Ok(0) | Err(_) => bsp_main(start_info),
        Ok(cpu) => smp::ap_main(cpu),
    }
}

/// What the tests know about the booted machine.
pub struct Machine<'a> {
    /// CPUs online, BSP included.
    pub cpus: usize,
    /// Usable RAM in MiB.
    pub mem_mib: u64,
    /// Guest time from the PVH entry to the ready line, in microseconds.
    pub boot_us: u64,
    /// The kernel command line.
    pub cmdline: &'a str,
}

fn bsp_main(start_info: u64) -> ! {
    // SAFETY: BOOT_TSC was written once by the BSP's PVH entry, before any other code ran.
    let boot_tsc = unsafe { kernel::boot::BOOT_TSC };
    let entered = sys::rdtsc();
    kernel::tables::init_idt();
    serial::init();
    let Some(info) = pvh::BootInfo::parse(start_info) else {
        println!("baton-test-guest: no valid PVH start info at {start_info:#x}");
        sys::crash()
    };
    let Some(acpi) = acpi::find_rsdp(info.rsdp).and_then(acpi::Acpi::new) else {
        println!("baton-test-guest: no ACPI RSDP found; cannot power off, stopping");
        sys::crash()
    };
    let power_off = acpi.find(b"FACP").and_then(acpi::power_off_method);
    let bsp_apic = sys::apic_id();
    let cpus = match acpi.find(b"APIC") {
        Some(madt) => acpi::madt_cpus(madt),
        None => acpi::CpuList {
            ids: [bsp_apic; kernel::MAX_CPUS],
            len: 1,
            skipped: 0,
        },
    };
    let acpi_done = sys::rdtsc();
    // The APs boot (emulated, under PVM) while the BSP reports and calibrates its clocks.
    // Holding the serial lock meanwhile keeps "cpu 0" the first report.
    let mut serial = serial::Serial::lock();
    let startup = smp::start_aps(&cpus, bsp_apic);
    serial.line(format_args!("cpu 0 online apic_id={bsp_apic} (bsp)"));
    drop(serial);
    let clock = time::calibrate();
    let calibrated = sys::rdtsc();
    let online = smp::finish_startup(&startup);
    let ready = sys::rdtsc();

    dma::init(info.ram_bytes);
    let machine = Machine {
        cpus: online,
        mem_mib: info.mem_mib(),
        boot_us: time::tsc_to_us(ready.wrapping_sub(boot_tsc)),
        cmdline: info.cmdline(),
    };
    println!(
        "baton-test-guest ready cpus={} mem_mib={} boot_ms={}.{:03} cmdline=\"{}\"",
        machine.cpus,
        machine.mem_mib,
        machine.boot_us / 1000,
        machine.boot_us % 1000,
        machine.cmdline,
    );
    // Details go after the ready line: under PVM every byte of serial output costs an exit.
    let us = |from: u64, to: u64| time::tsc_to_us(to.wrapping_sub(from));
    println!(
        "baton-test-guest: pvh v{} e820_entries={} tsc_khz={} lapic_khz={} clock={:?} \
         boot_us: kernel={} acpi={} calibrate={} smp_wait={} power_off={:?}",
        info.version,
        info.memmap_entries,
        time::tsc_hz() / 1000,
        time::lapic_hz() / 1000,
        clock,
        us(boot_tsc, entered),
        us(entered, acpi_done),
        us(acpi_done, calibrated),
        us(calibrated, ready),
        power_off,
    );
    if let Some((addr, size)) = info.module {
        println!("baton-test-guest: initramfs {size} bytes at {addr:#x}");
    }
    if cpus.skipped > 0 {
        println!(
            "baton-test-guest: {} CPUs not started (limit {})",
            cpus.skipped,
            kernel::MAX_CPUS
        );
    }

    tests::run(&machine);

    match power_off {
        Some(method) => {
            acpi::power_off(method);
            time::sleep_us(500_000);
            println!("baton-test-guest: ACPI power off ({method:?}) did not stop the VM");
        }
        None => println!("baton-test-guest: no ACPI power-off method found (FADT)"),
    }
    sys::crash()
}
