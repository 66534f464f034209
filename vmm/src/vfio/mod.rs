//! VFIO PCI passthrough (`--device path=/sys/bus/pci/devices/DDDD:BB:DD.F`): a host PCI
//! function bound to vfio-pci, given to the guest on baton's PCI bus.
//!
//! [`check`] looks at sysfs before anything is created, so that a device that cannot be passed
//! through (missing, not bound to vfio-pci, no IOMMU group, a group with a device bound to
//! another driver, given twice) leaves nothing behind. [`create`] then, with the KVM VM built:
//! the [`container`] (Type1, the KVM-VFIO device, guest RAM mapped for DMA at IOVA = GPA), the
//! device (reset), its [`bars`] and its virtualised [`config`] space, and MSI-X ([`device`]).
//!
//! Not yet: INTx and MSI (refused: the device must have MSI-X), I/O BARs (not offered), the
//! expansion ROM (hidden), live update with the device (refused; issue #14 item 2).

pub mod bars;
pub mod config;
pub mod container;
pub mod device;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vfio_ioctls::VfioDevice;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::PassthroughConfig;
use crate::interrupts::IrqRouting;
use crate::pci::PciBus;
use crate::pci::msix::Msix;
pub use container::Container;
pub use device::VfioPciDevice;

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
    /// KVM_CREATE_DEVICE (KVM_DEV_TYPE_VFIO).
    #[error("creating the KVM-VFIO device: {0}")]
    KvmDevice(#[source] std::io::Error),
    /// The container could not be opened or set up.
    #[error("VFIO container: {0}")]
    Container(#[source] vfio_ioctls::VfioError),
    /// The device could not be opened through its group.
    #[error("opening it through VFIO: {0}")]
    Open(#[source] vfio_ioctls::VfioError),
    /// Mapping guest RAM for DMA.
    #[error("mapping guest RAM at {gpa:#x} for DMA: {source}")]
    DmaMap {
        /// The region's guest address.
        gpa: u64,
        /// Why.
        #[source]
        source: vfio_ioctls::VfioError,
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
    /// eventfd creation.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// No free slot on the guest's PCI bus.
    #[error("no free slot on the guest's PCI bus")]
    BusFull,
}

fn driver_of(dev: &Path) -> Option<String> {
    let link = std::fs::read_link(dev.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Checks in sysfs that each of `devices` can be passed through, before anything is created.
/// Returns their paths as given (error messages name them so).
pub fn check(devices: &[PassthroughConfig]) -> Result<Vec<PathBuf>, (PathBuf, VfioError)> {
    let (mut seen, mut given): (Vec<PathBuf>, Vec<PathBuf>) = (Vec::new(), Vec::new());
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
        seen.push(path);
        given.push(d.path.clone());
    }
    Ok(given)
}

/// (PCI slot, device) of each passed-through device.
pub type OnBus = Vec<(u8, Arc<Mutex<VfioPciDevice>>)>;

/// Puts the devices at `paths` (checked by [`check`]) on `bus`, in one VFIO container; an
/// error names the device it is about.
pub fn add_to_bus(
    bus: &mut PciBus,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    irq: &Arc<IrqRouting>,
    window: &mut AddressAllocator,
    paths: &[PathBuf],
) -> Result<OnBus, (PathBuf, VfioError)> {
    let mut out = Vec::new();
    let Some(first) = paths.first() else {
        return Ok(out);
    };
    let mut container = Container::new(vm).map_err(|e| (first.clone(), e))?;
    let mut next_slot = bars::first_slot();
    for (i, path) in paths.iter().enumerate() {
        let setup = Setup {
            vm,
            mem,
            irq,
            window,
            next_slot: &mut next_slot,
        };
        let dev = create(format!("vfio{i}"), path, &mut container, setup)
            .map_err(|e| (path.clone(), e))?;
        let dev = Arc::new(Mutex::new(dev));
        let slot = bus
            .add(dev.clone())
            .and_then(|s| u8::try_from(s).ok())
            .ok_or_else(|| (path.clone(), VfioError::BusFull))?;
        out.push((slot, dev));
    }
    Ok(out)
}

/// What [`create`] needs from the VM being built.
pub struct Setup<'a> {
    /// The KVM VM.
    pub vm: &'a Arc<VmFd>,
    /// Guest RAM, mapped for DMA.
    pub mem: &'a GuestMemoryMmap,
    /// GSI routing, shared with the other PCI devices.
    pub irq: &'a Arc<IrqRouting>,
    /// The guest's PCI MMIO window.
    pub window: &'a mut AddressAllocator,
    /// The next KVM slot for a mapped BAR.
    pub next_slot: &'a mut u32,
}

/// Opens the device at `path` in `container`, resets it and builds its device model, its BARs
/// placed in the guest's window. Maps guest RAM for DMA with the first device.
pub fn create(
    name: String,
    path: &Path,
    container: &mut Container,
    s: Setup<'_>,
) -> Result<VfioPciDevice, VfioError> {
    let dev = Arc::new(VfioDevice::new(path, container.handle(), false).map_err(VfioError::Open)?);
    container.map_guest_ram(s.mem)?;
    dev.reset();
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
    let mut vectors = Vec::new();
    for v in 0..n {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VfioError::EventFd)?;
        s.vm.register_irqfd(&evt, gsi_base + u32::from(v))
            .map_err(|e| VfioError::EventFd(std::io::Error::from_raw_os_error(e.errno())))?;
        vectors.push(evt);
    }
    tracing::info!(
        device = %name,
        path = %path.display(),
        vectors = n,
        bars = placed.len(),
        mapped = placed.iter().filter(|b| !b.trapped()).count(),
        "VFIO device passed through"
    );
    Ok(VfioPciDevice {
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
    })
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
        assert_eq!(check(&c).unwrap(), vec![root.join("devices/c")]);
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
