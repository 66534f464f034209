//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and the capability
//! that describes them. Vector changes are turned into GSI routes by the owner.

use baton_protocol::state::{MsixEntryState, MsixState};

use crate::interrupts::MsiMessage;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Capability id of MSI-X.
pub const CAP_ID: u8 = 0x11;
/// Message control: MSI-X enable.
const CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CTRL_MASK_ALL: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// One table entry as the guest programs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsixEntry {
    /// Message address (low).
    pub addr_lo: u32,
    /// Message address (high).
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0 = masked). Starts masked, as the spec requires.
    pub control: u32,
}

/// The MSI-X state of one function.
#[derive(Debug, Clone)]
pub struct Msix {
    /// Table entries.
    pub table: Vec<MsixEntry>,
    /// Pending bits.
    pub pba: Vec<u64>,
    /// Message control register (enable and function-mask bits).
    pub control: u16,
}

impl Msix {
    /// `vectors` entries, all masked, MSI-X disabled.
    pub fn new(vectors: u16) -> Self {
        Msix {
            table: vec![
                MsixEntry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                usize::from(vectors)
            ],
            pba: vec![0; usize::from(vectors).div_ceil(64)],
            control: 0,
        }
    }

    /// The capability body: id, next, message control, table offset/BIR, PBA offset/BIR.
    pub fn capability(&self, bar: u8, table_off: u32, pba_off: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = CAP_ID;
        let size = u16::try_from(self.table.len().saturating_sub(1)).unwrap_or(0);
        c[2..4].copy_from_slice(&size.to_le_bytes());
        c[4..8].copy_from_slice(&(table_off | u32::from(bar)).to_le_bytes());
        c[8..12].copy_from_slice(&(pba_off | u32::from(bar)).to_le_bytes());
        c
    }

    /// Write mask for the capability: only the enable and function-mask bits are writable.
    pub fn capability_wmask() -> [u8; 12] {
        let mut m = [0u8; 12];
        m[3] = 0xc0;
        m
    }

    /// The table, pending bits and control word, for a live update.
    pub fn save(&self) -> MsixState {
        MsixState {
            table: self
                .table
                .iter()
                .map(|e| MsixEntryState {
                    addr_lo: e.addr_lo,
                    addr_hi: e.addr_hi,
                    data: e.data,
                    control: e.control,
                })
                .collect(),
            pba: self.pba.clone(),
            control: self.control,
        }
    }

    /// Takes the table, pending bits and control word another VMM saved (entries beyond this
    /// table's size are ignored; the caller checks the sizes match).
    pub fn restore(&mut self, s: &MsixState) {
        for (e, saved) in self.table.iter_mut().zip(&s.table) {
            *e = MsixEntry {
                addr_lo: saved.addr_lo,
                addr_hi: saved.addr_hi,
                data: saved.data,
                control: saved.control,
            };
        }
        for (p, saved) in self.pba.iter_mut().zip(&s.pba) {
            *p = *saved;
        }
        self.control = s.control;
    }

    /// Whether MSI-X is enabled and not function-masked.
    pub fn enabled(&self) -> bool {
        self.control & CTRL_ENABLE != 0 && self.control & CTRL_MASK_ALL == 0
    }

    /// The message of `vector` if it can be delivered now (enabled, unmasked).
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let e = self.table.get(usize::from(vector))?;
        (self.enabled() && e.control & VECTOR_MASKED == 0).then_some(MsiMessage {
            address: (u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo),
            data: e.data,
        })
    }

    /// Reads from the table region at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (idx, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        let Some(e) = usize::try_from(idx).ok().and_then(|i| self.table.get(i)) else {
            return;
        };
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&e.addr_lo.to_le_bytes());
        raw[4..8].copy_from_slice(&e.addr_hi.to_le_bytes());
        raw[8..12].copy_from_slice(&e.data.to_le_bytes());
        raw[12..16].copy_from_slice(&e.control.to_le_bytes());
        let start = usize::try_from(field).unwrap_or(16);
        if let Some(src) = raw.get(start..start + data.len()) {
            data.copy_from_slice(src);
        }
    }

    /// Writes to the table region; returns the vector whose entry changed.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Option<u16> {
        let (idx, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        let i = usize::try_from(idx).ok()?;
        let e = self.table.get_mut(i)?;
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&e.addr_lo.to_le_bytes());
        raw[4..8].copy_from_slice(&e.addr_hi.to_le_bytes());
        raw[8..12].copy_from_slice(&e.data.to_le_bytes());
        raw[12..16].copy_from_slice(&e.control.to_le_bytes());
        let start = usize::try_from(field).ok()?;
        raw.get_mut(start..start + data.len())?
            .copy_from_slice(data);
        let word = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let new = MsixEntry {
            addr_lo: word(0),
            addr_hi: word(4),
            data: word(8),
            control: word(12) & VECTOR_MASKED,
        };
        let changed = *e != new;
        *e = new;
        if changed { u16::try_from(i).ok() } else { None }
    }

    /// Reads the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut raw = Vec::with_capacity(self.pba.len() * 8);
        for q in &self.pba {
            raw.extend_from_slice(&q.to_le_bytes());
        }
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| raw.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_restores_the_same_table() {
        let mut a = Msix::new(3);
        a.write_table(ENTRY_SIZE, &0xfee0_0000u32.to_le_bytes());
        a.write_table(ENTRY_SIZE + 8, &0x41u32.to_le_bytes());
        a.write_table(ENTRY_SIZE + 12, &0u32.to_le_bytes());
        a.control = CTRL_ENABLE;
        a.pba[0] = 0b100;
        let mut b = Msix::new(3);
        b.restore(&a.save());
        assert_eq!(b.table, a.table);
        assert_eq!((b.pba.clone(), b.control), (vec![0b100], CTRL_ENABLE));
        assert_eq!(b.message(1), a.message(1));
        assert!(b.message(1).is_some() && b.message(0).is_none());
    }

    #[test]
    fn vectors_deliver_only_when_enabled_and_unmasked() {
        let mut m = Msix::new(3);
        assert_eq!(m.write_table(16, &0xfee0_0000u32.to_le_bytes()), Some(1));
        m.write_table(24, &0x31u32.to_le_bytes());
        assert_eq!(m.message(1), None, "masked and disabled");
        m.control = CTRL_ENABLE;
        assert_eq!(m.message(1), None, "still masked");
        m.write_table(28, &0u32.to_le_bytes());
        assert_eq!(
            m.message(1),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x31
            })
        );
        m.control |= CTRL_MASK_ALL;
        assert_eq!(m.message(1), None, "function mask");
        assert_eq!(m.message(7), None, "out of range");
        let mut b = [0u8; 4];
        m.read_table(24, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x31);
        assert_eq!(m.write_table(16 * 9, &[0; 4]), None);
    }
}
