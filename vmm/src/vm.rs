//! One VM: KVM objects, guest RAM, devices and vCPU threads, built from a [`VmConfig`].

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_protocol::api::{VmInfo, VmState};
use baton_protocol::state::{MAX_VCPUS, PassthroughConfigState};
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DeviceConfig, MemoryConfig, PassthroughConfig, SerialConfig};
use crate::console::ConsoleHub;
use crate::control::{ExitReason, VmControl};
use crate::devices::PioBus;
use crate::devices::serial::{ConsoleOut, ConsoleSerial, IrqTrigger};
use crate::interrupts::IrqRouting;
use crate::memory::GuestRam;
use crate::pci::PciBus;
use crate::sandbox::{Sandbox, SandboxError, kinds};
use crate::vfio::VfioError;
use crate::vhost_user::{TYPE_NET, VhostUserDevice, VhostUserError};
use crate::virtio::pci::{VirtioPciDevice, VirtioPciError, layout as vp_layout};
use crate::{acpi, boot, cpuid, layout, vcpu};

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Name, used for the default RAM file.
    pub name: String,
    /// PVH ELF kernel.
    pub kernel: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// vCPU count.
    pub cpus: u32,
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// Console.
    pub serial: SerialConfig,
    /// The console's far end for `socket=PATH` and `pty`, opened before the sandbox.
    pub console: Option<Arc<ConsoleHub>>,
    /// vhost-user devices, in PCI slot order.
    pub devices: Vec<DeviceConfig>,
}

/// Errors building a VM, one per step.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// /dev/kvm cannot be used.
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// Bad vCPU count.
    #[error("--cpus {0}: must be between 1 and {1}")]
    Cpus(u32, u32),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A KVM VM-level ioctl failed; the string names the step.
    #[error("{0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// A socket or pty console that was not opened (an incoming VMM without `--serial`).
    #[error(
        "the console is {0}: start the new VMM with --serial {0} (or another console) to take it over"
    )]
    ConsoleNotOpen(String),
    /// The serial output file.
    #[error("cannot open serial output {0}: {1}")]
    SerialFile(PathBuf, #[source] std::io::Error),
    /// Two devices name the same back-end socket.
    #[error("two devices use the vhost-user socket {0}: each back-end serves one device")]
    SharedSocket(PathBuf),
    /// A vhost-user back-end could not be set up.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    /// A virtio-pci device could not be created.
    #[error(transparent)]
    VirtioPci(#[from] VirtioPciError),
    /// Interrupt routing.
    #[error(transparent)]
    Irq(#[from] crate::interrupts::IrqError),
    /// No room for another BAR or slot.
    #[error("no room on the PCI bus for device {0}")]
    PciFull(PathBuf),
    /// eventfd / thread creation.
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
    /// A thread could not be started inside the sandbox.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// A device cannot be passed through (`--device`).
    #[error("--device path={}: {source}", .path.display())]
    Vfio {
        /// The device as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: VfioError,
    },
}

/// A VM, shared by the main thread, the API and (during a live update) the migration code.
pub struct Vm {
    pub(crate) vm: Arc<VmFd>,
    pub(crate) vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    vcpu_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) bus: Arc<PioBus>,
    pub(crate) serial: Arc<Mutex<ConsoleSerial>>,
    /// (PCI slot, device) of every vhost-user device.
    pub(crate) devices: Vec<(u8, Arc<Mutex<VirtioPciDevice>>)>,
    /// (PCI slot, device) of every passed-through device; dropped before guest RAM, whose
    /// DMA mappings their container holds.
    pub(crate) passthrough: crate::vfio::Passthrough,
    pub(crate) cpus: u32,
    pub(crate) config: VmConfig,
    pub(crate) ram: GuestRam,
    pub(crate) msr_indices: Vec<u32>,
    started: Instant,
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// How the VM's devices reach their back-ends when it is built.
pub(crate) enum Devices<'a> {
    /// Connect and negotiate now (a fresh boot).
    Connect,
    /// Another VMM owns the back-ends until the switch: build from its saved state.
    HandedOver(&'a [baton_protocol::state::DeviceState]),
}

/// What [`Vm::open`] opened, for [`Vm::load_opened`].
#[derive(Debug)]
pub struct Opened {
    kvm: Kvm,
    ram: GuestRam,
    kernel: boot::Kernel,
    initramfs: Option<std::fs::File>,
    passthrough: Vec<PassthroughConfigState>,
}

/// Checks the devices and the vCPU count, opens /dev/kvm, creates (or opens) and maps guest
/// RAM: what building a VM needs before the KVM VM exists.
fn open_kvm_and_ram(config: &VmConfig) -> Result<(Kvm, GuestRam), VmError> {
    for (i, d) in config.devices.iter().enumerate() {
        if config.devices[..i].iter().any(|o| o.socket == d.socket) {
            return Err(VmError::SharedSocket(d.socket.clone()));
        }
    }
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let max = u32::try_from(kvm.get_max_vcpus())
        .unwrap_or(1)
        .min(MAX_VCPUS);
    if config.cpus == 0 || config.cpus > max {
        return Err(VmError::Cpus(config.cpus, max));
    }
    let mut steps = StepTimer::new();
    let ram = GuestRam::new(&config.memory, &config.name)?;
    steps.done("map guest RAM");
    Ok((kvm, ram))
}

impl Vm {
    /// Builds the VM and loads the guest; nothing runs until [`Vm::start_vcpus`] (the caller
    /// enters Landlock in between: every file is open by then). Checks that need nothing
    /// created come first, so a bad kernel or an unusable /dev/kvm leaves nothing behind.
    pub fn load(config: VmConfig) -> Result<Arc<Vm>, VmError> {
        let opened = Vm::open(&config)?;
        Vm::load_opened(config, opened)
    }

    /// The first half of [`Vm::load`]: opens what is named by path and may need privilege
    /// (the kernel, the initramfs, /dev/kvm) and creates and maps the RAM file; creates no
    /// KVM VM, connects to no back-end, starts no thread. `--user` drops privileges between
    /// this and [`Vm::load_opened`].
    pub fn open(config: &VmConfig) -> Result<Opened, VmError> {
        Vm::open_with(config, &[])
    }

    /// [`Vm::open`] with host PCI functions to pass through: each is checked (bound to
    /// vfio-pci, a viable IOMMU group, not given twice) before anything is created.
    pub fn open_with(
        config: &VmConfig,
        passthrough: &[PassthroughConfig],
    ) -> Result<Opened, VmError> {
        let passthrough = crate::vfio::check(passthrough)
            .map_err(|(path, e)| VmError::Vfio { path, source: e })?;
        let kernel = boot::check_kernel(&config.kernel)?;
        let initramfs = config
            .initramfs
            .as_deref()
            .map(boot::open_initramfs)
            .transpose()?;
        let (kvm, ram) = open_kvm_and_ram(config)?;
        Ok(Opened {
            kvm,
            ram,
            kernel,
            initramfs,
            passthrough,
        })
    }

    /// The second half of [`Vm::load`], with what [`Vm::open`] opened for `config`.
    pub fn load_opened(config: VmConfig, opened: Opened) -> Result<Arc<Vm>, VmError> {
        let Opened {
            kvm,
            ram,
            kernel,
            initramfs,
            passthrough,
        } = opened;
        let vm = Vm::build_with(
            config,
            kvm,
            ram,
            Devices::Connect,
            crate::vfio::Source::Open(&passthrough),
        )?;
        let rsdp = acpi::create_tables(&vm.ram.mem, vm.cpus)?;
        let boot = boot::load(
            &vm.ram.mem,
            vm.config.memory.size,
            &vm.config.kernel,
            kernel,
            boot::BootData {
                cmdline: &vm.config.cmdline,
                initramfs: vm.config.initramfs.as_deref().zip(initramfs),
                rsdp,
            },
        )?;
        if let Some(bsp) = vm.vcpus.first() {
            vcpu::set_boot_entry(&bsp.lock().unwrap_or_else(|e| e.into_inner()), &boot)?;
        }
        Ok(Arc::new(vm))
    }

    /// Creates the KVM VM, maps RAM, creates vCPUs and devices; runs nothing.
    pub(crate) fn build(
        config: VmConfig,
        devices: Devices<'_>,
        passthrough: crate::vfio::Source<'_>,
    ) -> Result<Vm, VmError> {
        let (kvm, ram) = open_kvm_and_ram(&config)?;
        Vm::build_with(config, kvm, ram, devices, passthrough)
    }

    fn build_with(
        config: VmConfig,
        kvm: Kvm,
        ram: GuestRam,
        devices: Devices<'_>,
        passthrough: crate::vfio::Source<'_>,
    ) -> Result<Vm, VmError> {
        let mut steps = StepTimer::new();
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?,
        );
        steps.done("KVM_CREATE_VM");
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP)
            .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.set_tss_address(usize::try_from(layout::KVM_TSS).unwrap_or(0))
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
        steps.done("irqchip and PIT");
        for (slot, region) in ram.mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which the returned Vm keeps
            // for as long as the KVM VM exists.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        steps.done("KVM memory slots");
        let control = Arc::new(VmControl::default());
        let serial = Arc::new(Mutex::new(console(&config, &vm)?));
        let (pci, devs, passthrough) = create_pci(&config, &kvm, &vm, &ram, devices, passthrough)?;
        steps.done("create devices");
        let bus = Arc::new(PioBus::new(serial.clone(), control.clone(), Arc::new(pci)));

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::new();
        for id in 0..config.cpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            let tsc_khz = fd.get_tsc_khz().ok();
            vcpu::configure(&fd, &cpuid::for_vcpu(&supported, id, config.cpus, tsc_khz))?;
            vcpus.push(fd);
        }
        steps.done("create vCPUs");
        let msr_indices = match vcpus.first() {
            Some(v) => crate::snapshot::msr_indices(&kvm, v).map_err(|e| VmError::Kvm(e.0, e.1))?,
            None => Vec::new(),
        };
        Ok(Vm {
            vm,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            vcpu_threads: Mutex::new(Vec::new()),
            control,
            bus,
            serial,
            devices: devs,
            passthrough,
            cpus: config.cpus,
            config,
            ram,
            msr_indices,
            started: Instant::now(),
        })
    }

    /// Starts one thread per vCPU, one per device that watches its back-end, and (with
    /// `--serial stdio`) the one that feeds stdin to the guest; each enters the `sandbox` as
    /// its kind before it runs. Call on a thread without a seccomp filter (the main thread
    /// before it enters its own): a thread started by a filtered one is held to its parent's
    /// filter as well.
    pub fn start_vcpus(&self, sandbox: &Arc<Sandbox>) -> Result<(), VmError> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| VmError::Os("registering the vCPU kick signal", e.into()))?;
        for (_, dev) in &self.devices {
            let dev = dev.clone();
            sandbox.spawn(
                "backend-watch".into(),
                None,
                kinds::backend_watch(),
                move |gate| {
                    if gate.enter() {
                        crate::reconnect::watch(&dev);
                    }
                },
            )?;
        }
        if self.config.serial == SerialConfig::Stdio {
            forward_stdin(self.serial.clone(), sandbox)?;
        }
        if let Some(hub) = &self.config.console {
            let (hub, serial) = (hub.clone(), self.serial.clone());
            sandbox.spawn("console".into(), None, kinds::console(), move |gate| {
                if gate.enter() {
                    hub.serve(&serial);
                }
            })?;
        }
        let mut threads = self.vcpu_threads.lock().unwrap_or_else(|e| e.into_inner());
        for (id, fd) in (0u32..).zip(&self.vcpus) {
            let (fd, bus, mem, control) = (
                fd.clone(),
                self.bus.clone(),
                self.ram.mem.clone(),
                self.control.clone(),
            );
            let handle = sandbox.spawn(format!("vcpu{id}"), None, kinds::vcpu(), move |gate| {
                if gate.enter() {
                    crate::sandbox::violation_point("vcpu");
                    vcpu::run(fd, id, bus, mem, control);
                }
            })?;
            threads.push(handle);
        }
        Ok(())
    }

    fn kick(&self) {
        let threads = self.vcpu_threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter() {
            // SAFETY: the JoinHandle is held and never joined, so the thread id stays valid
            // even after the thread returned (a joinable thread's id lives until it is joined).
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Starts the vCPU threads parked (an incoming VMM before the switch); see
    /// [`Vm::start_vcpus`].
    pub fn start_vcpus_parked(&self, sandbox: &Arc<Sandbox>) -> Result<(), VmError> {
        self.control.hold();
        self.start_vcpus(sandbox)?;
        if !self.pause() {
            return Err(VmError::Os(
                "parking the vCPU threads",
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            ));
        }
        Ok(())
    }

    /// Stops every vCPU; returns once all are parked.
    pub fn pause(&self) -> bool {
        let n = usize::try_from(self.cpus).unwrap_or(usize::MAX);
        self.control
            .pause(n, || self.kick(), Duration::from_secs(5))
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Asks the VM to stop; [`Vm::wait`] then returns.
    pub fn shutdown(&self) {
        self.control.exit(ExitReason::Shutdown);
        self.kick();
    }

    /// Blocks until the VM stops.
    pub fn wait(&self) -> ExitReason {
        let r = self.control.wait_exit();
        self.kick();
        r
    }

    /// After a live update's commit: the RAM file now belongs to the new VMM.
    pub fn handed_over(&self) {
        self.ram.set_owned(false);
        self.passthrough.set_owner(false);
    }

    /// Moves the VM to the new VMM on `dest` (see [`crate::migration`]). On success the
    /// caller reports and then calls [`Vm::finish_live_update`]. baton-vmm runs it on its
    /// `migration-out` thread ([`crate::migration::Outgoing`]).
    pub fn live_update(
        self: &Arc<Self>,
        dest: &std::path::Path,
        timeout: Duration,
    ) -> Result<crate::migration::Report, crate::migration::LiveUpdateError> {
        let report = crate::migration::outgoing(self, dest, timeout)?;
        tracing::info!(blackout_us = report.blackout_us, "live update done");
        Ok(report)
    }

    /// Stops this VMM (exit 0) after its VM moved away.
    pub fn finish_live_update(&self) {
        self.control.exit(ExitReason::LiveUpdated);
    }

    /// After taking a VM over: this VMM now owns (and will remove) the RAM file.
    pub fn take_ownership(&self) {
        self.ram.set_owned(true);
        self.passthrough.set_owner(true);
    }

    /// Releases what outlives the process unless removed: the RAM file this VMM created.
    pub fn cleanup(&self) {
        self.ram.remove_file();
        // The guest is stopped: leave passed-through devices as the next user expects them.
        self.passthrough.reset_if_owner();
    }

    /// Removes the console socket this VMM bound, unless the VM moved to a new VMM (which
    /// renamed its own socket over the console's path).
    pub fn remove_console_socket(&self, reason: &ExitReason) {
        if matches!(reason, ExitReason::LiveUpdated) {
            return;
        }
        if let Some(p) = self.config.console.as_ref().and_then(|h| h.bound_socket()) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// What `vm.info` reports.
    pub fn info(&self) -> VmInfo {
        let state = if self.control.exit_reason().is_some() {
            VmState::ShuttingDown
        } else if self.control.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        };
        VmInfo {
            state,
            cpus: u8::try_from(self.cpus).unwrap_or(u8::MAX),
            memory_bytes: self.ram.size,
            memory_path: self.ram.path.display().to_string(),
            kernel: self.config.kernel.display().to_string(),
            cmdline: self.config.cmdline.clone(),
            pid: std::process::id(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            devices: self
                .devices
                .iter()
                .map(|(_, d)| d.lock().unwrap_or_else(|e| e.into_inner()).info())
                .collect(),
            console: self.config.console.as_ref().and_then(|c| {
                c.pty_path()
                    .or(c.socket_path())
                    .map(|p| p.display().to_string())
            }),
            passthrough: self
                .passthrough
                .devices
                .iter()
                .map(|(slot, d)| d.lock().unwrap_or_else(|e| e.into_inner()).info(*slot))
                .collect(),
        }
    }
}

/// Logs steps of building a VM that take unusually long (they explain a slow start or a
/// slow live-update preparation).
struct StepTimer(Instant);

impl StepTimer {
    fn new() -> Self {
        StepTimer(Instant::now())
    }

    fn done(&mut self, what: &str) {
        let took = self.0.elapsed();
        if took > Duration::from_millis(100) {
            tracing::warn!(?took, "building the VM: {what} was slow");
        }
        self.0 = Instant::now();
    }
}

/// The PCI bus with its virtio-pci devices (one per vhost-user back-end) and its
/// passed-through devices.
type PciDevices = (
    PciBus,
    Vec<(u8, Arc<Mutex<VirtioPciDevice>>)>,
    PassedThrough,
);

/// (PCI slot, device) of each passed-through device.
type PassedThrough = crate::vfio::Passthrough;

/// The PCI bus with one virtio-pci device per vhost-user back-end.
fn create_pci(
    config: &VmConfig,
    kvm: &Kvm,
    vm: &Arc<VmFd>,
    ram: &GuestRam,
    how: Devices<'_>,
    passthrough: crate::vfio::Source<'_>,
) -> Result<PciDevices, VmError> {
    let mut bus = PciBus::new(layout::PCI_ECAM);
    let mut devices = Vec::new();
    if config.devices.is_empty() && passthrough.is_empty() {
        return Ok((bus, devices, crate::vfio::Passthrough::default()));
    }
    let max_gsi =
        u32::try_from(kvm.check_extension_int(kvm_ioctls::Cap::IrqRouting)).unwrap_or(1024);
    let irq = Arc::new(IrqRouting::new(vm.clone(), max_gsi));
    let mut bars = vm_allocator::AddressAllocator::new(
        layout::PCI_MMIO_START,
        layout::PCI_MMIO_END - layout::PCI_MMIO_START,
    )
    .map_err(|_| VmError::PciFull(PathBuf::new()))?;
    for (i, d) in config.devices.iter().enumerate() {
        let full = || VmError::PciFull(d.socket.clone());
        let saved = match &how {
            Devices::Connect => None,
            Devices::HandedOver(states) => Some(states.get(i).ok_or_else(full)?),
        };
        let policy = match saved {
            Some(s) => vm_allocator::AllocPolicy::ExactMatch(s.pci.bar_base),
            None => vm_allocator::AllocPolicy::FirstMatch,
        };
        let range = bars
            .allocate(vp_layout::SIZE, vp_layout::SIZE, policy)
            .map_err(|_| full())?;
        let backend = match saved {
            None => VhostUserDevice::connect(d.clone(), ram.mem.clone())?,
            Some(s) => VhostUserDevice::handed_over(
                d.clone(),
                ram.mem.clone(),
                s.virtio.device_features,
                u16::try_from(s.virtio.queues.len()).unwrap_or(0),
            ),
        };
        let name = format!(
            "{}{i}",
            if backend.device_type() == TYPE_NET {
                "net"
            } else {
                "disk"
            }
        );
        let dev = Arc::new(Mutex::new(VirtioPciDevice::new(
            name,
            backend,
            vm.clone(),
            irq.clone(),
            ram.mem.clone(),
            range.start(),
        )?));
        let slot = bus.add(dev.clone()).ok_or_else(full)?;
        devices.push((u8::try_from(slot).map_err(|_| full())?, dev));
    }
    let vfio = crate::vfio::add_to_bus(&mut bus, vm, &ram.mem, &irq, &mut bars, passthrough)
        .map_err(|(path, source)| VmError::Vfio { path, source })?;
    Ok((bus, devices, vfio))
}

fn console(config: &VmConfig, vm: &VmFd) -> Result<ConsoleSerial, VmError> {
    let out: ConsoleOut = match &config.serial {
        SerialConfig::Stdio => Box::new(std::io::stdout()),
        SerialConfig::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| VmError::SerialFile(p.clone(), e))?,
        ),
        SerialConfig::Off => Box::new(std::io::sink()),
        SerialConfig::Socket(p) => match &config.console {
            Some(hub) => hub.writer(),
            None => return Err(VmError::ConsoleNotOpen(format!("socket={}", p.display()))),
        },
        SerialConfig::Pty => match &config.console {
            Some(hub) => hub.writer(),
            None => return Err(VmError::ConsoleNotOpen("pty".into())),
        },
    };
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Os("eventfd", e))?;
    vm.register_irqfd(&evt, layout::COM1_GSI)
        .map_err(|e| VmError::Kvm("KVM_IRQFD (serial)", e))?;
    Ok(ConsoleSerial::new(IrqTrigger(evt), out))
}

/// Feeds the VMM's stdin to the guest's UART, waiting when its FIFO is full.
fn forward_stdin(
    serial: Arc<Mutex<ConsoleSerial>>,
    sandbox: &Arc<Sandbox>,
) -> Result<(), SandboxError> {
    sandbox
        .spawn("stdin".into(), None, kinds::stdin(), move |gate| {
            if !gate.enter() {
                return;
            }
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n @ 1..) = stdin.read(&mut buf) {
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = serial
                        .lock()
                        .map(|mut s| s.enqueue_raw_bytes(pending).unwrap_or(0))
                        .unwrap_or(0);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
        .map(drop)
}
