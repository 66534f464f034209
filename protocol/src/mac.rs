//! MAC addresses as people write them (`52:54:00:12:34:56`): the one parser behind baton-vmm's
//! `--net mac=` and baton-net-tap's `--mac`. The address itself travels as `[u8; 6]` (the
//! live-update state's net devices, the virtio-net config space).

/// Why a MAC address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six `:`-separated parts.
    #[error("a MAC address has six ':'-separated bytes")]
    Parts,
    /// A part that is not two hex digits.
    #[error("'{0}' is not a two-digit hex byte")]
    Byte(String),
    /// The group bit is set: a guest NIC cannot have a multicast address.
    #[error("multicast MAC addresses cannot be used")]
    Multicast,
    /// `00:00:00:00:00:00`.
    #[error("the all-zero MAC address cannot be used")]
    Zero,
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex digits in either case), refusing multicast and all-zero
/// addresses.
///
/// ```
/// use baton_protocol::mac::{MacError, parse_mac};
///
/// assert_eq!(parse_mac("52:54:00:ab:CD:ef"), Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
/// assert_eq!(parse_mac("01:00:5e:00:00:01"), Err(MacError::Multicast));
/// ```
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or(MacError::Parts)?;
        // from_str_radix alone would take "+f".
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(MacError::Byte(p.to_string()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| MacError::Byte(p.to_string()))?;
    }
    if parts.next().is_some() {
        return Err(MacError::Parts);
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast);
    }
    if mac == [0; 6] {
        return Err(MacError::Zero);
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unicast_addresses() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("02:FF:aa:00:00:01"), Ok([2, 0xff, 0xaa, 0, 0, 1]));
    }

    #[test]
    fn refuses_what_a_guest_nic_cannot_have() {
        assert_eq!(parse_mac("01:00:00:00:00:01"), Err(MacError::Multicast));
        assert_eq!(parse_mac("ff:ff:ff:ff:ff:ff"), Err(MacError::Multicast));
        assert_eq!(parse_mac("00:00:00:00:00:00"), Err(MacError::Zero));
    }

    #[test]
    fn refuses_malformed_text() {
        for (s, e) in [
            ("", MacError::Byte(String::new())),
            ("52:54:00:12:34", MacError::Parts),
            ("52:54:00:12:34:56:78", MacError::Parts),
            ("52:54:00:12:34:56:", MacError::Parts),
            ("52:54:00:12:34:zz", MacError::Byte("zz".into())),
            ("52:54:00:12:34:+f", MacError::Byte("+f".into())),
            ("52:54:00:12:34:5", MacError::Byte("5".into())),
            ("52:54:00:12:34:567", MacError::Byte("567".into())),
            (
                "52-54-00-12-34-56",
                MacError::Byte("52-54-00-12-34-56".into()),
            ),
        ] {
            assert_eq!(parse_mac(s), Err(e), "{s:?}");
        }
    }
}
