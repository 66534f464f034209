//! The vhost-user request handler of one front-end connection.
//!
//! Why not vhost-user-backend's `VhostUserDaemon`: its handler keeps an `owned` flag that a
//! disconnect never clears (a second front-end's SET_OWNER is refused), it does not implement
//! GET/SET_INFLIGHT_FD, and its `serve()` handles one connection. So baton-blk implements
//! [`VhostUserBackendReqHandlerMut`] of the vhost crate itself: one [`ConnHandler`] per
//! connection (fresh ownership and negotiation state), over a [`Device`] that outlives it
//! (image, queues, worker threads). Message-order quirks of QEMU 10 are handled in
//! `server.rs` before the vhost crate's dispatcher sees the message.

use std::fs::File;
use std::sync::Arc;

use baton_service::memory::MemoryTable;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, VhostUserBackendReqHandlerMut};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::device::{Device, feat};
use crate::inflight::{InflightRegion, queue_region_size};

type Result<T> = std::result::Result<T, VuError>;

/// Protocol features baton-blk offers.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

fn other(msg: &str) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(msg.to_string()))
}

/// State of one front-end connection.
#[derive(Debug)]
pub struct ConnHandler {
    dev: Arc<Device>,
    owner: bool,
    acked_features: u64,
    features_set: bool,
    acked_protocol: u64,
    /// The memory table (for translating ring addresses).
    table: Option<MemoryTable>,
    mem: Option<Arc<GuestMemoryMmap>>,
    inflight: Option<InflightRegion>,
}

impl ConnHandler {
    /// A handler for a new connection.
    pub fn new(dev: Arc<Device>) -> Self {
        Self {
            dev,
            owner: false,
            acked_features: 0,
            features_set: false,
            acked_protocol: 0,
            table: None,
            mem: None,
            inflight: None,
        }
    }

    /// Whether SET_FEATURES has acked VHOST_USER_F_PROTOCOL_FEATURES.
    pub fn protocol_features_acked(&self) -> bool {
        self.acked_features & feat::PROTOCOL_FEATURES != 0
    }

    /// SET_VRING_ENABLE, also reachable before SET_FEATURES (QEMU 10 order).
    pub fn enable_ring(&mut self, index: u32, enable: bool) -> Result<()> {
        let q = self.queue(index)?;
        let mut st = q.lock();
        st.enabled = enable;
        drop(st);
        q.wake();
        Ok(())
    }

    /// The connection ended: stop every ring (waiting for in-flight requests) and forget
    /// this front-end's memory, fds and inflight region. The device keeps its state.
    pub fn disconnect(&mut self) {
        for q in self.dev.queues() {
            let mut st = q.lock();
            st.stop();
            st.mem = None;
            st.inflight = None;
            st.enabled = false;
        }
        self.mem = None;
        self.inflight = None;
    }

    fn queue(&self, index: u32) -> Result<&Arc<crate::vring::VringCtl>> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.dev.queues().get(i))
            .ok_or(VuError::InvalidParam)
    }

    fn gpa(&self, user: u64) -> Result<GuestAddress> {
        self.table
            .as_ref()
            .and_then(|t| t.gpa(user))
            .ok_or(VuError::InvalidParam)
    }
}

impl VhostUserBackendReqHandlerMut for ConnHandler {
    fn set_owner(&mut self) -> Result<()> {
        if self.owner {
            return Err(VuError::InvalidOperation("already owned"));
        }
        self.owner = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.disconnect();
        self.owner = false;
        self.acked_features = 0;
        self.features_set = false;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        for q in self.dev.queues() {
            let mut st = q.lock();
            st.stop();
            st.enabled = false;
            st.queue.reset();
        }
        self.acked_features = 0;
        self.features_set = false;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.dev.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.dev.features() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        self.features_set = true;
        let proto = features & feat::PROTOCOL_FEATURES != 0;
        for q in self.dev.queues() {
            let mut st = q.lock();
            st.queue.set_event_idx(features & feat::EVENT_IDX != 0);
            if !proto {
                st.enabled = true;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> Result<Option<Vec<u64>>> {
        let table = MemoryTable::map(ctx, files).map_err(|e| other(&e.to_string()))?;
        let mem = Arc::new(table.mem.clone());
        for q in self.dev.queues() {
            q.lock().mem = Some(mem.clone());
        }
        self.mem = Some(mem);
        self.table = Some(table);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let q = self.queue(index)?;
        let n = u16::try_from(num).map_err(|_| VuError::InvalidParam)?;
        q.lock()
            .queue
            .try_set_size(n)
            .map_err(|_| VuError::InvalidParam)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let (d, u, a) = (self.gpa(descriptor)?, self.gpa(used)?, self.gpa(available)?);
        let q = self.queue(index)?;
        let mut st = q.lock();
        st.queue
            .try_set_desc_table_address(d)
            .map_err(|_| VuError::InvalidParam)?;
        st.queue
            .try_set_used_ring_address(u)
            .map_err(|_| VuError::InvalidParam)?;
        st.queue
            .try_set_avail_ring_address(a)
            .map_err(|_| VuError::InvalidParam)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let q = self.queue(index)?;
        let b = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        q.lock().queue.set_next_avail(b);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let q = self.queue(index)?;
        let mut st = q.lock();
        st.stop();
        Ok(VhostUserVringState::new(
            index,
            u32::from(st.queue.next_avail()),
        ))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let q = self.queue(u32::from(index))?;
        let Some(fd) = fd else {
            return Err(VuError::InvalidOperation(
                "polling mode (no kick fd) is not supported",
            ));
        };
        let mut st = q.lock();
        st.kick = Some(Arc::new(fd));
        if !self.protocol_features_acked() {
            st.enabled = true;
        }
        let ok = st.start();
        drop(st);
        q.wake();
        if ok {
            Ok(())
        } else {
            Err(other("ring not valid in guest memory"))
        }
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.queue(u32::from(index))?.lock().call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.queue(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol = features & protocol_features().bits();
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.dev.queues().len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.enable_ring(index, enable)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let c = self.dev.config();
        let (o, s) = (usize::try_from(offset), usize::try_from(size));
        match (o, s) {
            (Ok(o), Ok(s)) => c
                .get(o..o.saturating_add(s))
                .map(<[u8]>::to_vec)
                .ok_or(VuError::InvalidParam),
            _ => Err(VuError::InvalidParam),
        }
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        if self.dev.set_config(offset, buf) {
            Ok(())
        } else {
            Err(VuError::InvalidParam)
        }
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(VuError::InvalidOperation("not a gpu"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        let nq = inflight.num_queues;
        let qs = inflight.queue_size;
        if nq == 0
            || usize::from(nq) > self.dev.queues().len()
            || qs == 0
            || qs > self.dev.queue_size()
        {
            return Err(VuError::InvalidParam);
        }
        let (region, file, size) =
            InflightRegion::create(nq, qs).map_err(|e| other(&e.to_string()))?;
        debug_assert_eq!(size, queue_region_size(qs) * u64::from(nq));
        self.inflight = Some(region);
        Ok((VhostUserInflight::new(size, 0, nq, qs), file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let region = InflightRegion::map(
            file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e| other(&e.to_string()))?;
        for (i, q) in self.dev.queues().iter().enumerate() {
            let tracker = u16::try_from(i).ok().and_then(|i| region.queue(i));
            if let Some(t) = &tracker {
                tracing::info!(
                    queue = i,
                    pending = t.pending().len(),
                    "inflight region set"
                );
            }
            q.lock().inflight = tracker;
        }
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Err(VuError::InvalidOperation(
            "CONFIGURE_MEM_SLOTS not supported",
        ))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> Result<Option<u64>> {
        Err(VuError::InvalidOperation(
            "CONFIGURE_MEM_SLOTS not supported",
        ))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        Err(VuError::InvalidOperation(
            "CONFIGURE_MEM_SLOTS not supported",
        ))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(VuError::InvalidOperation("DEVICE_STATE not supported"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(VuError::InvalidOperation("DEVICE_STATE not supported"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("SHMEM not supported"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(VuError::InvalidOperation("LOG_SHMFD not supported"))
    }
}
