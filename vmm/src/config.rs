//! Command-line configuration of a VM: option strings in, typed values out.

use std::path::PathBuf;

use baton_protocol::mac::{MacError, parse_mac};

/// Errors in option values; each names the option and what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A `key=value` list had an entry without `=`.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key the option does not know.
    #[error("unknown key '{key}' (expected one of: {expected})")]
    UnknownKey {
        /// The key given.
        key: String,
        /// The keys that are accepted.
        expected: &'static str,
    },
    /// A size that does not parse.
    #[error("invalid size '{0}' (examples: 256M, 2G, 1048576)")]
    BadSize(String),
    /// Memory size zero.
    #[error("memory size must be greater than zero")]
    ZeroMemory,
    /// Memory size not a multiple of the page size.
    #[error("memory size {0} is not a multiple of 4 KiB")]
    UnalignedMemory(u64),
    /// A required key is missing.
    #[error("missing '{0}='")]
    Missing(&'static str),
    /// A boolean that is neither on nor off.
    #[error("'{0}' must be on or off")]
    BadBool(String),
    /// A MAC address that does not parse, or that a guest NIC cannot have.
    #[error("invalid MAC address '{0}' (expected six hex bytes like 52:54:00:12:34:56): {1}")]
    BadMac(String, #[source] MacError),
    /// A number that does not parse or is out of range.
    #[error("invalid {0} '{1}'")]
    BadNumber(&'static str, String),
    /// A serial spec that is not stdio, off, file=PATH, socket=PATH or pty.
    #[error("invalid serial '{0}' (expected stdio, off, file=PATH, socket=PATH or pty)")]
    BadSerial(String),
}

/// `--memory size=SIZE[,path=FILE][,hugepages=on]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Guest RAM size in bytes.
    pub size: u64,
    /// File that backs guest RAM; `None` means a new file under /dev/shm (or /dev/hugepages).
    pub path: Option<PathBuf>,
    /// Back RAM with huge pages (the file must be on hugetlbfs).
    pub hugepages: bool,
}

/// What kind of device a back-end serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk; configuration space comes from the back-end (GET_CONFIG).
    Block,
    /// virtio-net; configuration space comes from the options.
    Net {
        /// MAC address.
        mac: [u8; 6],
        /// MTU, if set.
        mtu: Option<u16>,
    },
}

/// Options of one vhost-user device (`--disk`, `--net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Back-end socket.
    pub socket: PathBuf,
    /// Queues (blk) or queue pairs (net).
    pub queues: u16,
    /// Largest ring size offered to the guest.
    pub queue_size: u16,
    /// Block or net.
    pub kind: DeviceKind,
    /// How long to keep reconnecting to a back-end that went away; `None`: forever.
    pub reconnect_limit: Option<std::time::Duration>,
    /// `drain=on`: a live update waits for the requests in flight even where the back-end
    /// could hand them over (GET_VRING_BASE_INFLIGHT is not negotiated).
    pub drain: bool,
}

/// A host PCI function passed through with VFIO (`--device path=...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughConfig {
    /// Its sysfs directory, `/sys/bus/pci/devices/DDDD:BB:DD.F`.
    pub path: PathBuf,
}

impl std::str::FromStr for PassthroughConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut path = None;
        for (k, v) in key_values(s)? {
            match k {
                "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
                "path" => return Err(ConfigError::Missing("path")),
                _ => {
                    return Err(ConfigError::UnknownKey {
                        key: k.to_string(),
                        expected: "path",
                    });
                }
            }
        }
        Ok(PassthroughConfig {
            path: path.ok_or(ConfigError::Missing("path"))?,
        })
    }
}

/// Where the serial console goes (`--serial`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's stdout (and stdin for input).
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Off,
    /// A UNIX socket that clients attach to and detach from; it outlives a live update.
    Socket(PathBuf),
    /// A new pseudo-terminal (its path is logged and in `vm.info`).
    Pty,
}

/// Parses a size with an optional K/M/G/T suffix (binary units).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

fn key_values(s: &str) -> Result<Vec<(&str, &str)>, ConfigError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(p.to_string()))
        })
        .collect()
}

fn parse_bool(v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::BadBool(v.to_string())),
    }
}

impl std::str::FromStr for MemoryConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (mut size, mut path, mut hugepages) = (None, None, false);
        for (k, v) in key_values(s)? {
            match k {
                "size" => size = Some(parse_size(v)?),
                "path" => path = Some(PathBuf::from(v)),
                "hugepages" => hugepages = parse_bool(v)?,
                _ => {
                    return Err(ConfigError::UnknownKey {
                        key: k.to_string(),
                        expected: "size, path, hugepages",
                    });
                }
            }
        }
        let size = size.ok_or(ConfigError::Missing("size"))?;
        if size == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if size % 4096 != 0 {
            return Err(ConfigError::UnalignedMemory(size));
        }
        Ok(MemoryConfig {
            size,
            path,
            hugepages,
        })
    }
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(SerialConfig::Stdio),
            "off" => Ok(SerialConfig::Off),
            "pty" => Ok(SerialConfig::Pty),
            _ => match s.split_once('=') {
                Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
                Some(("socket", p)) if !p.is_empty() => Ok(SerialConfig::Socket(PathBuf::from(p))),
                _ => Err(ConfigError::BadSerial(s.to_string())),
            },
        }
    }
}

fn parse_u16(what: &'static str, v: &str, min: u16) -> Result<u16, ConfigError> {
    v.parse::<u16>()
        .ok()
        .filter(|n| *n >= min)
        .ok_or_else(|| ConfigError::BadNumber(what, v.to_string()))
}

/// A locally administered MAC derived from `seed` (used when `--net` names none).
pub fn default_mac(seed: u32) -> [u8; 6] {
    let b = seed.to_be_bytes();
    [0x52, 0x54, 0x00, b[1], b[2], b[3]]
}

/// Parses `--disk socket=PATH[,queues=N,queue_size=N,reconnect_ms=N,drain=on|off]` or
/// `--net socket=PATH[,mac=MAC,queues=N,queue_size=N,mtu=N,...]`.
pub fn parse_device(s: &str, net: bool, seed: u32) -> Result<DeviceConfig, ConfigError> {
    let (mut socket, mut queues, mut queue_size, mut mac, mut mtu) = (None, 1, 256, None, None);
    let (mut reconnect_limit, mut drain) = (None, false);
    let expected = if net {
        "socket, queues, queue_size, reconnect_ms, drain, mac, mtu"
    } else {
        "socket, queues, queue_size, reconnect_ms, drain"
    };
    for (k, v) in key_values(s)? {
        match k {
            "socket" => socket = Some(PathBuf::from(v)),
            "queues" => queues = parse_u16("queues", v, 1)?,
            "queue_size" => {
                queue_size = parse_u16("queue_size", v, 1)?;
                if !queue_size.is_power_of_two() || queue_size > 32768 {
                    return Err(ConfigError::BadNumber(
                        "queue_size (a power of two)",
                        v.into(),
                    ));
                }
            }
            "reconnect_ms" => {
                let ms: u64 = v
                    .parse()
                    .map_err(|_| ConfigError::BadNumber("reconnect_ms", v.into()))?;
                reconnect_limit = Some(std::time::Duration::from_millis(ms));
            }
            "drain" => {
                drain = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(ConfigError::BadNumber("drain (on or off)", v.into())),
                }
            }
            "mac" if net => {
                mac = Some(parse_mac(v).map_err(|e| ConfigError::BadMac(v.to_string(), e))?);
            }
            "mtu" if net => mtu = Some(parse_u16("mtu", v, 68)?),
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: k.to_string(),
                    expected,
                });
            }
        }
    }
    let socket = socket.ok_or(ConfigError::Missing("socket"))?;
    let kind = if net {
        DeviceKind::Net {
            mac: mac.unwrap_or_else(|| default_mac(seed)),
            mtu,
        }
    } else {
        DeviceKind::Block
    };
    Ok(DeviceConfig {
        socket,
        queues,
        queue_size,
        kind,
        reconnect_limit,
        drain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn memory_options() {
        let m: MemoryConfig = "size=1G,path=/dev/shm/x,hugepages=on".parse().unwrap();
        assert_eq!(m.size, 1 << 30);
        assert_eq!(m.path, Some(PathBuf::from("/dev/shm/x")));
        assert!(m.hugepages);
        assert_eq!(
            "size=0".parse::<MemoryConfig>(),
            Err(ConfigError::ZeroMemory)
        );
        assert_eq!(
            "path=/x".parse::<MemoryConfig>(),
            Err(ConfigError::Missing("size"))
        );
        assert!("size=1G,color=red".parse::<MemoryConfig>().is_err());
        assert!("size=1000".parse::<MemoryConfig>().is_err());
    }

    #[test]
    fn device_options() {
        let d = parse_device("socket=/run/b.sock,queues=2,queue_size=128", false, 1).unwrap();
        assert_eq!(
            (d.queues, d.queue_size, d.kind),
            (2, 128, DeviceKind::Block)
        );
        let n = parse_device("socket=/s,mac=52:54:00:ab:cd:ef,queues=2", true, 1).unwrap();
        assert_eq!(
            n.kind,
            DeviceKind::Net {
                mac: [0x52, 0x54, 0, 0xab, 0xcd, 0xef],
                mtu: None
            }
        );
        assert!(matches!(
            parse_device("socket=/s,mac=52:54:00:ab:cd", true, 1),
            Err(ConfigError::BadMac(..))
        ));
        assert!(matches!(
            parse_device("socket=/s,mac=zz:54:00:ab:cd:ef", true, 1),
            Err(ConfigError::BadMac(..))
        ));
        assert!(matches!(
            parse_device("socket=/s,mac=01:54:00:ab:cd:ef", true, 1),
            Err(ConfigError::BadMac(..))
        ));
        assert_eq!(
            parse_device("socket=/s,mac=00:00:00:00:00:00", true, 1),
            Err(ConfigError::BadMac(
                "00:00:00:00:00:00".into(),
                MacError::Zero
            ))
        );
        assert!(parse_device("socket=/s,drain=on", false, 1).unwrap().drain);
        assert!(!parse_device("socket=/s,drain=off", false, 1).unwrap().drain);
        assert!(!parse_device("socket=/s", false, 1).unwrap().drain);
        assert!(parse_device("socket=/s,drain=yes", false, 1).is_err());
        let r = parse_device("socket=/s,reconnect_ms=250", false, 1).unwrap();
        assert_eq!(
            r.reconnect_limit,
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            parse_device("socket=/s", false, 1).unwrap().reconnect_limit,
            None
        );
        assert!(parse_device("queues=2", false, 1).is_err());
        assert!(parse_device("socket=/s,queue_size=100", false, 1).is_err());
        assert!(parse_device("socket=/s,mac=52:54:00:ab:cd:ef", false, 1).is_err());
    }

    #[test]
    fn passthrough_options() {
        let d: PassthroughConfig = "path=/sys/bus/pci/devices/0000:00:03.0".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/sys/bus/pci/devices/0000:00:03.0"));
        assert_eq!(
            "".parse::<PassthroughConfig>(),
            Err(ConfigError::Missing("path"))
        );
        assert_eq!(
            "path=".parse::<PassthroughConfig>(),
            Err(ConfigError::Missing("path"))
        );
        assert!("path=/x,iommu=on".parse::<PassthroughConfig>().is_err());
        assert!(
            "/sys/bus/pci/devices/x"
                .parse::<PassthroughConfig>()
                .is_err()
        );
    }

    #[test]
    fn serial_options() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file=/tmp/s".parse(),
            Ok(SerialConfig::File("/tmp/s".into()))
        );
        assert!("file=".parse::<SerialConfig>().is_err());
        assert_eq!("pty".parse(), Ok(SerialConfig::Pty));
        assert_eq!(
            "socket=/run/c.sock".parse(),
            Ok(SerialConfig::Socket("/run/c.sock".into()))
        );
        assert!("socket=".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }
}
