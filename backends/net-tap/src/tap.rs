//! TAP queues: create or attach to a (persistent, multi-queue) TAP device with a virtio-net
//! header, or take over an inherited TAP fd, and configure offloads and header size.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
pub(crate) const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
pub(crate) const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub(crate) const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// TUNSETQUEUE: attach this queue (again) to its device.
pub(crate) const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
/// TUNSETQUEUE: detach this queue: the device stops steering frames to it (and drops those
/// waiting in it). TUNGETIFF reports it on a detached queue.
pub(crate) const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
/// The flags every queue of ours has.
const QUEUE_FLAGS: libc::c_short = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
/// Interface names are at most 15 bytes plus the terminating NUL.
pub const IFNAMSIZ: usize = 16;

/// TUNSETOFFLOAD bit: the TAP may hand us frames with a partial checksum.
pub const TUN_F_CSUM: u32 = 0x01;
/// TUNSETOFFLOAD bit: the TAP may hand us TCPv4 GSO frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// TUNSETOFFLOAD bit: the TAP may hand us TCPv6 GSO frames.
pub const TUN_F_TSO6: u32 = 0x04;

/// Errors opening or configuring a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit in IFNAMSIZ.
    #[error("TAP name '{0}' is too long (at most {max} bytes)", max = IFNAMSIZ - 1)]
    NameTooLong(String),
    /// The name is empty or contains '/', NUL or whitespace.
    #[error("TAP name '{0}' is not a valid interface name")]
    BadName(String),
    /// A network device of that name exists and is not a TAP.
    #[error("network device '{0}' exists and is not a TAP device")]
    NotTap(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun (needs CAP_NET_ADMIN or an existing TAP owned by this user)")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF was refused for lack of privilege.
    #[error(
        "no permission to create or attach TAP '{0}': needs CAP_NET_ADMIN, or a persistent TAP owned by this user"
    )]
    Permission(String),
    /// An existing TAP was created without IFF_MULTI_QUEUE.
    #[error(
        "TAP '{0}' exists without multi-queue support: create it with `ip tuntap add dev {0} mode tap multi_queue vnet_hdr`"
    )]
    NotMultiQueue(String),
    /// TUNSETIFF failed.
    #[error("cannot create or attach TAP '{name}' (queue {queue})")]
    SetIff {
        /// Device name.
        name: String,
        /// Queue index.
        queue: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A stored queue fd handed back by the service manager is not a queue of this TAP with
    /// our flags.
    #[error(
        "not a queue of TAP '{want}' with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE: {found}"
    )]
    NotOurQueue {
        /// The TAP we serve.
        want: String,
        /// What the fd is.
        found: String,
    },
    /// An inherited fd is not a usable TAP.
    #[error("fd {fd} is not a TAP device with IFF_VNET_HDR")]
    BadInheritedFd {
        /// The fd.
        fd: RawFd,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An ioctl on a configured TAP failed.
    #[error("{op} on TAP failed")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> Self {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        for (d, s) in req
            .name
            .iter_mut()
            .zip(name.as_bytes().iter().take(IFNAMSIZ - 1))
        {
            *d = *s;
        }
        req
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(self.name.get(..end).unwrap_or_default()).into_owned()
    }
}

/// One queue of a TAP device (one fd), nonblocking.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    attached: bool,
}

/// Checks an interface name the way the kernel does (`dev_valid_name`).
pub fn check_name(name: &str) -> Result<(), TapError> {
    if name.len() >= IFNAMSIZ {
        return Err(TapError::NameTooLong(name.to_string()));
    }
    if name.is_empty()
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(TapError::BadName(name.to_string()));
    }
    Ok(())
}

/// Whether the existing TAP at `sys` (/sys/class/net/NAME) has IFF_MULTI_QUEUE.
fn is_multi_queue(sys: &Path) -> bool {
    std::fs::read_to_string(sys.join("tun_flags"))
        .ok()
        .and_then(|s| i64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .is_none_or(|f| f & i64::from(IFF_MULTI_QUEUE) != 0)
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: `fd` is an open TAP fd and `arg` points to a live value of the type the ioctl
    // `req` reads or writes (an ifreq for TUNSETIFF/TUNGETIFF, an int for the others).
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// TUNGETIFF: the device's name and flags, plus IFF_DETACH_QUEUE if this queue is detached.
fn query(fd: RawFd) -> io::Result<IfReq> {
    let mut req = IfReq::new("", 0);
    ioctl_ptr(fd, TUNGETIFF, &mut req)?;
    Ok(req)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Creates the TAP `name` if absent, or attaches to an existing one, and opens `queues`
    /// queue fds (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE), all nonblocking.
    pub fn open_queues(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        (0..queues).map(|q| Tap::open_queue(name, q)).collect()
    }

    /// Opens one more queue of TAP `name` (created if absent), attached; `queue` is its index
    /// among ours, for messages.
    pub fn open_queue(name: &str, queue: usize) -> Result<Tap, TapError> {
        check_name(name)?;
        let sys = Path::new("/sys/class/net").join(name);
        if sys.exists() && !sys.join("tun_flags").exists() {
            return Err(TapError::NotTap(name.to_string()));
        }
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name, QUEUE_FLAGS);
        ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| {
            if source.raw_os_error() == Some(libc::EPERM) {
                TapError::Permission(name.to_string())
            } else if source.raw_os_error() == Some(libc::EINVAL)
                && !sys.join("tun_flags").exists()
                && sys.exists()
            {
                TapError::NotTap(name.to_string())
            } else if source.raw_os_error() == Some(libc::EINVAL)
                && queue == 0
                && !is_multi_queue(&sys)
            {
                TapError::NotMultiQueue(name.to_string())
            } else {
                TapError::SetIff {
                    name: name.to_string(),
                    queue,
                    source,
                }
            }
        })?;
        Ok(Tap {
            fd: file.into(),
            name: req.name(),
            attached: true,
        })
    }

    /// Takes a queue fd a previous instance stored in the service manager, after checking
    /// (TUNGETIFF) that it is a queue of TAP `name` with our flags; it stays attached or
    /// detached as it was.
    pub fn adopt(fd: OwnedFd, name: &str) -> Result<Tap, TapError> {
        let req = query(fd.as_raw_fd()).map_err(|e| TapError::NotOurQueue {
            want: name.to_string(),
            found: format!("TUNGETIFF failed ({e})"),
        })?;
        if req.name() != name || req.flags & QUEUE_FLAGS != QUEUE_FLAGS {
            return Err(TapError::NotOurQueue {
                want: name.to_string(),
                found: format!("a queue of '{}' with flags {:#x}", req.name(), req.flags),
            });
        }
        set_nonblocking(fd.as_raw_fd()).map_err(|e| TapError::NotOurQueue {
            want: name.to_string(),
            found: format!("cannot be made nonblocking ({e})"),
        })?;
        Ok(Tap {
            fd,
            name: req.name(),
            attached: req.flags & IFF_DETACH_QUEUE == 0,
        })
    }

    /// Takes over an inherited TAP fd (e.g. from systemd's fd store): checks with TUNGETIFF
    /// that it is a TAP with IFF_VNET_HDR, and makes it nonblocking.
    pub fn from_inherited_fd(fd: RawFd) -> Result<Tap, TapError> {
        let req = query(fd).map_err(|source| TapError::BadInheritedFd { fd, source })?;
        if req.flags & IFF_TAP == 0 || req.flags & IFF_VNET_HDR == 0 || req.flags & IFF_NO_PI == 0 {
            return Err(TapError::BadInheritedFd {
                fd,
                source: io::Error::other(format!(
                    "flags {:#x} lack IFF_TAP|IFF_NO_PI|IFF_VNET_HDR",
                    req.flags
                )),
            });
        }
        set_nonblocking(fd).map_err(|source| TapError::BadInheritedFd { fd, source })?;
        // SAFETY: the caller hands over `fd` (inherited, not used elsewhere); TUNGETIFF above
        // proved it is an open TAP fd.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Tap {
            fd: owned,
            name: req.name(),
            attached: req.flags & IFF_DETACH_QUEUE == 0,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the queue was attached to its device when opened or taken over (a queue kept
    /// in the fd store stays detached across a restart if it was).
    pub fn attached(&self) -> bool {
        self.attached
    }

    /// Sets the offloads the TAP may use on frames it hands us (TUNSETOFFLOAD).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes its argument by value.
        // SAFETY: plain integer ioctl on our TAP fd.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(TapError::Ioctl {
                op: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Sets the virtio-net header size used on reads and writes (TUNSETVNETHDRSZ).
    pub fn set_vnet_hdr_size(&self, size: usize) -> Result<(), TapError> {
        let mut sz = libc::c_int::try_from(size).unwrap_or(12);
        ioctl_ptr(self.fd.as_raw_fd(), TUNSETVNETHDRSZ, &mut sz).map_err(|source| TapError::Ioctl {
            op: "TUNSETVNETHDRSZ",
            source,
        })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(matches!(
            check_name("a234567890123456"),
            Err(TapError::NameTooLong(_))
        ));
        assert!(check_name("a23456789012345").is_ok());
        assert!(matches!(check_name(""), Err(TapError::BadName(_))));
        assert!(matches!(check_name("a/b"), Err(TapError::BadName(_))));
    }

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(IfReq::new("tap0", 0).name(), "tap0");
    }
}
