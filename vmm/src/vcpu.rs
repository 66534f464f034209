//! vCPUs: initial state (PVH or 64-bit Linux entry for the boot vCPU; the others wait for INIT-SIPI in the
//! in-kernel LAPIC), and the per-vCPU thread that runs KVM_RUN and dispatches exits.

use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_fpu,
    kvm_msr_entry, kvm_regs, kvm_segment,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{BootInfo, Entry};
use crate::control::{ExitReason, VmControl};
use crate::devices::PioBus;
use crate::layout;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed; the string names it.
    #[error("{0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// State every vCPU gets: CPUID, MSRs, FPU, LAPIC LINT pins wired as firmware would.
pub fn configure(vcpu: &VcpuFd, cpuid: &kvm_bindings::CpuId) -> Result<(), VcpuError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(|e| VcpuError::Kvm("KVM_SET_CPUID2", e))?;
    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_WB,
            ..Default::default()
        },
    ])
    .map_err(|_| VcpuError::Kvm("building MSR list", kvm_ioctls::Error::new(libc::EINVAL)))?;
    vcpu.set_msrs(&msrs)
        .map_err(|e| VcpuError::Kvm("KVM_SET_MSRS", e))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| VcpuError::Kvm("KVM_SET_FPU", e))?;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| VcpuError::Kvm("KVM_GET_LAPIC", e))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| VcpuError::Kvm("KVM_SET_LAPIC", e))?;
    Ok(())
}

fn set_lvt_mode(regs: &mut [libc::c_char], reg: usize, mode: u32) {
    let Some(bytes) = regs.get_mut(reg..reg + 4) else {
        return;
    };
    let mut v = [0u8; 4];
    for (d, s) in v.iter_mut().zip(bytes.iter()) {
        *d = s.to_ne_bytes()[0];
    }
    let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
    for (d, s) in bytes.iter_mut().zip(val.to_le_bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
}

/// The boot vCPU's entry state for the loaded kernel's format.
pub fn set_boot_entry(vcpu: &VcpuFd, boot: &BootInfo) -> Result<(), VcpuError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| VcpuError::Kvm("KVM_GET_SREGS", e))?;
    let seg = |selector: u16, type_: u8, long: bool| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let (long, regs) = match boot.entry {
        // 32-bit protected mode, paging off, EBX = start info.
        Entry::Pvh { rip, start_info } => (
            false,
            kvm_regs {
                rip,
                rbx: start_info,
                rflags: 0x2,
                ..Default::default()
            },
        ),
        // Long mode on the identity map, RSI = zero page.
        Entry::Linux64 { rip, zero_page } => (
            true,
            kvm_regs {
                rip,
                rsi: zero_page,
                rflags: 0x2,
                ..Default::default()
            },
        ),
    };
    sregs.cs = seg(0x10, 0xb, long);
    let data = seg(0x18, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        selector: if long { 0x20 } else { sregs.cs.selector },
        limit: 0x67,
        s: 0,
        type_: 0xb,
        db: 0,
        l: 0,
        g: 0,
        ..sregs.cs
    };
    if long {
        sregs.gdt.base = layout::BOOT_GDT;
        sregs.gdt.limit = crate::boot::GDT_LIMIT;
        sregs.cr3 = layout::BOOT_PML4;
        sregs.cr4 = CR4_PAE;
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
        sregs.efer = EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| VcpuError::Kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| VcpuError::Kvm("KVM_SET_REGS", e))?;
    Ok(())
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Runs one vCPU until the VM stops. Exits are handled here; a fatal one stops the VM.
pub fn run(
    vcpu: Arc<Mutex<VcpuFd>>,
    id: u32,
    bus: Arc<PioBus>,
    mem: GuestMemoryMmap,
    control: Arc<VmControl>,
) {
    loop {
        // A pause or a stop: finish the last exit's instruction, then park (or return if
        // the VM is stopping).
        if control.pause_requested() {
            complete_pending_io(&vcpu);
            if !control.park_vcpu() {
                return;
            }
        }
        // Held across KVM_RUN and the exit's handling; released while parked, so a paused
        // vCPU's state can be read and written from another thread (live update).
        let mut vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let fatal = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                bus.write(port, data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.read(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Shutdown) => Some("triple fault (KVM_EXIT_SHUTDOWN)".to_string()),
            Ok(VcpuExit::InternalError) => Some(internal_error(&mut vcpu)),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
            )),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => {
                    control.exit(ExitReason::PowerOff);
                    None
                }
                KVM_SYSTEM_EVENT_RESET => {
                    control.exit(ExitReason::Reset);
                    None
                }
                KVM_SYSTEM_EVENT_CRASH => {
                    Some("guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".into())
                }
                other => Some(format!("unexpected system event {other}")),
            },
            Ok(other) => Some(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(what) = fatal {
            let where_ = describe_cpu(&vcpu, &mem);
            control.exit(ExitReason::Crash(format!("vCPU {id}: {what}; {where_}")));
            return;
        }
    }
}

/// Finishes the instruction behind the last I/O or MMIO exit before the vCPU parks.
///
/// KVM completes an exit's operation (the register an `in` loads, the rest of a string
/// instruction) only on the next KVM_RUN, and that pending state is not in what
/// KVM_GET_REGS and friends return: a state saved now would lose or repeat it. Entering
/// KVM_RUN with `immediate_exit` set completes it without running any guest instruction.
fn complete_pending_io(vcpu: &Mutex<VcpuFd>) {
    let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
    v.set_kvm_immediate_exit(1);
    let _ = v.run();
    v.set_kvm_immediate_exit(0);
}

fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = usize::try_from(internal.ndata)
        .unwrap_or(0)
        .min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    let what = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exception",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown",
    };
    format!(
        "KVM_EXIT_INTERNAL_ERROR suberror {} ({what}) data [{}]",
        internal.suberror,
        data.join(" ")
    )
}

/// "RIP ... CPL ... bytes ..." for a crash report.
fn describe_cpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "registers unavailable".into();
    };
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    let bytes = translate(mem, sregs.cr0, sregs.cr3, sregs.cr4, linear)
        .and_then(|gpa| {
            let mut b = [0u8; 15];
            mem.read_slice(&mut b, GuestAddress(gpa)).ok().map(|_| b)
        })
        .map_or_else(
            || "unreadable".to_string(),
            |b| {
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
        );
    format!(
        "RIP {:#x} CS {:#x} CPL {} RSP {:#x} CR0 {:#x} CR3 {:#x} instruction bytes: {bytes}",
        regs.rip, sregs.cs.selector, sregs.cs.dpl, regs.rsp, sregs.cr0, sregs.cr3
    )
}

/// Guest linear → physical address with the guest's 4-level page tables (or identity when
/// paging is off). 32-bit paging modes are not walked.
fn translate(mem: &GuestMemoryMmap, cr0: u64, cr3: u64, cr4: u64, linear: u64) -> Option<u64> {
    const PG: u64 = 1 << 31;
    const PAE: u64 = 1 << 5;
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    if cr0 & PG == 0 {
        return Some(linear);
    }
    if cr4 & PAE == 0 {
        return None;
    }
    let mut table = cr3 & ADDR;
    for (level, shift) in [(4, 39u32), (3, 30), (2, 21), (1, 12)] {
        let index = (linear >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        if level == 1 || (level <= 3 && entry & HUGE != 0) {
            let mask = (1u64 << shift) - 1;
            return Some((entry & ADDR & !mask) | (linear & mask));
        }
        table = entry & ADDR;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_walk_finds_2m_and_4k_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000; PD[0] = 2 MiB page at 0x20_0000;
        // PD[1] -> PT 0x4000, PT[3] = 0x5000.
        mem.write_obj(0x2003u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x20_0083u64, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x4003u64, GuestAddress(0x3008)).unwrap();
        mem.write_obj(0x5003u64, GuestAddress(0x4018)).unwrap();
        let t = |l| translate(&mem, 1 << 31, 0x1000, 1 << 5, l);
        assert_eq!(t(0x1234), Some(0x20_1234));
        assert_eq!(t(0x20_3010), Some(0x5010));
        assert_eq!(t(0x8000_0000), None);
        assert_eq!(translate(&mem, 0, 0, 0, 0x1234), Some(0x1234));
    }

    #[test]
    fn lvt_mode_bits() {
        let mut regs = [0 as libc::c_char; 0x400];
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x7);
    }
}
