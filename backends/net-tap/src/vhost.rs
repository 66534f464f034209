//! baton-net-tap's device core as a vhost-user device: [`VhostUserDevice`] for [`Device`]. The
//! request handler, the connection loop (with QEMU 10's SET_VRING_ENABLE before SET_FEATURES)
//! and the memory table are the framework's (`baton_service::vhost`); what is left here is how
//! a ring of this device is set up, started and stopped.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::{Arc, Mutex};

use baton_service::vhost::VhostUserDevice;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Device, MAX_QUEUE_SIZE, Vring, lock};
use crate::virtio::OFFERED;

/// Protocol features we offer.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

impl Device {
    fn ring(&self, index: usize) -> io::Result<&Mutex<Vring>> {
        self.vring(index).ok_or_else(|| invalid("no such queue"))
    }
}

impl VhostUserDevice for Device {
    type Inflight = ();

    fn features(&self) -> u64 {
        OFFERED
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn num_queues(&self) -> usize {
        Device::num_queues(self)
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn config(&self) -> Vec<u8> {
        Device::config(self).to_vec()
    }

    fn set_features(&self, features: u64) -> io::Result<()> {
        Device::set_features(self, features).map_err(io::Error::other)
    }

    fn set_memory(&self, mem: GuestMemoryMmap) -> io::Result<()> {
        self.mem
            .lock()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?
            .replace(mem);
        Ok(())
    }

    fn set_queue_size(&self, index: usize, size: u16) -> io::Result<()> {
        lock(self.ring(index)?)
            .queue
            .try_set_size(size)
            .map_err(invalid)
    }

    fn set_queue_addr(
        &self,
        index: usize,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    ) -> io::Result<()> {
        let mut v = lock(self.ring(index)?);
        v.queue.try_set_desc_table_address(desc).map_err(invalid)?;
        v.queue.try_set_avail_ring_address(avail).map_err(invalid)?;
        v.queue.try_set_used_ring_address(used).map_err(invalid)?;
        // The used index restarts where the driver's used ring says (after a reconnect or reboot).
        let mem = self.mem.memory();
        if let Ok(idx) = v
            .queue
            .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
        {
            v.queue.set_next_used(idx.0);
        }
        Ok(())
    }

    fn set_queue_base(&self, index: usize, base: u16) -> io::Result<()> {
        let mut v = lock(self.ring(index)?);
        v.queue.set_next_avail(base);
        v.queue.set_next_used(base);
        Ok(())
    }

    fn start_queue(&self, index: usize, kick: File) -> io::Result<()> {
        // SAFETY: the fd was just received over the socket and is owned by `kick`; ownership
        // moves into the EventFd.
        let kick = unsafe { EventFd::from_raw_fd(kick.into_raw_fd()) };
        {
            let mut v = lock(self.ring(index)?);
            v.kick = Some(Arc::new(kick));
            v.started = true;
            v.broken = false;
            v.queue.set_ready(true);
            let mem = self.mem.memory();
            if !v.queue.is_valid(&*mem) {
                tracing::warn!(ring = index, "ring addresses are not inside guest memory");
            }
        }
        self.wake(Some(index));
        Ok(())
    }

    fn stop_queue(&self, index: usize) -> io::Result<u16> {
        let base = {
            let mut v = lock(self.ring(index)?);
            v.stop();
            v.queue.set_ready(false);
            v.queue.next_avail()
        };
        self.wake(Some(index));
        Ok(base)
    }

    fn set_queue_call(&self, index: usize, call: Option<File>) -> io::Result<()> {
        // SAFETY: as in start_queue: a received fd whose ownership moves into the EventFd.
        let call = call.map(|fd| unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) });
        lock(self.ring(index)?).call = call;
        Ok(())
    }

    fn enable_queue(&self, index: usize, enable: bool) -> io::Result<()> {
        {
            let mut v = lock(self.ring(index)?);
            v.enabled = enable;
            v.disabled = !enable;
        }
        self.wake(Some(index));
        Ok(())
    }

    fn reset(&self) {
        self.stop_all();
    }

    fn disconnect(&self) {
        self.stop_all();
    }
}
