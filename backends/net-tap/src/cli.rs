//! Command-line options.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::Parser;

/// vhost-user-net back-end over a TAP device that outlives its front-ends.
#[derive(Debug, Parser)]
#[command(name = "baton-net-tap", version)]
pub struct Args {
    /// vhost-user socket path (not needed under systemd socket activation).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// TAP device to create, or to attach to if it exists (persistent).
    #[arg(long, required_unless_present = "tap_fd", conflicts_with = "tap_fd")]
    pub tap: Option<String>,
    /// An inherited TAP queue fd (repeat once per queue pair).
    #[arg(long = "tap-fd")]
    pub tap_fd: Vec<RawFd>,
    /// Number of queue pairs (one TAP queue each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Guest MAC address (default: derived from the TAP name).
    #[arg(long, value_parser = parse_mac)]
    pub mac: Option<[u8; 6]>,
    /// MTU offered to the guest.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..=65521))]
    pub mtu: u16,
    /// A uid allowed to connect as a front-end (repeatable; default: this service's own uid).
    /// Every connection's SO_PEERCRED is checked; others are closed at once.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Started as root: once the TAP queues are open and the socket bound (and given to this
    /// uid), drop to UID or UID:GID (numbers; GID defaults to UID) with no capability, before the
    /// sandbox.
    #[arg(long, value_name = "UID[:GID]")]
    pub user: Option<baton_service::privilege::User>,
    /// The sandbox: --seccomp true|false|log, --landlock true|false.
    #[command(flatten)]
    pub sandbox: baton_service::sandbox::SandboxArgs,
}

/// Parses `aa:bb:cc:dd:ee:ff`, refusing multicast and all-zero addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts
            .next()
            .ok_or("a MAC address has six ':'-separated bytes")?;
        if p.len() != 2 {
            return Err(format!("'{p}' is not a two-digit hex byte"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("'{p}' is not a hex byte"))?;
    }
    if parts.next().is_some() {
        return Err("a MAC address has six ':'-separated bytes".into());
    }
    if mac[0] & 1 != 0 {
        return Err("multicast MAC addresses cannot be used".into());
    }
    if mac == [0; 6] {
        return Err("the all-zero MAC address cannot be used".into());
    }
    Ok(mac)
}

/// A locally administered MAC derived from `seed` (FNV-1a), stable across restarts.
pub fn default_mac(seed: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in seed.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let [a, b, c, _] = h.to_be_bytes();
    [0x52, 0x54, 0x00, a, b, c]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert!(parse_mac("01:00:00:00:00:01").is_err());
        assert!(parse_mac("00:00:00:00:00:00").is_err());
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("52:54:00:12:34:56:78").is_err());
        assert!(parse_mac("52:54:00:12:34:zz").is_err());
        assert_eq!(default_mac("tap0"), default_mac("tap0"));
        assert_eq!(default_mac("tap0")[0] & 1, 0);
    }
}
