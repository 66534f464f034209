//! Conversions between the VMM's own state and the live-update state stream's types
//! (`baton_protocol::state`).

use baton_protocol::state::{
    Blob, ClockState, DeviceConfigState, DeviceKindState, DeviceState, FpuState, InflightState,
    IrqchipState, MemoryState, MsrEntry, PitState, Raw, SerialConfigState, SerialState, VcpuState,
    VhostUserState, VmConfigState, VmState, VringState,
};
use kvm_bindings::{kvm_irqchip, kvm_mp_state, kvm_msr_entry};

use super::LiveUpdateError;
use crate::config::{DeviceConfig, DeviceKind};
use crate::config::{MemoryConfig, SerialConfig};
use crate::console::ConsoleChoice;
use crate::snapshot::{self, VcpuSnapshot, VmSnapshot};
use crate::vhost_user::RingBase;
use crate::vm::{Vm, VmConfig};

/// Name of a device's inflight region on the cpr channel.
pub(super) fn inflight_name(slot: u8) -> String {
    format!("inflight-{slot}")
}

pub(super) fn config_state(vm: &Vm) -> VmConfigState {
    let c = &vm.config;
    VmConfigState {
        name: c.name.clone(),
        kernel: c.kernel.clone(),
        cmdline: c.cmdline.clone(),
        initramfs: c.initramfs.clone(),
        cpus: c.cpus,
        memory: MemoryState {
            size: c.memory.size,
            path: vm.ram.path.clone(),
            hugepages: c.memory.hugepages,
        },
        serial: match &c.serial {
            SerialConfig::Stdio => SerialConfigState::Stdio,
            SerialConfig::File(p) => SerialConfigState::File(p.clone()),
            SerialConfig::Off => SerialConfigState::Off,
            SerialConfig::Socket(p) => SerialConfigState::Socket(p.clone()),
            SerialConfig::Pty => SerialConfigState::Pty,
        },
        api_socket: None,
        devices: c
            .devices
            .iter()
            .map(|d| DeviceConfigState {
                socket: d.socket.clone(),
                queues: d.queues,
                queue_size: d.queue_size,
                kind: match d.kind {
                    DeviceKind::Block => DeviceKindState::Block,
                    DeviceKind::Net { mac, mtu } => DeviceKindState::Net { mac, mtu },
                },
                reconnect_ms: d
                    .reconnect_limit
                    .map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
                drain: d.drain,
            })
            .collect(),
        passthrough: vm.passthrough.config.clone(),
    }
}

pub(super) fn vm_config(s: &VmConfigState, console: ConsoleChoice) -> VmConfig {
    VmConfig {
        name: s.name.clone(),
        kernel: s.kernel.clone(),
        cmdline: s.cmdline.clone(),
        initramfs: s.initramfs.clone(),
        cpus: s.cpus,
        memory: MemoryConfig {
            size: s.memory.size,
            path: Some(s.memory.path.clone()),
            hugepages: s.memory.hugepages,
        },
        console: console.hub,
        serial: console.serial.unwrap_or(match &s.serial {
            SerialConfigState::Stdio => SerialConfig::Stdio,
            SerialConfigState::File(p) => SerialConfig::File(p.clone()),
            SerialConfigState::Off => SerialConfig::Off,
            SerialConfigState::Socket(p) => SerialConfig::Socket(p.clone()),
            SerialConfigState::Pty => SerialConfig::Pty,
        }),
        devices: s
            .devices
            .iter()
            .map(|d| DeviceConfig {
                socket: d.socket.clone(),
                queues: d.queues,
                queue_size: d.queue_size,
                kind: match d.kind {
                    DeviceKindState::Block => DeviceKind::Block,
                    DeviceKindState::Net { mac, mtu } => DeviceKind::Net { mac, mtu },
                },
                reconnect_limit: d.reconnect_ms.map(std::time::Duration::from_millis),
                drain: d.drain,
            })
            .collect(),
    }
}

pub(super) fn vcpu_state(id: u32, s: &VcpuSnapshot) -> VcpuState {
    VcpuState {
        id,
        regs: Raw::new(&s.regs),
        sregs: Raw::new(&s.sregs),
        fpu: FpuState::default(),
        xsave: Blob(
            s.xsave
                .region
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect(),
        ),
        xcrs: Raw::new(&s.xcrs),
        lapic: Raw::new(&s.lapic),
        msrs: s
            .msrs
            .iter()
            .map(|m| MsrEntry {
                index: m.index,
                data: m.data,
            })
            .collect(),
        vcpu_events: Raw::new(&s.events),
        mp_state: s.mp_state.mp_state,
        debugregs: None,
        tsc_khz: None,
    }
}

pub(super) fn vcpu_snapshot(s: &VcpuState) -> Result<VcpuSnapshot, LiveUpdateError> {
    let mut xsave = kvm_bindings::kvm_xsave::default();
    let bytes = s.xsave.as_bytes();
    if bytes.len() != xsave.region.len() * 4 {
        return Err(LiveUpdateError::XsaveSize {
            vcpu: s.id,
            len: bytes.len(),
            expected: xsave.region.len() * 4,
        });
    }
    for (w, b) in xsave.region.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(VcpuSnapshot {
        mp_state: kvm_mp_state {
            mp_state: s.mp_state,
        },
        regs: s.regs.get(),
        sregs: s.sregs.get(),
        xsave,
        xcrs: s.xcrs.get(),
        lapic: s.lapic.get(),
        msrs: s
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect(),
        events: s.vcpu_events.get(),
    })
}

pub(super) fn serial_state(s: &vm_superio::serial::SerialState) -> SerialState {
    SerialState {
        baud_divisor_low: s.baud_divisor_low,
        baud_divisor_high: s.baud_divisor_high,
        interrupt_enable: s.interrupt_enable,
        interrupt_identification: s.interrupt_identification,
        line_control: s.line_control,
        line_status: s.line_status,
        modem_control: s.modem_control,
        modem_status: s.modem_status,
        scratch: s.scratch,
        in_buffer: s.in_buffer.clone(),
        console_unread: Vec::new(),
    }
}

pub(super) fn superio_state(s: &SerialState) -> vm_superio::serial::SerialState {
    vm_superio::serial::SerialState {
        baud_divisor_low: s.baud_divisor_low,
        baud_divisor_high: s.baud_divisor_high,
        interrupt_enable: s.interrupt_enable,
        interrupt_identification: s.interrupt_identification,
        line_control: s.line_control,
        line_status: s.line_status,
        modem_control: s.modem_control,
        modem_status: s.modem_status,
        scratch: s.scratch,
        in_buffer: s.in_buffer.clone(),
    }
}

/// The device layout (PCI, virtio registers, back-end identity) without ring positions: what
/// the new VMM needs to build devices before the switch.
pub(super) fn device_states(vm: &Vm, bases: &[Vec<RingBase>]) -> Vec<DeviceState> {
    vm.devices
        .iter()
        .enumerate()
        .map(|(i, (slot, dev))| {
            let d = dev.lock().unwrap_or_else(|e| e.into_inner());
            let (pci, virtio) = d.save(*slot);
            let b = d.backend();
            let ring_bases = bases.get(i).map(Vec::as_slice).unwrap_or(&[]);
            let rings = ring_bases
                .iter()
                .filter_map(|rb| {
                    let q = virtio.queues.get(usize::from(rb.index))?;
                    Some(VringState {
                        index: rb.index,
                        size: q.size,
                        desc: q.desc,
                        avail: q.avail,
                        used: q.used,
                        next_avail: u32::from(rb.next_avail),
                        enabled: true,
                    })
                })
                .collect();
            let inflight = d.inflight().map(|info| InflightState {
                mmap_size: info.mmap_size,
                mmap_offset: info.mmap_offset,
                num_queues: info.num_queues,
                queue_size: info.queue_size,
                fd_name: inflight_name(*slot),
            });
            DeviceState {
                pci,
                virtio,
                vhost_user: VhostUserState {
                    socket: b.socket().to_path_buf(),
                    features: b.acked_features(),
                    protocol_features: b.protocol_features(),
                    rings,
                    inflight,
                },
            }
        })
        .collect()
}

pub(super) fn restore_kvm(vm: &Vm, state: &VmState) -> Result<(), LiveUpdateError> {
    if state.vcpus.len() != vm.vcpus.len() {
        return Err(LiveUpdateError::VcpuCount {
            saved: state.vcpus.len(),
            here: vm.vcpus.len(),
        });
    }
    for (fd, s) in vm.vcpus.iter().zip(&state.vcpus) {
        let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
        snapshot::restore_vcpu(&fd, &vcpu_snapshot(s)?)?;
    }
    let chips: [kvm_irqchip; 3] = [
        state.irqchip.pic_master.get(),
        state.irqchip.pic_slave.get(),
        state.irqchip.ioapic.get(),
    ];
    snapshot::restore_vm(
        &vm.vm,
        &VmSnapshot {
            irqchips: chips,
            pit: state.pit.pit.get(),
            clock: kvm_bindings::kvm_clock_data::from(&state.clock),
        },
    )?;
    let mut serial = vm.serial.lock().unwrap_or_else(|e| e.into_inner());
    crate::devices::serial::restore(&mut serial, &superio_state(&state.serial))
        .map_err(LiveUpdateError::Serial)?;
    if let Some(hub) = &vm.config.console {
        hub.carry_over(&state.serial.console_unread);
    }
    Ok(())
}

/// Saves everything of a paused VM except the back-ends' ring positions.
pub(super) fn save_kvm(
    vm: &Vm,
) -> Result<(Vec<VcpuState>, IrqchipState, PitState, ClockState), LiveUpdateError> {
    let mut vcpus = Vec::new();
    for (id, fd) in (0u32..).zip(&vm.vcpus) {
        let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
        vcpus.push(vcpu_state(id, &snapshot::save_vcpu(&fd, &vm.msr_indices)?));
    }
    let s = snapshot::save_vm(&vm.vm)?;
    let [pic_master, pic_slave, ioapic] = &s.irqchips;
    Ok((
        vcpus,
        IrqchipState {
            pic_master: Raw::new(pic_master),
            pic_slave: Raw::new(pic_slave),
            ioapic: Raw::new(ioapic),
        },
        PitState {
            pit: Raw::new(&s.pit),
        },
        ClockState::from(&s.clock),
    ))
}
