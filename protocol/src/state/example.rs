//! A consistent example [`VmState`] for documentation and tests.

use kvm_bindings::{kvm_irqchip, kvm_regs};

use super::*;

fn chip(id: u32) -> Raw<kvm_irqchip> {
    Raw::new(&kvm_irqchip {
        chip_id: id,
        ..Default::default()
    })
}

fn vcpu(id: u32) -> VcpuState {
    VcpuState {
        id,
        regs: Raw::new(&kvm_regs {
            rip: 0x10_0000,
            rflags: 2,
            ..Default::default()
        }),
        sregs: Raw::default(),
        fpu: FpuState {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        },
        xsave: Blob(vec![0; 4096]),
        xcrs: Raw::default(),
        lapic: Raw::default(),
        msrs: vec![
            MsrEntry {
                index: 0x10,
                data: 123_456_789,
            },
            MsrEntry {
                index: 0x4b56_4d01,
                data: 0x7000_0001,
            },
        ],
        vcpu_events: Raw::default(),
        mp_state: 0,
        debugregs: None,
        tsc_khz: Some(2_000_000),
    }
}

fn device(slot: u8, cfg: &DeviceConfigState, queues: u16) -> DeviceState {
    let q = |i: u64| VirtioQueueState {
        size: cfg.queue_size,
        msix_vector: 1,
        enabled: true,
        desc: 0x10_0000 * (i + 1),
        avail: 0x10_0000 * (i + 1) + 0x4000,
        used: 0x10_0000 * (i + 1) + 0x5000,
    };
    let vqs: Vec<VirtioQueueState> = (0..u64::from(queues)).map(q).collect();
    let rings = vqs
        .iter()
        .zip(0u16..)
        .map(|(v, index)| VringState {
            index,
            size: v.size,
            desc: v.desc,
            avail: v.avail,
            used: v.used,
            next_avail: 17,
            enabled: true,
        })
        .collect();
    DeviceState {
        pci: PciDeviceState {
            slot,
            config: Blob(vec![0; 256]),
            bar_base: 0xe000_0000 + u64::from(slot) * 0x10_0000,
            msix: MsixState {
                table: vec![MsixEntryState::default(); usize::from(queues) + 1],
                pba: vec![0],
                control: 0x8000,
            },
        },
        virtio: VirtioPciState {
            device_features: 1 << 32,
            driver_features: 1 << 32,
            device_feature_select: 0,
            driver_feature_select: 0,
            config_msix_vector: 0,
            status: 0x0f,
            config_generation: 0,
            queue_select: 0,
            queues: vqs,
        },
        vhost_user: VhostUserState {
            socket: cfg.socket.clone(),
            features: 1 << 32,
            protocol_features: 0x8003,
            rings,
            inflight: None,
        },
    }
}

pub(super) fn example(cpus: u32) -> VmState {
    let blk = DeviceConfigState {
        socket: "/run/baton/blk0.sock".into(),
        queues: 1,
        queue_size: 256,
        kind: DeviceKindState::Block,
        reconnect_ms: None,
        drain: false,
    };
    let net = DeviceConfigState {
        socket: "/run/baton/net0.sock".into(),
        queues: 1,
        queue_size: 256,
        kind: DeviceKindState::Net {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            mtu: Some(1500),
        },
        reconnect_ms: Some(60_000),
        drain: false,
    };
    let mut blk_dev = device(1, &blk, 1);
    blk_dev.vhost_user.inflight = Some(InflightState {
        mmap_size: 4096,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 256,
        fd_name: "inflight-disk0".into(),
    });
    let net_dev = device(2, &net, 2);
    VmState {
        config: VmConfigState {
            name: "example".into(),
            kernel: "/var/lib/baton/vmlinux".into(),
            cmdline: "console=ttyS0".into(),
            initramfs: None,
            cpus,
            memory: MemoryState {
                size: 256 << 20,
                path: "/dev/shm/baton-example".into(),
                hugepages: false,
            },
            serial: SerialConfigState::Stdio,
            api_socket: Some("/run/baton/api.sock".into()),
            devices: vec![blk, net],
            passthrough: Vec::new(),
        },
        vcpus: (0..cpus).map(vcpu).collect(),
        irqchip: IrqchipState {
            pic_master: chip(0),
            pic_slave: chip(1),
            ioapic: chip(2),
        },
        pit: PitState {
            pit: Raw::default(),
        },
        clock: ClockState {
            clock: 5_000_000_000,
            flags: 0,
            realtime: 0,
            host_tsc: 0,
        },
        devices: vec![blk_dev, net_dev],
        serial: SerialState {
            line_status: 0x60,
            in_buffer: b"ls\n".to_vec(),
            ..Default::default()
        },
        paused_at_unix_ns: 1_700_000_000_000_000_000,
        user_paused: false,
        passthrough: Vec::new(),
    }
}
