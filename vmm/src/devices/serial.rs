//! COM1: a 16550 UART from vm-superio, wired to an irqfd for IRQ 4 and to the console.

use std::io::Write;

use vm_superio::Trigger;
use vm_superio::serial::{NoEvents, Serial};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial interrupt by signalling an eventfd registered as KVM irqfd for GSI 4.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The guest's console UART.
pub type ConsoleSerial = Serial<IrqTrigger, NoEvents, ConsoleOut>;

/// Why a saved UART state cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The interrupt eventfd could not be duplicated.
    #[error("duplicating the serial interrupt eventfd: {0}")]
    Eventfd(#[source] std::io::Error),
    /// vm-superio refused the state.
    #[error("invalid serial state: {0}")]
    State(#[source] vm_superio::serial::Error<std::io::Error>),
}

/// Replaces the UART's registers with a saved state (live update), keeping its interrupt
/// eventfd and output.
pub fn restore(
    serial: &mut ConsoleSerial,
    state: &vm_superio::serial::SerialState,
) -> Result<(), RestoreError> {
    let evt = serial
        .interrupt_evt()
        .0
        .try_clone()
        .map_err(RestoreError::Eventfd)?;
    let placeholder = ConsoleSerial::new(
        IrqTrigger(evt.try_clone().map_err(RestoreError::Eventfd)?),
        Box::new(std::io::sink()),
    );
    let old = std::mem::replace(serial, placeholder);
    let out = old.into_writer();
    *serial = vm_superio::Serial::from_state(state, IrqTrigger(evt), NoEvents, out)
        .map_err(RestoreError::State)?;
    Ok(())
}
