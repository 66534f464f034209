//! Starting and stopping a back-end's rings: memory table, inflight region, each ring's
//! size, addresses, base, call and kick fds, enable; GET_VRING_BASE to stop them.

use std::os::fd::AsRawFd;

use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::error::VhostUserError as E;
use super::{ActiveQueue, RingBase, VhostUserDevice};

impl VhostUserDevice {
    /// Sends the memory table, inflight region and rings; `bases` gives each queue's starting
    /// available index (0 for a fresh start).
    pub(super) fn start_rings(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
        bases: &[u16],
        enable: bool,
    ) -> Result<(), E> {
        let sock = self.cfg.socket.clone();
        let s = || sock.clone();
        let acked = (features & self.offered & self.backend_features)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.fe()?
            .set_features(acked)
            .map_err(|e| E::SetFeatures(s(), e))?;
        self.acked = acked;
        let regions = self.memory_regions();
        self.fe()?
            .set_mem_table(&regions)
            .map_err(|e| E::SetMemTable(s(), e))?;
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
                let got = self
                    .fe()?
                    .get_inflight_fd(&want)
                    .map_err(|e| E::GetInflightFd(s(), e))?;
                self.inflight = Some(got);
            }
            if let Some((info, file)) = &self.inflight {
                let (info, fd) = (*info, file.as_raw_fd());
                self.fe()?
                    .set_inflight_fd(&info, fd)
                    .map_err(|e| E::SetInflightFd(s(), e))?;
            }
        }
        for (n, q) in queues.iter().enumerate() {
            let i = usize::from(q.index);
            let base = bases.get(n).copied().unwrap_or(0);
            // vhost-user ring addresses are the front-end's virtual addresses; the back-end
            // translates them through the userspace_addr of SET_MEM_TABLE's regions.
            let addrs = VringConfigData {
                queue_max_size: self.cfg.queue_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: self.hva(q.index, q.desc)?,
                used_ring_addr: self.hva(q.index, q.used)?,
                avail_ring_addr: self.hva(q.index, q.avail)?,
                log_addr: None,
            };
            let fe = self.fe()?;
            fe.set_vring_num(i, q.size)
                .map_err(|e| E::SetVringNum(s(), e))?;
            fe.set_vring_addr(i, &addrs)
                .map_err(|e| E::SetVringAddr(s(), e))?;
            fe.set_vring_base(i, base)
                .map_err(|e| E::SetVringBase(s(), e))?;
            fe.set_vring_call(i, q.call)
                .map_err(|e| E::SetVringCall(s(), e))?;
            fe.set_vring_kick(i, q.kick)
                .map_err(|e| E::SetVringKick(s(), e))?;
            if enable {
                fe.set_vring_enable(i, true)
                    .map_err(|e| E::SetVringEnable(s(), e))?;
            }
            self.started.push(q.index);
        }
        Ok(())
    }

    /// The front-end's virtual address of guest address `gpa`, a ring of queue `queue`.
    fn hva(&self, queue: u16, gpa: u64) -> Result<u64, E> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|source| E::RingAddress {
                queue,
                addr: gpa,
                source,
            })
    }

    /// Stops every started ring (live update) and adds where each stopped to `bases`, also
    /// those stopped before a failure. The back-end may still complete requests it had taken
    /// (see [`crate::virtio::drain`]); the connection stays until
    /// [`VhostUserDevice::release`].
    pub fn stop_rings(&mut self, bases: &mut Vec<RingBase>) -> Result<(), E> {
        for q in std::mem::take(&mut self.started) {
            // GET_VRING_BASE stops the ring: the back-end takes nothing more from it. Requests
            // it had taken may complete after the answer (baton-blk completes them first,
            // qemu-storage-daemon does not): the caller waits for them, see virtio::drain.
            let socket = self.cfg.socket.clone();
            let base = self
                .fe()?
                .get_vring_base(usize::from(q))
                .map_err(|e| E::GetVringBase(socket, e))?;
            bases.push(RingBase {
                index: q,
                next_avail: u16::try_from(base & 0xffff).unwrap_or(0),
            });
        }
        Ok(())
    }

    /// Enables every configured ring.
    pub fn enable_rings(&mut self) -> Result<(), E> {
        for q in self.started.clone() {
            let socket = self.cfg.socket.clone();
            self.fe()?
                .set_vring_enable(usize::from(q), true)
                .map_err(|e| E::SetVringEnable(socket, e))?;
        }
        Ok(())
    }

    /// Stops the device (guest-driven reset).
    pub fn reset(&mut self) {
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
