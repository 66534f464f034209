//! The cpr channel (`baton_protocol::cpr`): a manifest frame and the fds that follow it with
//! SCM_RIGHTS, received with `recv_fds` over a real socket pair, as the new VMM receives them
//! from the old one. Nothing may panic; every fd that arrives must be handed out or closed (the
//! process's fd count is the same afterwards); what is accepted pairs one valid, unique name
//! with each fd, and sending it on with `send_fds` gives back the same names.
//!
//! Input: byte 0 = mode (bit 0: the payload is the raw stream, no header fix-up; bit 1: send no
//! marker byte, only hang up); byte 1 = fds attached to the marker (0..=253, copies of
//! /dev/null); byte 2 = peer uid for `check_credentials`; the rest is the manifest JSON.
#![no_main]

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use baton_fuzz::frames::frame;
use baton_fuzz::input::Input;
use baton_fuzz::open_fds;
use baton_protocol::cpr::{
    MANIFEST_KIND, MAX_FDS, MAX_TOTAL_FDS, Manifest, PeerCred, check_credentials, recv_fds,
    send_fds, take_fd,
};
use baton_protocol::frame::Validate;
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

fn devnull() -> RawFd {
    static NULL: OnceLock<std::fs::File> = OnceLock::new();
    NULL.get_or_init(|| std::fs::File::open("/dev/null").expect("/dev/null"))
        .as_raw_fd()
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let nfds = usize::from(inp.u8()).min(253);
    let uid = u32::from(inp.u8());
    let payload = inp.rest();
    let _ = check_credentials(
        &PeerCred {
            pid: 1,
            uid,
            gid: 0,
        },
        0,
    );
    let null = devnull();
    let before = open_fds();
    {
        let (tx, rx) = UnixStream::pair().expect("socketpair");
        let wire = if mode & 1 != 0 {
            payload.to_vec()
        } else {
            frame(&MANIFEST_KIND, payload)
        };
        // Written before anything reads: it must fit the socket buffer.
        if wire.len() > 100_000 || (&tx).write_all(&wire).is_err() {
            return;
        }
        if mode & 2 == 0 {
            let fds = vec![null; nfds];
            let rights = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage] = if nfds == 0 { &[] } else { &rights };
            let _ = sendmsg::<()>(
                tx.as_raw_fd(),
                &[std::io::IoSlice::new(b"F")],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            );
        }
        let _ = tx.shutdown(std::net::Shutdown::Write);
        match recv_fds(&rx) {
            Ok(mut got) => {
                assert!(got.len() <= MAX_TOTAL_FDS);
                let names: Vec<String> = got.iter().map(|(n, _)| n.clone()).collect();
                let unique: std::collections::HashSet<&String> = names.iter().collect();
                assert_eq!(unique.len(), names.len());
                for batch in names.chunks(MAX_FDS) {
                    assert!(
                        Manifest {
                            names: batch.to_vec(),
                            more: false,
                        }
                        .validate()
                        .is_ok()
                    );
                }
                // Pass them on, as a third VMM would get them.
                let (a, b) = UnixStream::pair().expect("socketpair");
                let list: Vec<(&str, _)> =
                    got.iter().map(|(n, f)| (n.as_str(), f.as_fd())).collect();
                send_fds(&a, &list).expect("what was received can be sent on");
                let again = recv_fds(&b).expect("and received again");
                let back: Vec<String> = again.iter().map(|(n, _)| n.clone()).collect();
                assert_eq!(back, names);
                if let Some(first) = names.first() {
                    assert!(take_fd(&mut got, first).is_some());
                }
            }
            Err(e) => {
                let _ = e.to_string();
                let _ = e.is_disconnect();
            }
        }
    }
    assert_eq!(open_fds(), before, "fds leaked by recv_fds");
});
