//! Frames of baton-protocol: building them with a correct header (the fuzzer cannot guess a
//! CRC-32), and the round-trip check every decoded message must pass:
//! `decode(encode(x)) == x`, and the encoding is stable (`encode(decode(encode(x))) == encode(x)`).

use std::fmt::Debug;

use baton_protocol::cpr::{MANIFEST_KIND, Manifest};
use baton_protocol::frame::{
    FrameHeader, FrameKind, HEADER_LEN, RawFrame, Validate, encode_frame, read_any_frame,
};
use baton_protocol::handshake::{
    ABORT_KIND, ACK_KIND, Abort, Ack, COMMIT_KIND, Commit, HELLO_KIND, Hello, PREPARE_KIND,
    PREPARED_KIND, Prepare, READY_KIND, Ready,
};
use baton_protocol::state::{STATE_KIND, VmState};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Every frame kind baton reads, in a fixed order (a fuzz byte picks one).
pub const KINDS: [FrameKind; 9] = [
    HELLO_KIND,
    PREPARE_KIND,
    PREPARED_KIND,
    STATE_KIND,
    READY_KIND,
    COMMIT_KIND,
    ACK_KIND,
    ABORT_KIND,
    MANIFEST_KIND,
];

/// The kind a fuzz byte picks.
pub fn kind(b: u8) -> FrameKind {
    KINDS[usize::from(b) % KINDS.len()]
}

/// A well-formed frame of `kind` around `payload` (any bytes): right magic, version, length
/// and CRC-32.
pub fn frame(kind: &FrameKind, payload: &[u8]) -> Vec<u8> {
    let h = FrameHeader {
        magic: kind.magic,
        version: kind.version,
        flags: 0,
        len: u32::try_from(payload.len()).expect("payload under 4 GiB"),
        crc: crc32(payload),
    };
    let mut f = h.to_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// CRC-32 (IEEE), as the frame header carries it.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// The JSON payload of `msg`, for seeds.
pub fn payload<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("seed message encodes")
}

/// Checks that `msg`, decoded from a frame of `kind`, survives encode → read → decode unchanged
/// and encodes to the same bytes again.
pub fn round_trip<T>(kind: &FrameKind, msg: &T)
where
    T: Serialize + DeserializeOwned + Validate + PartialEq + Debug,
{
    let wire = encode_frame(kind, msg).expect("a decoded message must encode");
    let raw = read_any_frame(&mut wire.as_slice(), std::slice::from_ref(kind), usize::MAX)
        .expect("an encoded frame must read back");
    let back: T = raw
        .decode()
        .unwrap_or_else(|e| panic!("re-decoding {kind:?} failed: {e}\n{msg:?}"));
    assert_eq!(&back, msg, "{} changed across a round trip", kind.name);
    let again = encode_frame(kind, &back).expect("re-encode");
    assert_eq!(
        again, wire,
        "{} encodes differently the second time",
        kind.name
    );
}

/// Decodes a checked frame as the message its kind names; a message that decodes and
/// validates must round-trip. Returns whether it decoded.
pub fn decode_and_round_trip(raw: &RawFrame) -> bool {
    fn go<T>(raw: &RawFrame) -> bool
    where
        T: Serialize + DeserializeOwned + Validate + PartialEq + Debug,
    {
        match raw.decode::<T>() {
            Ok(msg) => {
                assert!(
                    msg.validate().is_ok(),
                    "decode handed out an invalid message"
                );
                round_trip(&raw.kind, &msg);
                true
            }
            Err(e) => {
                // Error messages quote peer bytes: formatting them must not panic either.
                let _ = e.to_string();
                let _ = e.is_disconnect();
                false
            }
        }
    }
    match raw.kind.magic {
        m if m == HELLO_KIND.magic => go::<Hello>(raw),
        m if m == PREPARE_KIND.magic => go::<Prepare>(raw),
        m if m == PREPARED_KIND.magic || m == READY_KIND.magic => go::<Ready>(raw),
        m if m == STATE_KIND.magic => go::<VmState>(raw),
        m if m == COMMIT_KIND.magic => go::<Commit>(raw),
        m if m == ACK_KIND.magic => go::<Ack>(raw),
        m if m == ABORT_KIND.magic => go::<Abort>(raw),
        m if m == MANIFEST_KIND.magic => go::<Manifest>(raw),
        m => panic!("read_any_frame returned a kind it was not asked for: {m:?}"),
    }
}

/// The header length, re-exported for the targets.
pub const HEADER: usize = HEADER_LEN;
