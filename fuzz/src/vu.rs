//! The front-end side of a fuzzed vhost-user connection.
//!
//! The input's message stream is cut into messages by each header's `size` field (the last one
//! may be cut short) and each message is sent with one `sendmsg`, with the file descriptors a
//! well-behaved front-end would attach to it: memfds for memory tables, inflight regions and
//! logs (one per region of SET_MEM_TABLE, as its body announces, at most 8), an eventfd for the
//! ring kick/call/err fds (unless the body sets the no-fd bit) and the other fd-carrying
//! requests. The contents and sizes are the fuzzer's; the fds are always the harness's.
//!
//! One thread writes the messages and then shuts its half down, another drains the back-end's
//! replies (so that neither side can block the other on a full socket buffer).

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// Size of a vhost-user message header.
pub const HDR: usize = 12;
/// Header flag: version 1.
pub const VERSION: u32 = 0x1;
/// Header flag: the front-end wants a reply (REPLY_ACK).
pub const NEED_REPLY: u32 = 0x8;

/// Front-end request codes used by the harness and the seeds.
pub mod code {
    #![allow(missing_docs)]
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const GPU_SET_SOCKET: u32 = 33;
    pub const RESET_DEVICE: u32 = 34;
    pub const ADD_MEM_REG: u32 = 37;
    pub const SET_DEVICE_STATE_FD: u32 = 42;
}

/// One message of the stream: its request code and its bytes (header and body).
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    /// Request code.
    pub code: u32,
    /// Header and body.
    pub bytes: &'a [u8],
}

impl Msg<'_> {
    /// The body (after the header).
    pub fn body(&self) -> &[u8] {
        self.bytes.get(HDR..).unwrap_or_default()
    }
}

/// Cuts `stream` into messages by their headers' size fields.
pub fn split(mut stream: &[u8]) -> Vec<Msg<'_>> {
    let mut out = Vec::new();
    while !stream.is_empty() {
        let word = |i: usize| {
            let mut b = [0u8; 4];
            for (d, s) in b.iter_mut().zip(stream.iter().skip(i)) {
                *d = *s;
            }
            u32::from_le_bytes(b)
        };
        let size = usize::try_from(word(8)).unwrap_or(usize::MAX);
        let n = HDR.saturating_add(size).min(stream.len());
        let (bytes, rest) = stream.split_at(n);
        out.push(Msg {
            code: word(0),
            bytes,
        });
        stream = rest;
    }
    out
}

/// Which fds go with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fds {
    /// None.
    None,
    /// `n` copies of the shared-memory fd.
    Memory(usize),
    /// One eventfd.
    Event,
}

/// The fds a well-behaved front-end attaches to `msg`.
pub fn fds_for(msg: &Msg<'_>) -> Fds {
    let body = msg.body();
    let u = |n: usize| {
        let mut b = [0u8; 8];
        for (d, s) in b.iter_mut().zip(body.iter()).take(n) {
            *d = *s;
        }
        u64::from_le_bytes(b)
    };
    match msg.code {
        code::SET_MEM_TABLE => Fds::Memory(usize::try_from(u(4).min(8)).unwrap_or(8)),
        code::SET_LOG_BASE
        | code::SET_LOG_FD
        | code::SET_INFLIGHT_FD
        | code::ADD_MEM_REG
        | code::SET_DEVICE_STATE_FD => Fds::Memory(1),
        code::SET_VRING_KICK | code::SET_VRING_CALL | code::SET_VRING_ERR => {
            // VHOST_USER_VRING_NOFD_MASK
            if u(8) & 0x100 != 0 {
                Fds::None
            } else {
                Fds::Event
            }
        }
        code::SET_BACKEND_REQ_FD | code::GPU_SET_SOCKET => Fds::Event,
        _ => Fds::None,
    }
}

/// A message with header `code`, `flags` (version 1 is added) and `body`, for seeds.
pub fn message(code: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR + body.len());
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&(flags | VERSION).to_le_bytes());
    m.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// A message whose body is the little-endian `u64`s in `words`.
pub fn message_u64(code: u32, words: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    message(code, 0, &body)
}

/// Plays the front-end on `sock`: sends every message of `stream` with its fds (`memory` for
/// shared memory, `event` for eventfds), shuts the write half down, and drains the replies until
/// the back-end closes. Returns the writer and the reader threads.
pub fn frontend(
    sock: UnixStream,
    stream: Vec<u8>,
    memory: OwnedFd,
    event: OwnedFd,
) -> (JoinHandle<()>, JoinHandle<()>) {
    let mut reader = sock.try_clone().expect("clone the front-end socket");
    let writer = std::thread::spawn(move || {
        for msg in split(&stream) {
            let fd: RawFd;
            let n = match fds_for(&msg) {
                Fds::None => {
                    fd = -1;
                    0
                }
                Fds::Memory(n) => {
                    fd = memory.as_raw_fd();
                    n
                }
                Fds::Event => {
                    fd = event.as_raw_fd();
                    1
                }
            };
            let fds = vec![fd; n];
            let rights = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage] = if n == 0 { &[] } else { &rights };
            let iov = [IoSlice::new(msg.bytes)];
            if sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).is_err() {
                break;
            }
        }
        let _ = sock.shutdown(std::net::Shutdown::Write);
    });
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    (writer, drain)
}
