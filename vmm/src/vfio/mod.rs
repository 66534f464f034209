//! VFIO PCI passthrough (`--device path=/sys/bus/pci/devices/DDDD:BB:DD.F`): a host PCI
//! function bound to vfio-pci, given to the guest on baton's PCI bus.
//!
//! [`check`] looks at sysfs before anything is created, so that a device that cannot be passed
//! through (missing, not bound to vfio-pci, no IOMMU group, a group with a device bound to
//! another driver, given twice) leaves nothing behind. [`create`] then, with the KVM VM built:
//! the [`container`] (Type1, the KVM-VFIO device, guest RAM mapped for DMA at IOVA = GPA), the
//! device (reset), its [`bars`] and its virtualised [`config`] space, and MSI-X ([`device`]).
//!
//! A live update moves the devices to the new VMM without touching them ([`handover`]).
//!
//! Not yet: INTx and MSI (refused: the device must have MSI-X), I/O BARs (not offered), the
//! expansion ROM (hidden).

pub mod bars;
pub mod config;
pub mod container;
pub mod device;
pub mod handover;
pub mod sys;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use baton_protocol::state::PassthroughConfigState;
use kvm_ioctls::VmFd;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::PassthroughConfig;
use crate::interrupts::IrqRouting;
use crate::pci::PciBus;
use crate::pci::msix::Msix;
pub use container::Container;
pub use device::VfioPciDevice;
pub use handover::Received;
use sys::SysError;

/// Why a device cannot be passed through; the VM error names the device.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The sysfs path does not exist.
    #[error("no such PCI device (is the path under /sys/bus/pci/devices/?)")]
    Missing,
    /// The device is bound to another driver, or to none.
    #[error(
        "it is bound to {0}, not vfio-pci (bind it: echo vfio-pci > DEVICE/driver_override; echo BDF > DEVICE/driver/unbind; echo BDF > /sys/bus/pci/drivers_probe)"
    )]
    NotVfio(String),
    /// No IOMMU group: no IOMMU, or it is off.
    #[error("it has no IOMMU group (no IOMMU, or it is off: intel_iommu=on / amd_iommu=on)")]
    NoIommuGroup,
    /// Another device of the group is bound to a driver other than vfio-pci.
    #[error(
        "its IOMMU group {group} is not viable: {other} is bound to {driver} (every device of the group must be bound to vfio-pci or to no driver)"
    )]
    GroupNotViable {
        /// Group number.
        group: String,
        /// The other device.
        other: String,
        /// Its driver.
        driver: String,
    },
    /// The same device twice.
    #[error("it is given twice")]
    Duplicate,
    /// KVM_CREATE_DEVICE (KVM_DEV_TYPE_VFIO) or adding a group to it.
    #[error("the KVM-VFIO device: {0}")]
    KvmDevice(#[source] std::io::Error),
    /// The container could not be opened or set up.
    #[error("VFIO container: {0}")]
    Container(#[source] SysError),
    /// The device could not be opened through its group.
    #[error("opening it through VFIO: {0}")]
    Open(#[source] SysError),
    /// Mapping guest RAM for DMA (or changing the mapping's address in a live update).
    #[error("DMA mapping of guest RAM at {gpa:#x}: {source}")]
    DmaMap {
        /// The region's guest address.
        gpa: u64,
        /// Why.
        #[source]
        source: SysError,
    },
    /// The configuration space says it cannot be passed through.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A BAR could not be mapped into the guest.
    #[error("mapping BAR{0} into the guest: {1}")]
    MapBar(usize, #[source] std::io::Error),
    /// No room for its BARs in the guest's MMIO window.
    #[error("no room for BAR{0} ({1:#x} bytes) in the guest's PCI window")]
    NoRoom(usize, u64),
    /// Interrupt routing.
    #[error(transparent)]
    Irq(#[from] crate::interrupts::IrqError),
    /// eventfd creation or an irqfd.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// No free slot on the guest's PCI bus.
    #[error("no free slot on the guest's PCI bus")]
    BusFull,
    /// A live update: the fds or the state the old VMM sent do not fit the device.
    #[error("taking it over: {0}")]
    Handover(String),
}

fn driver_of(dev: &Path) -> Option<String> {
    let link = std::fs::read_link(dev.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Checks in sysfs that each of `devices` can be passed through, before anything is created.
/// Returns each with its IOMMU group, under the path it was given as (error messages name it
/// so).
pub fn check(
    devices: &[PassthroughConfig],
) -> Result<Vec<PassthroughConfigState>, (PathBuf, VfioError)> {
    let (mut seen, mut given): (Vec<PathBuf>, Vec<PassthroughConfigState>) =
        (Vec::new(), Vec::new());
    for d in devices {
        let fail = |e| (d.path.clone(), e);
        let path = std::fs::canonicalize(&d.path).map_err(|_| fail(VfioError::Missing))?;
        if !path.join("config").exists() {
            return Err(fail(VfioError::Missing));
        }
        if seen.contains(&path) {
            return Err(fail(VfioError::Duplicate));
        }
        match driver_of(&path) {
            Some(drv) if drv == "vfio-pci" => {}
            Some(drv) => return Err(fail(VfioError::NotVfio(drv))),
            None => return Err(fail(VfioError::NotVfio("no driver".into()))),
        }
        let group = std::fs::canonicalize(path.join("iommu_group"))
            .map_err(|_| fail(VfioError::NoIommuGroup))?;
        let group_name = group
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(members) = std::fs::read_dir(group.join("devices")) {
            for m in members.flatten() {
                let mp = m.path();
                match driver_of(&mp) {
                    None => {}
                    Some(drv) if drv == "vfio-pci" || drv == "pci-stub" || drv == "pcieport" => {}
                    Some(driver) => {
                        return Err(fail(VfioError::GroupNotViable {
                            group: group_name,
                            other: m.file_name().to_string_lossy().into_owned(),
                            driver,
                        }));
                    }
                }
            }
        }
        let group = group_name
            .parse()
            .map_err(|_| fail(VfioError::NoIommuGroup))?;
        seen.push(path);
        given.push(PassthroughConfigState {
            path: d.path.clone(),
            group,
        });
    }
    Ok(given)
}

/// The `DDDD:BB:DD.F` name VFIO knows the device at `path` by.
fn bdf(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// (PCI slot, device) of each passed-through device.
pub type OnBus = Vec<(u8, Arc<Mutex<VfioPciDevice>>)>;

/// Where the passed-through devices of a VM being built come from.
pub enum Source<'a> {
    /// Opened here through their groups ([`check`]ed); reset; guest RAM mapped for DMA.
    Open(&'a [PassthroughConfigState]),
    /// Another VMM's, received on the cpr channel: left exactly as they are.
    HandedOver(&'a [PassthroughConfigState], Received),
}

impl Source<'_> {
    /// Whether there is no device.
    pub fn is_empty(&self) -> bool {
        match self {
            Source::Open(c) | Source::HandedOver(c, _) => c.is_empty(),
        }
    }
}

/// Every passed-through device of a VM and the container they share.
#[derive(Default)]
pub struct Passthrough {
    container: Option<Container>,
    /// The devices, by PCI slot.
    pub devices: OnBus,
    /// Their configuration, for a live update.
    pub config: Vec<PassthroughConfigState>,
    /// This VMM runs the guest (not a VM handed over, or being taken over): it resets the
    /// devices when the guest stops.
    owner: AtomicBool,
}

impl Passthrough {
    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// After a live update's commit (`false` on the old side, `true` on the new one).
    pub fn set_owner(&self, owner: bool) {
        self.owner.store(owner, Ordering::SeqCst);
    }

    /// The guest stopped: leave the devices as the next user expects them (unless they
    /// belong to another VMM now).
    pub fn reset_if_owner(&self) {
        if self.owner.load(Ordering::SeqCst) {
            for (_, d) in &self.devices {
                d.lock().unwrap_or_else(|e| e.into_inner()).reset();
            }
        }
    }
}

/// Puts the devices of `source` on `bus`, in one VFIO container; an error names the device
/// it is about.
pub fn add_to_bus(
    bus: &mut PciBus,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    irq: &Arc<IrqRouting>,
    window: &mut AddressAllocator,
    source: Source<'_>,
) -> Result<Passthrough, (PathBuf, VfioError)> {
    let (config, handed) = match source {
        Source::Open(c) => (c, None),
        Source::HandedOver(c, r) => (c, Some(r)),
    };
    let mut out = Passthrough {
        owner: AtomicBool::new(handed.is_none()),
        config: config.to_vec(),
        ..Default::default()
    };
    let Some(first) = config.first() else {
        return Ok(out);
    };
    let fail = |p: &PassthroughConfigState| {
        let path = p.path.clone();
        move |e| (path, e)
    };
    let handed_over = handed.is_some();
    let (mut container, handed_devices) = match handed {
        None => (Container::new(vm).map_err(fail(first))?, Vec::new()),
        Some(r) => {
            let c = Container::adopt(vm, r.container, r.groups).map_err(fail(first))?;
            (c, r.devices)
        }
    };
    let mut handed_devices = handed_devices.into_iter();
    let mut next_slot = bars::first_slot();
    for (i, p) in config.iter().enumerate() {
        let (dev, vectors) = match handed_devices.next() {
            Some((fd, vectors)) => (
                sys::Device::adopt(fd)
                    .map_err(VfioError::Open)
                    .map_err(fail(p))?,
                Some(vectors),
            ),
            None if !handed_over => (
                container
                    .open_device(p.group, &bdf(&p.path))
                    .map_err(fail(p))?,
                None,
            ),
            None => return Err(fail(p)(VfioError::Handover("no device fd".into()))),
        };
        if vectors.is_none() {
            container.map_guest_ram(mem).map_err(fail(p))?;
        }
        let setup = Setup {
            vm,
            irq,
            window,
            next_slot: &mut next_slot,
        };
        let dev = create(format!("vfio{i}"), &p.path, dev, vectors, setup).map_err(fail(p))?;
        let dev = Arc::new(Mutex::new(dev));
        let slot = bus
            .add(dev.clone())
            .and_then(|s| u8::try_from(s).ok())
            .ok_or_else(|| fail(p)(VfioError::BusFull))?;
        out.devices.push((slot, dev));
    }
    out.container = Some(container);
    Ok(out)
}

/// What [`create`] needs from the VM being built.
pub struct Setup<'a> {
    /// The KVM VM.
    pub vm: &'a Arc<VmFd>,
    /// GSI routing, shared with the other PCI devices.
    pub irq: &'a Arc<IrqRouting>,
    /// The guest's PCI MMIO window.
    pub window: &'a mut AddressAllocator,
    /// The next KVM slot for a mapped BAR.
    pub next_slot: &'a mut u32,
}

/// Builds the device model of `dev` (the device at `path`), its BARs placed in the guest's
/// window. A device opened here (`handed_vectors` is `None`) is reset and gets new eventfds
/// for its vectors, wired to KVM as irqfds; a device taken over from another VMM keeps its
/// state and that VMM's eventfds, which become irqfds here only at the switch.
pub fn create(
    name: String,
    path: &Path,
    dev: sys::Device,
    handed_vectors: Option<Vec<OwnedFd>>,
    s: Setup<'_>,
) -> Result<VfioPciDevice, VfioError> {
    let dev = Arc::new(dev);
    if handed_vectors.is_none() {
        dev.reset();
    }
    let mut raw = [0u8; config::CONFIG_SIZE];
    dev.region_read(device::CONFIG_REGION, &mut raw, 0);
    let mut guest_bars = Vec::new();
    let mut sizes = Vec::new();
    for (index, region_size, size, is_64bit) in bars::discover(&name, &dev, &raw) {
        let range = s
            .window
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map_err(|_| VfioError::NoRoom(index, size))?;
        guest_bars.push(config::GuestBar {
            index,
            addr: range.start(),
            size,
            is_64bit,
        });
        sizes.push(region_size);
    }
    let cfg = config::VirtualConfig::new(&raw, &guest_bars)?;
    let msix_cap = cfg.msix();
    let mut placed = Vec::new();
    for (g, region_size) in guest_bars.into_iter().zip(sizes) {
        placed.push(bars::place(
            s.vm,
            &dev,
            g,
            region_size,
            &msix_cap,
            s.next_slot,
        )?);
    }
    let n = msix_cap.vectors;
    let gsi_base = s.irq.allocate(u32::from(n))?;
    let handed = handed_vectors.is_some();
    let vectors: Vec<EventFd> = match handed_vectors {
        Some(fds) => {
            if fds.len() != usize::from(n) {
                return Err(VfioError::Handover(format!(
                    "{} vector eventfds for {n} vectors",
                    fds.len()
                )));
            }
            fds.into_iter().map(handover::eventfd).collect()
        }
        None => (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(VfioError::EventFd))
            .collect::<Result<_, _>>()?,
    };
    let mut d = VfioPciDevice {
        name,
        path: path.to_path_buf(),
        dev,
        config: cfg,
        bars: placed,
        msix: Msix::new(n),
        msix_cap,
        msix_on_device: false,
        vm: s.vm.clone(),
        irq: s.irq.clone(),
        gsi_base,
        vectors,
        irqfds: vec![false; usize::from(n)],
    };
    if !handed {
        d.attach_irqfds()?;
    }
    tracing::info!(
        device = %d.name,
        path = %path.display(),
        vectors = n,
        bars = d.bars.len(),
        mapped = d.bars.iter().filter(|b| !b.trapped()).count(),
        handed_over = handed,
        "VFIO device passed through"
    );
    Ok(d)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A sysfs-like tree: drivers/{vfio-pci,nvme}, groups/{1,2}, devices/{a,b,c}: a and b in
    /// group 1 (a on vfio-pci, b on nvme), c in group 2 on vfio-pci, d with no group.
    fn tree() -> PathBuf {
        let root = std::env::temp_dir().join(format!("baton-vfio-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in [
            "drivers/vfio-pci",
            "drivers/nvme",
            "groups/1/devices",
            "groups/2/devices",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (dev, driver, group) in [
            ("a", "vfio-pci", Some("1")),
            ("b", "nvme", Some("1")),
            ("c", "vfio-pci", Some("2")),
            ("d", "vfio-pci", None),
        ] {
            let p = root.join("devices").join(dev);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("config"), [0u8; 64]).unwrap();
            symlink(root.join("drivers").join(driver), p.join("driver")).unwrap();
            if let Some(g) = group {
                let g = root.join("groups").join(g);
                symlink(&g, p.join("iommu_group")).unwrap();
                symlink(&p, g.join("devices").join(dev)).unwrap();
            }
        }
        root
    }

    fn dev(root: &Path, name: &str) -> PassthroughConfig {
        PassthroughConfig {
            path: root.join("devices").join(name),
        }
    }

    #[test]
    fn bad_devices_are_refused_before_anything_is_created() {
        let root = tree();
        let c = [dev(&root, "c")];
        assert_eq!(
            check(&c).unwrap(),
            vec![PassthroughConfigState {
                path: root.join("devices/c"),
                group: 2
            }]
        );
        let err = |d: &[PassthroughConfig]| check(d).unwrap_err();
        assert!(matches!(err(&[dev(&root, "x")]), (p, VfioError::Missing) if p.ends_with("x")));
        assert!(matches!(err(&[dev(&root, "b")]), (_, VfioError::NotVfio(d)) if d == "nvme"));
        assert!(matches!(
            err(&[dev(&root, "d")]),
            (_, VfioError::NoIommuGroup)
        ));
        match err(&[dev(&root, "a")]) {
            (
                p,
                VfioError::GroupNotViable {
                    group,
                    other,
                    driver,
                },
            ) => {
                assert!(p.ends_with("a"));
                assert_eq!(
                    (group.as_str(), other.as_str(), driver.as_str()),
                    ("1", "b", "nvme")
                );
            }
            e => panic!("{e:?}"),
        }
        // The same device twice, even through another path to it.
        let again = PassthroughConfig {
            path: root.join("devices/../devices/c"),
        };
        assert!(matches!(
            err(&[dev(&root, "c"), again]),
            (_, VfioError::Duplicate)
        ));
        let _ = std::fs::remove_dir_all(&root);
    }
}
