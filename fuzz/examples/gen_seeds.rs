//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/`, from real data:
//! the messages baton's own code builds (`VmState::example`, `Hello::new`, the handshake's
//! acks and aborts, cpr manifests as the VMM names its fds), and rings, requests, frames and
//! vhost-user sessions laid out the way a virtio driver and QEMU lay them out. Each seed is in
//! the input format of its target (the formats are in `baton_fuzz`, shared with the targets).
//!
//! `cargo +nightly run --manifest-path fuzz/Cargo.toml --example gen_seeds` (or
//! `./fuzz.sh --seeds`); the files are small and committed.

use std::path::{Path, PathBuf};

use baton_fuzz::frames::{KINDS, frame, payload};
use baton_fuzz::guest::{F_INDIRECT, F_NEXT, F_WRITE, Image, RAM1, RingLayout};
use baton_fuzz::vu::{NEED_REPLY, code, message, message_u64};
use baton_protocol::cpr::{MANIFEST_KIND, Manifest};
use baton_protocol::frame::{FrameKind, encode_frame};
use baton_protocol::handshake::{
    ABORT_KIND, ACK_KIND, Abort, Ack, COMMIT_KIND, Commit, HELLO_KIND, Hello, PREPARE_KIND,
    PREPARED_KIND, Phase, Prepare, READY_KIND, Ready, Role,
};
use baton_protocol::state::{STATE_KIND, VmState};

fn out(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(out(target).join(name), bytes).expect("write seed");
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn kind_index(k: &FrameKind) -> u8 {
    u8::try_from(
        KINDS
            .iter()
            .position(|x| x.magic == k.magic)
            .expect("known kind"),
    )
    .expect("few kinds")
}

// ---------------------------------------------------------------- protocol

fn phases() -> Vec<Phase> {
    [
        ("map_ram", 210),
        ("create_vm", 3900),
        ("restore_vcpus", 640),
        ("reconnect_backends", 910),
    ]
    .into_iter()
    .map(|(n, m)| Phase {
        name: n.into(),
        micros: m,
    })
    .collect()
}

fn prepare() -> Prepare {
    let s = VmState::example(2);
    let mut devices = s.devices.clone();
    for d in &mut devices {
        d.vhost_user.rings.clear();
    }
    Prepare {
        config: s.config,
        devices,
    }
}

fn hello(role: Role) -> Hello {
    let mut h = Hello::new(role);
    h.pid = 4242; // stable seeds
    h
}

fn ack_failed() -> Ack {
    Ack::failed(
        "restoring device 0: vhost-user back-end /run/baton/blk0.sock refused SET_VRING_BASE",
    )
}

fn abort() -> Abort {
    Abort {
        reason: "live-update protocol 2 is not supported by this build (1)".into(),
    }
}

fn manifest() -> Manifest {
    Manifest {
        names: vec!["inflight-blk0".into(), "vfio-container".into()],
        more: false,
    }
}

fn protocol() {
    let msgs: Vec<(&str, FrameKind, Vec<u8>)> = vec![
        ("hello", HELLO_KIND, payload(&hello(Role::Outgoing))),
        ("prepare", PREPARE_KIND, payload(&prepare())),
        (
            "prepared",
            PREPARED_KIND,
            payload(&Ready { phases: phases() }),
        ),
        ("state", STATE_KIND, payload(&VmState::example(1))),
        ("ready", READY_KIND, payload(&Ready { phases: phases() })),
        (
            "commit",
            COMMIT_KIND,
            payload(&Commit {
                committed_at_unix_ns: 1_764_000_000_123_456_789,
            }),
        ),
        ("ack", ACK_KIND, payload(&Ack::ok(phases()))),
        ("ack-failed", ACK_KIND, payload(&ack_failed())),
        ("abort", ABORT_KIND, payload(&abort())),
        ("manifest", MANIFEST_KIND, payload(&manifest())),
    ];
    for (name, kind, p) in &msgs {
        write("protocol_frame", name, &cat(&[&[0], &frame(kind, p)]));
        // The same with the header fixed up by the target (mode bit 0).
        let mode = 1 | (kind_index(kind) << 1);
        write(
            "protocol_frame",
            &format!("{name}-fixup"),
            &cat(&[&[mode], &frame(kind, p)]),
        );
    }
    let hello_then_abort = cat(&[
        &[0],
        &encode_frame(&HELLO_KIND, &hello(Role::Incoming)).expect("hello"),
        &encode_frame(&ABORT_KIND, &abort()).expect("abort"),
    ]);
    write("protocol_frame", "hello-then-abort", &hello_then_abort);

    // protocol_state: [mode][payload]
    write(
        "protocol_state",
        "example-1",
        &cat(&[&[0], &payload(&VmState::example(1))]),
    );
    write(
        "protocol_state",
        "example-2",
        &cat(&[&[0], &payload(&VmState::example(2))]),
    );
    write(
        "protocol_state",
        "recv-state",
        &cat(&[&[1], &payload(&VmState::example(1))]),
    );
    write(
        "protocol_state",
        "recv-abort",
        &cat(&[&[3], &payload(&abort())]),
    );

    // protocol_handshake: [step][kind][payload]
    let hs = |name: &str, step: u8, kind: u8, p: Vec<u8>| {
        write("protocol_handshake", name, &cat(&[&[step, kind], &p]))
    };
    let k = |f: &FrameKind| kind_index(f);
    hs(
        "hello-incoming",
        0,
        k(&HELLO_KIND),
        payload(&hello(Role::Outgoing)),
    );
    hs(
        "hello-outgoing",
        0,
        k(&HELLO_KIND) | 0x40,
        payload(&hello(Role::Incoming)),
    );
    hs("prepare", 1, k(&PREPARE_KIND), payload(&prepare()));
    hs("prepare-aborted", 1, k(&ABORT_KIND), payload(&abort()));
    hs(
        "prepared",
        2,
        k(&PREPARED_KIND),
        payload(&Ready { phases: phases() }),
    );
    hs(
        "ready",
        3,
        k(&READY_KIND),
        payload(&Ready { phases: phases() }),
    );
    hs("ready-refused", 3, k(&ACK_KIND), payload(&ack_failed()));
    hs("ready-aborted", 3, k(&ABORT_KIND), payload(&abort()));
    hs("commit", 4, k(&COMMIT_KIND), payload(&Commit::default()));
    hs("ack", 5, k(&ACK_KIND), payload(&Ack::ok(phases())));
    hs("ack-failed", 5, k(&ACK_KIND), payload(&ack_failed()));
    hs(
        "prepare-raw",
        1,
        0x80,
        encode_frame(&PREPARE_KIND, &prepare()).expect("prepare"),
    );
    hs(
        "send-abort",
        6,
        0,
        "rolling back: new VMM (pid 4242) exited with status 1 — « état invalide »"
            .as_bytes()
            .to_vec(),
    );
    // A reason cut at the 4096-byte cap in the middle of a multi-byte character.
    let mut long = "x".repeat(4095);
    long.push('é');
    hs("send-abort-long", 6, 0, long.into_bytes());

    // cpr_manifest: [mode][fds][uid][payload]
    let cpr = |name: &str, mode: u8, fds: u8, p: Vec<u8>| {
        write("cpr_manifest", name, &cat(&[&[mode, fds, 0], &p]))
    };
    cpr("two-fds", 0, 2, payload(&manifest()));
    cpr(
        "inflight-per-device",
        0,
        3,
        payload(&Manifest {
            names: vec![
                "inflight-blk0".into(),
                "inflight-blk1".into(),
                "inflight-net0".into(),
            ],
            more: false,
        }),
    );
    cpr("none", 0, 0, payload(&Manifest {
            names: vec![],
            more: false,
        }));
    cpr("count-mismatch", 0, 1, payload(&manifest()));
    cpr("hang-up", 2, 0, payload(&manifest()));
    cpr(
        "raw",
        1,
        2,
        encode_frame(&MANIFEST_KIND, &manifest()).expect("manifest"),
    );
}

// ---------------------------------------------------------------- virtio-blk

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

fn blk_hdr(t: u32, sector: u64) -> Vec<u8> {
    cat(&[&t.to_le_bytes(), &0u32.to_le_bytes(), &sector.to_le_bytes()])
}

fn segment(sector: u64, num: u32, flags: u32) -> Vec<u8> {
    cat(&[
        &sector.to_le_bytes(),
        &num.to_le_bytes(),
        &flags.to_le_bytes(),
    ])
}

/// Lays out the requests of a virtio-blk driver: header at `0x800 + 0x40 * n`, data in RAM1,
/// status bytes at `0xc00 + n`, descriptors from `next` in `table`; `heads` collects the heads.
struct BlkRequests<'a> {
    img: &'a mut Image,
    table: u64,
    next: u16,
    n: u64,
    heads: Vec<u16>,
}

impl BlkRequests<'_> {
    fn add(&mut self, t: u32, sector: u64, data: Option<(u32, bool)>, out: Option<Vec<u8>>) {
        let hdr_at = 0x800 + 0x40 * self.n;
        let status = 0xc00 + self.n;
        let head = self.next;
        self.img.put(hdr_at, &blk_hdr(t, sector));
        let mut i = self.next;
        self.img.desc(self.table, i, hdr_at, 16, F_NEXT, i + 1);
        i += 1;
        if let Some(bytes) = out {
            let at = hdr_at + 16;
            self.img.put(at, &bytes);
            let len = u32::try_from(bytes.len()).expect("len");
            self.img.desc(self.table, i, at, len, F_NEXT, i + 1);
            i += 1;
        }
        if let Some((len, write)) = data {
            let addr = RAM1 + 0x1000 * self.n;
            let flags = F_NEXT | if write { F_WRITE } else { 0 };
            self.img.desc(self.table, i, addr, len, flags, i + 1);
            i += 1;
        }
        self.img.desc(self.table, i, status, 1, F_WRITE, 0);
        self.next = i + 1;
        self.n += 1;
        self.heads.push(head);
    }

    /// A read through an indirect table at `0xd00 + 0x40 * n`.
    fn add_indirect_read(&mut self, sector: u64) {
        let hdr_at = 0x800 + 0x40 * self.n;
        let status = 0xc00 + self.n;
        let itab = 0xd00 + 0x40 * self.n;
        self.img.put(hdr_at, &blk_hdr(T_IN, sector));
        self.img.desc(itab, 0, hdr_at, 16, F_NEXT, 1);
        self.img
            .desc(itab, 1, RAM1 + 0x1000 * self.n, 512, F_NEXT | F_WRITE, 2);
        self.img.desc(
            itab,
            2,
            RAM1 + 0x1000 * self.n + 512,
            512,
            F_NEXT | F_WRITE,
            3,
        );
        self.img.desc(itab, 3, status, 1, F_WRITE, 0);
        self.img
            .desc(self.table, self.next, itab, 4 * 16, F_INDIRECT, 0);
        self.heads.push(self.next);
        self.next += 1;
        self.n += 1;
    }
}

fn blk_request_seed(name: &str, build: impl FnOnce(&mut BlkRequests<'_>)) {
    let mut img = Image::new();
    let mut reqs = BlkRequests {
        img: &mut img,
        table: 0,
        next: 0,
        n: 0,
        heads: Vec::new(),
    };
    build(&mut reqs);
    let head = reqs.heads[0];
    // queue size, head, table, max descriptors, flags, serial length, sectors, spare
    let hdr = cat(&[
        &64u16.to_le_bytes(),
        &head.to_le_bytes(),
        &0u32.to_le_bytes(),
        &[255, 0, 9],
        &2048u32.to_le_bytes(),
        &[0],
    ]);
    write("blk_request", name, &cat(&[&hdr, &img.trimmed()]));
}

fn blk() {
    blk_request_seed("read", |r| r.add(T_IN, 8, Some((4096, true)), None));
    blk_request_seed("write", |r| r.add(T_OUT, 16, Some((1024, false)), None));
    blk_request_seed("flush", |r| r.add(T_FLUSH, 0, None, None));
    blk_request_seed("get-id", |r| r.add(T_GET_ID, 0, Some((20, true)), None));
    blk_request_seed("discard", |r| {
        r.add(T_DISCARD, 0, None, Some(segment(64, 8, 0)))
    });
    blk_request_seed("write-zeroes-unmap", |r| {
        let segs = cat(&[&segment(0, 8, 1), &segment(128, 16, 0)]);
        r.add(T_WRITE_ZEROES, 0, None, Some(segs))
    });
    blk_request_seed("indirect-read", |r| r.add_indirect_read(4));
    blk_request_seed("unsupported", |r| r.add(99, 0, None, None));

    // blk_ring: [queue size][flags][sectors][layout][inflight?][RAM0]
    let ring = RingLayout {
        size: 64,
        desc: 0,
        avail: 0x400,
        used: 0x600,
        next_avail: 0,
    };
    let mixed = |img: &mut Image| -> Vec<u16> {
        let mut r = BlkRequests {
            img,
            table: ring.desc,
            next: 0,
            n: 0,
            heads: Vec::new(),
        };
        r.add(T_IN, 8, Some((4096, true)), None);
        r.add(T_OUT, 16, Some((2048, false)), None);
        r.add_indirect_read(32);
        r.add(T_FLUSH, 0, None, None);
        r.add(T_GET_ID, 0, Some((20, true)), None);
        r.add(T_DISCARD, 0, None, Some(segment(64, 8, 0)));
        r.add(T_WRITE_ZEROES, 0, None, Some(segment(96, 8, 1)));
        r.heads
    };
    let ring_seed = |name: &str, flags: u8, inflight: Option<Vec<u8>>, img: &Image| {
        let mut b = cat(&[&[6, flags], &2048u16.to_le_bytes(), &ring.bytes()]);
        if let Some(inf) = inflight {
            b.extend_from_slice(&u16::try_from(inf.len()).expect("len").to_le_bytes());
            b.extend_from_slice(&inf);
        }
        b.extend_from_slice(&img.trimmed());
        write("blk_ring", name, &b);
    };
    let mut img = Image::new();
    let heads = mixed(&mut img);
    img.avail(&ring, u16::try_from(heads.len()).expect("n"), 0, &heads);
    ring_seed("mixed", 0, None, &img);
    ring_seed("mixed-event-idx", 1, None, &img);
    ring_seed("mixed-readonly-write-through", 4 | 8, None, &img);
    // A previous back-end took the first two requests and died: both are marked inflight
    // (counters 7 and 8) in the region and are no longer counted in the avail ring.
    let mut inf = vec![0u8; 16 + 16 * 64];
    inf[8..10].copy_from_slice(&1u16.to_le_bytes()); // version
    inf[10..12].copy_from_slice(&64u16.to_le_bytes()); // desc_num
    for (k, &h) in heads.iter().take(2).enumerate() {
        let d = 16 + 16 * usize::from(h);
        inf[d] = 1;
        inf[d + 8..d + 16].copy_from_slice(&(7 + k as u64).to_le_bytes());
    }
    ring_seed("inflight-resubmit", 2, Some(inf.clone()), &img);
    ring_seed("inflight-resubmit-event-idx", 3, Some(inf.clone()), &img);
    // Regression (fixed): leftover counters at the top of the range overflowed the next one.
    for (k, &h) in heads.iter().take(2).enumerate() {
        let d = 16 + 16 * usize::from(h);
        inf[d + 8..d + 16].copy_from_slice(&(u64::MAX - 1 + k as u64).to_le_bytes());
    }
    ring_seed("regression-inflight-counter-max", 2, Some(inf), &img);
}

// ---------------------------------------------------------------- virtio-net

const OFFERED: u64 = baton_net_tap::virtio::OFFERED;

fn net_hdr(
    flags: u8,
    gso: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_off: u16,
) -> Vec<u8> {
    cat(&[
        &[flags, gso],
        &hdr_len.to_le_bytes(),
        &gso_size.to_le_bytes(),
        &csum_start.to_le_bytes(),
        &csum_off.to_le_bytes(),
        &1u16.to_le_bytes(), // num_buffers
    ])
}

/// An Ethernet + IPv4 + UDP frame of `len` bytes.
fn udp_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    let ip_len = u16::try_from(len - 14).expect("len");
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 0, 0, 2]);
    f[30..34].copy_from_slice(&[10, 0, 0, 1]);
    f[34..36].copy_from_slice(&7000u16.to_be_bytes());
    f[36..38].copy_from_slice(&7u16.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn net() {
    let ring = RingLayout {
        size: 64,
        desc: 0,
        avail: 0x400,
        used: 0x600,
        next_avail: 0,
    };
    let tx = |img: &mut Image| -> Vec<u16> {
        // 0: no offload, header and frame in one buffer.
        let plain = cat(&[&net_hdr(0, 0, 0, 0, 0, 0), &udp_frame(60)]);
        img.put(0x800, &plain);
        img.desc(0, 0, 0x800, u32::try_from(plain.len()).expect("len"), 0, 0);
        // 1: checksum offload, header in its own buffer.
        let h = net_hdr(1, 0, 0, 0, 34, 6);
        img.put(0x900, &h);
        img.put(0xa00, &udp_frame(1514));
        img.desc(0, 1, 0x900, 12, F_NEXT, 2);
        img.desc(0, 2, 0xa00, 1514, 0, 0);
        // 3: TCPv4 segmentation offload, payload in RAM1.
        let h = net_hdr(1, 1, 54, 1448, 34, 16);
        img.put(0x1000, &h);
        let mut tcp = udp_frame(54);
        tcp[23] = 6;
        img.put(0x1100, &tcp);
        img.desc(0, 3, 0x1000, 12, F_NEXT, 4);
        img.desc(0, 4, 0x1100, 54, F_NEXT, 5);
        img.desc(0, 5, RAM1, 8000, 0, 0);
        // 6: an indirect chain of three segments.
        img.desc(0x1200, 0, 0x900, 12, F_NEXT, 1);
        img.desc(0x1200, 1, 0xa00, 600, F_NEXT, 2);
        img.desc(0x1200, 2, 0xa00 + 600, 914, 0, 0);
        img.desc(0, 6, 0x1200, 48, F_INDIRECT, 0);
        vec![0, 1, 3, 6]
    };
    let seed = |name: &str, features: u64, flags: u8, img: &Image| {
        let loose = net_hdr(1, 4, 74, 1428, 54, 16);
        let b = cat(&[
            &features.to_le_bytes(),
            &[flags],
            &loose[..10],
            &1514u16.to_le_bytes(),
            &ring.bytes(),
            &img.trimmed(),
        ]);
        write("net_tx_header", name, &b);
    };
    let mut img = Image::new();
    let heads = tx(&mut img);
    img.avail(&ring, u16::try_from(heads.len()).expect("n"), 0, &heads);
    seed("tx-all-offloads", OFFERED, 0, &img);
    seed("tx-no-offloads", 1 << 32, 0, &img);
    // RX: device-writable buffers, one per chain, and a mergeable-buffer chain of two.
    let mut rx = Image::new();
    rx.desc(0, 0, RAM1, 1526, F_WRITE, 0);
    rx.desc(0, 1, RAM1 + 0x1000, 4096, F_WRITE | F_NEXT, 2);
    rx.desc(0, 2, RAM1 + 0x2000, 4096, F_WRITE, 0);
    rx.avail(&ring, 2, 0, &[0, 1]);
    seed("rx-buffers", OFFERED, 1, &rx);

    // net_ctrl: [features][layout][RAM0]; each command: class+cmd, data, ack.
    let mut img = Image::new();
    let cmds: [(u8, u8, Vec<u8>); 6] = [
        (4, 0, 1u16.to_le_bytes().to_vec()), // MQ: VQ_PAIRS_SET 1
        (0, 0, vec![1]),                     // RX: PROMISC on
        (
            1,
            0,
            cat(&[
                &0u32.to_le_bytes(),
                &1u32.to_le_bytes(),
                &[2, 0, 0, 0, 0, 9],
            ]),
        ), // MAC: TABLE_SET
        (2, 0, 5u16.to_le_bytes().to_vec()), // VLAN: ADD 5
        (3, 0, vec![]),                      // ANNOUNCE: ACK
        (9, 9, vec![0; 4]),                  // unknown class
    ];
    let mut heads = Vec::new();
    let mut d = 0u16;
    for (n, (class, cmd, data)) in cmds.iter().enumerate() {
        let at = 0x800 + 0x40 * n as u64;
        img.put(at, &[*class, *cmd]);
        img.put(at + 2, data);
        heads.push(d);
        img.desc(0, d, at, 2, F_NEXT, d + 1);
        d += 1;
        if !data.is_empty() {
            let len = u32::try_from(data.len()).expect("len");
            img.desc(0, d, at + 2, len, F_NEXT, d + 1);
            d += 1;
        }
        img.desc(0, d, 0xc00 + n as u64, 1, F_WRITE, 0);
        d += 1;
    }
    img.avail(&ring, u16::try_from(heads.len()).expect("n"), 0, &heads);
    let ctrl = |name: &str, features: u64| {
        write(
            "net_ctrl",
            name,
            &cat(&[&features.to_le_bytes(), &ring.bytes(), &img.trimmed()]),
        )
    };
    ctrl("commands", OFFERED & !(1 << 29));
    ctrl("commands-event-idx", OFFERED);
}

// ---------------------------------------------------------------- vhost-user

const VRING_STATE: fn(u32, u32) -> Vec<u8> = |i, n| cat(&[&i.to_le_bytes(), &n.to_le_bytes()]);

/// Front-end virtual address of guest address 0 (as QEMU maps guest RAM).
const UADDR: u64 = 0x7f12_3400_0000;

/// One guest RAM region of `size` bytes at guest address 0, `offset` bytes into the memfd.
fn mem_table(size: u64, offset: u64) -> Vec<u8> {
    cat(&[
        &1u32.to_le_bytes(),
        &0u32.to_le_bytes(),
        &0u64.to_le_bytes(),
        &size.to_le_bytes(),
        &UADDR.to_le_bytes(),
        &offset.to_le_bytes(),
    ])
}

/// VhostUserInflight: `repr(C)`, so 24 bytes with its tail padding.
fn inflight(size: u64, offset: u64, queues: u16, qsize: u16) -> Vec<u8> {
    cat(&[
        &size.to_le_bytes(),
        &offset.to_le_bytes(),
        &queues.to_le_bytes(),
        &qsize.to_le_bytes(),
        &[0; 4],
    ])
}

fn config(offset: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    cat(&[
        &offset.to_le_bytes(),
        &size.to_le_bytes(),
        &0u32.to_le_bytes(),
        payload,
    ])
}

/// SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL and _ENABLE (with REPLY_ACK) for ring `i`, whose
/// rings sit at `0x10000 * (i + 1)` in guest memory.
fn ring_setup(i: u32, size: u32) -> Vec<u8> {
    let base = UADDR + 0x10000 * u64::from(i + 1);
    let addr = cat(&[
        &i.to_le_bytes(),
        &0u32.to_le_bytes(),
        &base.to_le_bytes(),
        &(base + 0x2000).to_le_bytes(),
        &(base + 0x1000).to_le_bytes(),
        &0u64.to_le_bytes(),
    ]);
    cat(&[
        &message(code::SET_VRING_NUM, 0, &VRING_STATE(i, size)),
        &message(code::SET_VRING_BASE, 0, &VRING_STATE(i, 0)),
        &message(code::SET_VRING_ADDR, 0, &addr),
        &message_u64(code::SET_VRING_KICK, &[u64::from(i)]),
        &message_u64(code::SET_VRING_CALL, &[u64::from(i)]),
        &message(code::SET_VRING_ENABLE, NEED_REPLY, &VRING_STATE(i, 1)),
    ])
}

fn vhost() {
    // baton-blk: features as baton-vmm (and QEMU 10) negotiate them.
    let blk_features: u64 =
        (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | (1 << 12) | (1 << 9) | (1 << 6) | (1 << 2);
    let blk_protocol: u64 = 1 | (1 << 3) | (1 << 9) | (1 << 12) | (1 << 13);
    let region = 8320u64; // 2 queues of 256: 2 * align_up(16 * 256 + 2, 64)
    let common = |features: u64, protocol: u64| {
        cat(&[
            &message(code::GET_FEATURES, 0, &[]),
            &message(code::GET_PROTOCOL_FEATURES, 0, &[]),
            &message_u64(code::SET_PROTOCOL_FEATURES, &[protocol]),
            &message(code::GET_QUEUE_NUM, 0, &[]),
            &message(code::SET_OWNER, 0, &[]),
            // QEMU 10 enables ring 0 before SET_FEATURES.
            &message(code::SET_VRING_ENABLE, 0, &VRING_STATE(0, 1)),
            &message_u64(code::SET_FEATURES, &[features]),
        ])
    };
    // The inflight region and guest RAM share the front-end's memfd: `inflight_at` and
    // `ram_at` are their offsets in it.
    let blk_session = |inflight_at: u64, ram_at: u64| {
        cat(&[
            &common(blk_features, blk_protocol),
            &message(code::GET_CONFIG, 0, &config(0, 60, &[0; 60])),
            &message(code::GET_INFLIGHT_FD, 0, &inflight(0, 0, 2, 256)),
            &message(
                code::SET_INFLIGHT_FD,
                0,
                &inflight(region, inflight_at, 2, 256),
            ),
            &message(code::SET_MEM_TABLE, NEED_REPLY, &mem_table(0x40000, ram_at)),
            &ring_setup(0, 256),
            &ring_setup(1, 256),
            &message(code::SET_CONFIG, NEED_REPLY, &config(32, 1, &[0])),
            &message(code::GET_VRING_BASE, 0, &VRING_STATE(0, 0)),
            &message(code::GET_VRING_BASE, 0, &VRING_STATE(1, 0)),
            &message(code::RESET_DEVICE, 0, &[]),
        ])
    };
    let stream = |which: u8, init: &[u8], msgs: &[u8]| {
        cat(&[
            &[which],
            &u16::try_from(init.len()).expect("init").to_le_bytes(),
            init,
            msgs,
        ])
    };
    write(
        "vhost_user_stream",
        "blk-session",
        &stream(0, &[], &blk_session(0x80000, 0)),
    );
    // The same session after a back-end restart: the inflight region (at the start of the
    // memfd, whose first bytes the input gives) still marks heads 0 and 5 of queue 0.
    let mut init = vec![0u8; 16 + 16 * 6];
    init[8..10].copy_from_slice(&1u16.to_le_bytes());
    init[10..12].copy_from_slice(&256u16.to_le_bytes());
    for (k, h) in [0usize, 5].into_iter().enumerate() {
        init[16 + 16 * h] = 1;
        init[16 + 16 * h + 8] = 3 + k as u8;
    }
    write(
        "vhost_user_stream",
        "blk-restart-inflight",
        &stream(0, &init, &blk_session(0, 0x40000)),
    );
    write(
        "vhost_user_stream",
        "blk-no-protocol-features",
        &stream(
            0,
            &[],
            &cat(&[
                &message(code::SET_OWNER, 0, &[]),
                &message_u64(code::SET_FEATURES, &[blk_features & !(1 << 30)]),
                &message(code::SET_MEM_TABLE, 0, &mem_table(0x40000, 0)),
                &ring_setup(0, 128),
                &message(code::RESET_OWNER, 0, &[]),
            ]),
        ),
    );

    // baton-net-tap (no TAP queue in the harness: ring 0 is the control queue).
    let net_features: u64 = OFFERED;
    let net_protocol: u64 = 1 | (1 << 3) | (1 << 9);
    let net_session = cat(&[
        &common(net_features, net_protocol),
        &message(code::SET_MEM_TABLE, NEED_REPLY, &mem_table(0x40000, 0)),
        &ring_setup(0, 64),
        &message(code::GET_CONFIG, 0, &config(0, 12, &[0; 12])),
        &message(code::GET_VRING_BASE, 0, &VRING_STATE(0, 0)),
        &message(code::RESET_OWNER, 0, &[]),
    ]);
    write(
        "vhost_user_stream",
        "net-session",
        &stream(1, &[], &net_session),
    );
}

/// Minimal inputs for the livelocks fuzzing found (all fixed), kept as seeds so that
/// `./fuzz.sh --smoke` runs them.
fn regressions() {
    // A ring of 1: descriptors at 0x100, the rings at `avail` and `used`.
    let layout = |avail: u64, used: u64| RingLayout {
        size: 1,
        desc: 0x100,
        avail,
        used,
        next_avail: 0,
    };
    let image = |avail: u64| {
        let mut img = Image::new();
        img.desc(0x100, 0, 0x800, 16, 0, 0);
        img.put(avail + 2, &1u16.to_le_bytes()); // one request available
        img.trimmed()
    };
    let blk = |flags: u8, ring: RingLayout, avail: u64| {
        cat(&[
            &[6, flags],
            &2048u16.to_le_bytes(),
            &ring.bytes(),
            &image(avail),
        ])
    };
    let net =
        |ring: RingLayout, avail: u64| cat(&[&0u64.to_le_bytes(), &ring.bytes(), &image(avail)]);
    // The used ring on the avail ring: each completion moved the avail index one further.
    let over = layout(0x200, 0x200);
    write(
        "blk_ring",
        "regression-used-ring-on-avail-ring",
        &blk(0, over, 0x200),
    );
    write(
        "net_ctrl",
        "regression-used-ring-on-avail-ring",
        &net(over, 0x200),
    );
    // The avail ring at guest address 0: virtio-queue refuses to iterate it.
    write(
        "blk_ring",
        "regression-avail-ring-at-0-event-idx",
        &blk(1, layout(0, 0x200), 0),
    );
    write(
        "net_ctrl",
        "regression-avail-ring-at-0",
        &net(layout(0, 0x200), 0),
    );
    // The avail ring's first entry past the end of RAM0 (in the hole).
    let past = layout(0xfffc, 0x200);
    write(
        "net_ctrl",
        "regression-avail-ring-past-memory",
        &net(past, 0xfffc),
    );
    // (blk, EVENT_IDX) the avail ring's third entry past the 4 KiB a second memory table
    // leaves while the ring runs.
    let cut = RingLayout {
        size: 4,
        desc: 0x100,
        avail: 0xff8,
        used: 0x400,
        next_avail: 2,
    };
    let mut img = Image::new();
    img.desc(0x100, 0, 0x800, 16, 0, 0);
    img.put(0xffa, &3u16.to_le_bytes());
    write(
        "blk_ring",
        "regression-avail-ring-cut-by-set-mem-table",
        &cat(&[
            &[6, 1 | 16],
            &2048u16.to_le_bytes(),
            &cut.bytes(),
            &img.trimmed(),
        ]),
    );
}

fn main() {
    protocol();
    blk();
    net();
    vhost();
    regressions();
    println!(
        "seeds written under {}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .display()
    );
}
