//! virtio-net wire facts: feature bits, the header, the config space, and what the negotiated
//! features imply for the TAP (header size, offloads) and for TX header validation.

use crate::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

/// Feature bit numbers (virtio 1.2, 5.1.3) used here.
pub mod f {
    /// Device handles packets with partial checksum (guest → host).
    pub const CSUM: u64 = 0;
    /// Driver handles packets with partial checksum (host → guest).
    pub const GUEST_CSUM: u64 = 1;
    /// Config has `mtu`.
    pub const MTU: u64 = 3;
    /// Config has `mac`.
    pub const MAC: u64 = 5;
    /// Driver can receive TSOv4.
    pub const GUEST_TSO4: u64 = 7;
    /// Driver can receive TSOv6.
    pub const GUEST_TSO6: u64 = 8;
    /// Device can receive TSOv4.
    pub const HOST_TSO4: u64 = 11;
    /// Device can receive TSOv6.
    pub const HOST_TSO6: u64 = 12;
    /// Driver can merge receive buffers.
    pub const MRG_RXBUF: u64 = 15;
    /// Config has `status`.
    pub const STATUS: u64 = 16;
    /// Control virtqueue.
    pub const CTRL_VQ: u64 = 17;
    /// Multiqueue with automatic receive steering.
    pub const MQ: u64 = 22;
    /// Indirect descriptors.
    pub const INDIRECT_DESC: u64 = 28;
    /// used_event / avail_event.
    pub const EVENT_IDX: u64 = 29;
    /// vhost-user protocol features.
    pub const PROTOCOL_FEATURES: u64 = 30;
    /// virtio 1.0+.
    pub const VERSION_1: u64 = 32;
}

/// The bit for feature number `n`.
pub const fn bit(n: u64) -> u64 {
    1 << n
}

/// Features this back-end offers.
pub const OFFERED: u64 = bit(f::CSUM)
    | bit(f::GUEST_CSUM)
    | bit(f::MTU)
    | bit(f::MAC)
    | bit(f::GUEST_TSO4)
    | bit(f::GUEST_TSO6)
    | bit(f::HOST_TSO4)
    | bit(f::HOST_TSO6)
    | bit(f::MRG_RXBUF)
    | bit(f::STATUS)
    | bit(f::CTRL_VQ)
    | bit(f::MQ)
    | bit(f::INDIRECT_DESC)
    | bit(f::EVENT_IDX)
    | bit(f::PROTOCOL_FEATURES)
    | bit(f::VERSION_1);

/// `flags` bit: the checksum must be completed from csum_start/csum_offset.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags` bit: the checksum is known to be valid (receive only).
pub const HDR_F_DATA_VALID: u8 = 2;
/// No GSO.
pub const GSO_NONE: u8 = 0;
/// TCPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;
/// TCPv6 segmentation.
pub const GSO_TCPV6: u8 = 4;
/// ECN bit of gso_type.
pub const GSO_ECN: u8 = 0x80;

/// Control queue classes and commands used here.
pub mod ctrl {
    /// Success.
    pub const OK: u8 = 0;
    /// Failure.
    pub const ERR: u8 = 1;
    /// RX mode class.
    pub const CLASS_RX: u8 = 0;
    /// MAC filter class.
    pub const CLASS_MAC: u8 = 1;
    /// VLAN filter class.
    pub const CLASS_VLAN: u8 = 2;
    /// Announce class.
    pub const CLASS_ANNOUNCE: u8 = 3;
    /// Multiqueue class.
    pub const CLASS_MQ: u8 = 4;
    /// MQ: set the number of queue pairs.
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
}

/// What a set of negotiated features means for the data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// The acked feature bits.
    pub features: u64,
}

impl Negotiated {
    /// Whether feature number `n` was acked.
    pub fn has(&self, n: u64) -> bool {
        self.features & bit(n) != 0
    }

    /// Size of the virtio-net header on both rings (12 with VERSION_1 or MRG_RXBUF, else 10).
    pub fn hdr_len(&self) -> usize {
        if self.has(f::VERSION_1) || self.has(f::MRG_RXBUF) {
            12
        } else {
            10
        }
    }

    /// TUNSETOFFLOAD flags: what the guest accepts on receive.
    pub fn tap_offload(&self) -> u32 {
        let mut o = 0;
        if self.has(f::GUEST_CSUM) {
            o |= TUN_F_CSUM;
            if self.has(f::GUEST_TSO4) {
                o |= TUN_F_TSO4;
            }
            if self.has(f::GUEST_TSO6) {
                o |= TUN_F_TSO6;
            }
        }
        o
    }

    /// Largest frame (header excluded) the TAP can hand us with these offloads and `mtu`.
    pub fn max_rx_frame(&self, mtu: u16) -> usize {
        if self.tap_offload() & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
            65_550
        } else {
            usize::from(mtu) + 14 + 4
        }
    }

    /// Checks a TX header (first 10 bytes) against what was negotiated and against the frame
    /// it precedes (`frame_len` bytes, header excluded): the offsets the host kernel will use
    /// must lie inside the frame.
    pub fn check_tx_header(&self, hdr: &[u8; 10], frame_len: usize) -> Result<(), &'static str> {
        let [flags, gso_type, ..] = *hdr;
        let field = |i: usize| usize::from(u16::from_le_bytes([hdr[i], hdr[i + 1]]));
        let (hdr_len, csum_start, csum_offset) = (field(2), field(6), field(8));
        if hdr_len > frame_len {
            return Err("hdr_len past the end of the frame");
        }
        if flags & HDR_F_NEEDS_CSUM != 0 && csum_start + csum_offset + 2 > frame_len {
            return Err("checksum field past the end of the frame");
        }
        if flags & !(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 {
            return Err("unknown flags");
        }
        if flags & HDR_F_NEEDS_CSUM != 0 && !self.has(f::CSUM) {
            return Err("NEEDS_CSUM without CSUM negotiated");
        }
        match gso_type & !GSO_ECN {
            GSO_NONE => {
                if gso_type & GSO_ECN != 0 {
                    return Err("ECN without GSO");
                }
            }
            GSO_TCPV4 if self.has(f::HOST_TSO4) => {}
            GSO_TCPV6 if self.has(f::HOST_TSO6) => {}
            _ => return Err("GSO type not negotiated"),
        }
        if gso_type & GSO_ECN != 0 {
            return Err("ECN not negotiated");
        }
        if gso_type != GSO_NONE && flags & HDR_F_NEEDS_CSUM == 0 {
            return Err("GSO without NEEDS_CSUM");
        }
        let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]);
        if gso_type != GSO_NONE && gso_size == 0 {
            return Err("GSO with gso_size 0");
        }
        Ok(())
    }
}

/// The virtio-net config space we expose (mac, status, max_virtqueue_pairs, mtu).
pub fn config_space(mac: [u8; 6], pairs: u16, mtu: u16) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
    c[8..10].copy_from_slice(&pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_len_and_offloads() {
        let n = Negotiated {
            features: bit(f::VERSION_1),
        };
        assert_eq!(n.hdr_len(), 12);
        assert_eq!(n.tap_offload(), 0);
        assert_eq!(Negotiated { features: 0 }.hdr_len(), 10);
        assert_eq!(
            Negotiated {
                features: bit(f::MRG_RXBUF)
            }
            .hdr_len(),
            12
        );
        let n = Negotiated {
            features: bit(f::GUEST_CSUM) | bit(f::GUEST_TSO4),
        };
        assert_eq!(n.tap_offload(), TUN_F_CSUM | TUN_F_TSO4);
        assert_eq!(n.max_rx_frame(1500), 65_550);
        // TSO without checksum offload is meaningless: the TAP must not use it.
        assert_eq!(
            Negotiated {
                features: bit(f::GUEST_TSO4)
            }
            .tap_offload(),
            0
        );
    }

    #[test]
    fn tx_header_validation() {
        let all = Negotiated { features: OFFERED };
        let none = Negotiated {
            features: bit(f::VERSION_1),
        };
        let mut h = [0u8; 10];
        assert!(all.check_tx_header(&h, 60).is_ok());
        h[0] = 0x10;
        assert!(all.check_tx_header(&h, 60).is_err());
        h[0] = HDR_F_NEEDS_CSUM;
        assert!(all.check_tx_header(&h, 60).is_ok());
        assert!(none.check_tx_header(&h, 60).is_err());
        h[1] = GSO_TCPV4;
        assert!(all.check_tx_header(&h, 60).is_err(), "gso_size 0");
        h[4] = 0xa8;
        h[5] = 0x05;
        assert!(all.check_tx_header(&h, 60).is_ok());
        h[1] = 3; // UDP (UFO) is not offered
        assert!(all.check_tx_header(&h, 60).is_err());
        h[1] = GSO_TCPV6 | GSO_ECN;
        assert!(all.check_tx_header(&h, 60).is_err());
        // Offsets must lie inside the frame: csum at 34 + 16 (TCP) needs 52 bytes.
        let mut h = [HDR_F_NEEDS_CSUM, 0, 0, 0, 0, 0, 34, 0, 16, 0];
        assert!(all.check_tx_header(&h, 52).is_ok());
        assert!(
            all.check_tx_header(&h, 51).is_err(),
            "checksum past the end"
        );
        h[6] = 0xff;
        h[7] = 0xff;
        assert!(
            all.check_tx_header(&h, 1500).is_err(),
            "csum_start past the end"
        );
        let h = [0, 0, 54, 0, 0, 0, 0, 0, 0, 0];
        assert!(all.check_tx_header(&h, 54).is_ok());
        assert!(all.check_tx_header(&h, 53).is_err(), "hdr_len past the end");
    }

    #[test]
    fn config_layout() {
        let c = config_space([1, 2, 3, 4, 5, 6], 2, 1500);
        assert_eq!(c, [1, 2, 3, 4, 5, 6, 1, 0, 2, 0, 0xdc, 0x05]);
    }
}
