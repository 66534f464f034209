//! Command-line options of `baton-blk`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Which I/O engine executes disk requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IoEngineKind {
    /// io_uring with one ring per queue, up to a queue's worth of requests in flight.
    #[value(name = "io_uring")]
    IoUring,
    /// Synchronous preadv/pwritev on the queue's thread.
    Sync,
}

/// vhost-user-blk back-end over a raw disk image; it outlives its front-ends.
#[derive(Clone, Debug, Parser)]
#[command(name = "baton-blk", version)]
pub struct Args {
    /// UNIX socket to listen on (ignored under socket activation: LISTEN_FDS/LISTEN_PID).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Raw image: a regular file or a block device.
    #[arg(long)]
    pub image: PathBuf,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub readonly: bool,
    /// Number of virtqueues (VIRTIO_BLK_F_MQ when > 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Maximum size of each virtqueue (a power of two).
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Open the image with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// Serial returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes are used).
    #[arg(long, default_value = "baton-blk")]
    pub serial: String,
    /// I/O engine; io_uring falls back to sync when it cannot be set up.
    #[arg(long, value_enum, default_value_t = IoEngineKind::IoUring)]
    pub io_engine: IoEngineKind,
    /// After a queue runs dry, look for the guest's next request for up to this many
    /// microseconds before sleeping (0: sleep at once). A request that comes meanwhile needs
    /// no notification and no wake-up; the cost is this much CPU per idle moment (QEMU's
    /// iothreads poll the same way, 32 µs by default).
    #[arg(long, default_value_t = 32, value_name = "MICROSECONDS")]
    pub poll_us: u64,
    /// --allow-uid and --user.
    #[command(flatten)]
    pub service: baton_service::privilege::ServiceArgs,
    /// The sandbox: --seccomp true|false|log, --landlock true|false.
    #[command(flatten)]
    pub sandbox: baton_service::sandbox::SandboxArgs,
    /// Test only: hold every batch this long between marking it inflight and executing it,
    /// so that tests can kill the back-end with requests in flight.
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_delay_ms: u64,
    /// Test only: a suspended ring (GET_VRING_BASE_INFLIGHT) unmarks the requests it leaves in
    /// flight, as a back-end that breaks the feature's contract would, so that tests can check
    /// the front-end's side of it.
    #[arg(long, hide = true)]
    pub test_suspend_unrecorded: bool,
}

impl Args {
    /// Checks what clap cannot: the queue size.
    pub fn validate(&self) -> Result<(), String> {
        if !self.queue_size.is_power_of_two() || self.queue_size < 4 || self.queue_size > 1024 {
            return Err(format!(
                "--queue-size {} must be a power of two in 4..=1024",
                self.queue_size
            ));
        }
        Ok(())
    }
}
