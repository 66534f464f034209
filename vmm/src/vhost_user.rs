//! The vhost-user front-end of one device: connects to a back-end's socket, negotiates, and
//! hands it the rings, kick (ioeventfd) and call (irqfd) eventfds when the guest starts the
//! device. Implements [`VirtioBackend`] for the virtio-pci transport.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::virtio::{self, ActiveQueue, VirtioBackend};

/// virtio-blk feature bits baton passes through.
pub mod blk {
    /// Max segment size / count, geometry, block size, flush, topology, config WCE, MQ,
    /// discard, write zeroes, read-only.
    pub const FEATURES: u64 = (1 << 1)
        | (1 << 2)
        | (1 << 4)
        | (1 << 5)
        | (1 << 6)
        | (1 << 9)
        | (1 << 10)
        | (1 << 11)
        | (1 << 12)
        | (1 << 13)
        | (1 << 14);
    /// virtio_blk_config size.
    pub const CONFIG_SIZE: u32 = 60;
}

/// virtio-net feature bits baton passes through.
pub mod net {
    /// CSUM, GUEST_CSUM, MTU, MAC, GUEST_TSO4/6, GUEST_ECN, GUEST_UFO, HOST_TSO4/6, HOST_ECN,
    /// HOST_UFO, MRG_RXBUF, STATUS, CTRL_VQ, MQ.
    pub const FEATURES: u64 = (1 << 0)
        | (1 << 1)
        | (1 << 3)
        | (1 << 5)
        | (1 << 7)
        | (1 << 8)
        | (1 << 9)
        | (1 << 10)
        | (1 << 11)
        | (1 << 12)
        | (1 << 13)
        | (1 << 14)
        | (1 << 15)
        | (1 << 16)
        | (1 << 17)
        | (1 << 22);
    /// Feature bit: MAC address in config space (baton provides it).
    pub const F_MAC: u64 = 1 << 5;
    /// Feature bit: link status in config space.
    pub const F_STATUS: u64 = 1 << 16;
    /// Feature bit: MTU in config space.
    pub const F_MTU: u64 = 1 << 3;
    /// Feature bit: control queue.
    pub const F_CTRL_VQ: u64 = 1 << 17;
    /// Feature bit: multi-queue.
    pub const F_MQ: u64 = 1 << 22;
}

/// Protocol features baton uses when the back-end offers them.
const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::RESET_DEVICE);

/// How long the VMM waits for any one answer of a back-end before giving up on the step.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a reconnect keeps retrying a back-end that refuses us.
pub const RECONNECT_WINDOW: std::time::Duration = std::time::Duration::from_secs(3);

/// What kind of device a back-end serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk; configuration space comes from the back-end (GET_CONFIG).
    Block,
    /// virtio-net; configuration space comes from the options.
    Net {
        /// MAC address.
        mac: [u8; 6],
        /// MTU, if set.
        mtu: Option<u16>,
    },
}

/// Options of one vhost-user device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Back-end socket.
    pub socket: PathBuf,
    /// Queues (blk) or queue pairs (net).
    pub queues: u16,
    /// Largest ring size offered to the guest.
    pub queue_size: u16,
    /// Block or net.
    pub kind: DeviceKind,
    /// How long to keep reconnecting to a back-end that went away; `None`: forever.
    pub reconnect_limit: Option<std::time::Duration>,
}

/// Errors talking to a back-end, one per protocol step; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// connect() failed.
    #[error("cannot connect to vhost-user back-end {0}: {1}")]
    Connect(PathBuf, #[source] vhost::Error),
    /// A protocol step failed.
    #[error("vhost-user back-end {socket}: {step} failed: {source}")]
    Step {
        /// The socket.
        socket: PathBuf,
        /// The request.
        step: &'static str,
        /// The error.
        #[source]
        source: vhost::Error,
    },
    /// The back-end lacks features baton needs.
    #[error(
        "vhost-user back-end {0} does not offer required features {1:#x} (VERSION_1 and vhost-user protocol features)"
    )]
    MissingFeatures(PathBuf, u64),
    /// The back-end has fewer queues than asked for.
    #[error("vhost-user back-end {0} serves at most {1} queues, {2} were asked for")]
    TooFewQueues(PathBuf, u64, u64),
}

/// A vhost-user back-end: connected while the VM runs, disconnected while its rings are
/// handed over to another VMM (live update).
pub struct VhostUserDevice {
    fe: Option<Frontend>,
    cfg: DeviceConfig,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    offered: u64,
    queue_count: u16,
    config_space: Vec<u8>,
    mem: GuestMemoryMmap,
    inflight: Option<(VhostUserInflight, File)>,
    started: Vec<u16>,
    /// Virtio features the guest acknowledged, as sent with SET_FEATURES.
    acked: u64,
}

/// Ring position of a started queue, as GET_VRING_BASE returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingBase {
    /// Queue index.
    pub index: u16,
    /// Next available-ring index the back-end would process.
    pub next_avail: u16,
}

impl VhostUserDevice {
    /// Connects and negotiates everything that does not depend on the guest.
    pub fn connect(cfg: DeviceConfig, mem: GuestMemoryMmap) -> Result<Self, VhostUserError> {
        let sock = cfg.socket.clone();
        let step = |step: &'static str| {
            let socket = sock.clone();
            move |source| VhostUserError::Step {
                socket: socket.clone(),
                step,
                source,
            }
        };
        let queue_count = match cfg.kind {
            DeviceKind::Block => cfg.queues,
            DeviceKind::Net { .. } => cfg.queues.saturating_mul(2),
        };
        // One connect(2), no hidden retries (Frontend::connect sleeps 100 ms between five
        // tries): the callers decide how to retry (live-update window, restart backoff).
        let connect_err = |e| {
            VhostUserError::Connect(
                sock.clone(),
                vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketConnect(e)),
            )
        };
        let stream = std::os::unix::net::UnixStream::connect(&cfg.socket).map_err(connect_err)?;
        // A back-end that accepts and then never answers (or answers short) must not hang the
        // VMM: past the deadline the connection is ended and the step fails.
        let _deadline = crate::deadline::arm(&stream, REPLY_TIMEOUT).map_err(connect_err)?;
        let mut fe = Frontend::from_stream(stream, u64::from(queue_count) + 1);
        fe.set_owner().map_err(step("SET_OWNER"))?;
        let features = fe.get_features().map_err(step("GET_FEATURES"))?;
        let required = virtio::F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & required != required {
            return Err(VhostUserError::MissingFeatures(sock, required & !features));
        }
        let theirs = fe
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        let protocol = theirs & PROTOCOL_FEATURES;
        fe.set_protocol_features(protocol)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request asks for an answer, so a refusal is seen where it happens.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let mut queue_count = queue_count;
        let device_features = match cfg.kind {
            DeviceKind::Block => blk::FEATURES,
            DeviceKind::Net { .. } => net::FEATURES,
        };
        let mut offered = features & (device_features | virtio::TRANSPORT_FEATURES);
        if let DeviceKind::Net { mtu, .. } = cfg.kind {
            offered |= net::F_MAC | net::F_STATUS;
            if mtu.is_some() {
                offered |= net::F_MTU;
            }
            if cfg.queues > 1 {
                offered |= net::F_MQ;
            }
            if offered & net::F_CTRL_VQ != 0 {
                queue_count += 1;
            }
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = fe.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
            if max < u64::from(queue_count) {
                return Err(VhostUserError::TooFewQueues(sock, max, queue_count.into()));
            }
        } else if queue_count > 2 || (cfg.kind == DeviceKind::Block && queue_count > 1) {
            return Err(VhostUserError::TooFewQueues(sock, 1, queue_count.into()));
        }
        let config_space = match &cfg.kind {
            DeviceKind::Block if protocol.contains(VhostUserProtocolFeatures::CONFIG) => {
                let buf = vec![0u8; blk::CONFIG_SIZE as usize];
                let (_, payload) = fe
                    .get_config(0, blk::CONFIG_SIZE, VhostUserConfigFlags::WRITABLE, &buf)
                    .map_err(step("GET_CONFIG"))?;
                let mut c = payload.to_vec();
                // num_queues (offset 34) is what baton exposes, not the back-end's maximum.
                if let Some(b) = c.get_mut(34..36) {
                    b.copy_from_slice(&cfg.queues.to_le_bytes());
                }
                c
            }
            DeviceKind::Block => vec![0; blk::CONFIG_SIZE as usize],
            DeviceKind::Net { mac, mtu } => {
                let mut c = mac.to_vec();
                c.extend_from_slice(&1u16.to_le_bytes()); // status: link up
                c.extend_from_slice(&cfg.queues.to_le_bytes());
                c.extend_from_slice(&mtu.unwrap_or(1500).to_le_bytes());
                c
            }
        };
        Ok(VhostUserDevice {
            fe: Some(fe),
            cfg,
            backend_features: features,
            protocol,
            offered,
            queue_count,
            config_space,
            mem,
            inflight: None,
            started: Vec::new(),
            acked: 0,
        })
    }

    /// A device for a back-end that another VMM is using right now (incoming live update):
    /// nothing is sent until [`VirtioBackend::resume`]. `offered` and `queue_count` come from
    /// the saved state, so the guest sees exactly the device it had.
    pub fn handed_over(
        cfg: DeviceConfig,
        mem: GuestMemoryMmap,
        offered: u64,
        queue_count: u16,
        config_space: Vec<u8>,
    ) -> Self {
        VhostUserDevice {
            fe: None,
            cfg,
            backend_features: offered,
            protocol: VhostUserProtocolFeatures::empty(),
            offered,
            queue_count,
            config_space,
            mem,
            inflight: None,
            started: Vec::new(),
            acked: 0,
        }
    }

    /// Connects again and renegotiates; the back-end must still offer every feature the guest
    /// relies on.
    ///
    /// A back-end serves one front-end at a time and may not have seen the previous one hang
    /// up yet (it then refuses us), so the whole handshake is retried with a short capped
    /// backoff for up to [`RECONNECT_WINDOW`].
    fn reconnect(&mut self, window: std::time::Duration) -> Result<(), VhostUserError> {
        let deadline = std::time::Instant::now() + window;
        let mut delay = std::time::Duration::from_micros(100);
        let fresh = loop {
            match VhostUserDevice::connect(self.cfg.clone(), self.mem.clone()) {
                Ok(d) => break d,
                Err(e) if std::time::Instant::now() + delay < deadline => {
                    tracing::debug!("reconnect to {}: {e}; retrying", self.cfg.socket.display());
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        };
        let missing = self.offered & !fresh.offered;
        if missing != 0 {
            return Err(VhostUserError::MissingFeatures(
                self.cfg.socket.clone(),
                missing,
            ));
        }
        self.fe = fresh.fe;
        self.backend_features = fresh.backend_features;
        self.protocol = fresh.protocol;
        if fresh.config_space.len() == self.config_space.len() {
            self.config_space = fresh.config_space;
        }
        Ok(())
    }

    /// The device's configuration space as the guest sees it.
    pub fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    fn step<T>(&self, step: &'static str, r: vhost::Result<T>) -> Result<T, String> {
        r.map_err(|e| {
            VhostUserError::Step {
                socket: self.cfg.socket.clone(),
                step,
                source: e,
            }
            .to_string()
        })
    }

    /// Ends the connection (if any) at once, whoever else holds the fd.
    fn hang_up(&mut self) {
        if let Some(fe) = self.fe.take() {
            // SAFETY: shutdown(2) on the Frontend's own open socket fd.
            unsafe { libc::shutdown(fe.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    fn fe(&mut self) -> Result<&mut Frontend, String> {
        let socket = self.cfg.socket.display().to_string();
        self.fe
            .as_mut()
            .ok_or_else(|| format!("vhost-user back-end {socket} is not connected"))
    }

    /// Sends the memory table, inflight region and rings; `bases` gives each queue's starting
    /// available index (0 for a fresh start).
    fn start_rings(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
        bases: &[u16],
        enable: bool,
    ) -> Result<(), String> {
        let acked = (features & self.offered & self.backend_features)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let r = self.fe()?.set_features(acked);
        self.step("SET_FEATURES", r)?;
        self.acked = acked;
        let regions = self.memory_regions();
        let r = self.fe()?.set_mem_table(&regions);
        self.step("SET_MEM_TABLE", r)?;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if self.inflight.is_none() {
                let want = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: self.queue_count,
                    queue_size: self.cfg.queue_size,
                };
                let r = self.fe()?.get_inflight_fd(&want);
                self.inflight = Some(self.step("GET_INFLIGHT_FD", r)?);
            }
            if let Some((info, file)) = &self.inflight {
                let (info, fd) = (*info, file.as_raw_fd());
                let r = self.fe()?.set_inflight_fd(&info, fd);
                self.step("SET_INFLIGHT_FD", r)?;
            }
        }
        for (n, q) in queues.iter().enumerate() {
            let i = usize::from(q.index);
            let base = bases.get(n).copied().unwrap_or(0);
            let max = self.cfg.queue_size;
            let fe = self.fe()?;
            let r = fe.set_vring_num(i, q.size);
            self.step("SET_VRING_NUM", r)?;
            // vhost-user ring addresses are the front-end's virtual addresses; the back-end
            // translates them through the userspace_addr of SET_MEM_TABLE's regions.
            let hva = |gpa: u64| -> Result<u64, String> {
                self.mem
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| format!("queue {}: ring address {gpa:#x}: {e}", q.index))
            };
            let addrs = VringConfigData {
                queue_max_size: max,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: hva(q.desc)?,
                used_ring_addr: hva(q.used)?,
                avail_ring_addr: hva(q.avail)?,
                log_addr: None,
            };
            let r = self.fe()?.set_vring_addr(i, &addrs);
            self.step("SET_VRING_ADDR", r)?;
            let r = self.fe()?.set_vring_base(i, base);
            self.step("SET_VRING_BASE", r)?;
            let r = self.fe()?.set_vring_call(i, q.call);
            self.step("SET_VRING_CALL", r)?;
            let r = self.fe()?.set_vring_kick(i, q.kick);
            self.step("SET_VRING_KICK", r)?;
            if enable {
                let r = self.fe()?.set_vring_enable(i, true);
                self.step("SET_VRING_ENABLE", r)?;
            }
            self.started.push(q.index);
        }
        Ok(())
    }

    fn memory_regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                Some(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: fo.start(),
                    mmap_handle: fo.file().as_raw_fd(),
                })
            })
            .collect()
    }
}

impl VirtioBackend for VhostUserDevice {
    fn device_type(&self) -> u16 {
        match self.cfg.kind {
            DeviceKind::Block => 2,
            DeviceKind::Net { .. } => 1,
        }
    }

    fn queue_count(&self) -> u16 {
        self.queue_count
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.config_space.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only virtio-blk's writeback byte (offset 32) is writable; pass it on.
        if self.cfg.kind == DeviceKind::Block
            && self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
        {
            let Ok(off) = u32::try_from(offset) else {
                return;
            };
            let Some(fe) = self.fe.as_mut() else {
                return;
            };
            if let Err(e) = fe.set_config(off, VhostUserConfigFlags::WRITABLE, data) {
                tracing::warn!(socket = %self.cfg.socket.display(), "SET_CONFIG: {e}");
                return;
            }
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            if let Some(dst) = self.config_space.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), String> {
        self.start_rings(features, queues, &[], true)?;
        tracing::info!(socket = %self.cfg.socket.display(), queues = queues.len(), "device started");
        Ok(())
    }

    fn stop_rings(&mut self, bases: &mut Vec<RingBase>) -> Result<(), String> {
        for q in std::mem::take(&mut self.started) {
            // GET_VRING_BASE stops the ring: the back-end takes nothing more from it. Requests
            // it had taken may complete after the answer (baton-blk completes them first,
            // qemu-storage-daemon does not): the caller waits for them, see virtio::drain.
            let r = self.fe()?.get_vring_base(usize::from(q));
            let base = self.step("GET_VRING_BASE", r)?;
            bases.push(RingBase {
                index: q,
                next_avail: u16::try_from(base & 0xffff).unwrap_or(0),
            });
        }
        Ok(())
    }

    fn release(&mut self) {
        // Hang up: the back-end accepts the next front-end (the new VMM, or us on rollback).
        // shutdown() ends the connection even while the monitor thread holds a duplicate of
        // the fd. The inflight region stays: it goes to the new VMM, or back to the back-end
        // on rollback.
        self.started.clear();
        self.hang_up();
    }

    fn resume(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
        bases: &[u16],
        enable: bool,
    ) -> Result<(), String> {
        if self.fe.is_none() {
            self.reconnect(RECONNECT_WINDOW)
                .map_err(|e| e.to_string())?;
        }
        if queues.is_empty() {
            return Ok(());
        }
        self.start_rings(features, queues, bases, enable)
    }

    fn enable_rings(&mut self) -> Result<(), String> {
        for q in self.started.clone() {
            let r = self.fe()?.set_vring_enable(usize::from(q), true);
            self.step("SET_VRING_ENABLE", r)?;
        }
        Ok(())
    }

    fn inflight(&self) -> Option<(VhostUserInflight, &File)> {
        self.inflight.as_ref().map(|(i, f)| (*i, f))
    }

    fn set_inflight(&mut self, info: VhostUserInflight, file: File) {
        self.inflight = Some((info, file));
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn watch_fd(&self) -> Option<std::os::fd::OwnedFd> {
        let fe = self.fe.as_ref()?;
        // SAFETY: the fd is the Frontend's open socket; BorrowedFd lives only for this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fe.as_raw_fd()) };
        fd.try_clone_to_owned().ok()
    }

    fn lost(&mut self) {
        // The back-end is gone: its rings stopped with it. Keep the inflight region (the next
        // back-end resubmits what it lists) and forget the connection.
        self.started.clear();
        self.hang_up();
    }

    fn reconnect_once(&mut self) -> Result<(), String> {
        self.reconnect(std::time::Duration::ZERO)
            .map_err(|e| e.to_string())
    }

    fn protocol_features(&self) -> u64 {
        self.protocol.bits()
    }

    fn socket(&self) -> &Path {
        &self.cfg.socket
    }

    fn reconnect_limit(&self) -> Option<std::time::Duration> {
        self.cfg.reconnect_limit
    }

    fn reset(&mut self) {
        let socket = self.cfg.socket.clone();
        let reset_device = self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE);
        let started = std::mem::take(&mut self.started);
        let Some(fe) = self.fe.as_mut() else {
            return;
        };
        for q in started {
            let i = usize::from(q);
            let _ = fe.set_vring_enable(i, false);
            if let Err(e) = fe.get_vring_base(i) {
                tracing::warn!(socket = %socket.display(), "GET_VRING_BASE {q}: {e}");
            }
        }
        if reset_device {
            let _ = fe.reset_device();
        }
        // A fresh start after reset has no requests in flight.
        self.inflight = None;
    }
}
