//! Polled 16550 output for the kernel's crash reports (CPL0, no lock, no formatting engine).

use core::arch::asm;

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;

fn outb(port: u16, value: u8) {
    // SAFETY: writes to the serial port have no memory-safety effect.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: reading the serial line status has no memory-safety effect.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) }
    value
}

/// Writes one byte, waiting for the transmitter to be ready (bounded, in case there is none).
pub fn write_byte(b: u8) {
    for _ in 0..100_000 {
        if inb(LSR) & 0x20 != 0 {
            break;
        }
    }
    outb(COM1, b);
}

/// Writes a string.
pub fn write_str(s: &str) {
    for b in s.bytes() {
        write_byte(b);
    }
}

/// Writes `0x` and the value in hexadecimal.
pub fn write_hex(v: u64) {
    write_str("0x");
    let mut started = false;
    for shift in (0..16).rev() {
        let nibble = ((v >> (shift * 4)) & 0xf) as u8;
        if nibble != 0 || started || shift == 0 {
            started = true;
            write_byte(if nibble < 10 {
                b'0' + nibble
            } else {
                b'a' + nibble - 10
            });
        }
    }
}

/// Writes the value in decimal.
pub fn write_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        write_byte(b);
    }
}
