//! The framed, versioned message format used on every cross-process stream.
//!
//! A frame is a 16-byte header followed by a payload:
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! | 0      | 4    | magic, one per message kind (e.g. `b"BLUS"`)       |
//! | 4      | 2    | version of that kind, little endian                |
//! | 6      | 2    | flags, reserved: must be zero                      |
//! | 8      | 4    | payload length in bytes, little endian             |
//! | 12     | 4    | CRC-32 (IEEE) of the payload, little endian        |
//! | 16     | len  | payload: one JSON value (`serde_json`)             |
//!
//! The payload is JSON because it is self-describing (a reader names the field it did not
//! understand, and `jq` reads a captured stream), it is already a workspace dependency, and
//! fields can be added with `#[serde(default)]` without a version bump. The largest message,
//! the live-update state of a VM, is tens of KiB, which serde_json writes and parses in well
//! under a millisecond; large binary blobs (KVM structures) are hex strings, not number arrays.
//!
//! A reader checks, in order: magic, version, flags, length against its cap (before reading or
//! allocating the payload), that the whole payload arrived, the checksum, that the payload
//! deserializes, and finally [`Validate::validate`]. Only then does it hand the value out.
//!
//! ```
//! use baton_protocol::frame::{read_frame, write_frame, FrameKind, Validate};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct Ping { seq: u32 }
//! impl Validate for Ping {
//!     type Error = std::convert::Infallible;
//!     fn validate(&self) -> Result<(), Self::Error> { Ok(()) }
//! }
//! const PING: FrameKind = FrameKind::new("ping", *b"PING", 1);
//!
//! let mut wire = Vec::new();
//! write_frame(&mut wire, &PING, &Ping { seq: 7 }).unwrap();
//! let back: Ping = read_frame(&mut wire.as_slice(), &PING, 1024).unwrap();
//! assert_eq!(back, Ping { seq: 7 });
//! ```

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 16;

/// One kind of message: its magic, the version this build writes, and the oldest it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameKind {
    /// Human-readable name, used in error messages.
    pub name: &'static str,
    /// Four bytes that start every frame of this kind.
    pub magic: [u8; 4],
    /// Version written by this build; also the newest version it reads.
    pub version: u16,
    /// Oldest version this build still reads.
    pub min_version: u16,
}

impl FrameKind {
    /// A kind that writes and reads exactly `version`.
    pub const fn new(name: &'static str, magic: [u8; 4], version: u16) -> Self {
        FrameKind {
            name,
            magic,
            version,
            min_version: version,
        }
    }
}

/// Consistency checks a message runs after it is decoded and before it is used.
pub trait Validate {
    /// Why a message is inconsistent.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Checks the message; an `Err` stops the reader from handing it out.
    fn validate(&self) -> Result<(), Self::Error>;
}

/// Errors writing or reading a frame; each names the kind of message expected.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed (not a clean end of stream).
    #[error("{kind}: I/O error: {source}")]
    Io {
        /// Kind of message being read or written.
        kind: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The stream ended before the frame was complete.
    #[error("{kind}: stream ended after {got} of {expected} {part} bytes")]
    Truncated {
        /// Kind of message expected.
        kind: &'static str,
        /// `"header"` or `"payload"`.
        part: &'static str,
        /// Bytes that arrived.
        got: usize,
        /// Bytes that were needed.
        expected: usize,
    },
    /// The magic does not name the expected kind.
    #[error("{kind}: bad magic {found:02x?} (expected one of {expected})")]
    BadMagic {
        /// Kind (or kinds) of message expected.
        kind: &'static str,
        /// The four bytes found.
        found: [u8; 4],
        /// The expected magics, printed.
        expected: String,
    },
    /// The peer speaks a version of this kind that this build does not read.
    #[error(
        "{kind}: peer sent version {found}, this build reads versions {min}..={max}: \
         update the older side first"
    )]
    UnsupportedVersion {
        /// Kind of message.
        kind: &'static str,
        /// Version in the frame.
        found: u16,
        /// Oldest version this build reads.
        min: u16,
        /// Newest version this build reads (the one it writes).
        max: u16,
    },
    /// Reserved flag bits are set.
    #[error("{kind}: reserved flags {0:#06x} are set", .flags)]
    UnknownFlags {
        /// Kind of message.
        kind: &'static str,
        /// The flags word found.
        flags: u16,
    },
    /// The payload length exceeds the reader's cap (checked before reading the payload).
    #[error("{kind}: payload of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// Kind of message.
        kind: &'static str,
        /// Length announced by the header.
        len: u64,
        /// The reader's cap.
        max: usize,
    },
    /// The payload checksum does not match the header.
    #[error("{kind}: payload checksum {found:#010x} does not match header {expected:#010x}")]
    Checksum {
        /// Kind of message.
        kind: &'static str,
        /// CRC-32 computed over the payload.
        found: u32,
        /// CRC-32 in the header.
        expected: u32,
    },
    /// The payload is not valid JSON for the expected type.
    #[error("{kind}: payload does not decode: {source}")]
    Decode {
        /// Kind of message.
        kind: &'static str,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The message could not be encoded.
    #[error("{kind}: cannot encode: {source}")]
    Encode {
        /// Kind of message.
        kind: &'static str,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The message decoded but is inconsistent.
    #[error("{kind}: invalid message: {source}")]
    Invalid {
        /// Kind of message.
        kind: &'static str,
        /// What [`Validate::validate`] reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl FrameError {
    /// True when the peer went away or the stream broke, as opposed to the peer sending
    /// something this build rejects; the caller may retry with a new connection.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, FrameError::Io { .. } | FrameError::Truncated { .. })
    }
}

/// The decoded fixed-size part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Magic of the message kind.
    pub magic: [u8; 4],
    /// Version of the message kind.
    pub version: u16,
    /// Reserved flags.
    pub flags: u16,
    /// Payload length in bytes.
    pub len: u32,
    /// CRC-32 of the payload.
    pub crc: u32,
}

impl FrameHeader {
    /// Header bytes as they go on the wire.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let fields: [&[u8]; 5] = [
            &self.magic,
            &self.version.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.crc.to_le_bytes(),
        ];
        for (dst, src) in b.iter_mut().zip(fields.into_iter().flatten()) {
            *dst = *src;
        }
        b
    }

    /// Parses header bytes; no field is checked here.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let [
            m0,
            m1,
            m2,
            m3,
            v0,
            v1,
            f0,
            f1,
            l0,
            l1,
            l2,
            l3,
            c0,
            c1,
            c2,
            c3,
        ] = *b;
        FrameHeader {
            magic: [m0, m1, m2, m3],
            version: u16::from_le_bytes([v0, v1]),
            flags: u16::from_le_bytes([f0, f1]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            crc: u32::from_le_bytes([c0, c1, c2, c3]),
        }
    }
}

/// Serializes `msg` into a complete frame of `kind` (header and payload).
pub fn encode_frame<T: Serialize>(kind: &FrameKind, msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut buf, msg).map_err(|source| FrameError::Encode {
        kind: kind.name,
        source,
    })?;
    let payload = buf.get(HEADER_LEN..).unwrap_or_default();
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        kind: kind.name,
        len: payload.len() as u64,
        max: u32::MAX as usize,
    })?;
    let header = FrameHeader {
        magic: kind.magic,
        version: kind.version,
        flags: 0,
        len,
        crc: crc32fast::hash(payload),
    };
    for (dst, src) in buf.iter_mut().zip(header.to_bytes()) {
        *dst = src;
    }
    Ok(buf)
}

/// Writes `msg` as one frame of `kind` with a single `write_all`; returns the bytes written.
pub fn write_frame<W: Write, T: Serialize>(
    w: &mut W,
    kind: &FrameKind,
    msg: &T,
) -> Result<usize, FrameError> {
    let buf = encode_frame(kind, msg)?;
    w.write_all(&buf)
        .and_then(|()| w.flush())
        .map_err(|source| FrameError::Io {
            kind: kind.name,
            source,
        })?;
    Ok(buf.len())
}

/// A frame whose header was checked and whose payload arrived intact, not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The kind its magic names.
    pub kind: FrameKind,
    /// Version found in the header (within the kind's supported range).
    pub version: u16,
    /// The payload; its checksum matched.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// Decodes and validates the payload as a `T`.
    pub fn decode<T: DeserializeOwned + Validate>(&self) -> Result<T, FrameError> {
        let kind = self.kind.name;
        let msg: T = serde_json::from_slice(&self.payload)
            .map_err(|source| FrameError::Decode { kind, source })?;
        msg.validate().map_err(|e| FrameError::Invalid {
            kind,
            source: Box::new(e),
        })?;
        Ok(msg)
    }
}

/// Reads into `buf` until it is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], kind: &'static str) -> Result<usize, FrameError> {
    let mut got = 0;
    while let Some(rest) = buf.get_mut(got..) {
        if rest.is_empty() {
            break;
        }
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(FrameError::Io { kind, source }),
        }
    }
    Ok(got)
}

/// Reads one frame whose magic is one of `kinds`, checks its header, length cap and checksum,
/// and returns the undecoded payload. Used where more than one message may come next.
///
/// `kinds` must not be empty; `max_len` caps the payload and is checked before any of it is read.
pub fn read_any_frame<R: Read>(
    r: &mut R,
    kinds: &[FrameKind],
    max_len: usize,
) -> Result<RawFrame, FrameError> {
    let names = kinds.first().map_or("frame", |k| k.name);
    let mut hb = [0u8; HEADER_LEN];
    let got = read_full(r, &mut hb, names)?;
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            kind: names,
            part: "header",
            got,
            expected: HEADER_LEN,
        });
    }
    let h = FrameHeader::from_bytes(&hb);
    let Some(kind) = kinds.iter().find(|k| k.magic == h.magic) else {
        let expected = kinds
            .iter()
            .map(|k| format!("{:?} ({})", String::from_utf8_lossy(&k.magic), k.name))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(FrameError::BadMagic {
            kind: names,
            found: h.magic,
            expected,
        });
    };
    let name = kind.name;
    if h.version < kind.min_version || h.version > kind.version {
        return Err(FrameError::UnsupportedVersion {
            kind: name,
            found: h.version,
            min: kind.min_version,
            max: kind.version,
        });
    }
    if h.flags != 0 {
        return Err(FrameError::UnknownFlags {
            kind: name,
            flags: h.flags,
        });
    }
    let too_large = || FrameError::TooLarge {
        kind: name,
        len: u64::from(h.len),
        max: max_len,
    };
    let len = usize::try_from(h.len).map_err(|_| too_large())?;
    if len > max_len {
        return Err(too_large());
    }
    // Grow with the data actually received rather than trusting the announced length.
    let mut payload = Vec::new();
    r.take(u64::from(h.len))
        .read_to_end(&mut payload)
        .map_err(|source| FrameError::Io { kind: name, source })?;
    if payload.len() < len {
        return Err(FrameError::Truncated {
            kind: name,
            part: "payload",
            got: payload.len(),
            expected: len,
        });
    }
    let crc = crc32fast::hash(&payload);
    if crc != h.crc {
        return Err(FrameError::Checksum {
            kind: name,
            found: crc,
            expected: h.crc,
        });
    }
    Ok(RawFrame {
        kind: *kind,
        version: h.version,
        payload,
    })
}

/// Reads one frame of `kind`, rejecting anything malformed (see the module doc), and returns
/// the decoded and validated message. `max_len` caps the payload length.
pub fn read_frame<R: Read, T: DeserializeOwned + Validate>(
    r: &mut R,
    kind: &FrameKind,
    max_len: usize,
) -> Result<T, FrameError> {
    read_any_frame(r, std::slice::from_ref(kind), max_len)?.decode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Msg {
        name: String,
        n: u32,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("n must be below 100, got {0}")]
    struct TooBig(u32);

    impl Validate for Msg {
        type Error = TooBig;
        fn validate(&self) -> Result<(), TooBig> {
            if self.n >= 100 {
                return Err(TooBig(self.n));
            }
            Ok(())
        }
    }

    const KIND: FrameKind = FrameKind::new("test message", *b"TEST", 2);
    const OTHER: FrameKind = FrameKind::new("other message", *b"OTHR", 1);

    fn msg() -> Msg {
        Msg {
            name: "disk0".into(),
            n: 7,
        }
    }

    fn read(bytes: &[u8]) -> Result<Msg, FrameError> {
        read_frame(&mut &bytes[..], &KIND, 4096)
    }

    #[test]
    fn round_trip() {
        let mut wire = Vec::new();
        let n = write_frame(&mut wire, &KIND, &msg()).unwrap();
        assert_eq!(n, wire.len());
        assert_eq!(&wire[..4], b"TEST");
        assert_eq!(read(&wire).unwrap(), msg());
    }

    #[test]
    fn two_frames_back_to_back_read_exactly() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &KIND, &msg()).unwrap();
        write_frame(&mut wire, &OTHER, &msg()).unwrap();
        let mut r = wire.as_slice();
        let a: Msg = read_frame(&mut r, &KIND, 4096).unwrap();
        let b = read_any_frame(&mut r, &[KIND, OTHER], 4096).unwrap();
        assert_eq!(b.kind, OTHER);
        assert_eq!(a, b.decode::<Msg>().unwrap());
        assert!(r.is_empty());
    }

    #[test]
    fn header_bytes_round_trip() {
        let h = FrameHeader {
            magic: *b"ABCD",
            version: 0x1234,
            flags: 0,
            len: 0xdead_beef,
            crc: 0x0102_0304,
        };
        assert_eq!(FrameHeader::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn wrong_magic_names_expected() {
        let wire = encode_frame(&OTHER, &msg()).unwrap();
        let e = read(&wire).unwrap_err();
        assert!(matches!(e, FrameError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("TEST"), "{e}");
    }

    #[test]
    fn unsupported_version_names_both() {
        let newer = FrameKind::new("test message", *b"TEST", 9);
        let wire = encode_frame(&newer, &msg()).unwrap();
        let e = read(&wire).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(
                e,
                FrameError::UnsupportedVersion {
                    found: 9,
                    min: 2,
                    max: 2,
                    ..
                }
            ),
            "{text}"
        );
        assert!(text.contains('9') && text.contains("2..=2"), "{text}");
        // A reader with a range accepts an older writer.
        let range = FrameKind {
            min_version: 1,
            ..newer
        };
        let old = encode_frame(&KIND, &msg()).unwrap();
        let back: Msg = read_frame(&mut old.as_slice(), &range, 4096).unwrap();
        assert_eq!(back, msg());
    }

    #[test]
    fn reserved_flags_rejected() {
        let mut wire = encode_frame(&KIND, &msg()).unwrap();
        wire[6] = 1;
        assert!(matches!(
            read(&wire).unwrap_err(),
            FrameError::UnknownFlags { flags: 1, .. }
        ));
    }

    /// A reader that fails the test if more than the header is read.
    struct HeaderOnly<'a>(&'a [u8], usize);
    impl Read for HeaderOnly<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(self.1 < HEADER_LEN, "payload read despite the length cap");
            let n = buf
                .len()
                .min(HEADER_LEN - self.1)
                .min(self.0.len() - self.1);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }

    #[test]
    fn length_over_cap_rejected_before_reading_payload() {
        let mut wire = encode_frame(&KIND, &msg()).unwrap();
        wire[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = read_frame::<_, Msg>(&mut HeaderOnly(&wire, 0), &KIND, 4096).unwrap_err();
        assert!(
            matches!(e, FrameError::TooLarge { len, max: 4096, .. } if len == u64::from(u32::MAX)),
            "{e}"
        );
        let wire = encode_frame(&KIND, &msg()).unwrap();
        let e = read_frame::<_, Msg>(&mut wire.as_slice(), &KIND, 3).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { max: 3, .. }), "{e}");
    }

    #[test]
    fn checksum_mismatch_rejected() {
        let mut wire = encode_frame(&KIND, &msg()).unwrap();
        let last = wire.len() - 2;
        wire[last] ^= 0x20;
        assert!(matches!(
            read(&wire).unwrap_err(),
            FrameError::Checksum { .. }
        ));
    }

    #[test]
    fn truncated_input_rejected_at_every_length() {
        let wire = encode_frame(&KIND, &msg()).unwrap();
        for cut in 0..wire.len() {
            let e = read(&wire[..cut]).unwrap_err();
            let part = if cut < HEADER_LEN {
                "header"
            } else {
                "payload"
            };
            assert!(
                matches!(&e, FrameError::Truncated { part: p, got, .. }
                    if *p == part && *got == if cut < HEADER_LEN { cut } else { cut - HEADER_LEN }),
                "cut at {cut}: {e}"
            );
            assert!(e.is_disconnect());
        }
    }

    #[test]
    fn undecodable_payload_rejected() {
        #[derive(Serialize)]
        struct Wrong {
            name: u32,
        }
        let wire = encode_frame(&KIND, &Wrong { name: 3 }).unwrap();
        assert!(matches!(
            read(&wire).unwrap_err(),
            FrameError::Decode { .. }
        ));
    }

    #[test]
    fn invalid_message_rejected_by_validate() {
        let wire = encode_frame(&KIND, &Msg { n: 100, ..msg() }).unwrap();
        let e = read(&wire).unwrap_err();
        assert!(matches!(e, FrameError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("below 100"), "{e}");
    }

    #[test]
    fn every_flipped_byte_is_an_error_never_a_panic() {
        let wire = encode_frame(&KIND, &msg()).unwrap();
        for i in 0..wire.len() {
            for bit in [0x01u8, 0x80, 0xff] {
                let mut bad = wire.clone();
                bad[i] ^= bit;
                assert!(read(&bad).is_err(), "byte {i} ^ {bit:#x} accepted");
            }
        }
    }

    #[test]
    fn io_error_reported_as_disconnect() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::ConnectionReset))
            }
        }
        let e = read_frame::<_, Msg>(&mut Broken, &KIND, 4096).unwrap_err();
        assert!(
            matches!(e, FrameError::Io { .. }) && e.is_disconnect(),
            "{e}"
        );
    }
}
