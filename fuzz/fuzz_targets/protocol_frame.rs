//! The live-update framed format (`baton_protocol::frame`): a stream of frames, as a peer VMM
//! would send it, read with every kind baton knows. Nothing may panic; a frame that passes the
//! reader's checks must be exactly its header and payload, and a payload that decodes (and
//! validates) as its kind's message must round-trip.
//!
//! Input: byte 0 = mode; bit 0 set: the first frame's header gets the right length and CRC-32
//! for the bytes that follow it (the fuzzer cannot forge a CRC), and bits 1..4 pick its kind.
//! The rest is the stream.
#![no_main]

use baton_fuzz::frames::{HEADER, KINDS, crc32, decode_and_round_trip, kind};
use baton_fuzz::input::Input;
use baton_protocol::frame::{FrameHeader, read_any_frame};
use libfuzzer_sys::fuzz_target;

/// Payload cap of the reader (the handshake's message cap; large enough for any fuzz input).
const CAP: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let mut stream = inp.rest().to_vec();
    if mode & 1 != 0 && stream.len() >= HEADER {
        let mut hb = [0u8; HEADER];
        hb.copy_from_slice(&stream[..HEADER]);
        let mut h = FrameHeader::from_bytes(&hb);
        let k = kind(mode >> 1);
        h.magic = k.magic;
        h.version = k.version;
        h.flags = 0;
        let avail = stream.len() - HEADER;
        let len = usize::try_from(h.len).unwrap_or(usize::MAX).min(avail);
        h.len = u32::try_from(len).unwrap_or(0);
        h.crc = crc32(&stream[HEADER..HEADER + len]);
        stream[..HEADER].copy_from_slice(&h.to_bytes());
    }
    let mut r = stream.as_slice();
    for _ in 0..16 {
        let before = r;
        match read_any_frame(&mut r, &KINDS, CAP) {
            Ok(raw) => {
                let used = before.len() - r.len();
                assert_eq!(
                    used,
                    HEADER + raw.payload.len(),
                    "frame consumed extra bytes"
                );
                assert!(raw.payload.len() <= CAP);
                let mut hb = [0u8; HEADER];
                hb.copy_from_slice(&before[..HEADER]);
                let h = FrameHeader::from_bytes(&hb);
                assert_eq!(FrameHeader::from_bytes(&h.to_bytes()), h);
                assert_eq!(h.flags, 0);
                assert_eq!(h.magic, raw.kind.magic);
                assert!((raw.kind.min_version..=raw.kind.version).contains(&raw.version));
                assert_eq!(h.crc, crc32(&raw.payload));
                decode_and_round_trip(&raw);
            }
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        }
    }
});
