//! CPUID for each vCPU: what KVM supports, with the topology leaves describing `cpus` single-
//! threaded cores in one package, and this vCPU's APIC id.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Level types in leaves 0xB/0x1F, ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` cores.
fn core_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// KVM's hypervisor leaf range starts here (signature "KVMKVMKVM").
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
/// Timing leaf (as VMware and QEMU's `vmware-cpuid-freq` define it): EAX = TSC kHz,
/// EBX = local APIC timer (bus) kHz. Saves a guest its timer calibration.
const LEAF_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz.
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;

/// Patches `supported` (KVM_GET_SUPPORTED_CPUID) for vCPU `id` of `cpus`; `tsc_khz` (if known)
/// is published in the timing leaf.
pub fn for_vcpu(supported: &CpuId, id: u32, cpus: u32, tsc_khz: Option<u32>) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC id [31:24], logical processors per package [23:16],
                // CLFLUSH line size in quadwords [15:8].
                e.ebx = (id << 24) | ((cpus & 0xff) << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; [25:14]: logical processors sharing
                // this cache - 1 (the last level is shared by all, the others are per core).
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 {
                    cpus.saturating_sub(1)
                } else {
                    0
                };
                e.eax = (e.eax & 0x3fff)
                    | ((cpus.saturating_sub(1) & 0x3f) << 26)
                    | ((sharing & 0xfff) << 14);
            }
            LEAF_AMD_SIZES => {
                e.ecx = (e.ecx & !0xff) | (cpus.saturating_sub(1) & 0xff);
            }
            _ => {}
        }
    }
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if leaf <= max_basic {
            entries.extend(topology(leaf, id, cpus));
        }
    }
    if let Some(khz) = tsc_khz {
        if let Some(h) = entries.iter_mut().find(|e| e.function == LEAF_HYPERVISOR) {
            h.eax = h.eax.max(LEAF_TIMING);
            entries.retain(|e| e.function != LEAF_TIMING);
            entries.push(kvm_cpuid_entry2 {
                function: LEAF_TIMING,
                eax: khz,
                ebx: KVM_APIC_BUS_KHZ,
                ..Default::default()
            });
        }
    }
    // The entries came from a valid CpuId and we added at most 6: this cannot exceed the cap.
    CpuId::from_entries(&entries).unwrap_or_else(|_| supported.clone())
}

fn topology(function: u32, id: u32, cpus: u32) -> [kvm_cpuid_entry2; 3] {
    let e = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: id,
        ..Default::default()
    };
    [
        // One thread per core: shift 0, one logical processor at this level.
        e(0, 0, 1, LEVEL_SMT),
        e(1, core_bits(cpus), cpus, LEVEL_CORE),
        // Level type 0 ends the enumeration.
        e(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                eax: 99,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn apic_id_and_counts() {
        let c = for_vcpu(&supported(), 3, 4, None);
        let l1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let core = c
            .as_slice()
            .iter()
            .find(|e| e.function == 0xb && e.index == 1)
            .unwrap();
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 3));
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
        assert_eq!(
            c.as_slice().iter().filter(|e| e.function == 0x1f).count(),
            3
        );
    }

    #[test]
    fn timing_leaf_when_tsc_known() {
        let mut entries = supported().as_slice().to_vec();
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: 0x4000_0001,
            ..Default::default()
        });
        let c = for_vcpu(
            &CpuId::from_entries(&entries).unwrap(),
            0,
            1,
            Some(2_600_000),
        );
        let h = c
            .as_slice()
            .iter()
            .find(|e| e.function == LEAF_HYPERVISOR)
            .unwrap();
        assert_eq!(h.eax, LEAF_TIMING);
        let t = c
            .as_slice()
            .iter()
            .find(|e| e.function == LEAF_TIMING)
            .unwrap();
        assert_eq!((t.eax, t.ebx), (2_600_000, KVM_APIC_BUS_KHZ));
    }

    #[test]
    fn core_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(core_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
