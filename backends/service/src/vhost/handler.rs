//! [`Frontend`]: the vhost-user request handler of one front-end connection.

use std::fs::File;
use std::sync::Arc;

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vm_memory::GuestAddress;

use super::{PROTOCOL_FEATURES, VhostUserDevice};
use crate::memory::MemoryTable;

fn handler_err(e: impl std::fmt::Display) -> Error {
    Error::ReqHandlerError(std::io::Error::other(e.to_string()))
}

/// The state of one front-end connection (ownership, negotiation, memory table, inflight
/// region) over a device core that outlives it.
#[derive(Debug)]
pub struct Frontend<D: VhostUserDevice> {
    dev: Arc<D>,
    owner: bool,
    acked_features: u64,
    acked_protocol: u64,
    table: Option<MemoryTable>,
    inflight: Option<D::Inflight>,
    /// SET_INFLIGHT_FD gave the rings a region to record their requests in.
    inflight_set: bool,
}

impl<D: VhostUserDevice> Frontend<D> {
    /// A fresh handler for a new front-end.
    pub fn new(dev: Arc<D>) -> Self {
        Self {
            dev,
            owner: false,
            acked_features: 0,
            acked_protocol: 0,
            table: None,
            inflight: None,
            inflight_set: false,
        }
    }

    /// Whether GET_VRING_BASE may leave requests in flight (suspend the ring): the front-end
    /// negotiated VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT (with INFLIGHT_SHMFD, as the
    /// spec requires) and gave the rings an inflight region to record them in.
    fn suspends(&self) -> bool {
        let both = VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        self.acked_protocol & both.bits() == both.bits() && self.inflight_set
    }

    /// Whether SET_FEATURES has acked VHOST_USER_F_PROTOCOL_FEATURES.
    pub fn protocol_features_acked(&self) -> bool {
        self.acked_features & PROTOCOL_FEATURES != 0
    }

    /// Whether REPLY_ACK was negotiated.
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// SET_VRING_ENABLE, also reached before SET_FEATURES (QEMU 10's order).
    pub fn enable_ring(&mut self, index: u32, enable: bool) -> Result<()> {
        let i = self.index(index)?;
        self.dev.enable_queue(i, enable).map_err(handler_err)
    }

    /// The connection ended: the device stops every ring and forgets this front-end's memory
    /// and fds; its memory table and inflight region go.
    pub fn disconnect(&mut self) {
        self.dev.disconnect();
        self.table = None;
        self.inflight = None;
        self.inflight_set = false;
    }

    fn index(&self, index: u32) -> Result<usize> {
        usize::try_from(index)
            .ok()
            .filter(|&i| i < self.dev.num_queues())
            .ok_or(Error::InvalidParam)
    }

    fn gpa(&self, va: u64) -> Result<GuestAddress> {
        self.table
            .as_ref()
            .and_then(|t| t.gpa(va))
            .ok_or(Error::InvalidParam)
    }
}

impl<D: VhostUserDevice> VhostUserBackendReqHandlerMut for Frontend<D> {
    fn set_owner(&mut self) -> Result<()> {
        if self.owner {
            return Err(Error::InvalidOperation("already owned"));
        }
        self.owner = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.disconnect();
        self.owner = false;
        self.acked_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.dev.reset();
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.dev.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let offered = self.dev.features();
        if features & !offered != 0 {
            tracing::warn!(
                "front-end acked features {features:#x} beyond the offered {offered:#x}"
            );
            return Err(Error::InvalidParam);
        }
        self.dev.set_features(features).map_err(handler_err)?;
        self.acked_features = features;
        if features & PROTOCOL_FEATURES == 0 {
            // Without PROTOCOL_FEATURES rings are enabled from the start.
            for i in 0..self.dev.num_queues() {
                self.dev.enable_queue(i, true).map_err(handler_err)?;
            }
        }
        tracing::info!("features acked: {features:#x}");
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(Error::InvalidOperation("postcopy is not supported"));
        }
        let table = MemoryTable::map(ctx, files).map_err(handler_err)?;
        self.dev
            .set_memory(table.mem.clone())
            .map_err(handler_err)?;
        self.table = Some(table);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let i = self.index(index)?;
        let num = u16::try_from(num).map_err(|_| Error::InvalidParam)?;
        if num == 0 || num > self.dev.max_queue_size() {
            return Err(Error::InvalidParam);
        }
        self.dev.set_queue_size(i, num).map_err(handler_err)
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
        let i = self.index(index)?;
        let (d, u, a) = (self.gpa(descriptor)?, self.gpa(used)?, self.gpa(available)?);
        self.dev.set_queue_addr(i, d, a, u).map_err(handler_err)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let i = self.index(index)?;
        let base = u16::try_from(base).map_err(|_| Error::InvalidParam)?;
        self.dev.set_queue_base(i, base).map_err(handler_err)
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let i = self.index(index)?;
        let base = if self.suspends() {
            self.dev.suspend_queue(i)
        } else {
            self.dev.stop_queue(i)
        }
        .map_err(handler_err)?;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let i = self.index(u32::from(index))?;
        let fd = fd.ok_or(Error::InvalidOperation(
            "polling rings (no kick fd) are not supported",
        ))?;
        if !self.protocol_features_acked() {
            self.dev.enable_queue(i, true).map_err(handler_err)?;
        }
        self.dev.start_queue(i, fd).map_err(handler_err)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let i = self.index(u32::from(index))?;
        self.dev.set_queue_call(i, fd).map_err(handler_err)
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.index(u32::from(index)).map(drop)
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.dev.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol = features & self.dev.protocol_features().bits();
        let suspend = VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT.bits();
        if self.acked_protocol & suspend != 0
            && self.acked_protocol & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() == 0
        {
            // "must only be negotiated if VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD is also
            // negotiated": without a region, GET_VRING_BASE drains.
            tracing::warn!("GET_VRING_BASE_INFLIGHT acked without INFLIGHT_SHMFD: ignored");
            self.acked_protocol &= !suspend;
        }
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        u64::try_from(self.dev.num_queues()).map_err(|_| Error::InvalidParam)
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
        let cfg = self.dev.config();
        let start = usize::try_from(offset).map_err(|_| Error::InvalidParam)?;
        let end = start.checked_add(usize::try_from(size).map_err(|_| Error::InvalidParam)?);
        end.and_then(|end| cfg.get(start..end))
            .map(<[u8]>::to_vec)
            .ok_or(Error::InvalidParam)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        self.dev.set_config(offset, buf).map_err(handler_err)
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(Error::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(Error::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        if !self
            .dev
            .protocol_features()
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Err(Error::InvalidOperation("INFLIGHT_SHMFD not offered"));
        }
        let (nq, qs) = (inflight.num_queues, inflight.queue_size);
        if nq == 0
            || usize::from(nq) > self.dev.num_queues()
            || qs == 0
            || qs > self.dev.max_queue_size()
        {
            return Err(Error::InvalidParam);
        }
        let (keep, file, size) = self.dev.get_inflight_fd(nq, qs).map_err(handler_err)?;
        self.inflight = Some(keep);
        Ok((VhostUserInflight::new(size, 0, nq, qs), file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        if !self
            .dev
            .protocol_features()
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Err(Error::InvalidOperation("INFLIGHT_SHMFD not offered"));
        }
        let keep = self
            .dev
            .set_inflight_fd(
                file,
                inflight.mmap_offset,
                inflight.mmap_size,
                inflight.num_queues,
                inflight.queue_size,
            )
            .map_err(handler_err)?;
        self.inflight = Some(keep);
        self.inflight_set = true;
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Err(Error::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        Err(Error::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        Err(Error::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(Error::InvalidOperation("DEVICE_STATE not offered"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(Error::InvalidOperation("DEVICE_STATE not offered"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(Error::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(Error::InvalidOperation("LOG_SHMFD not offered"))
    }
}
