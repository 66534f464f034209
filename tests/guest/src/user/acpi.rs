//! Just enough ACPI: find the RSDP and the system tables, list the CPUs from the MADT, and
//! power off (S5) through the FADT — the HW-reduced SLEEP_CONTROL_REG (baton-vmm) or
//! PM1a_CNT (QEMU `pc`/`q35`), with SLP_TYP taken from the DSDT's `_S5_` package.

use super::sys::{outb, outw, peek};
use crate::kernel::MAX_CPUS;

/// Reads a `T` from a physical address below 4 GiB, or `None` above.
fn read<T: Copy>(addr: u64) -> Option<T> {
    if addr == 0 || addr.checked_add(core::mem::size_of::<T>() as u64)? > 1 << 32 {
        return None;
    }
    // SAFETY: ACPI tables lie in RAM or firmware ROM below 4 GiB, identity-mapped; any bit
    // pattern is a valid integer or byte array. The range check above keeps us below 4 GiB.
    Some(unsafe { peek(addr) })
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        match read::<u8>(addr + i) {
            Some(b) => sum = sum.wrapping_add(b),
            None => return false,
        }
    }
    sum == 0
}

/// Locates the RSDP: the address from the PVH start info, else a scan of 0xE0000..0xFFFFF.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    let valid = |addr: u64| read::<[u8; 8]>(addr) == Some(*b"RSD PTR ") && checksum_ok(addr, 20);
    if hint != 0 && valid(hint) {
        return Some(hint);
    }
    (0xe0000..0x100000).step_by(16).find(|&addr| valid(addr))
}

/// The system tables reachable from the RSDP.
pub struct Acpi {
    /// Address of the XSDT (entries of 8 bytes) or RSDT (4 bytes).
    root: u64,
    entry_size: u64,
}

impl Acpi {
    /// Uses the XSDT if the RSDP has one (revision ≥ 2), otherwise the RSDT.
    pub fn new(rsdp: u64) -> Option<Acpi> {
        let revision: u8 = read(rsdp + 15)?;
        let xsdt: u64 = if revision >= 2 { read(rsdp + 24)? } else { 0 };
        if xsdt != 0 {
            return Some(Acpi {
                root: xsdt,
                entry_size: 8,
            });
        }
        let rsdt: u32 = read(rsdp + 16)?;
        Some(Acpi {
            root: u64::from(rsdt),
            entry_size: 4,
        })
    }

    /// Address of the first table with this signature.
    pub fn find(&self, signature: &[u8; 4]) -> Option<u64> {
        let len: u32 = read(self.root + 4)?;
        let count = u64::from(len).saturating_sub(36) / self.entry_size;
        (0..count).find_map(|i| {
            let at = self.root + 36 + i * self.entry_size;
            let table = if self.entry_size == 8 {
                read::<u64>(at)?
            } else {
                u64::from(read::<u32>(at)?)
            };
            (read::<[u8; 4]>(table)? == *signature).then_some(table)
        })
    }
}

/// Local APIC ids of the enabled CPUs listed in the MADT.
pub struct CpuList {
    /// APIC ids, `len` of them valid.
    pub ids: [u32; MAX_CPUS],
    /// Number of ids.
    pub len: usize,
    /// Enabled CPUs that did not fit in `ids` (or have x2APIC-only ids).
    pub skipped: usize,
}

/// Lists the enabled CPUs from the MADT (type 0 local APIC and type 9 local x2APIC entries).
pub fn madt_cpus(madt: u64) -> CpuList {
    let mut list = CpuList {
        ids: [0; MAX_CPUS],
        len: 0,
        skipped: 0,
    };
    let len = u64::from(read::<u32>(madt + 4).unwrap_or(0));
    let mut at = madt + 44;
    while at + 2 <= madt + len {
        let (kind, entry_len) = match (read::<u8>(at), read::<u8>(at + 1)) {
            (Some(k), Some(l)) if l >= 2 => (k, u64::from(l)),
            _ => break,
        };
        let cpu = match kind {
            0 => read::<u8>(at + 3)
                .zip(read::<u32>(at + 4))
                .map(|(id, f)| (u32::from(id), f)),
            9 => read::<u32>(at + 4).zip(read::<u32>(at + 8)),
            _ => None,
        };
        if let Some((id, _)) = cpu.filter(|&(_, flags)| flags & 1 != 0) {
            if list.len < MAX_CPUS && id < 0xff && !list.ids[..list.len].contains(&id) {
                list.ids[list.len] = id;
                list.len += 1;
            } else {
                list.skipped += 1;
            }
        }
        at += entry_len;
    }
    list
}

/// How to enter S5.
#[derive(Clone, Copy, Debug)]
pub enum PowerOff {
    /// HW-reduced ACPI: write `(SLP_TYP << 2) | SLP_EN` to SLEEP_CONTROL_REG (I/O port).
    SleepControl { port: u16, slp_typ: u8 },
    /// Write `(SLP_TYP << 10) | SLP_EN` to the PM1a control block (I/O port).
    Pm1aCnt { port: u16, slp_typ: u8 },
}

/// Reads a Generic Address Structure in system I/O space; its port, if it is one.
fn gas_io_port(addr: u64) -> Option<u16> {
    let space: u8 = read(addr)?;
    let address: u64 = read(addr + 4)?;
    u16::try_from(address)
        .ok()
        .filter(|&port| space == 1 && port != 0)
}

/// Works out the S5 method from the FADT (and the DSDT it points to).
pub fn power_off_method(fadt: u64) -> Option<PowerOff> {
    let len = u64::from(read::<u32>(fadt + 4)?);
    let field = |offset: u64, size: u64| (offset + size <= len).then_some(fadt + offset);
    let flags: u32 = read(field(112, 4)?)?;
    let x_dsdt: u64 = field(140, 8).and_then(read).unwrap_or(0);
    let dsdt = if x_dsdt != 0 {
        x_dsdt
    } else {
        u64::from(read::<u32>(field(40, 4)?)?)
    };
    let slp_typ = s5_sleep_type(dsdt).unwrap_or(0);
    if flags & (1 << 20) != 0 {
        let port = gas_io_port(field(244, 12)?)?;
        return Some(PowerOff::SleepControl { port, slp_typ });
    }
    let port = field(172, 12).and_then(gas_io_port).or_else(|| {
        u16::try_from(read::<u32>(field(64, 4)?)?)
            .ok()
            .filter(|&p| p != 0)
    })?;
    Some(PowerOff::Pm1aCnt { port, slp_typ })
}

/// Finds `Name(_S5_, Package { SLP_TYPa, ... })` in the DSDT's AML and returns SLP_TYPa.
pub fn s5_sleep_type(dsdt: u64) -> Option<u8> {
    let len = u64::from(read::<u32>(dsdt + 4)?);
    let byte = |at: u64| {
        if at < dsdt + len {
            read::<u8>(at)
        } else {
            None
        }
    };
    let mut at = dsdt + 36;
    while at + 4 < dsdt + len {
        if read::<[u8; 4]>(at)? == *b"_S5_"
            && (byte(at - 1)? == 0x08 || (byte(at - 1)? == b'\\' && byte(at - 2)? == 0x08))
        {
            let mut p = at + 4;
            if byte(p)? != 0x12 {
                return None; // not a PackageOp
            }
            p += 1;
            p += 1 + u64::from(byte(p)? >> 6); // PkgLength: lead byte + follow bytes
            p += 1; // NumElements
            return match byte(p)? {
                0x0a => byte(p + 1), // BytePrefix
                0x00 => Some(0),     // Zero
                0x01 => Some(1),     // One
                0xff => Some(0xff),  // Ones
                _ => None,
            };
        }
        at += 1;
    }
    None
}

/// Enters S5. Returns only if the platform ignored the request.
pub fn power_off(method: PowerOff) {
    match method {
        PowerOff::SleepControl { port, slp_typ } => outb(port, ((slp_typ & 7) << 2) | (1 << 5)),
        PowerOff::Pm1aCnt { port, slp_typ } => {
            outw(port, (u16::from(slp_typ & 7) << 10) | (1 << 13));
        }
    }
}
