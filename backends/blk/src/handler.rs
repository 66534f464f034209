//! baton-blk's device core as a vhost-user device: [`VhostUserDevice`] for [`Device`]. The
//! request handler, the connection loop and the memory table are the framework's
//! (`baton_service::vhost`); what is left here is how a ring of this device starts, stops and
//! keeps its requests in the INFLIGHT_SHMFD region.

use std::fs::File;
use std::io;
use std::sync::Arc;

use baton_service::vhost::VhostUserDevice;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::device::{Device, feat};
use crate::vring::VringCtl;
use baton_service::inflight::{InflightRegion, queue_region_size};

/// Protocol features baton-blk offers.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

impl Device {
    fn ring(&self, index: usize) -> io::Result<&Arc<VringCtl>> {
        self.queues()
            .get(index)
            .ok_or_else(|| invalid("no such queue"))
    }
}

impl VhostUserDevice for Device {
    type Inflight = InflightRegion;

    fn features(&self) -> u64 {
        Device::features(self)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn num_queues(&self) -> usize {
        self.queues().len()
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size()
    }

    fn config(&self) -> Vec<u8> {
        Device::config(self).to_vec()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if Device::set_config(self, offset, buf) {
            Ok(())
        } else {
            Err(invalid("config space write refused"))
        }
    }

    fn set_features(&self, features: u64) -> io::Result<()> {
        for q in self.queues() {
            q.lock()
                .queue
                .set_event_idx(features & feat::EVENT_IDX != 0);
        }
        Ok(())
    }

    fn set_memory(&self, mem: GuestMemoryMmap) -> io::Result<()> {
        let mem = Arc::new(mem);
        for q in self.queues() {
            q.lock().mem = Some(mem.clone());
        }
        Ok(())
    }

    fn set_queue_size(&self, index: usize, size: u16) -> io::Result<()> {
        self.ring(index)?
            .lock()
            .queue
            .try_set_size(size)
            .map_err(|e| invalid(&e.to_string()))
    }

    fn set_queue_addr(
        &self,
        index: usize,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    ) -> io::Result<()> {
        let q = self.ring(index)?;
        let mut st = q.lock();
        let bad = |e: virtio_queue::Error| invalid(&e.to_string());
        st.queue.try_set_desc_table_address(desc).map_err(bad)?;
        st.queue.try_set_used_ring_address(used).map_err(bad)?;
        st.queue.try_set_avail_ring_address(avail).map_err(bad)
    }

    fn set_queue_base(&self, index: usize, base: u16) -> io::Result<()> {
        self.ring(index)?.lock().queue.set_next_avail(base);
        Ok(())
    }

    fn start_queue(&self, index: usize, kick: File) -> io::Result<()> {
        let q = self.ring(index)?;
        let mut st = q.lock();
        st.kick = Some(Arc::new(kick));
        let ok = st.start();
        drop(st);
        q.wake();
        if ok {
            Ok(())
        } else {
            Err(invalid("ring not valid in guest memory"))
        }
    }

    fn stop_queue(&self, index: usize) -> io::Result<u16> {
        let q = self.ring(index)?;
        let mut st = q.lock();
        st.stop();
        Ok(st.queue.next_avail())
    }

    fn suspend_queue(&self, index: usize) -> io::Result<u16> {
        let q = self.ring(index)?;
        let mut st = q.lock_suspending();
        st.stop();
        if self.test_suspend_unrecorded() {
            let used = st.queue.next_used();
            if let Some(inf) = &st.inflight {
                for head in &st.suspended {
                    inf.post_put(*head, used);
                }
            }
        }
        Ok(st.queue.next_avail())
    }

    fn set_queue_call(&self, index: usize, call: Option<File>) -> io::Result<()> {
        self.ring(index)?.lock().call = call;
        Ok(())
    }

    fn enable_queue(&self, index: usize, enable: bool) -> io::Result<()> {
        let q = self.ring(index)?;
        q.lock().enabled = enable;
        q.wake();
        Ok(())
    }

    fn reset(&self) {
        for q in self.queues() {
            let mut st = q.lock();
            st.stop();
            st.enabled = false;
            st.queue.reset();
            // A reset device completes nothing it had taken before.
            st.suspended.clear();
            st.adopted.clear();
        }
    }

    fn disconnect(&self) {
        for q in self.queues() {
            let mut st = q.lock();
            st.stop();
            st.mem = None;
            st.inflight = None;
            st.enabled = false;
        }
    }

    fn get_inflight_fd(
        &self,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<(InflightRegion, File, u64)> {
        let (region, file, size) =
            InflightRegion::create(num_queues, queue_size).map_err(io::Error::other)?;
        debug_assert_eq!(size, queue_region_size(queue_size) * u64::from(num_queues));
        Ok((region, file, size))
    }

    fn set_inflight_fd(
        &self,
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightRegion> {
        let region = InflightRegion::map(file, offset, size, num_queues, queue_size)
            .map_err(io::Error::other)?;
        for (i, q) in self.queues().iter().enumerate() {
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
        Ok(region)
    }
}
