//! What baton offers the guest: the virtio feature bits it passes through from a back-end,
//! the vhost-user protocol features it uses, and the device configuration space it knows
//! without asking the back-end.

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk as vblk;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net as vnet;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::config::{DeviceConfig, DeviceKind};

/// The feature mask of bit `n`.
const fn bit(n: u32) -> u64 {
    1 << n
}

/// Feature bit: virtio 1.0 or later.
pub const F_VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
/// Transport features baton passes through from a back-end to the guest: VERSION_1,
/// indirect descriptors, event index.
pub const TRANSPORT_FEATURES: u64 =
    F_VERSION_1 | bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX);

/// virtio-blk feature bits baton passes through.
pub mod blk {
    use super::{bit, vblk};

    /// Max segment size / count, geometry, read-only, block size, flush, topology, config
    /// WCE, MQ, discard, write zeroes.
    pub const FEATURES: u64 = bit(vblk::VIRTIO_BLK_F_SIZE_MAX)
        | bit(vblk::VIRTIO_BLK_F_SEG_MAX)
        | bit(vblk::VIRTIO_BLK_F_GEOMETRY)
        | bit(vblk::VIRTIO_BLK_F_RO)
        | bit(vblk::VIRTIO_BLK_F_BLK_SIZE)
        | bit(vblk::VIRTIO_BLK_F_FLUSH)
        | bit(vblk::VIRTIO_BLK_F_TOPOLOGY)
        | bit(vblk::VIRTIO_BLK_F_CONFIG_WCE)
        | bit(vblk::VIRTIO_BLK_F_MQ)
        | bit(vblk::VIRTIO_BLK_F_DISCARD)
        | bit(vblk::VIRTIO_BLK_F_WRITE_ZEROES);
    /// virtio_blk_config size.
    pub const CONFIG_SIZE: u32 = 60;
    /// Offset of `num_queues` in virtio_blk_config.
    pub const NUM_QUEUES_OFFSET: usize = 34;
}

/// virtio-net feature bits baton passes through.
pub mod net {
    use super::{bit, vnet};

    /// CSUM, GUEST_CSUM, MTU, MAC, GUEST_TSO4/6, GUEST_ECN, GUEST_UFO, HOST_TSO4/6, HOST_ECN,
    /// HOST_UFO, MRG_RXBUF, STATUS, CTRL_VQ, MQ.
    pub const FEATURES: u64 = bit(vnet::VIRTIO_NET_F_CSUM)
        | bit(vnet::VIRTIO_NET_F_GUEST_CSUM)
        | F_MTU
        | F_MAC
        | bit(vnet::VIRTIO_NET_F_GUEST_TSO4)
        | bit(vnet::VIRTIO_NET_F_GUEST_TSO6)
        | bit(vnet::VIRTIO_NET_F_GUEST_ECN)
        | bit(vnet::VIRTIO_NET_F_GUEST_UFO)
        | bit(vnet::VIRTIO_NET_F_HOST_TSO4)
        | bit(vnet::VIRTIO_NET_F_HOST_TSO6)
        | bit(vnet::VIRTIO_NET_F_HOST_ECN)
        | bit(vnet::VIRTIO_NET_F_HOST_UFO)
        | bit(vnet::VIRTIO_NET_F_MRG_RXBUF)
        | F_STATUS
        | F_CTRL_VQ
        | F_MQ;
    /// Feature bit: MAC address in config space (baton provides it).
    pub const F_MAC: u64 = bit(vnet::VIRTIO_NET_F_MAC);
    /// Feature bit: link status in config space.
    pub const F_STATUS: u64 = bit(vnet::VIRTIO_NET_F_STATUS);
    /// Feature bit: MTU in config space.
    pub const F_MTU: u64 = bit(vnet::VIRTIO_NET_F_MTU);
    /// Feature bit: control queue.
    pub const F_CTRL_VQ: u64 = bit(vnet::VIRTIO_NET_F_CTRL_VQ);
    /// Feature bit: multi-queue.
    pub const F_MQ: u64 = bit(vnet::VIRTIO_NET_F_MQ);
}

/// Protocol features baton uses when the back-end offers them.
pub const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::RESET_DEVICE)
    .union(VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT);

/// The features offered to the guest out of the back-end's `theirs`, and the number of queues
/// the device then has (a net device with a control queue has one more).
pub fn offer(cfg: &DeviceConfig, theirs: u64) -> (u64, u16) {
    let mut queue_count = match cfg.kind {
        DeviceKind::Block => cfg.queues,
        DeviceKind::Net { .. } => cfg.queues.saturating_mul(2),
    };
    let device_features = match cfg.kind {
        DeviceKind::Block => blk::FEATURES,
        DeviceKind::Net { .. } => net::FEATURES,
    };
    let mut offered = theirs & (device_features | TRANSPORT_FEATURES);
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
    (offered, queue_count)
}

/// Device configuration space known without asking the back-end: net's from the options
/// (MAC, link up, queue pairs, MTU); blk's zeroed until GET_CONFIG fills it.
pub fn local_config_space(cfg: &DeviceConfig) -> Vec<u8> {
    match &cfg.kind {
        DeviceKind::Net { mac, mtu } => {
            let mut c = mac.to_vec();
            c.extend_from_slice(&1u16.to_le_bytes()); // status: link up
            c.extend_from_slice(&cfg.queues.to_le_bytes());
            c.extend_from_slice(&mtu.unwrap_or(1500).to_le_bytes());
            c
        }
        DeviceKind::Block => vec![0; blk::CONFIG_SIZE as usize],
    }
}

/// A back-end's virtio_blk_config as the guest sees it: `num_queues` is what baton exposes,
/// not the back-end's maximum.
pub fn blk_config_space(theirs: &[u8], queues: u16) -> Vec<u8> {
    let mut c = theirs.to_vec();
    if let Some(b) = c.get_mut(blk::NUM_QUEUES_OFFSET..blk::NUM_QUEUES_OFFSET + 2) {
        b.copy_from_slice(&queues.to_le_bytes());
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_bits_are_the_ones_baton_always_offered() {
        // The masks as they were written by hand before virtio-bindings named them.
        assert_eq!(blk::FEATURES, 0x7e76);
        assert_eq!(net::FEATURES, 0x43_ffab);
        assert_eq!(TRANSPORT_FEATURES, (1 << 32) | (1 << 28) | (1 << 29));
    }

    #[test]
    fn net_offer_adds_what_baton_provides() {
        let cfg = DeviceConfig {
            socket: "/s".into(),
            queues: 2,
            queue_size: 256,
            kind: DeviceKind::Net {
                mac: [0x52, 0x54, 0, 1, 2, 3],
                mtu: None,
            },
            reconnect_limit: None,
            drain: false,
        };
        let (offered, queues) = offer(&cfg, F_VERSION_1 | net::F_CTRL_VQ | (1 << 40));
        assert_eq!(
            offered,
            F_VERSION_1 | net::F_CTRL_VQ | net::F_MAC | net::F_STATUS | net::F_MQ
        );
        assert_eq!(queues, 5);
        assert_eq!(local_config_space(&cfg).len(), 12);
    }
}
