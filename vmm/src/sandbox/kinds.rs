//! baton-vmm's thread kinds and their seccomp allowlists (on top of what every thread needs:
//! `baton_service::sandbox::seccomp::base`). Found by reading the code, running the VMM test
//! suites with `--seccomp log` (the kernel's audit records, type 1326) and, for the ioctl
//! requests, under `strace -f`. `ioctl` is only allowed with the requests a kind uses
//! ([`super::ioctls`]), `socket` only for AF_UNIX, `getsockopt` only for SO_PEERCRED,
//! `setsockopt` only for the two socket timeouts, `tgkill` only with the vCPU kick signal.
//!
//! No kind may `execve`, `ptrace`, open a file (except `migration-in`, which maps the RAM file
//! by path), create a socket other than AF_UNIX, bind or listen (the sockets are bound before),
//! or spawn a thread (except `migration-in`, for its parallel back-end reconnects).

use baton_service::sandbox::{Syscall, ThreadKind};

use super::ioctls::*;

const F_DUPFD_CLOEXEC: u64 = libc::F_DUPFD_CLOEXEC as u64;

fn ioctls(requests: &[u64]) -> Syscall {
    Syscall::arg_in(libc::SYS_ioctl, 1, requests)
}

/// `tgkill(pid, tid, sig)` with the vCPU kick signal (pthread_kill asks getpid first).
fn kick() -> Vec<Syscall> {
    let sig = u64::try_from(vmm_sys_util::signal::SIGRTMIN()).unwrap_or(u64::MAX);
    vec![
        Syscall::any(libc::SYS_getpid),
        Syscall::arg_in(libc::SYS_tgkill, 2, &[sig]),
    ]
}

/// A UNIX stream socket that connects: `socket(AF_UNIX, ...)`, `connect`, and the duplicate
/// the handshake watchdog keeps (`fcntl(F_DUPFD_CLOEXEC)`).
fn unix_connect() -> Vec<Syscall> {
    vec![
        Syscall::arg_in(libc::SYS_socket, 0, &[libc::AF_UNIX as u64]),
        Syscall::any(libc::SYS_connect),
        Syscall::arg_in(libc::SYS_fcntl, 1, &[F_DUPFD_CLOEXEC]),
    ]
}

/// vhost-user messages (with fds: SCM_RIGHTS) and ending a connection.
fn vhost_user() -> Vec<Syscall> {
    vec![
        Syscall::any(libc::SYS_sendmsg),
        Syscall::any(libc::SYS_recvmsg),
        Syscall::any(libc::SYS_shutdown),
    ]
}

/// The peer's credentials (SO_PEERCRED) and the socket timeouts of a stream.
fn stream_options() -> Vec<Syscall> {
    let sol = libc::SOL_SOCKET as u64;
    vec![
        Syscall::args_eq(
            libc::SYS_getsockopt,
            &[(1, sol), (2, libc::SO_PEERCRED as u64)],
        ),
        Syscall::args_eq(
            libc::SYS_setsockopt,
            &[(1, sol), (2, libc::SO_RCVTIMEO as u64)],
        ),
        Syscall::args_eq(
            libc::SYS_setsockopt,
            &[(1, sol), (2, libc::SO_SNDTIMEO as u64)],
        ),
    ]
}

/// Reading and writing a stream socket (std's `UnixStream` uses recv and send).
fn stream_io() -> Vec<Syscall> {
    vec![
        Syscall::any(libc::SYS_recvfrom),
        Syscall::any(libc::SYS_sendto),
    ]
}

/// The KVM ioctls a running device model makes on the VM fd: MSI routes when the guest
/// programs MSI-X, irqfds when a vector moves, ioeventfds when a BAR moves.
const DEVICE_MODEL_IOCTLS: [u64; 3] = [KVM_SET_GSI_ROUTING, KVM_IRQFD, KVM_IOEVENTFD];

/// A vCPU thread: KVM_RUN and its exits — port I/O and MMIO emulation (the serial console's
/// output, to a socket console's clients with `send`, PCI configuration, virtio-pci registers, which start and reset devices: vhost-user
/// messages to the back-end), registers for a crash report. For a passed-through device:
/// configuration and trapped BAR accesses (`pread64`/`pwrite64` on the VFIO device fd), its
/// MSI-X eventfds (VFIO_DEVICE_SET_IRQS) and moving a mapped BAR's memory slot.
pub fn vcpu() -> ThreadKind {
    let mut ioctl = vec![
        KVM_RUN,
        KVM_GET_REGS,
        KVM_GET_SREGS,
        KVM_SET_USER_MEMORY_REGION,
        VFIO_DEVICE_SET_IRQS,
    ];
    ioctl.extend(DEVICE_MODEL_IOCTLS);
    let mut l = vec![
        ioctls(&ioctl),
        Syscall::any(libc::SYS_sendto),
        Syscall::any(libc::SYS_pread64),
        Syscall::any(libc::SYS_pwrite64),
    ];
    l.extend(vhost_user());
    ThreadKind::new("vcpu", l)
}

/// The API thread: accepts one connection at a time from allowed peers (SO_PEERCRED), reads
/// the request, answers; pauses and resumes the vCPUs (the kick signal). A live update is
/// handed to the `migration-out` thread.
pub fn api() -> ThreadKind {
    let mut l = vec![Syscall::any(libc::SYS_accept4)];
    l.extend(stream_io());
    l.extend(stream_options());
    l.extend(kick());
    ThreadKind::new("api", l)
}

/// The main thread once the VM runs: waits for the VM to stop, kicks the vCPUs out, removes
/// the API socket, the `--incoming` sockets and the RAM file it owns, resets passed-through
/// devices (VFIO_DEVICE_RESET), exits.
pub fn control() -> ThreadKind {
    let mut l = vec![
        Syscall::any(libc::SYS_unlink),
        Syscall::any(libc::SYS_unlinkat),
        ioctls(&[VFIO_DEVICE_RESET]),
    ];
    l.extend(kick());
    ThreadKind::new("control", l)
}

/// The thread that waits for SIGTERM/SIGINT/SIGHUP and stops the VM.
pub fn signals() -> ThreadKind {
    let mut l = vec![Syscall::any(libc::SYS_rt_sigtimedwait)];
    l.extend(kick());
    ThreadKind::new("signals", l)
}

/// The thread that feeds stdin to the guest's UART (`--serial stdio`).
pub fn stdin() -> ThreadKind {
    ThreadKind::new("stdin", vec![Syscall::any(libc::SYS_read)])
}

/// The serial console's thread (`--serial socket=PATH` or `pty`): polls the listener and the
/// clients (each poll on duplicates of their fds: `fcntl(F_DUPFD_CLOEXEC)`), accepts clients
/// from allowed peers (SO_PEERCRED), reads what they type, writes queued output.
pub fn console() -> ThreadKind {
    let sol = libc::SOL_SOCKET as u64;
    ThreadKind::new(
        "console",
        vec![
            Syscall::any(libc::SYS_poll),
            Syscall::any(libc::SYS_ppoll),
            Syscall::arg_in(libc::SYS_fcntl, 1, &[F_DUPFD_CLOEXEC]),
            Syscall::any(libc::SYS_read),
            Syscall::any(libc::SYS_sendto),
            Syscall::any(libc::SYS_accept4),
            Syscall::args_eq(
                libc::SYS_getsockopt,
                &[(1, sol), (2, libc::SO_PEERCRED as u64)],
            ),
        ],
    )
}

/// The thread that ends a back-end handshake past its deadline (`shutdown` of the socket).
pub fn watchdog() -> ThreadKind {
    ThreadKind::new("watchdog", vec![Syscall::any(libc::SYS_shutdown)])
}

/// A thread per device that watches its back-end's connection (poll for a hang-up) and
/// reconnects when it went away: connect, the whole vhost-user handshake with the memory table
/// and inflight fds, ring restarts, notifications (eventfd writes).
pub fn backend_watch() -> ThreadKind {
    let mut l = vec![Syscall::any(libc::SYS_poll)];
    l.extend(unix_connect());
    l.extend(vhost_user());
    l.extend(stream_io());
    ThreadKind::new("backend-watch", l)
}

/// The live update's outgoing side (one thread, waiting for the API's requests): connects to
/// the new VMM (state stream and cpr channel; SO_PEERCRED), pauses the vCPUs, reads vCPU and
/// VM state from KVM, stops every ring (vhost-user GET_VRING_BASE) and hangs up, sends the
/// state and the inflight fds (SCM_RIGHTS); on rollback kills the new VMM (pidfd) and
/// reconnects the back-ends as `backend-watch` does. With passed-through devices: duplicates
/// their fds for the cpr channel, removes and (on rollback) restores their vectors' irqfds
/// and routes, and moves the DMA mappings' addresses (VFIO_IOMMU_UNMAP_DMA and MAP_DMA with
/// the VADDR flags). Reads (pread) the inflight region of a back-end that suspended its rings,
/// to check that it recorded the requests it left in flight.
pub fn migration_out() -> ThreadKind {
    let mut l = vec![
        ioctls(&[
            VFIO_CHECK_EXTENSION,
            VFIO_IOMMU_UNMAP_DMA,
            VFIO_IOMMU_MAP_DMA,
            KVM_IRQFD,
            KVM_SET_GSI_ROUTING,
            KVM_GET_MP_STATE,
            KVM_GET_REGS,
            KVM_GET_SREGS,
            KVM_GET_XSAVE,
            KVM_GET_XCRS,
            KVM_GET_LAPIC,
            KVM_GET_MSRS,
            KVM_GET_VCPU_EVENTS,
            KVM_GET_IRQCHIP,
            KVM_GET_PIT2,
            KVM_GET_CLOCK,
        ]),
        Syscall::any(libc::SYS_geteuid),
        // Rollback: SIGKILL to the new VMM and wait for it to be gone.
        Syscall::any(libc::SYS_pidfd_open),
        Syscall::arg_in(libc::SYS_pidfd_send_signal, 1, &[libc::SIGKILL as u64]),
        Syscall::arg_in(libc::SYS_kill, 1, &[libc::SIGKILL as u64]),
        Syscall::any(libc::SYS_poll),
        Syscall::any(libc::SYS_pread64),
    ];
    l.extend(unix_connect());
    l.extend(vhost_user());
    l.extend(stream_io());
    l.extend(stream_options());
    l.extend(kick());
    ThreadKind::new("migration-out", l)
}

/// The live update's incoming side (a thread of its own, from before the first connection to
/// the switch): accepts the old VMM (SO_PEERCRED), reads the configuration, builds the VM —
/// opens /dev/kvm and the RAM file *by path* (openat) and maps it, creates the KVM VM, its
/// memory slots, irqchip, PIT, vCPUs, eventfds, ioeventfds and irqfds — then enters Landlock,
/// receives the state and the inflight fds (SCM_RIGHTS), restores KVM state, reconnects every
/// back-end on a thread of its own (clone; those threads inherit this filter), and after the
/// commit enables the rings; finally removes its `--incoming` sockets. With passed-through
/// devices: receives their fds with the prepare, reads their region info and configuration
/// space, maps their BARs (mmap of the device fd), registers their groups with a KVM-VFIO
/// device, and at the switch gives the DMA mappings its addresses (VFIO_IOMMU_MAP_DMA with
/// VFIO_DMA_MAP_FLAG_VADDR).
pub fn migration_in() -> ThreadKind {
    let mut ioctl = vec![
        VFIO_DEVICE_GET_INFO,
        VFIO_DEVICE_GET_REGION_INFO,
        VFIO_IOMMU_MAP_DMA,
        VFIO_IOMMU_UNMAP_DMA,
        KVM_CREATE_DEVICE,
        KVM_SET_DEVICE_ATTR,
        KVM_GET_API_VERSION,
        KVM_CREATE_VM,
        KVM_GET_MSR_INDEX_LIST,
        KVM_CHECK_EXTENSION,
        KVM_GET_VCPU_MMAP_SIZE,
        KVM_GET_SUPPORTED_CPUID,
        KVM_CREATE_VCPU,
        KVM_SET_USER_MEMORY_REGION,
        KVM_SET_TSS_ADDR,
        KVM_SET_IDENTITY_MAP_ADDR,
        KVM_CREATE_IRQCHIP,
        KVM_SET_IRQCHIP,
        KVM_CREATE_PIT2,
        KVM_SET_PIT2,
        KVM_SET_CLOCK,
        KVM_GET_TSC_KHZ,
        KVM_SET_CPUID2,
        KVM_GET_MSRS,
        KVM_SET_MSRS,
        KVM_SET_FPU,
        KVM_GET_LAPIC,
        KVM_SET_LAPIC,
        KVM_SET_MP_STATE,
        KVM_SET_REGS,
        KVM_SET_SREGS,
        KVM_SET_XSAVE,
        KVM_SET_XCRS,
        KVM_SET_VCPU_EVENTS,
    ];
    ioctl.extend(DEVICE_MODEL_IOCTLS);
    let mut l = vec![
        ioctls(&ioctl),
        Syscall::any(libc::SYS_accept4),
        Syscall::any(libc::SYS_geteuid),
        Syscall::any(libc::SYS_getpid),
        // Building the VM: the RAM file by path, /dev/kvm, a serial output file.
        Syscall::any(libc::SYS_openat),
        Syscall::any(libc::SYS_fstat),
        Syscall::any(libc::SYS_newfstatat),
        Syscall::any(libc::SYS_statx),
        Syscall::any(libc::SYS_fstatfs),
        Syscall::any(libc::SYS_ftruncate),
        Syscall::any(libc::SYS_fchmod),
        Syscall::any(libc::SYS_eventfd2),
        Syscall::any(libc::SYS_pread64),
        // Entering Landlock once the VM is built.
        Syscall::any(libc::SYS_landlock_create_ruleset),
        Syscall::any(libc::SYS_landlock_add_rule),
        Syscall::any(libc::SYS_landlock_restrict_self),
        Syscall::arg_in(libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64]),
        // The reconnect threads, and what a new thread does before its closure runs.
        Syscall::any(libc::SYS_clone3),
        Syscall::any(libc::SYS_clone),
        Syscall::any(libc::SYS_set_robust_list),
        Syscall::any(libc::SYS_rseq),
        Syscall::any(libc::SYS_gettid),
        Syscall::any(libc::SYS_sched_getaffinity),
        Syscall::any(libc::SYS_poll),
        // The --incoming sockets, removed once the VM runs here.
        Syscall::any(libc::SYS_unlink),
        Syscall::any(libc::SYS_unlinkat),
        // The console socket, moved over the old VMM's path when the VM runs here.
        Syscall::any(libc::SYS_rename),
        Syscall::any(libc::SYS_renameat),
        Syscall::any(libc::SYS_renameat2),
    ];
    l.extend(unix_connect());
    l.extend(vhost_user());
    l.extend(stream_io());
    l.extend(stream_options());
    ThreadKind::new("migration-in", l)
}

/// Every kind, for the tests and the docs.
pub fn all() -> Vec<ThreadKind> {
    vec![
        vcpu(),
        api(),
        control(),
        signals(),
        stdin(),
        console(),
        watchdog(),
        backend_watch(),
        migration_out(),
        migration_in(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_service::sandbox::seccomp::SeccompAction;

    #[test]
    fn thread_kinds_compile_and_keep_least_privilege() {
        for k in all() {
            assert!(k.program(SeccompAction::Trap).is_ok(), "{}", k.name);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_process_vm_writev,
                libc::SYS_open,
            ] {
                assert!(!k.allows(nr), "{} allows {nr}", k.name);
            }
            assert!(!k.allows_any_args(libc::SYS_ioctl), "{}", k.name);
            assert!(!k.allows_any_args(libc::SYS_socket), "{}", k.name);
            assert!(!k.allows_any_args(libc::SYS_mmap), "{}", k.name);
            if k.name != "migration-in" {
                for nr in [libc::SYS_openat, libc::SYS_clone3, libc::SYS_clone] {
                    assert!(!k.allows(nr), "{} allows {nr}", k.name);
                }
            }
        }
        // Only the threads that reconnect back-ends or move the VM connect anywhere.
        for k in [vcpu(), api(), control(), signals(), stdin(), watchdog()] {
            assert!(!k.allows(libc::SYS_connect), "{}", k.name);
            assert!(!k.allows(libc::SYS_socket), "{}", k.name);
        }
        // Killing a process: only the rollback of a live update.
        for k in all() {
            assert_eq!(
                k.allows(libc::SYS_kill) || k.allows(libc::SYS_pidfd_send_signal),
                k.name == "migration-out",
                "{}",
                k.name
            );
        }
        assert!(!api().allows(libc::SYS_sendmsg) && !api().allows(libc::SYS_recvmsg));
        assert!(!vcpu().allows(libc::SYS_accept4) && !vcpu().allows(libc::SYS_unlink));
    }
}
