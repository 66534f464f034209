//! The virtio-blk device: disk, features, config space and queues. It keeps all state that
//! must survive front-end disconnects; nothing here depends on a connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use baton_service::sandbox::{Sandbox, SandboxError};

use crate::cli::{Args, IoEngineKind};
use crate::disk::{Disk, DiskError};
use crate::request::{DiskInfo, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR};
use crate::vring::{VringCtl, worker};

/// virtio-blk feature bits.
pub mod feat {
    /// Maximum segment count (seg_max).
    pub const SEG_MAX: u64 = 1 << 2;
    /// Read-only.
    pub const RO: u64 = 1 << 5;
    /// blk_size is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Flush command.
    pub const FLUSH: u64 = 1 << 9;
    /// Topology.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// Writeback toggle in config space.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// Multi-queue.
    pub const MQ: u64 = 1 << 12;
    /// Discard.
    pub const DISCARD: u64 = 1 << 13;
    /// Write zeroes.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Indirect descriptors.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// Event index.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// vhost-user protocol features.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// Virtio 1.0.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Size of our config space answer buffer (virtio_blk_config is 96 bytes in recent specs).
pub const CONFIG_SPACE: usize = 256;
const WRITEBACK_OFFSET: usize = 32;

/// The device.
#[derive(Debug)]
pub struct Device {
    disk: Disk,
    info: DiskInfo,
    queues: Vec<Arc<VringCtl>>,
    queue_size: u16,
    engine: IoEngineKind,
    writeback: AtomicBool,
    seg_max: u32,
    poll: std::time::Duration,
    test_delay: Option<std::time::Duration>,
    test_suspend_unrecorded: bool,
}

impl Device {
    /// Opens the image and builds the queues (no threads yet).
    pub fn new(args: &Args) -> Result<Self, DiskError> {
        let disk = Disk::open(&args.image, args.readonly, args.direct)?;
        let info = DiskInfo {
            size: disk.size() / SECTOR * SECTOR,
            readonly: args.readonly,
            serial: args.serial.as_bytes().to_vec(),
        };
        let queues = (0..args.queues)
            .map(|_| VringCtl::new(args.queue_size).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| DiskError::Size {
                path: "queues".into(),
                source,
            })?;
        Ok(Self {
            disk,
            info,
            queues,
            queue_size: args.queue_size,
            engine: args.io_engine,
            writeback: AtomicBool::new(true),
            seg_max: u32::from(args.queue_size).saturating_sub(2).clamp(1, 1024),
            poll: std::time::Duration::from_micros(args.poll_us),
            test_delay: (args.test_delay_ms > 0)
                .then(|| std::time::Duration::from_millis(args.test_delay_ms)),
            test_suspend_unrecorded: args.test_suspend_unrecorded,
        })
    }

    /// Starts one worker thread per queue; returns once each has entered the sandbox.
    pub fn spawn_workers(self: &Arc<Self>, sandbox: &Arc<Sandbox>) -> Result<(), SandboxError> {
        for (i, q) in self.queues.iter().enumerate() {
            let (q, dev) = (q.clone(), self.clone());
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            sandbox.spawn(
                format!("blk-q{i}"),
                Some(256 << 10),
                crate::seccomp::worker(),
                move |gate| worker(q, dev, index, gate),
            )?;
        }
        Ok(())
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// What request parsing needs.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// The queues.
    pub fn queues(&self) -> &[Arc<VringCtl>] {
        &self.queues
    }

    /// Maximum queue size.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// How long a worker looks for the next request before sleeping (`--poll-us`).
    pub fn poll(&self) -> std::time::Duration {
        self.poll
    }

    /// Test-only delay before executing a batch (`--test-delay-ms`).
    pub fn test_delay(&self) -> Option<std::time::Duration> {
        self.test_delay
    }

    /// Test only (`--test-suspend-unrecorded`): a suspended ring unmarks what it leaves in
    /// flight.
    pub fn test_suspend_unrecorded(&self) -> bool {
        self.test_suspend_unrecorded
    }

    /// Most descriptors a request may have: header, `seg_max` data segments, status.
    pub fn max_descs(&self) -> usize {
        usize::try_from(self.seg_max)
            .unwrap_or(usize::MAX)
            .saturating_add(2)
    }

    /// I/O engine for the workers.
    pub fn engine_kind(&self) -> IoEngineKind {
        self.engine
    }

    /// Write cache enabled (writeback) — otherwise writes are followed by fdatasync.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Offered virtio features.
    pub fn features(&self) -> u64 {
        let mut f = feat::VERSION_1
            | feat::PROTOCOL_FEATURES
            | feat::SEG_MAX
            | feat::BLK_SIZE
            | feat::FLUSH
            | feat::TOPOLOGY
            | feat::CONFIG_WCE
            | feat::INDIRECT_DESC
            | feat::EVENT_IDX;
        if self.queues.len() > 1 {
            f |= feat::MQ;
        }
        if self.info.readonly {
            f |= feat::RO;
        } else {
            f |= feat::DISCARD | feat::WRITE_ZEROES;
        }
        f
    }

    /// The config space (virtio_blk_config), zero-padded to [`CONFIG_SPACE`].
    pub fn config(&self) -> [u8; CONFIG_SPACE] {
        let mut c = [0u8; CONFIG_SPACE];
        let mut put = |off: usize, b: &[u8]| {
            if let Some(d) = c.get_mut(off..off + b.len()) {
                d.copy_from_slice(b);
            }
        };
        put(0, &(self.info.size / SECTOR).to_le_bytes()); // capacity
        put(12, &self.seg_max.to_le_bytes()); // seg_max
        put(20, &512u32.to_le_bytes()); // blk_size
        put(24, &[3, 0]); // physical_block_exp (4 KiB), alignment_offset
        put(26, &8u16.to_le_bytes()); // min_io_size (sectors)
        put(28, &8u32.to_le_bytes()); // opt_io_size
        put(WRITEBACK_OFFSET, &[u8::from(self.writeback())]);
        let nq = u16::try_from(self.queues.len()).unwrap_or(1);
        put(34, &nq.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// SET_CONFIG: only the writeback byte is writable.
    pub fn set_config(&self, offset: u32, buf: &[u8]) -> bool {
        if usize::try_from(offset).ok() == Some(WRITEBACK_OFFSET) && buf.len() == 1 {
            self.writeback
                .store(buf.first().copied().unwrap_or(1) != 0, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// The same device on another disk (tests).
    #[cfg(test)]
    pub(crate) fn with_disk(mut self, disk: Disk) -> Self {
        self.disk = disk;
        self
    }

    /// Stops every ring (waiting for in-flight requests), then fdatasync.
    pub fn quiesce(&self) -> std::io::Result<()> {
        for q in &self.queues {
            q.lock().stop();
        }
        self.disk.flush()
    }
}
