//! The live-update **state stream**: everything the new VMM needs to take over a paused guest.
//!
//! One [`VmState`] travels as one frame of kind [`STATE_KIND`] (magic `BLUS`, version 1) on
//! the live-update socket. Guest RAM is not in it: the new VMM maps the same file
//! ([`MemoryState::path`]). Back-ends are not in it either: the new VMM reconnects to each
//! socket and replays the ring state in [`VhostUserState`]. File descriptors that cannot be
//! re-opened (the inflight region, VFIO) travel on the cpr channel ([`crate::cpr`]) and are
//! referred to here by name.
//!
//! KVM structures are carried as their exact bytes ([`Raw`]), whose layout is kernel ABI;
//! `kvm_fpu`, which kvm-bindings gives no byte conversion, goes field by field ([`FpuState`]).
//! `VmState::validate` ([`crate::frame::Validate`]) checks the whole state for internal consistency before any of it
//! reaches KVM.
//!
//! ```
//! use baton_protocol::frame::{read_frame, write_frame};
//! use baton_protocol::state::{VmState, MAX_STATE_LEN, STATE_KIND};
//!
//! let state = VmState::example(2);
//! let mut wire = Vec::new();
//! write_frame(&mut wire, &STATE_KIND, &state).unwrap();
//! let back: VmState = read_frame(&mut wire.as_slice(), &STATE_KIND, MAX_STATE_LEN).unwrap();
//! assert_eq!(back, state);
//!
//! // An inconsistent state is refused by the reader.
//! let mut bad = state.clone();
//! bad.vcpus.pop();
//! let mut wire = Vec::new();
//! write_frame(&mut wire, &STATE_KIND, &bad).unwrap();
//! let err = read_frame::<_, VmState>(&mut wire.as_slice(), &STATE_KIND, MAX_STATE_LEN);
//! assert!(err.unwrap_err().to_string().contains("2 vCPUs"));
//! ```

mod device;
mod example;
pub mod passthrough;
mod raw;
mod validate;

use std::path::PathBuf;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};

pub use device::{
    DeviceState, InflightState, MsixEntryState, MsixState, PciDeviceState, VhostUserState,
    VirtioPciState, VirtioQueueState, VringState,
};
pub use passthrough::{PassthroughConfigState, PassthroughState};
pub use raw::{Blob, FpuState, Raw};
pub use validate::{
    MAX_CONSOLE_UNREAD, MAX_DEVICES, MAX_MSIX_VECTORS, MAX_MSRS, MAX_QUEUE_SIZE, MAX_SERIAL_BUFFER,
    MAX_VCPUS, MAX_XSAVE_LEN, MIN_XSAVE_LEN, NO_VECTOR, PCI_CONFIG_LEN, StateError,
    validate_devices,
};

use crate::frame::FrameKind;

/// Frame kind of the state stream: magic `BLUS`, version 1.
pub const STATE_KIND: FrameKind = FrameKind::new("live-update state", *b"BLUS", 1);

/// Largest state frame a reader accepts (16 MiB; a 2-vCPU VM with two devices is ~40 KiB).
pub const MAX_STATE_LEN: usize = 16 << 20;

/// The whole state of a paused VM, sent by the old VMM to the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// How the VM was built; the new VMM builds the same VM from it.
    pub config: VmConfigState,
    /// One entry per vCPU, in id order (`vcpus[i].id == i`).
    pub vcpus: Vec<VcpuState>,
    /// In-kernel PIC and IOAPIC.
    pub irqchip: IrqchipState,
    /// In-kernel PIT.
    pub pit: PitState,
    /// kvmclock.
    pub clock: ClockState,
    /// One entry per vhost-user device, in the order of `config.devices`.
    pub devices: Vec<DeviceState>,
    /// The 16550 UART.
    pub serial: SerialState,
    /// CLOCK_REALTIME in ns when the old VMM paused the vCPUs (for blackout accounting).
    #[serde(default)]
    pub paused_at_unix_ns: u64,
    /// The VM was paused through the API before the update: the new VMM keeps it paused.
    #[serde(default)]
    pub user_paused: bool,
    /// One entry per passed-through function, in the order of `config.passthrough`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passthrough: Vec<PassthroughState>,
}

/// The VM's configuration: what `baton-vmm` was started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfigState {
    /// VM name (used in file names and logs).
    pub name: String,
    /// PVH ELF kernel (not reloaded: the guest is already running; kept for `vm.info`).
    pub kernel: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Initramfs, if any.
    pub initramfs: Option<PathBuf>,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM.
    pub memory: MemoryState,
    /// Where the console goes (the new VMM's `--serial` may override).
    pub serial: SerialConfigState,
    /// API socket (the new VMM's `--api-socket` may override).
    pub api_socket: Option<PathBuf>,
    /// vhost-user devices, in PCI slot order.
    pub devices: Vec<DeviceConfigState>,
    /// Passed-through PCI functions (VFIO), after the vhost-user devices on the bus.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passthrough: Vec<PassthroughConfigState>,
}

/// Guest RAM: a shared file that the new VMM maps again by path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// Size in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// The file that backs guest RAM (on tmpfs or hugetlbfs).
    pub path: PathBuf,
    /// The file is on hugetlbfs.
    pub hugepages: bool,
}

/// Console destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialConfigState {
    /// The VMM's stdin/stdout.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Off,
    /// A UNIX socket clients attach to.
    Socket(PathBuf),
    /// A pseudo-terminal.
    Pty,
}

/// Options of one vhost-user device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfigState {
    /// Back-end socket; each socket serves one device.
    pub socket: PathBuf,
    /// Queues (block) or queue pairs (net).
    pub queues: u16,
    /// Largest ring size offered to the guest (a power of two, at most 32768).
    pub queue_size: u16,
    /// Block or net.
    pub kind: DeviceKindState,
    /// Give up reconnecting to a back-end that went away after this many ms (`None`: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_ms: Option<u64>,
    /// Always drain the rings in a live update: never negotiate GET_VRING_BASE_INFLIGHT
    /// (`drain=on`; absent when off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
}

/// What a vhost-user device is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKindState {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net {
        /// MAC address.
        mac: [u8; 6],
        /// MTU, if set.
        mtu: Option<u16>,
    },
}

/// One model-specific register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// Registers and in-kernel state of one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (also its APIC id).
    pub id: u32,
    /// General-purpose registers (`KVM_GET_REGS`).
    pub regs: Raw<kvm_regs>,
    /// Segment and control registers (`KVM_GET_SREGS`).
    pub sregs: Raw<kvm_sregs>,
    /// x87/SSE state (`KVM_GET_FPU`); redundant with `xsave`, restored first.
    pub fpu: FpuState,
    /// XSAVE area (`KVM_GET_XSAVE`, 4096 bytes, or `KVM_GET_XSAVE2`, larger).
    pub xsave: Blob,
    /// Extended control registers (`KVM_GET_XCRS`).
    pub xcrs: Raw<kvm_xcrs>,
    /// Local APIC registers (`KVM_GET_LAPIC`).
    pub lapic: Raw<kvm_lapic_state>,
    /// MSRs (`KVM_GET_MSRS`), including the TSC (0x10) and kvmclock MSRs.
    pub msrs: Vec<MsrEntry>,
    /// Pending exceptions, interrupts and NMIs (`KVM_GET_VCPU_EVENTS`).
    pub vcpu_events: Raw<kvm_vcpu_events>,
    /// `KVM_GET_MP_STATE` (0 runnable, 1 uninitialized, 2 init-received, 3 halted, ...).
    pub mp_state: u32,
    /// Debug registers (`KVM_GET_DEBUGREGS`), if saved.
    #[serde(default)]
    pub debugregs: Option<Raw<kvm_debugregs>>,
    /// Guest TSC frequency in kHz (`KVM_GET_TSC_KHZ`); the new VMM must set the same.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// In-kernel interrupt controllers (`KVM_GET_IRQCHIP`, chip ids 0, 1 and 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqchipState {
    /// Master 8259 (chip id 0).
    pub pic_master: Raw<kvm_irqchip>,
    /// Slave 8259 (chip id 1).
    pub pic_slave: Raw<kvm_irqchip>,
    /// IOAPIC (chip id 2).
    pub ioapic: Raw<kvm_irqchip>,
}

/// In-kernel PIT (`KVM_GET_PIT2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Channels and flags.
    pub pit: Raw<kvm_pit_state2>,
}

/// kvmclock (`KVM_GET_CLOCK`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// Guest clock in ns.
    pub clock: u64,
    /// `KVM_CLOCK_*` flags as returned (TSC_STABLE, REALTIME, HOST_TSC).
    pub flags: u32,
    /// Host CLOCK_REALTIME in ns at the time of `clock` (valid with `KVM_CLOCK_REALTIME`).
    pub realtime: u64,
    /// Host TSC at the time of `clock` (valid with `KVM_CLOCK_HOST_TSC`).
    pub host_tsc: u64,
}

impl From<&kvm_clock_data> for ClockState {
    fn from(c: &kvm_clock_data) -> Self {
        ClockState {
            clock: c.clock,
            flags: c.flags,
            realtime: c.realtime,
            host_tsc: c.host_tsc,
        }
    }
}

impl From<&ClockState> for kvm_clock_data {
    fn from(c: &ClockState) -> Self {
        kvm_clock_data {
            clock: c.clock,
            flags: c.flags,
            realtime: c.realtime,
            host_tsc: c.host_tsc,
            ..Default::default()
        }
    }
}

/// 16550 UART registers (the fields of vm-superio's `SerialState`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
    /// What the guest wrote to a socket or pty console that no client has received yet
    /// (oldest first; the new VMM gives it to the next client).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub console_unread: Vec<u8>,
}

impl VmState {
    /// A consistent example state with `cpus` vCPUs, one block and one net device (for docs
    /// and tests; the register contents are placeholders).
    pub fn example(cpus: u32) -> VmState {
        example::example(cpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameError, Validate, encode_frame, read_frame};
    use kvm_bindings::kvm_irqchip;

    fn roundtrip(s: &VmState) -> Result<VmState, FrameError> {
        let wire = encode_frame(&STATE_KIND, s)?;
        read_frame(&mut wire.as_slice(), &STATE_KIND, MAX_STATE_LEN)
    }

    fn invalid(s: &VmState) -> StateError {
        s.validate().unwrap_err()
    }

    #[test]
    fn example_round_trips_through_a_frame() {
        for cpus in [1, 2, 8] {
            let s = VmState::example(cpus);
            s.validate().unwrap();
            assert_eq!(roundtrip(&s).unwrap(), s);
        }
    }

    fn with_passthrough() -> VmState {
        let mut s = VmState::example(1);
        s.config.passthrough = vec![PassthroughConfigState {
            path: "/sys/bus/pci/devices/0000:00:04.0".into(),
            group: 7,
        }];
        s.passthrough = vec![PassthroughState {
            slot: 9,
            config: Blob(vec![0; PCI_CONFIG_LEN]),
            bars: vec![0xc000_0000, 0xc000_4000],
            msix: MsixState {
                table: vec![MsixEntryState::default(); 65],
                pba: vec![0; 2],
                control: 1 << 15,
            },
            msix_on_device: true,
        }];
        s
    }

    #[test]
    fn passed_through_functions_round_trip_and_are_checked() {
        let s = with_passthrough();
        s.validate().unwrap();
        assert_eq!(roundtrip(&s).unwrap(), s);
        // A VM without one encodes as before: no new field on the wire.
        let plain = encode_frame(&STATE_KIND, &VmState::example(1)).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("passthrough"));

        let mut t = with_passthrough();
        t.passthrough.clear();
        assert!(matches!(
            invalid(&t),
            StateError::PassthroughCount {
                config: 1,
                state: 0
            }
        ));
        let mut t = with_passthrough();
        t.passthrough[0].slot = t.devices[0].pci.slot;
        assert!(matches!(invalid(&t), StateError::DuplicateSlot(_)));
        let mut t = with_passthrough();
        t.passthrough[0].config = Blob(vec![0; 64]);
        assert!(matches!(
            invalid(&t),
            StateError::Passthrough { index: 0, .. }
        ));
        let mut t = with_passthrough();
        t.passthrough[0].msix.pba.pop();
        assert!(matches!(
            invalid(&t),
            StateError::Passthrough { index: 0, .. }
        ));
        let mut t = with_passthrough();
        t.passthrough[0].bars = vec![0; 7];
        assert!(matches!(
            invalid(&t),
            StateError::Passthrough { index: 0, .. }
        ));
        let mut t = with_passthrough();
        t.config.passthrough.push(t.config.passthrough[0].clone());
        assert!(matches!(invalid(&t), StateError::DuplicatePassthrough(_)));
    }

    #[test]
    fn state_size_and_speed_are_small() {
        let s = VmState::example(2);
        let wire = encode_frame(&STATE_KIND, &s).unwrap();
        assert!(wire.len() < 64 << 10, "{} bytes", wire.len());
        let t = std::time::Instant::now();
        for _ in 0..10 {
            let _ = roundtrip(&s).unwrap();
        }
        let each = t.elapsed() / 10;
        eprintln!(
            "2-vCPU state: {} bytes, encode+decode+validate {each:?}",
            wire.len()
        );
        // Generous for a debug build on a shared machine; release is far faster.
        assert!(each < std::time::Duration::from_millis(500), "{each:?}");
    }

    /// Payload corruption that the checksum does not catch (a peer that computes the CRC over
    /// garbage) reaches the decoder and `validate()`: it must fail cleanly or decode to a
    /// state that passes validation, never panic.
    #[test]
    fn corrupt_payload_with_valid_checksum_never_panics() {
        use crate::frame::{FrameHeader, HEADER_LEN};
        let mut s = VmState::example(1);
        s.devices.truncate(1);
        s.config.devices.truncate(1);
        let wire = encode_frame(&STATE_KIND, &s).unwrap();
        let payload = &wire[HEADER_LEN..];
        let (mut rejected, mut accepted) = (0, 0);
        // Every structural byte; the long runs of hex zeros only now and then.
        // (Debug-build serde_json makes each decode ~1 ms, hence the stride.)
        let positions = (0..payload.len())
            .filter(|&i| payload[i] != b'0' || i % 512 == 0)
            .step_by(3);
        for i in positions {
            for b in [b'"', b'9', 0xff] {
                let mut p = payload.to_vec();
                p[i] = b;
                let h = FrameHeader {
                    magic: STATE_KIND.magic,
                    version: STATE_KIND.version,
                    flags: 0,
                    len: u32::try_from(p.len()).unwrap(),
                    crc: crc32fast::hash(&p),
                };
                let mut frame = h.to_bytes().to_vec();
                frame.extend_from_slice(&p);
                match read_frame::<_, VmState>(&mut frame.as_slice(), &STATE_KIND, MAX_STATE_LEN) {
                    Ok(v) => {
                        v.validate().unwrap();
                        accepted += 1;
                    }
                    Err(FrameError::Decode { .. } | FrameError::Invalid { .. }) => rejected += 1,
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }
        assert!(
            rejected > 0 && accepted > 0,
            "{rejected} rejected, {accepted} accepted"
        );
    }

    #[test]
    fn every_flipped_byte_of_a_state_frame_is_an_error() {
        let mut s = VmState::example(1);
        s.devices.truncate(1);
        s.config.devices.truncate(1);
        s.vcpus[0].xsave = Blob(vec![0; 4096]);
        let wire = encode_frame(&STATE_KIND, &s).unwrap();
        // Every byte of the header, then a stride through the payload.
        let positions = (0..32).chain((32..wire.len()).step_by(97));
        for i in positions {
            let mut bad = wire.clone();
            bad[i] ^= 0x41;
            assert!(
                read_frame::<_, VmState>(&mut bad.as_slice(), &STATE_KIND, MAX_STATE_LEN).is_err(),
                "byte {i} accepted"
            );
        }
    }

    #[test]
    fn cpu_count_and_ids_checked() {
        let mut s = VmState::example(2);
        s.vcpus.pop();
        assert_eq!(
            invalid(&s),
            StateError::CpuCount {
                config: 2,
                vcpus: 1
            }
        );
        let mut s = VmState::example(2);
        s.vcpus.swap(0, 1);
        assert_eq!(invalid(&s), StateError::VcpuId { position: 0, id: 1 });
        let mut s = VmState::example(1);
        s.config.cpus = 0;
        s.vcpus.clear();
        assert_eq!(invalid(&s), StateError::CpuRange(0));
    }

    #[test]
    fn vcpu_contents_checked() {
        let mut s = VmState::example(1);
        s.vcpus[0].xsave = Blob(vec![0; 100]);
        assert!(matches!(
            invalid(&s),
            StateError::XsaveSize { len: 100, .. }
        ));
        let mut s = VmState::example(1);
        let m = s.vcpus[0].msrs[0];
        s.vcpus[0].msrs.push(m);
        assert!(matches!(
            invalid(&s),
            StateError::DuplicateMsr { index: 0x10, .. }
        ));
        let mut s = VmState::example(1);
        s.vcpus[0].mp_state = 77;
        assert!(matches!(invalid(&s), StateError::MpState { value: 77, .. }));
    }

    #[test]
    fn memory_and_irqchip_checked() {
        let mut s = VmState::example(1);
        s.config.memory.size = 4095;
        assert_eq!(invalid(&s), StateError::MemorySize(4095));
        let mut s = VmState::example(1);
        s.config.memory.path = "".into();
        assert_eq!(invalid(&s), StateError::NoMemoryPath);
        let mut s = VmState::example(1);
        s.irqchip.ioapic = Raw::new(&kvm_irqchip::default());
        assert!(matches!(
            invalid(&s),
            StateError::IrqchipId {
                chip: "ioapic",
                found: 0,
                ..
            }
        ));
    }

    #[test]
    fn devices_checked() {
        let mut s = VmState::example(1);
        s.config.devices[1].socket = s.config.devices[0].socket.clone();
        s.devices[1].vhost_user.socket = s.config.devices[0].socket.clone();
        assert!(matches!(invalid(&s), StateError::DuplicateSocket(_)));
        let mut s = VmState::example(1);
        s.devices.pop();
        assert!(matches!(
            invalid(&s),
            StateError::DeviceCount {
                config: 2,
                state: 1
            }
        ));
        let mut s = VmState::example(1);
        s.devices[1].pci.slot = s.devices[0].pci.slot;
        assert!(matches!(invalid(&s), StateError::DuplicateSlot(1)));
        let mut s = VmState::example(1);
        s.devices[0].vhost_user.socket = "/elsewhere".into();
        assert!(matches!(
            invalid(&s),
            StateError::DeviceSocket { device: 0, .. }
        ));
        let mut s = VmState::example(1);
        s.config.devices[0].queue_size = 300;
        assert!(matches!(
            invalid(&s),
            StateError::QueueSize { size: 300, .. }
        ));
        let mut s = VmState::example(1);
        s.config.devices[0].queue_size = 65535;
        assert!(matches!(
            invalid(&s),
            StateError::QueueSize { max: 32768, .. }
        ));
        let mut s = VmState::example(1);
        s.devices[1].virtio.queues.truncate(1);
        let e = invalid(&s);
        assert!(
            matches!(e, StateError::VirtqueueCount { found: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("2 or 3"), "{e}");
    }

    #[test]
    fn queues_and_rings_checked() {
        let mut s = VmState::example(1);
        s.devices[0].virtio.queues[0].size = 96;
        s.devices[0].vhost_user.rings[0].size = 96;
        assert!(matches!(
            invalid(&s),
            StateError::QueueSize { size: 96, .. }
        ));
        // A disabled queue's registers are not checked.
        let mut s = VmState::example(1);
        s.devices[1].virtio.queues[1].enabled = false;
        s.devices[1].virtio.queues[1].size = 3;
        s.devices[1].vhost_user.rings.pop();
        s.validate().unwrap();
        let mut s = VmState::example(1);
        s.devices[0].vhost_user.rings[0].index = 5;
        assert!(matches!(
            invalid(&s),
            StateError::RingIndex {
                index: 5,
                queues: 1,
                ..
            }
        ));
        let mut s = VmState::example(1);
        let r = s.devices[1].vhost_user.rings[0];
        s.devices[1].vhost_user.rings[1] = r;
        assert!(matches!(
            invalid(&s),
            StateError::DuplicateRing { index: 0, .. }
        ));
        let mut s = VmState::example(1);
        s.devices[0].vhost_user.rings[0].avail += 8;
        assert!(matches!(
            invalid(&s),
            StateError::RingMismatch { index: 0, .. }
        ));
        let mut s = VmState::example(1);
        s.devices[0].vhost_user.rings[0].next_avail = 0x1_0000;
        assert!(matches!(invalid(&s), StateError::RingBase { .. }));
        let mut s = VmState::example(1);
        if let Some(inf) = s.devices[0].vhost_user.inflight.as_mut() {
            inf.fd_name.clear();
        }
        assert!(matches!(
            invalid(&s),
            StateError::Inflight {
                detail: "fd_name is empty",
                ..
            }
        ));
    }

    #[test]
    fn msix_checked() {
        let mut s = VmState::example(1);
        s.devices[0].pci.msix.table.clear();
        assert!(matches!(
            invalid(&s),
            StateError::MsixTableSize { len: 0, .. }
        ));
        let mut s = VmState::example(1);
        s.devices[0].pci.msix.table = vec![MsixEntryState::default(); MAX_MSIX_VECTORS + 1];
        assert!(matches!(invalid(&s), StateError::MsixTableSize { .. }));
        let mut s = VmState::example(1);
        s.devices[0].pci.msix.pba.push(0);
        assert!(matches!(
            invalid(&s),
            StateError::MsixPbaSize {
                len: 2,
                expected: 1,
                ..
            }
        ));
        let mut s = VmState::example(1);
        s.devices[0].virtio.queues[0].msix_vector = 9;
        assert!(matches!(
            invalid(&s),
            StateError::MsixVector { vector: 9, .. }
        ));
        let mut s = VmState::example(1);
        s.devices[0].virtio.config_msix_vector = NO_VECTOR;
        s.validate().unwrap();
        let mut s = VmState::example(1);
        s.devices[0].pci.config = Blob(vec![0; 255]);
        assert!(matches!(
            invalid(&s),
            StateError::PciConfigLen { len: 255, .. }
        ));
    }

    #[test]
    fn serial_buffer_capped() {
        let mut s = VmState::example(1);
        s.serial.in_buffer = vec![0; MAX_SERIAL_BUFFER + 1];
        assert!(matches!(invalid(&s), StateError::SerialBuffer(_)));
        let mut s = VmState::example(1);
        s.serial.console_unread = vec![0; MAX_CONSOLE_UNREAD + 1];
        assert!(matches!(invalid(&s), StateError::ConsoleUnread(_)));
    }

    #[test]
    fn a_state_without_console_output_reads_as_empty() {
        // Written by a VMM that predates console_unread.
        let mut v = serde_json::to_value(VmState::example(1)).unwrap();
        v["serial"]
            .as_object_mut()
            .unwrap()
            .remove("console_unread");
        let s: VmState = serde_json::from_value(v).unwrap();
        assert!(s.serial.console_unread.is_empty());
    }

    #[test]
    fn clock_converts_both_ways() {
        let c = ClockState {
            clock: 1,
            flags: 2,
            realtime: 3,
            host_tsc: 4,
        };
        assert_eq!(ClockState::from(&kvm_bindings::kvm_clock_data::from(&c)), c);
    }

    #[test]
    fn optional_fields_default_when_absent() {
        let s = VmState::example(1);
        let mut v = serde_json::to_value(&s).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("paused_at_unix_ns");
        obj["vcpus"][0].as_object_mut().unwrap().remove("tsc_khz");
        let back: VmState = serde_json::from_value(v).unwrap();
        assert_eq!(back.paused_at_unix_ns, 0);
        assert_eq!(back.vcpus[0].tsc_khz, None);
    }
}
