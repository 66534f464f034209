//! The live-update handshake messages (`baton_protocol::handshake`), read with the receive
//! function of each step, as the other VMM would make us: hello exchange, prepare, prepared,
//! ready (which also accepts a failed ack or an abort), commit, ack; and `send_abort`, whose
//! reason comes from an error message. Nothing may panic; whatever a receiver accepts must
//! round-trip and satisfy what the step promises (hello: same protocol version, opposite role;
//! ack: ok), and an abort we send must read back as a valid abort with a prefix of its reason.
//!
//! Input: byte 0 = step (0 hello, 1 prepare, 2 prepared, 3 ready, 4 commit, 5 ack, 6 send_abort);
//! byte 1 = frame kind around the payload (bits 0..5, an index into `frames::KINDS`; bit 6: our
//! hello says outgoing; bit 7: no frame, the payload is the raw stream); the rest is the payload
//! (JSON) or, for send_abort, the reason.
#![no_main]

use std::io::{self, Read, Write};

use baton_fuzz::frames::{frame, kind, round_trip};
use baton_fuzz::input::Input;
use baton_protocol::frame::read_frame;
use baton_protocol::handshake::{
    ABORT_KIND, ACK_KIND, Abort, COMMIT_KIND, HELLO_KIND, HandshakeError, Hello, MAX_MESSAGE_LEN,
    MAX_TEXT_LEN, PREPARE_KIND, PREPARED_KIND, READY_KIND, Role, exchange_hello, recv_ack,
    recv_commit, recv_prepare, recv_prepared, recv_ready, send_abort,
};
use libfuzzer_sys::fuzz_target;

/// A peer: reads come from the fuzz input, writes are kept.
struct Peer<'a> {
    r: &'a [u8],
    w: Vec<u8>,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn check_err(e: &HandshakeError) {
    let _ = e.to_string();
    let _ = e.is_disconnect();
    if let HandshakeError::Aborted(r) | HandshakeError::Refused(r) = e {
        assert!(r.len() <= MAX_TEXT_LEN, "peer text over the cap accepted");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let step = inp.u8() % 7;
    let k = inp.u8();
    let payload = inp.rest();
    if step == 6 {
        let reason = String::from_utf8_lossy(payload);
        let mut wire = Vec::new();
        send_abort(&mut wire, &reason).expect("send_abort to a Vec");
        let a: Abort = read_frame(&mut wire.as_slice(), &ABORT_KIND, MAX_MESSAGE_LEN)
            .expect("our own abort must be valid");
        assert!(a.reason.len() <= MAX_TEXT_LEN);
        assert!(reason.starts_with(a.reason.as_str()) || (a.reason == "unspecified"));
        round_trip(&ABORT_KIND, &a);
        match recv_commit(&mut wire.as_slice()) {
            Err(HandshakeError::Aborted(r)) => assert_eq!(r, a.reason),
            other => panic!("an abort read as {other:?}"),
        }
        return;
    }
    let wire = if k & 0x80 != 0 {
        payload.to_vec()
    } else {
        frame(&kind(k & 0x3f), payload)
    };
    let r = &mut wire.as_slice();
    match step {
        0 => {
            let role = if k & 0x40 != 0 {
                Role::Outgoing
            } else {
                Role::Incoming
            };
            let ours = Hello::new(role);
            let mut peer = Peer {
                r: &wire,
                w: Vec::new(),
            };
            match exchange_hello(&mut peer, &ours) {
                Ok(theirs) => {
                    assert_eq!(theirs.protocol_version, ours.protocol_version);
                    assert_ne!(theirs.role, ours.role);
                    round_trip(&HELLO_KIND, &theirs);
                }
                Err(e) => check_err(&e),
            }
            let sent: Hello = read_frame(&mut peer.w.as_slice(), &HELLO_KIND, MAX_MESSAGE_LEN)
                .expect("our hello reads back");
            assert_eq!(sent, ours);
        }
        1 => match recv_prepare(r) {
            Ok(p) => round_trip(&PREPARE_KIND, &p),
            Err(e) => check_err(&e),
        },
        2 => match recv_prepared(r) {
            Ok(p) => round_trip(&PREPARED_KIND, &p),
            Err(e) => check_err(&e),
        },
        3 => match recv_ready(r) {
            Ok(p) => round_trip(&READY_KIND, &p),
            Err(e) => check_err(&e),
        },
        4 => match recv_commit(r) {
            Ok(c) => round_trip(&COMMIT_KIND, &c),
            Err(e) => check_err(&e),
        },
        _ => match recv_ack(r) {
            Ok(a) => {
                assert!(a.ok && a.error.is_none());
                round_trip(&ACK_KIND, &a);
            }
            Err(e) => check_err(&e),
        },
    }
});
