//! Polled 16550 serial output at CPL3 (COM1, port 0x3f8), with a lock so lines from
//! different CPUs do not interleave.
//!
//! Under PVM every port access from CPL3 is a 25 µs exit, so output checks the line status
//! once per 16 bytes (the transmit FIFO depth) rather than once per byte.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use super::sys::{inb, outb};

const COM1: u16 = 0x3f8;
const IER: u16 = COM1 + 1;
const FCR: u16 = COM1 + 2;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 0x20;
const FIFO_DEPTH: usize = 16;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Disables UART interrupts and enables (and clears) the FIFOs.
pub fn init() {
    outb(IER, 0);
    outb(FCR, 0x07);
}

/// The serial port, held locked while a value of this type lives.
pub struct Serial {
    /// Bytes written since the last "transmitter empty" check.
    pending: usize,
}

impl Serial {
    /// Takes the serial lock (spinning: lines are short).
    pub fn lock() -> Self {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        Serial {
            pending: FIFO_DEPTH,
        }
    }

    fn write_byte(&mut self, b: u8) {
        if self.pending >= FIFO_DEPTH {
            // Bounded wait, so a missing UART cannot hang the guest.
            for _ in 0..1_000_000 {
                if inb(LSR) & LSR_THRE != 0 {
                    break;
                }
            }
            self.pending = 0;
        }
        outb(COM1, b);
        self.pending += 1;
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            self.write_byte(b);
        }
        Ok(())
    }
}

impl Serial {
    /// Prints a formatted line.
    pub fn line(&mut self, args: fmt::Arguments) {
        let _ = self.write_fmt(args);
        let _ = self.write_str("\n");
    }
}

/// Prints a formatted line under the serial lock (used by [`println!`](crate::println)).
pub fn print_line(args: fmt::Arguments) {
    Serial::lock().line(args);
}

/// Prints a panic message without taking the lock (the panicking CPU may hold it).
pub fn panic_print(info: &core::panic::PanicInfo) {
    let mut serial = Serial {
        pending: FIFO_DEPTH,
    };
    let _ = write!(serial, "\n!! panic: {info}\n");
    core::mem::forget(serial);
}

/// Prints one line on the serial console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::user::serial::print_line(format_args!($($arg)*))
    };
}

/// A `Write` sink that escapes a string for a JSON string literal.
pub struct JsonStr<'a>(pub &'a str);

impl fmt::Display for JsonStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Reads one received byte from COM1 if there is one (polled: LSR bit 0, then RBR). The VMM
/// forwards its standard input to the UART.
pub fn read_byte() -> Option<u8> {
    const LSR_DR: u8 = 0x01;
    (inb(LSR) & LSR_DR != 0).then(|| inb(COM1))
}
