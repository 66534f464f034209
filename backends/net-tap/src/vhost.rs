//! The vhost-user adapter: one [`Adapter`] per connected front-end, on top of the long-lived
//! [`Device`].
//!
//! Why our own `VhostUserBackendReqHandlerMut` on the vhost crate's `BackendReqHandler`, and not
//! vhost-user-backend's `VhostUserDaemon`:
//! - ownership: vhost-user-backend keeps an `owned` flag that is never cleared on disconnect, so
//!   the second front-end's SET_OWNER is refused and its connection killed. Here the adapter (and
//!   its SET_OWNER state) is per connection while the device core outlives it.
//! - message order: QEMU 10 sends SET_VRING_ENABLE before SET_FEATURES. The vhost crate's
//!   dispatcher rejects SET_VRING_ENABLE until PROTOCOL_FEATURES has been acked, *before* calling
//!   the handler, and fails the request without a reply that QEMU waits for. So the connection loop
//!   ([`crate::server`]) peeks at each message header and serves SET_VRING_ENABLE itself (with a
//!   REPLY_ACK answer when asked); every other message goes through the crate's dispatcher, which
//!   does the parsing, size checks and fd handling.
//! - lifetime: our loop decides what a handler error means (a refused request keeps the
//!   connection; a broken socket ends it) and stops all rings when the front-end goes.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use baton_service::memory::{Mapping, MemoryTable};
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Device, MAX_QUEUE_SIZE, lock};
use crate::virtio::{OFFERED, bit, f};

/// Protocol features we offer.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
}

/// Per-connection vhost-user state.
#[derive(Debug)]
pub struct Adapter {
    dev: Arc<Device>,
    acked_protocol: u64,
    acked_features: u64,
    /// The guest memory table's front-end view (for ring addresses).
    mappings: Vec<Mapping>,
}

fn handler_err(e: impl std::fmt::Display) -> Error {
    Error::ReqHandlerError(std::io::Error::other(e.to_string()))
}

impl Adapter {
    /// A fresh adapter for a new front-end.
    pub fn new(dev: Arc<Device>) -> Self {
        Adapter {
            dev,
            acked_protocol: 0,
            acked_features: 0,
            mappings: Vec::new(),
        }
    }

    /// Whether REPLY_ACK was negotiated.
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn va_to_gpa(&self, va: u64) -> Result<GuestAddress> {
        self.mappings
            .iter()
            .find(|m| va >= m.va && va - m.va < m.size)
            .map(|m| GuestAddress(va - m.va + m.gpa))
            .ok_or(Error::InvalidParam)
    }

    fn ring(&self, index: u32) -> Result<&std::sync::Mutex<crate::device::Vring>> {
        self.dev
            .vring(usize::try_from(index).map_err(|_| Error::InvalidParam)?)
            .ok_or(Error::InvalidParam)
    }

    /// SET_VRING_ENABLE, also reached from the connection loop's pre-filter.
    pub fn vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        {
            let mut v = lock(self.ring(index)?);
            v.enabled = enable;
            v.disabled = !enable;
        }
        self.dev.wake(usize::try_from(index).ok());
        Ok(())
    }
}

impl VhostUserBackendReqHandlerMut for Adapter {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.dev.stop_all();
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.dev.stop_all();
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(OFFERED)
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !OFFERED != 0 {
            tracing::warn!(
                "front-end acked features {features:#x} beyond the offered {OFFERED:#x}"
            );
            return Err(Error::InvalidParam);
        }
        self.dev.set_features(features).map_err(handler_err)?;
        self.acked_features = features;
        if features & bit(f::PROTOCOL_FEATURES) == 0 {
            // Without PROTOCOL_FEATURES rings are enabled from the start.
            for i in 0..self.dev.num_queues() {
                if let Some(v) = self.dev.vring(i) {
                    lock(v).enabled = true;
                }
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
        let MemoryTable { mem, mappings } = MemoryTable::map(ctx, files).map_err(handler_err)?;
        self.dev
            .mem
            .lock()
            .map_err(|_| Error::BackendInternalError)?
            .replace(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let num = u16::try_from(num).map_err(|_| Error::InvalidParam)?;
        if num == 0 || num > MAX_QUEUE_SIZE {
            return Err(Error::InvalidParam);
        }
        lock(self.ring(index)?)
            .queue
            .try_set_size(num)
            .map_err(handler_err)
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
        let (d, u, a) = (
            self.va_to_gpa(descriptor)?,
            self.va_to_gpa(used)?,
            self.va_to_gpa(available)?,
        );
        let mut v = lock(self.ring(index)?);
        v.queue.try_set_desc_table_address(d).map_err(handler_err)?;
        v.queue.try_set_avail_ring_address(a).map_err(handler_err)?;
        v.queue.try_set_used_ring_address(u).map_err(handler_err)?;
        // The used index restarts where the driver's used ring says (after a reconnect or reboot).
        let mem = self.dev.mem.memory();
        if let Ok(idx) = v
            .queue
            .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
        {
            v.queue.set_next_used(idx.0);
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let base = u16::try_from(base).map_err(|_| Error::InvalidParam)?;
        let mut v = lock(self.ring(index)?);
        v.queue.set_next_avail(base);
        v.queue.set_next_used(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let base = {
            let mut v = lock(self.ring(index)?);
            v.stop();
            v.queue.set_ready(false);
            v.queue.next_avail()
        };
        self.dev.wake(usize::try_from(index).ok());
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let fd = fd.ok_or(Error::InvalidOperation(
            "polling rings (no kick fd) are not supported",
        ))?;
        // SAFETY: the fd was just received over the socket and is owned by `fd`; ownership moves
        // into the EventFd.
        let kick = unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) };
        {
            let mut v = lock(self.ring(u32::from(index))?);
            v.kick = Some(Arc::new(kick));
            v.started = true;
            v.broken = false;
            v.queue.set_ready(true);
            let mem = self.dev.mem.memory();
            if !v.queue.is_valid(&*mem) {
                tracing::warn!(ring = index, "ring addresses are not inside guest memory");
            }
        }
        self.dev.wake(Some(usize::from(index)));
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        // SAFETY: as in set_vring_kick: a received fd whose ownership moves into the EventFd.
        let call = fd.map(|fd| unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) });
        lock(self.ring(u32::from(index))?).call = call;
        Ok(())
    }

    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> Result<()> {
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        if features & !protocol_features().bits() != 0 {
            return Err(Error::InvalidParam);
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        u64::try_from(self.dev.num_queues()).map_err(|_| Error::InvalidParam)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.vring_enable(index, enable)
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

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> Result<()> {
        Err(Error::InvalidOperation(
            "the virtio-net config space is read-only",
        ))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(Error::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(Error::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        Err(Error::InvalidOperation("INFLIGHT_SHMFD not offered"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        Err(Error::InvalidOperation("INFLIGHT_SHMFD not offered"))
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
