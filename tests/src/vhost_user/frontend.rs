//! The vhost-user control path of the driver.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

use super::memory::SharedMemory;
use super::virtq::SplitQueue;
use super::{Result, vh};

/// Feature bit VHOST_USER_F_PROTOCOL_FEATURES.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;

/// A negotiated vhost-user connection.
pub struct Connection {
    fe: Frontend,
    /// Virtio features offered by the back-end.
    pub offered: u64,
    /// Virtio features acked.
    pub features: u64,
    /// Protocol features acked.
    pub protocol: VhostUserProtocolFeatures,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl Connection {
    /// Connects and negotiates: SET_OWNER, GET/SET_FEATURES (offered ∩ `wanted`, plus
    /// PROTOCOL_FEATURES), GET/SET_PROTOCOL_FEATURES (offered ∩ `wanted_protocol`, REPLY_ACK
    /// always asked for), then every later request waits for the back-end's ack.
    pub fn connect(
        path: &Path,
        max_queues: u64,
        wanted: u64,
        wanted_protocol: VhostUserProtocolFeatures,
    ) -> Result<Self> {
        let fe = vh("connect", Frontend::connect(path, max_queues))?;
        Self::negotiate(fe, wanted, wanted_protocol)
    }

    /// Same as [`Connection::connect`] on an already connected stream.
    pub fn from_stream(
        s: std::os::unix::net::UnixStream,
        max_queues: u64,
        wanted: u64,
        wanted_protocol: VhostUserProtocolFeatures,
    ) -> Result<Self> {
        Self::negotiate(
            Frontend::from_stream(s, max_queues),
            wanted,
            wanted_protocol,
        )
    }

    fn negotiate(
        mut fe: Frontend,
        wanted: u64,
        wanted_protocol: VhostUserProtocolFeatures,
    ) -> Result<Self> {
        let offered = vh("GET_FEATURES", fe.get_features())?;
        vh("SET_OWNER", fe.set_owner())?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & F_PROTOCOL_FEATURES != 0 {
            let p = vh("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
            protocol = p & (wanted_protocol | VhostUserProtocolFeatures::REPLY_ACK);
            vh("SET_PROTOCOL_FEATURES", fe.set_protocol_features(protocol))?;
        }
        let features = offered & (wanted | F_PROTOCOL_FEATURES);
        vh("SET_FEATURES", fe.set_features(features))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        Ok(Self {
            fe,
            offered,
            features,
            protocol,
        })
    }

    /// The underlying vhost `Frontend` (for requests this type does not wrap).
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    /// GET_QUEUE_NUM (needs the MQ protocol feature).
    pub fn queue_num(&mut self) -> Result<u64> {
        vh("GET_QUEUE_NUM", self.fe.get_queue_num())
    }

    /// SET_MEM_TABLE with the one shared region.
    pub fn set_mem_table(&mut self, mem: &SharedMemory) -> Result<()> {
        let r = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.size(),
            userspace_addr: mem.host_base(),
            mmap_offset: 0,
            mmap_handle: mem.raw_fd(),
        };
        vh("SET_MEM_TABLE", self.fe.set_mem_table(&[r])).map(|_| ())
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK (+ ENABLE) for `q`, resuming at avail index `base`.
    pub fn start_queue(&mut self, q: &SplitQueue, base: u16) -> Result<()> {
        let i = usize::from(q.index);
        let mem = q.memory();
        vh("SET_VRING_NUM", self.fe.set_vring_num(i, q.size()))?;
        let cfg = VringConfigData {
            queue_max_size: q.size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: mem.host_addr(q.desc.0),
            used_ring_addr: mem.host_addr(q.used.0),
            avail_ring_addr: mem.host_addr(q.avail.0),
            log_addr: None,
        };
        vh("SET_VRING_ADDR", self.fe.set_vring_addr(i, &cfg))?;
        vh("SET_VRING_BASE", self.fe.set_vring_base(i, base))?;
        vh("SET_VRING_CALL", self.fe.set_vring_call(i, &q.call))?;
        vh("SET_VRING_KICK", self.fe.set_vring_kick(i, &q.kick))?;
        if self.features & F_PROTOCOL_FEATURES != 0 {
            vh("SET_VRING_ENABLE", self.fe.set_vring_enable(i, true))?;
        }
        Ok(())
    }

    /// GET_VRING_BASE: stops ring `index`, returns where the device would resume.
    pub fn stop_queue(&mut self, index: u16) -> Result<u32> {
        vh("GET_VRING_BASE", self.fe.get_vring_base(usize::from(index)))
    }

    /// GET_CONFIG of `size` bytes at `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let (_, payload) = vh(
            "GET_CONFIG",
            self.fe
                .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf),
        )?;
        Ok(payload)
    }

    /// SET_CONFIG.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        vh(
            "SET_CONFIG",
            self.fe
                .set_config(offset, VhostUserConfigFlags::WRITABLE, data),
        )
    }

    /// GET_INFLIGHT_FD then SET_INFLIGHT_FD with the same region (as QEMU does on first start).
    pub fn setup_inflight(
        &mut self,
        queues: u16,
        queue_size: u16,
    ) -> Result<(VhostUserInflight, File)> {
        let req = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size,
        };
        let (info, file) = vh("GET_INFLIGHT_FD", self.fe.get_inflight_fd(&req))?;
        vh(
            "SET_INFLIGHT_FD",
            self.fe.set_inflight_fd(&info, file.as_raw_fd()),
        )?;
        Ok((info, file))
    }

    /// SET_INFLIGHT_FD with a region kept from an earlier connection.
    pub fn set_inflight(&mut self, info: &VhostUserInflight, file: &File) -> Result<()> {
        vh(
            "SET_INFLIGHT_FD",
            self.fe.set_inflight_fd(info, file.as_raw_fd()),
        )
    }
}
