//! Devices the VMM emulates itself: only what the data path never touches
//! (serial console, ACPI power/reset registers). Port I/O exits are dispatched here.

pub mod serial;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::control::{ExitReason, VmControl};
use crate::layout;
use crate::pci::PciBus;

/// Dispatches port I/O and MMIO exits to the emulated devices and the PCI bus.
pub struct PioBus {
    serial: Arc<Mutex<serial::ConsoleSerial>>,
    control: Arc<VmControl>,
    pci: Arc<PciBus>,
    serial_error_logged: AtomicBool,
}

impl PioBus {
    /// A bus with COM1, the ACPI registers and PCI.
    pub fn new(
        serial: Arc<Mutex<serial::ConsoleSerial>>,
        control: Arc<VmControl>,
        pci: Arc<PciBus>,
    ) -> Self {
        PioBus {
            serial,
            control,
            pci,
            serial_error_logged: AtomicBool::new(false),
        }
    }

    /// Handles an MMIO read; nothing decoded reads as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    /// Handles an MMIO write; nothing decoded drops it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.pci.mmio_write(addr, data);
    }

    /// Handles an `in` from the guest.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        if self.pci.pio_read(port, data) {
            return;
        }
        data.fill(0xff);
        match port {
            p if (layout::PORT_COM1..layout::PORT_COM1 + 8).contains(&p) => {
                if let (Some(d), Ok(mut s)) = (data.first_mut(), self.serial.lock()) {
                    *d = s.read(offset(p));
                }
            }
            layout::PORT_SLEEP_CONTROL | layout::PORT_RESET => data.fill(0),
            _ => {}
        }
    }

    /// Handles an `out` from the guest.
    pub fn write(&self, port: u16, data: &[u8]) {
        if self.pci.pio_write(port, data) {
            return;
        }
        let Some(&v) = data.first() else { return };
        match port {
            p if (layout::PORT_COM1..layout::PORT_COM1 + 8).contains(&p) => {
                // String I/O (`rep outsb`) delivers several bytes in one exit.
                if let Ok(mut s) = self.serial.lock() {
                    for &b in data {
                        if let Err(e) = s.write(offset(p), b) {
                            // The guest decides how often this happens: say it once.
                            if !self.serial_error_logged.swap(true, Ordering::Relaxed) {
                                tracing::warn!(
                                    "serial output failing (further errors not logged): {e:?}"
                                );
                            }
                        }
                    }
                }
            }
            // HW-reduced ACPI sleep control: SLP_EN is bit 5, SLP_TYP bits 2..4.
            layout::PORT_SLEEP_CONTROL
                if v & (1 << 5) != 0 && (v >> 2) & 7 == layout::S5_SLEEP_TYPE =>
            {
                self.control.exit(ExitReason::PowerOff);
            }
            layout::PORT_RESET if v == layout::RESET_VALUE => {
                self.control.exit(ExitReason::Reset);
            }
            // i8042 "pulse reset line", the legacy way PC guests reboot.
            0x64 if v == 0xfe => self.control.exit(ExitReason::Reset),
            _ => {}
        }
    }
}

fn offset(port: u16) -> u8 {
    u8::try_from(port - layout::PORT_COM1).unwrap_or(0)
}
