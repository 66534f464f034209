//! GSI routing: the in-kernel irqchip's default routes plus one MSI route per MSI-X vector.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so every update re-sends the irqchip routes
//! (PIC and IOAPIC pins) together with the current MSI routes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;

/// First GSI handed out for MSI routes (0..24 are the IOAPIC's pins).
const FIRST_MSI_GSI: u32 = 24;
/// Number of IOAPIC pins.
const IOAPIC_PINS: u32 = 24;

/// An MSI message: what the device writes where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Address (low and high halves together).
    pub address: u64,
    /// Data.
    pub data: u32,
}

/// Errors changing the routing table.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// KVM_SET_GSI_ROUTING failed.
    #[error("KVM_SET_GSI_ROUTING: {0}")]
    SetRouting(#[source] kvm_ioctls::Error),
    /// No GSIs left.
    #[error("out of GSIs")]
    Exhausted,
}

#[derive(Debug, Default)]
struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// The VM's GSI routing table.
pub struct IrqRouting {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
    max_gsi: u32,
}

impl IrqRouting {
    /// Routing for `vm`, which has an in-kernel irqchip.
    pub fn new(vm: Arc<VmFd>, max_gsi: u32) -> Self {
        IrqRouting {
            vm,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
            max_gsi,
        }
    }

    /// Reserves `n` consecutive GSIs for MSI routes and returns the first.
    pub fn allocate(&self, n: u32) -> Result<u32, IrqError> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let base = t.next_gsi;
        let end = base.checked_add(n).ok_or(IrqError::Exhausted)?;
        if end > self.max_gsi {
            return Err(IrqError::Exhausted);
        }
        t.next_gsi = end;
        Ok(base)
    }

    /// Installs (`Some`) or removes (`None`) the MSI route of `gsi`.
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match msg {
            Some(m) => t.msi.insert(gsi, m) != Some(m),
            None => t.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.apply(&t)?;
        }
        Ok(())
    }

    fn apply(&self, t: &Table) -> Result<(), IrqError> {
        let entries = routing_entries(&t.msi);
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| IrqError::SetRouting(kvm_ioctls::Error::new(libc::E2BIG)))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(IrqError::SetRouting)
    }
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The full table: KVM's default PIC/IOAPIC routes and the MSI routes.
fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            v.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            v.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = (m.address & 0xffff_ffff) as u32;
        e.u.msi.address_hi = (m.address >> 32) as u32;
        e.u.msi.data = m.data;
        v.push(e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keeps_irqchip_routes_beside_msi() {
        let mut msi = BTreeMap::new();
        msi.insert(
            30,
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x41,
            },
        );
        let e = routing_entries(&msi);
        // 16 PIC + 24 IOAPIC + 1 MSI.
        assert_eq!(e.len(), 41);
        let last = e.last().unwrap();
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: type_ is MSI, so `msi` is the active member.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.data), (0xfee0_1000, 0x41));
    }
}
