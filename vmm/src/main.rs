//! `baton-vmm`: boots a PVH ELF kernel in a KVM VM, or takes one over (`--incoming`), inside
//! its sandbox (`baton_vmm::sandbox`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use baton_service::access::AllowList;
use baton_service::privilege::{self, User};
use baton_vmm::api::ApiSocket;
use baton_vmm::config::{MemoryConfig, PassthroughConfig, SerialConfig, parse_device};
use baton_vmm::console::ConsoleChoice;
use baton_vmm::control::ExitReason;
use baton_vmm::migration::{self, Incoming, Outgoing};
use baton_vmm::sandbox::{self, Removable, Sandbox, SandboxArgs, kinds};
use baton_vmm::vm::{Vm, VmConfig};
use clap::Parser;

/// A KVM VMM whose devices are served by vhost-user back-ends.
#[derive(Parser, Debug)]
#[command(name = "baton-vmm", version)]
struct Args {
    /// Kernel to boot: a bzImage as distributions ship it (`/boot/vmlinuz-*`, entered through
    /// the 64-bit boot protocol) or a PVH ELF (`vmlinux`); told apart by content.
    #[arg(long, required_unless_present = "incoming")]
    kernel: Option<PathBuf>,
    /// Take over a running VM from another baton-vmm (live update): listen on this socket
    /// (and PATH.cpr for the cpr channel). The configuration arrives with the VM; --serial
    /// and --api-socket may override.
    #[arg(long, conflicts_with_all = ["kernel", "initramfs", "disk", "net", "device"])]
    incoming: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Initramfs (for a bzImage in the zero page, for a PVH kernel as a module).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest RAM: size=SIZE[,path=FILE][,hugepages=on]. The file is mapped MAP_SHARED.
    #[arg(long, default_value = "size=256M")]
    memory: MemoryConfig,
    /// Serial console: stdio, file=PATH, off, socket=PATH (clients attach and detach, e.g.
    /// `socat - UNIX-CONNECT:PATH`; mode 0600, --allow-uid peers; output written while nobody
    /// is attached is kept, 64 KiB; a live update keeps it when the new VMM gets the same
    /// --serial socket=PATH) or pty (a new pseudo-terminal, its path printed and in vm.info).
    #[arg(long)]
    serial: Option<SerialConfig>,
    /// HTTP API socket path. Created mode 0600; only --allow-uid peers get through.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Also let processes of this uid use the API socket and the --incoming sockets
    /// (checked with SO_PEERCRED on every connection; the socket files get an ACL entry for
    /// it). Repeatable. The VMM's own uid is always allowed; root only if listed.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uid: Vec<u32>,
    /// A vhost-user block device: socket=PATH[,queues=N,queue_size=N,reconnect_ms=N,
    /// drain=on|off]. Repeatable. A back-end that goes away is reconnected forever unless
    /// reconnect_ms says how long to try. A live update stops the rings of a back-end that
    /// offers GET_VRING_BASE_INFLIGHT without waiting for its requests in flight (they go over
    /// in the inflight region) unless drain=on.
    #[arg(long)]
    disk: Vec<String>,
    /// A vhost-user net device: socket=PATH[,mac=MAC,queues=N,queue_size=N,mtu=N,
    /// reconnect_ms=N,drain=on|off]. Repeatable.
    #[arg(long)]
    net: Vec<String>,
    /// A host PCI function passed through with VFIO: path=/sys/bus/pci/devices/DDDD:BB:DD.F,
    /// bound to vfio-pci, with MSI-X (INTx and MSI are not supported). Repeatable. Guest RAM
    /// is mapped for the device's DMA; a VM with one cannot be live-updated yet.
    #[arg(long)]
    device: Vec<PassthroughConfig>,
    /// Started as root: open /dev/kvm, the kernel and initramfs, create the RAM file (as
    /// UID's: /dev/shm/baton-UID/) and bind the API socket (chowned to UID:GID), then drop to
    /// UID:GID for good with no capability, before any thread starts and before the sandbox.
    /// Numbers; GID defaults to UID. UID is then the VMM's own uid in the --allow-uid check.
    /// Not with --incoming.
    #[arg(long, value_name = "UID[:GID]")]
    user: Option<User>,
    /// VM name (names the default RAM file /dev/shm/baton-UID/NAME.ram).
    #[arg(long)]
    name: Option<String>,
    /// The sandbox: --seccomp true|false|log, --landlock true|false.
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Test only: the kind of thread that tries --test-sandbox-violation (default: the main
    /// thread, after start-up).
    #[arg(long, hide = true, value_name = "KIND", requires = "test_sandbox_violation",
        value_parser = clap::builder::PossibleValuesParser::new(sandbox::VIOLATION_POINTS))]
    test_sandbox_violation_in: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(reason) => {
            if let ExitReason::Crash(what) = &reason {
                eprintln!("baton-vmm: guest stopped: {what}");
            } else {
                tracing::info!(?reason, "VM stopped");
            }
            ExitCode::from(u8::try_from(reason.exit_code()).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("baton-vmm: {e}");
            ExitCode::from(1)
        }
    }
}

fn block_exit_signals() -> std::io::Result<libc::sigset_t> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset and pthread_sigmask only read and
    // write that set and this thread's mask.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        let set = set.assume_init();
        match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
            0 => Ok(set),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

fn run(mut args: Args) -> anyhow::Result<ExitReason> {
    if let (Some(user), Some(_)) = (args.user, &args.incoming) {
        anyhow::bail!(
            "--user {user} cannot be used with --incoming: the incoming VMM of a live update \
             opens /dev/kvm and the RAM file while it takes the VM over, after its threads \
             started; start it as the uid the running VMM dropped to instead (it can open \
             /dev/kvm and owns the RAM file)"
        );
    }
    privilege::check_can_drop(args.user)?;
    let mut devices = Vec::new();
    for d in &args.disk {
        devices.push(parse_device(d, false, 0).map_err(|e| anyhow::anyhow!("--disk {d}: {e}"))?);
    }
    for (i, n) in (0u32..).zip(&args.net) {
        let seed = std::process::id().wrapping_mul(31).wrapping_add(i);
        devices.push(parse_device(n, true, seed).map_err(|e| anyhow::anyhow!("--net {n}: {e}"))?);
    }
    // SIGTERM/SIGINT/SIGHUP are taken by a thread of their own (blocked everywhere else), so
    // that they shut the VM down cleanly and the RAM file and API socket are removed.
    let signals = block_exit_signals()?;
    // The sandbox: the SIGSYS handler now; each thread enters its seccomp filter as it starts,
    // and Landlock comes once every file is open (see baton_vmm::sandbox).
    if let Some(what) = args.sandbox.test_sandbox_violation.take() {
        let kind = args
            .test_sandbox_violation_in
            .as_deref()
            .unwrap_or("control");
        sandbox::plan_violation(kind, what);
    }
    let sandbox = Arc::new(Sandbox::bare(sandbox::SERVICE, &args.sandbox)?);
    let mut keep = Removable {
        api_socket: args.api_socket.clone(),
        incoming: args.incoming.clone(),
        console_socket: None,
    };
    let allow = AllowList::for_user(&args.allow_uid, args.user);
    // Bind the API socket first: an address in use must leave nothing behind.
    let mut api = args
        .api_socket
        .as_deref()
        .map(|p| ApiSocket::bind(p, &allow))
        .transpose()?;
    if let (Some(path), Some(user)) = (&args.api_socket, args.user) {
        privilege::chown_socket(path, user)?;
    }
    // A socket or pty console is opened now, before any thread and the sandbox.
    let console = ConsoleChoice::open(args.serial.clone(), args.incoming.is_some(), &allow)?;
    let console_socket = console.hub.as_ref().and_then(|h| h.bound_socket());
    if let (Some(path), Some(user)) = (&console_socket, args.user) {
        privilege::chown_socket(path, user)?;
    }
    if let Some(pty) = console.hub.as_ref().and_then(|h| h.pty_path()) {
        eprintln!("baton-vmm: serial console on {}", pty.display());
    }
    keep.console_socket = console
        .hub
        .as_ref()
        .and_then(|h| h.socket_path())
        .map(Into::into);
    let name = args
        .name
        .unwrap_or_else(|| format!("pid{}", std::process::id()));
    let vm = match (&args.incoming, args.kernel) {
        (Some(path), _) => {
            baton_vmm::vhost_user::deadline::start(&sandbox)?;
            let incoming = Incoming::bind(path, &allow)?;
            eprintln!("baton-vmm: waiting for a VM on {}", path.display());
            // The migration-in thread builds the VM; this thread starts its threads.
            migration::take_over(incoming, console, &sandbox, keep.clone(), |vm| {
                sandbox::restrict_fs(&sandbox, &keep, vm)?;
                vm.start_vcpus_parked(&sandbox)?;
                Ok(())
            })?
        }
        (None, Some(kernel)) => {
            let config = VmConfig {
                name,
                kernel,
                cmdline: args.cmdline,
                initramfs: args.initramfs,
                cpus: args.cpus,
                memory: args.memory,
                serial: console.serial.unwrap_or(SerialConfig::Stdio),
                console: console.hub,
                devices,
            };
            if let Some(user) = args.user {
                baton_vmm::ram_file::set_owner(user.uid, user.gid);
            }
            // What needs privilege: /dev/kvm, the kernel and initramfs, the RAM file.
            let opened = Vm::open_with(&config, &args.device)?;
            // No thread has started yet (the watchdog is next): glibc applies the drop to
            // this one thread, and none is left with root.
            if let Some(user) = args.user {
                privilege::drop_to(user)?;
            }
            // The back-ends' handshake deadlines, before the first connect.
            baton_vmm::vhost_user::deadline::start(&sandbox)?;
            let vm = Vm::load_opened(config, opened)?;
            sandbox::restrict_fs(&sandbox, &keep, &vm)?;
            vm.start_vcpus(&sandbox)?;
            vm
        }
        (None, None) => anyhow::bail!("--kernel or --incoming is required"),
    };
    let outgoing = Outgoing::spawn(&vm, &sandbox)?;
    if let Some(api) = api.as_mut() {
        api.serve(vm.clone(), outgoing, &sandbox)?;
    }
    let on_signal = vm.clone();
    sandbox.spawn("signals".into(), None, kinds::signals(), move |gate| {
        if !gate.enter() {
            return;
        }
        let mut sig = 0;
        // SAFETY: sigwait reads the set we built and writes one int we own.
        if unsafe { libc::sigwait(&signals, &mut sig) } == 0 {
            tracing::info!("signal {sig}: shutting down");
            on_signal.shutdown();
        }
    })?;
    // From here on this thread only waits for the VM to stop and removes its files.
    sandbox.enter(&kinds::control())?;
    sandbox.report();
    sandbox::violation_point("control");
    let reason = vm.wait();
    drop(api);
    // Other threads (API, vCPUs) may still hold the VM: remove its files explicitly.
    vm.cleanup();
    vm.remove_console_socket(&reason);
    Ok(reason)
}
