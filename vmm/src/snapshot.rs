//! KVM state of a paused VM: every vCPU's registers and the VM-wide irqchip, PIT and clock.
//! Captured by the outgoing VMM of a live update and restored by the incoming one, in the
//! order KVM needs (Firecracker's and Cloud Hypervisor's order: MP state, regs, sregs, xsave,
//! xcrs, LAPIC, MSRs, vCPU events last so pending events survive).

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// Errors capturing or restoring state; the string names the ioctl.
#[derive(Debug, thiserror::Error)]
#[error("{0}: {1}")]
pub struct SnapshotError(pub &'static str, #[source] pub kvm_ioctls::Error);

fn kvm(step: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError(step, e)
}

/// One vCPU.
pub struct VcpuSnapshot {
    /// Multiprocessing state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers (including the TSC).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

/// VM-wide devices inside KVM.
#[derive(Clone)]
pub struct VmSnapshot {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: [kvm_irqchip; 3],
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// MSRs worth carrying: KVM's list of saved MSRs, minus those this host cannot read.
pub fn msr_indices(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(self::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    // Drop each MSR the host refuses to read; KVM stops at the first failing entry.
    let mut start = 0;
    while start < indices.len() {
        let entries: Vec<kvm_msr_entry> = indices[start..]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError("building MSR list", kvm_ioctls::Error::new(libc::E2BIG)))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(self::kvm("KVM_GET_MSRS"))?;
        if start + n >= indices.len() {
            break;
        }
        indices.remove(start + n);
        start += n;
    }
    Ok(indices)
}

/// Reads a paused vCPU.
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuSnapshot, SnapshotError> {
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries)
        .map_err(|_| SnapshotError("building MSR list", kvm_ioctls::Error::new(libc::E2BIG)))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    let msrs = msrs.as_slice()[..n].to_vec();
    let events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuSnapshot {
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        lapic,
        msrs,
        events,
    })
}

/// Writes a vCPU's state into a freshly created (not yet run) vCPU.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuSnapshot) -> Result<(), SnapshotError> {
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: the xsave area came from KVM_GET_XSAVE of a vCPU with the same CPUID on this
    // host, so its size and layout are what KVM_SET_XSAVE expects.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs)
        .map_err(|_| SnapshotError("building MSR list", kvm_ioctls::Error::new(libc::E2BIG)))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        let failed = s.msrs.get(n).map_or(0, |m| m.index);
        return Err(SnapshotError(
            "KVM_SET_MSRS (refused an MSR)",
            kvm_ioctls::Error::new(i32::try_from(failed).unwrap_or(libc::EINVAL)),
        ));
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Reads the in-kernel irqchip, PIT and clock of a paused VM.
pub fn save_vm(vm: &VmFd) -> Result<VmSnapshot, SnapshotError> {
    let mut irqchips = [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ]
    .map(|chip_id| kvm_irqchip {
        chip_id,
        ..Default::default()
    });
    for c in irqchips.iter_mut() {
        vm.get_irqchip(c).map_err(kvm("KVM_GET_IRQCHIP"))?;
    }
    let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    Ok(VmSnapshot {
        irqchips,
        pit,
        clock,
    })
}

/// Writes irqchip, PIT and clock into a VM that has both created.
pub fn restore_vm(vm: &VmFd, s: &VmSnapshot) -> Result<(), SnapshotError> {
    for c in &s.irqchips {
        vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // Only the clock value moves; flags from another VM are not valid input.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}
