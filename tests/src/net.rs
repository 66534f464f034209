//! Pieces of the baton-net-tap tests: the back-end process with its log and counters, the
//! Linux test guest on QEMU with a vhost-user-net device, hand-built frames, TAP queues opened
//! from a namespace, and ping. Everything stays inside namespaces the tests create
//! ([`crate::netns`]).
// Test support: a failed set-up step panics, as the test that called it would.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{self, Proc, TempDir, wait_until};
use crate::netns::{Netns, sh};
use crate::services::{net_tap_command, start_service};

/// A running baton-net-tap (inside a namespace) with an info-level log, killed (SIGKILL) on
/// drop.
pub struct NetTap {
    /// The process (`ip netns exec` execs it, so this is baton-net-tap itself).
    pub proc: Proc,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Its stderr.
    pub log: PathBuf,
}

impl NetTap {
    /// Starts `baton-net-tap --socket <dir>/net.sock <args>` in `ns` and waits for the socket.
    pub fn start(ns: &Netns, dir: &TempDir, args: &[&str]) -> NetTap {
        let socket = dir.join("net.sock");
        let log = dir.join("net-tap.log");
        let mut c = net_tap_command(ns, &socket, args);
        c.env("RUST_LOG", "info");
        let proc = start_service(c, &socket, Some(&log)).unwrap_or_else(|e| {
            panic!(
                "baton-net-tap did not come up: {e}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        NetTap { proc, socket, log }
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log_text().contains(needle).then_some(())).is_some()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.proc.child.try_wait(), Ok(None))
    }

    /// Asks for the counters (SIGUSR1) and returns the value of `name` from the next stats line.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let before = self.log_text().matches("stats: ").count();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.proc.child.id() as i32, libc::SIGUSR1) };
        let line = wait_until(Duration::from_secs(10), || {
            let log = self.log_text();
            (log.matches("stats: ").count() > before)
                .then(|| {
                    log.lines()
                        .rfind(|l| l.contains("stats: "))
                        .map(str::to_string)
                })
                .flatten()
        })?;
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}="))?.parse().ok())
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.proc.child.id() as i32, libc::SIGTERM) };
        let code = wait_until(Duration::from_secs(10), || {
            self.proc.child.try_wait().ok().flatten()
        });
        code.and_then(|s| s.code())
    }
}

impl Drop for NetTap {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }
}

/// The QEMU/TCG command line booting the guest with one vhost-user-net device on `socket`
/// (`queues` pairs, as many vCPUs), running `script`.
pub fn qemu_command(
    guest: &(PathBuf, PathBuf),
    socket: &Path,
    mac: &str,
    queues: u16,
    script: &str,
) -> Command {
    let mut cmd = crate::linux_guest::qemu(guest, 512, u32::from(queues), script);
    cmd.arg("-chardev")
        .arg(format!("socket,id=n0,path={}", socket.display()))
        .arg("-netdev")
        .arg(format!("vhost-user,id=net0,chardev=n0,queues={queues}"))
        .arg("-device")
        .arg(if queues > 1 {
            format!(
                "virtio-net-pci,netdev=net0,mac={mac},mq=on,vectors={}",
                2 * queues + 2
            )
        } else {
            format!("virtio-net-pci,netdev=net0,mac={mac}")
        });

    cmd
}

/// Boots the guest under QEMU/TCG with one vhost-user-net device on `socket`, running
/// `script`; returns its console output when it powers off (or at the deadline).
pub fn run_guest(
    guest: &(PathBuf, PathBuf),
    socket: &Path,
    mac: &str,
    queues: u16,
    script: &str,
) -> String {
    let cmd = qemu_command(guest, socket, mac, queues, script);
    let f = harness::run_to_end(cmd, Duration::from_secs(120)).expect("run qemu");
    format!("{}\n{}", f.stdout, f.stderr)
}

/// Ones'-complement sum of 16-bit big-endian words.
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

/// Folds a ones'-complement sum to 16 bits.
pub fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (d, p) in m.iter_mut().zip(s.trim().split(':')) {
        *d = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

/// An Ethernet/IPv4/UDP frame. With `partial`, the UDP checksum holds only the pseudo-header
/// sum and the returned virtio-net header asks the device to complete it (NEEDS_CSUM).
pub fn udp_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, dst): ([u8; 4], [u8; 4]),
    (sport, dport): (u16, u16),
    payload: &[u8],
    partial: bool,
) -> ([u8; 12], Vec<u8>) {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let mut hdr = [0u8; 12];
    if partial {
        let c = csum_fold(csum_add(0, &pseudo));
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        hdr[0] = 1; // NEEDS_CSUM
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        hdr[8..10].copy_from_slice(&6u16.to_le_bytes()); // csum_offset
    } else {
        let mut c = !csum_fold(csum_add(csum_add(0, &pseudo), &udp));
        if c == 0 {
            c = 0xffff;
        }
        udp[6..8].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&udp);
    (hdr, f)
}

/// The UDP (destination port, payload) of an Ethernet/IPv4 frame, if it is one.
pub fn udp_payload(frame: &[u8]) -> Option<(u16, &[u8])> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = frame.get(14 + ihl..)?;
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    Some((dport, udp.get(8..len)?))
}

/// Opens one queue of TAP `name` (created if absent) with a 12-byte virtio-net header,
/// offloads `offload`, blocking or not. Must run on a thread inside the namespace.
pub fn open_tap(name: &str, offload: u32, nonblock: bool) -> OwnedFd {
    let path = c"/dev/net/tun";
    let flags = libc::O_RDWR | libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: plain open(2) of a constant path.
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just opened and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let f: i16 = 0x0002 | 0x1000 | 0x4000 | 0x0100;
    req[16..18].copy_from_slice(&f.to_ne_bytes());
    // SAFETY: TUNSETIFF reads/writes an ifreq (40 bytes) that outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) };
    assert_eq!(
        r,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    let mut sz: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads an int that outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), 0x4004_54d8, &mut sz) };
    assert_eq!(r, 0);
    // SAFETY: TUNSETOFFLOAD takes an integer argument.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), 0x4004_54d0, libc::c_ulong::from(offload)) };
    assert_eq!(r, 0);
    fd
}

/// From inside `ns`: `count` pings to `ip` (busybox or iputils ping), retried until the
/// first answer arrives (ARP, guest start-up). Returns the ping output.
pub fn ping_from(ns: &Netns, ip: &str, count: u32) -> String {
    let ping = if sh("command -v ping").is_ok() {
        "ping"
    } else {
        "busybox ping"
    };
    let first = wait_until(Duration::from_secs(15), || {
        ns.exec(&format!("{ping} -c 1 -W 1 {ip}")).ok().map(drop)
    });
    assert!(first.is_some(), "no ping reply from {ip}");
    let out = ns
        .exec(&format!("{ping} -c {count} -W 2 {ip}"))
        .unwrap_or_else(|e| panic!("ping -c {count} {ip} failed: {e}"));
    assert!(
        out.contains(&format!("{count} packets received"))
            || out.contains(&format!("{count} received")),
        "{out}"
    );
    out
}
