//! A vhost-user connection from a hostile front-end, against each back-end's real connection
//! loop: baton-blk's `server::serve` (deadline per message, the SET_VRING_ENABLE pre-filter,
//! the vhost crate's dispatcher, `handler::ConnHandler`, disconnect) and baton-net-tap's
//! `server::connection` (`vhost::Adapter`). The fuzzer writes the front-end's side of a socket
//! pair: message codes, flags, sizes and bodies; the harness attaches the fds a message wants
//! (see `baton_fuzz::vu`): a memfd whose first bytes the input gives (guest memory, inflight
//! region), or an eventfd. Nothing may panic or hang, the loop must end when the front-end
//! hangs up, every ring must be stopped afterwards, and no fd may be left open.
//!
//! The devices are built in-process for each input: baton-blk with 2 queues of 256 on a 1 MiB
//! memfd disk, no worker threads (ring processing is `blk_ring`'s job); baton-net-tap with no
//! TAP queue (opening one needs CAP_NET_ADMIN), so only its control queue exists.
//!
//! Input: byte 0 = back-end (bit 0: 0 baton-blk, 1 baton-net-tap); shared-memory contents
//! length (u16) and bytes (the memfd is 1 MiB); then the message stream.
#![no_main]

use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::{Arc, OnceLock};

use baton_blk::cli::Args;
use baton_blk::server::{End, serve};
use baton_fuzz::input::Input;
use baton_fuzz::{fd_path, ignore_sigpipe, memfd, open_fds, vu};
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::SigSet;
use nix::sys::signalfd::SignalFd;

/// What lives for the whole run: baton-blk's listening socket and signalfd (its connection
/// loop polls both; nothing ever connects or signals) and the disk image.
struct Fixed {
    listener: UnixListener,
    peers: baton_service::access::SocketPolicy,
    sig: SignalFd,
    disk: std::fs::File,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        ignore_sigpipe();
        let name = format!("baton-fuzz-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        Fixed {
            listener: UnixListener::bind_addr(&addr).expect("listener"),
            peers: baton_service::access::SocketPolicy::new(
                baton_service::access::AllowList::new(&[]),
                None,
            ),
            sig: SignalFd::new(&SigSet::empty()).expect("signalfd"),
            disk: memfd("baton-fuzz-disk", 1 << 20, &[]),
        }
    })
}

fn blk(be: UnixStream, f: &Fixed) {
    let path = fd_path(&f.disk);
    let args = Args::try_parse_from([
        "baton-blk",
        "--image",
        path.to_str().expect("path"),
        "--queues",
        "2",
        "--queue-size",
        "256",
        "--io-engine",
        "sync",
    ])
    .expect("arguments");
    let dev = Arc::new(baton_blk::device::Device::new(&args).expect("device"));
    let end = serve(&dev, be, &f.listener, &f.peers, &f.sig);
    assert_eq!(end, End::Disconnected);
    for q in dev.queues() {
        let st = q.lock();
        assert!(
            !st.started && st.mem.is_none() && st.inflight.is_none(),
            "ring left running"
        );
    }
}

fn net(be: UnixStream) {
    use baton_net_tap::device::{Device, NetConfig, lock};
    let dev = Device::new(
        NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            pairs: 0,
        },
        Vec::new(),
    )
    .expect("device");
    let _ = baton_net_tap::server::connection(&dev, be);
    dev.stop_all();
    for i in 0..dev.num_queues() {
        let v = lock(dev.vring(i).expect("ring"));
        assert!(
            !v.started && v.kick.is_none() && v.call.is_none(),
            "ring left running"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixed();
    let mut inp = Input::new(data);
    let which = inp.u8();
    let init_len = usize::from(inp.u16());
    let init = inp.bytes(init_len);
    let stream = inp.rest().to_vec();
    let before = open_fds();
    {
        let shm: OwnedFd = memfd("baton-fuzz-guest", 1 << 20, init).into();
        let event: OwnedFd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .expect("eventfd")
            .into();
        let (fe, be) = UnixStream::pair().expect("socketpair");
        let (writer, drain) = vu::frontend(fe, stream, shm, event);
        if which & 1 == 0 {
            blk(be, f);
        } else {
            net(be);
        }
        writer.join().expect("front-end writer");
        drain.join().expect("front-end reader");
    }
    assert_eq!(open_fds(), before, "fds leaked");
});
