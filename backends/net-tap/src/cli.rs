//! Command-line options.

use std::os::fd::RawFd;
use std::path::PathBuf;

use baton_protocol::mac::parse_mac;
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
    /// An idle queue worker looks for the guest's next frame for up to this many
    /// microseconds before sleeping (0: sleep at once); a frame that comes meanwhile needs no
    /// wake-up. QEMU's iothreads poll the same way, 32 µs by default.
    #[arg(long, default_value_t = crate::device::DEFAULT_POLL_US, value_name = "MICROSECONDS")]
    pub poll_us: u64,
    /// --allow-uid and --user.
    #[command(flatten)]
    pub service: baton_service::privilege::ServiceArgs,
    /// The sandbox: --seccomp true|false|log, --landlock true|false.
    #[command(flatten)]
    pub sandbox: baton_service::sandbox::SandboxArgs,
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
        let mac = |v: &str| Args::try_parse_from(["baton-net-tap", "--tap", "t0", "--mac", v]);
        assert_eq!(
            mac("52:54:00:12:34:56").unwrap().mac,
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        let err = mac("01:00:00:00:00:01").unwrap_err().to_string();
        assert!(err.contains("multicast"), "{err}");
        assert!(mac("52:54:00:12:34").is_err());
        assert_eq!(default_mac("tap0"), default_mac("tap0"));
        assert_eq!(default_mac("tap0")[0] & 1, 0);
    }
}
