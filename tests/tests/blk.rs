//! baton-blk through the host-side vhost-user driver: every request type, multi-queue,
//! reconnects, a second front-end in standby (a third refused), QEMU's message order, SIGTERM.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use baton_tests::blk::*;
use baton_tests::harness::wait_until;
use baton_tests::vhost_user::blk::*;

const MIB: u64 = 1 << 20;

fn opts(queues: u16) -> BlkOptions {
    BlkOptions {
        queues,
        mem_size: 32 * MIB,
        slots: 32,
        ..BlkOptions::default()
    }
}

#[test]
fn every_request_type_against_the_image() {
    every_request_type(&[]);
}

#[test]
fn every_request_type_with_the_sync_engine() {
    every_request_type(&["--io-engine", "sync"]);
}

#[test]
fn every_request_type_with_o_direct() {
    // O_DIRECT needs a file system that supports it (not tmpfs): use the target directory.
    let probe = harness_dir().join("odirect-probe");
    std::fs::write(&probe, vec![0u8; 4096]).unwrap();
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    if !ok {
        baton_tests::harness::cannot_run(
            "odirect",
            &format!("O_DIRECT unsupported on {}", harness_dir().display()),
        );
        return;
    }
    every_request_type(&["--direct"]);
}

fn harness_dir() -> std::path::PathBuf {
    baton_tests::harness::target_dir()
}

use std::os::unix::fs::OpenOptionsExt;

fn every_request_type(extra: &[&str]) {
    let mut args = vec!["--serial", "baton-test-serial"];
    args.extend_from_slice(extra);
    let b = if extra.contains(&"--direct") {
        let dir = harness_dir().join(format!("blk-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        Blk::start_on(dir, img, &args)
    } else {
        Blk::start(16 * MIB, &args)
    };
    let mut d = BlkDriver::connect(&b.sock, opts(1)).unwrap();
    assert_eq!(d.capacity, 16 * MIB / 512);
    let q = d.queue(0);

    // Writes of several sizes, read back, compared with the image file.
    let mut expect = vec![0u8; (16 * MIB) as usize];
    for (i, &(sector, len)) in [(0u64, 512usize), (7, 4096), (100, 65536), (32760, 4096)]
        .iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, len);
        assert_eq!(q.write(sector, &data).unwrap(), S_OK);
        let off = (sector * 512) as usize;
        expect[off..off + len].copy_from_slice(&data);
        let (st, back) = q.read(sector, len as u32).unwrap();
        assert_eq!(st, S_OK);
        assert_eq!(back, data);
    }
    assert_eq!(q.flush().unwrap(), S_OK);
    assert_eq!(b.image(), expect);

    // GET_ID returns the serial, zero padded to 20 bytes.
    let (st, id) = q.get_id().unwrap();
    assert_eq!(st, S_OK);
    assert_eq!(&id[..17], b"baton-test-serial");
    assert_eq!(&id[17..], &[0, 0, 0]);

    // DISCARD: the range reads back as zeroes on a file that supports hole punching.
    assert_eq!(q.ranges(T_DISCARD, &[(100, 128, 0)]).unwrap(), S_OK);
    expect[100 * 512..228 * 512].fill(0);
    // WRITE_ZEROES without and with unmap.
    assert_eq!(
        q.ranges(T_WRITE_ZEROES, &[(0, 1, 0), (7, 8, 1)]).unwrap(),
        S_OK
    );
    expect[0..512].fill(0);
    expect[7 * 512..15 * 512].fill(0);
    assert_eq!(q.flush().unwrap(), S_OK);
    assert_eq!(b.image(), expect);
    let (st, z) = q.read(100, 4096).unwrap();
    assert_eq!((st, z.iter().all(|&x| x == 0)), (S_OK, true));

    // Unknown request type.
    let done = q
        .run(Req {
            rtype: 99,
            sector: 0,
            out: &[],
            in_len: 0,
        })
        .unwrap();
    assert_eq!(done.status, S_UNSUPP);
}

#[test]
fn config_space_and_features() {
    let b = Blk::start(8 * MIB, &["--queues", "2"]);
    let mut d = BlkDriver::connect(&b.sock, opts(2)).unwrap();
    let c = d.conn().unwrap().config(0, 60).unwrap();
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        8 * MIB / 512
    );
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512); // blk_size
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2); // num_queues
    assert_eq!(c[32], 1); // writeback
    assert_eq!(d.conn().unwrap().queue_num().unwrap(), 2);
    for bit in [2, 6, 9, 10, 11, 12, 13, 14, 28, 29, 32] {
        assert!(
            d.conn().unwrap().offered & (1u64 << bit) != 0,
            "feature bit {bit} not offered"
        );
    }
    assert!(
        d.conn().unwrap().offered & (1 << 5) == 0,
        "RO offered on a writable disk"
    );
    // Write-through mode via CONFIG_WCE still works.
    d.conn().unwrap().set_config(32, &[0]).unwrap();
    assert_eq!(d.conn().unwrap().config(32, 1).unwrap(), vec![0]);
    let data = pattern(9, 4096);
    assert_eq!(d.queue(1).write(8, &data).unwrap(), S_OK);
    assert_eq!(&b.image()[4096..8192], &data[..]);
}

#[test]
fn multiqueue_in_parallel() {
    let b = Blk::start(32 * MIB, &["--queues", "2"]);
    let mut d = BlkDriver::connect(&b.sock, opts(2)).unwrap();
    let queues = std::mem::take(&mut d.queues);
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                // Each queue writes 256 blocks of 4 KiB with up to 16 in flight.
                let base = qi as u64 * 8 * 1024; // sectors: 4 MiB apart
                let mut next = 0u64;
                let mut done = 0u64;
                while done < 256 {
                    while next < 256 && q.in_flight() < 16 {
                        let data = pattern(1000 * qi as u64 + next, 4096);
                        q.submit(
                            Req {
                                rtype: T_OUT,
                                sector: base + next * 8,
                                out: &data,
                                in_len: 0,
                            },
                            next,
                        )
                        .unwrap();
                        next += 1;
                    }
                    q.kick().unwrap();
                    for c in q.wait(Duration::from_secs(10)).unwrap() {
                        assert_eq!(c.status, S_OK);
                        done += 1;
                    }
                }
                for i in 0..256u64 {
                    let (st, data) = q.read(base + i * 8, 4096).unwrap();
                    assert_eq!(st, S_OK);
                    assert_eq!(
                        data,
                        pattern(1000 * qi as u64 + i, 4096),
                        "queue {qi} block {i}"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let img = b.image();
    for qi in 0..2u64 {
        for i in 0..256u64 {
            let off = ((qi * 8 * 1024 + i * 8) * 512) as usize;
            assert_eq!(&img[off..off + 4096], &pattern(1000 * qi + i, 4096)[..]);
        }
    }
}

#[test]
fn disconnect_mid_io_then_reconnect_loses_and_duplicates_nothing() {
    let b = Blk::start(16 * MIB, &[]);
    let mut d = BlkDriver::connect(&b.sock, opts(1)).unwrap();
    // The image starts as zeroes: each 4 KiB block i gets pattern(i) exactly once.
    let mut completed: HashMap<u64, u32> = HashMap::new();
    let mut next = 0u64;
    for round in 0..3 {
        {
            let q = d.queue(0);
            for _ in 0..24 {
                let data = pattern(next, 4096);
                q.submit(
                    Req {
                        rtype: T_OUT,
                        sector: next * 8,
                        out: &data,
                        in_len: 0,
                    },
                    next,
                )
                .unwrap();
                next += 1;
            }
            q.kick().unwrap();
        }
        // Hang up immediately, with requests in flight, and come back.
        d.reconnect()
            .unwrap_or_else(|e| panic!("reconnect {round}: {e}"));
        let q = d.queue(0);
        let ok = wait_until(Duration::from_secs(10), || {
            for c in q.poll() {
                assert_eq!(c.status, S_OK);
                *completed.entry(c.tag).or_default() += 1;
            }
            (q.in_flight() == 0).then_some(())
        });
        assert!(
            ok.is_some(),
            "requests lost across the reconnect: {} in flight",
            q.in_flight()
        );
    }
    assert_eq!(completed.len() as u64, next);
    assert!(
        completed.values().all(|&n| n == 1),
        "a request completed twice"
    );
    // The device still works and the data is all there.
    let q = d.queue(0);
    for i in 0..next {
        let (st, data) = q.read(i * 8, 4096).unwrap();
        assert_eq!((st, data == pattern(i, 4096)), (S_OK, true), "block {i}");
    }
    let img = b.image();
    for i in 0..next as usize {
        assert_eq!(&img[i * 4096..(i + 1) * 4096], &pattern(i as u64, 4096)[..]);
    }
}

#[test]
fn state_survives_many_frontends_and_set_owner_is_not_a_trap() {
    let b = Blk::start(4 * MIB, &[]);
    for i in 0..4u64 {
        let mut d =
            BlkDriver::connect(&b.sock, opts(1)).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let q = d.queue(0);
        if i > 0 {
            let (st, data) = q.read((i - 1) * 8, 4096).unwrap();
            assert_eq!(
                (st, data == pattern(i - 1, 4096)),
                (S_OK, true),
                "data of front-end {}",
                i - 1
            );
        }
        assert_eq!(q.write(i * 8, &pattern(i, 4096)).unwrap(), S_OK);
        drop(d);
    }
}

/// A second front-end (a live update's next VMM connecting early) waits in standby: its
/// handshake is served, its device setup waits until the first goes, then it takes the device
/// over; a third is refused; the first is not disturbed.
#[test]
fn a_second_front_end_waits_in_standby_takes_over_and_a_third_is_refused() {
    let b = Blk::start(4 * MIB, &[]);
    let mut first = BlkDriver::connect(&b.sock, opts(1)).unwrap();
    assert_eq!(first.queue(0).write(0, &pattern(1, 4096)).unwrap(), S_OK);
    let sock = b.sock.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let standby = std::thread::spawn(move || {
        let d = BlkDriver::connect(&sock, opts(1));
        let _ = tx.send(());
        d
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the standby front-end set the device up while the first runs"
    );
    let mut third = UnixStream::connect(&b.sock).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        third.read(&mut [0u8; 1]).unwrap_or(0),
        0,
        "a third front-end is refused"
    );
    let q = first.queue(0);
    assert_eq!(q.write(8, &pattern(2, 4096)).unwrap(), S_OK);
    let (st, data) = q.read(0, 4096).unwrap();
    assert_eq!((st, data == pattern(1, 4096)), (S_OK, true));
    drop(first);
    let mut second = standby
        .join()
        .unwrap()
        .expect("the standby front-end takes the device over");
    let (st, data) = second.queue(0).read(8, 4096).unwrap();
    assert_eq!((st, data == pattern(2, 4096)), (S_OK, true));
}

fn msg(code: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&code.to_le_bytes());
    v.extend_from_slice(&(flags | 1).to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 12];
    s.read_exact(&mut h).unwrap();
    let size = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let mut body = vec![0u8; size];
    s.read_exact(&mut body).unwrap();
    let v = if size >= 8 {
        u64::from_le_bytes(body[..8].try_into().unwrap())
    } else {
        0
    };
    (u32::from_le_bytes(h[0..4].try_into().unwrap()), v)
}

#[test]
fn qemu10_order_set_vring_enable_before_set_features() {
    let b = Blk::start(4 * MIB, &[]);
    let mut s = UnixStream::connect(&b.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    const NEED_REPLY: u32 = 0x8;
    s.write_all(&msg(1, 0, &[])).unwrap(); // GET_FEATURES
    let (_, features) = reply(&mut s);
    assert!(features & (1 << 30) != 0);
    s.write_all(&msg(15, 0, &[])).unwrap(); // GET_PROTOCOL_FEATURES
    let (_, proto) = reply(&mut s);
    assert!(proto & (1 << 3) != 0, "REPLY_ACK"); // REPLY_ACK
    assert!(proto & (1 << 12) != 0, "INFLIGHT_SHMFD");
    s.write_all(&msg(16, 0, &proto.to_le_bytes())).unwrap(); // SET_PROTOCOL_FEATURES
    s.write_all(&msg(3, NEED_REPLY, &[])).unwrap(); // SET_OWNER
    assert_eq!(reply(&mut s), (3, 0));
    let mut body = Vec::new();
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    s.write_all(&msg(18, NEED_REPLY, &body)).unwrap(); // SET_VRING_ENABLE before SET_FEATURES
    assert_eq!(reply(&mut s), (18, 0), "SET_VRING_ENABLE was not acked");
    s.write_all(&msg(2, NEED_REPLY, &features.to_le_bytes()))
        .unwrap(); // SET_FEATURES
    assert_eq!(reply(&mut s), (2, 0));
    s.write_all(&msg(3, NEED_REPLY, &[])).unwrap(); // a second SET_OWNER on the same connection is refused
    assert_eq!(reply(&mut s).0, 3);
    drop(s);
    // And the next (regular) front-end is served.
    let mut d = wait_until(Duration::from_secs(10), || {
        BlkDriver::connect(&b.sock, opts(1)).ok()
    })
    .unwrap();
    assert_eq!(d.queue(0).write(0, &pattern(3, 512)).unwrap(), S_OK);
}

#[test]
fn sigterm_completes_and_exits_zero() {
    let mut b = Blk::start(4 * MIB, &[]);
    let mut d = BlkDriver::connect(&b.sock, opts(1)).unwrap();
    let q = d.queue(0);
    for i in 0..16u64 {
        q.submit(
            Req {
                rtype: T_OUT,
                sector: i * 8,
                out: &pattern(i, 4096),
                in_len: 0,
            },
            i,
        )
        .unwrap();
    }
    q.kick().unwrap();
    let st = b.signal_and_wait(libc::SIGTERM);
    assert_eq!(st.code(), Some(0), "exit status {st:?}");
    // Whatever was completed is in the image; and with nothing lost in the ring.
    let done: Vec<_> = q.poll();
    let img = b.image();
    for c in &done {
        assert_eq!(c.status, S_OK);
        let i = c.tag as usize;
        assert_eq!(&img[i * 4096..(i + 1) * 4096], &pattern(c.tag, 4096)[..]);
    }
}

#[test]
fn sigint_idle_exits_zero() {
    let mut b = Blk::start(MIB, &[]);
    assert!(b.alive());
    assert_eq!(b.signal_and_wait(libc::SIGINT).code(), Some(0));
}

fn region_u16(f: &std::fs::File, off: u64) -> u16 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, off).unwrap();
    u16::from_le_bytes(b)
}

#[test]
fn inflight_region_is_kept_on_every_request() {
    use std::os::unix::fs::FileExt;
    let b = Blk::start(4 * MIB, &[]);
    let mut d = BlkDriver::connect(&b.sock, opts(1)).unwrap();
    let q = d.queue(0);
    for round in 0..5u64 {
        for i in round * 8..round * 8 + 8 {
            q.submit(
                Req {
                    rtype: T_OUT,
                    sector: i * 8,
                    out: &pattern(i, 4096),
                    in_len: 0,
                },
                i,
            )
            .unwrap();
        }
        q.kick().unwrap();
        let mut n = 0;
        while n < 8 {
            n += q.wait(Duration::from_secs(10)).unwrap().len();
        }
    }
    let used = q.vq.device_used_idx();
    let (info, file) = d.inflight.as_ref().expect("no inflight region negotiated");
    assert_eq!(info.num_queues, 1);
    assert_eq!(region_u16(file, 8), 1, "version");
    assert_eq!(region_u16(file, 10), 256, "desc_num");
    assert_eq!(region_u16(file, 14), used, "used_idx");
    for h in 0..256u64 {
        let mut v = [0u8; 1];
        file.read_exact_at(&mut v, 16 + 16 * h).unwrap();
        assert_eq!(v[0], 0, "descriptor {h} still marked inflight");
    }
}

#[test]
fn restarted_backend_resubmits_inflight_requests() {
    use std::os::unix::fs::FileExt;
    let mut a = Blk::start(4 * MIB, &[]);
    let mut d = BlkDriver::connect(&a.sock, opts(1)).unwrap();
    assert_eq!(d.queue(0).write(0, &pattern(100, 4096)).unwrap(), S_OK);
    // The back-end crashes.
    a.proc.child.kill().unwrap();
    a.proc.child.wait().unwrap();
    // Four requests it had "popped" when it died: in the avail ring and marked inflight
    // in the region (the avail index moved past them), never completed.
    let mut heads = Vec::new();
    for i in 1..=4u64 {
        let h = d
            .queue(0)
            .submit(
                Req {
                    rtype: T_OUT,
                    sector: i * 8,
                    out: &pattern(100 + i, 4096),
                    in_len: 0,
                },
                i,
            )
            .unwrap();
        heads.push(h);
    }
    {
        let (_, file) = d.inflight.as_ref().unwrap();
        for (k, h) in heads.iter().enumerate() {
            let off = 16 + 16 * u64::from(*h);
            file.write_all_at(&(50 + k as u64).to_le_bytes(), off + 8)
                .unwrap();
            file.write_all_at(&[1], off).unwrap();
        }
    }
    // A new back-end on the same image and socket; the front-end reconnects with its region.
    std::fs::remove_file(&a.sock).unwrap();
    let b = Blk::start_on(a.dir.clone(), a.img.clone(), &[]);
    d.reconnect().unwrap();
    let q = d.queue(0);
    let mut done = HashMap::new();
    let ok = wait_until(Duration::from_secs(10), || {
        for c in q.poll() {
            assert_eq!(c.status, S_OK);
            *done.entry(c.tag).or_insert(0) += 1;
        }
        (q.in_flight() == 0).then_some(())
    });
    assert!(ok.is_some(), "inflight requests were not resubmitted");
    assert_eq!(done.len(), 4);
    assert!(done.values().all(|&n| n == 1));
    // New requests continue after the resubmitted ones.
    assert_eq!(q.write(40, &pattern(200, 4096)).unwrap(), S_OK);
    let img = b.image();
    for i in 0..=4u64 {
        let off = (i * 4096) as usize;
        assert_eq!(
            &img[off..off + 4096],
            &pattern(100 + i, 4096)[..],
            "block {i}"
        );
    }
    assert_eq!(&img[40 * 512..40 * 512 + 4096], &pattern(200, 4096)[..]);
}

#[test]
fn get_vring_base_stops_the_ring_until_restarted() {
    let b = Blk::start(4 * MIB, &[]);
    let mut d = BlkDriver::connect(&b.sock, opts(1)).unwrap();
    assert_eq!(d.queue(0).write(0, &pattern(1, 4096)).unwrap(), S_OK);
    let base = d.conn().unwrap().stop_queue(0).unwrap();
    assert_eq!(base, u32::from(d.queue(0).vq.avail_idx()));
    // A stopped ring: no used entries, no notification, no write to the disk.
    let used_before = d.queue(0).vq.device_used_idx();
    d.queue(0)
        .submit(
            Req {
                rtype: T_OUT,
                sector: 8,
                out: &pattern(2, 4096),
                in_len: 0,
            },
            7,
        )
        .unwrap();
    d.queue(0).kick().unwrap();
    assert!(
        d.queue(0).vq.wait(Duration::from_millis(300)).is_err(),
        "a stopped ring completed a request"
    );
    assert_eq!(d.queue(0).vq.device_used_idx(), used_before);
    assert!(b.image()[4096..8192].iter().all(|&v| v == 0));
    // Restarted at the returned base, the pending request is processed.
    let mut d2 = d;
    let (conn, q) = {
        let q = std::mem::take(&mut d2.queues);
        (d2.conn().unwrap(), q)
    };
    conn.start_queue(&q[0].vq, base as u16).unwrap();
    d2.queues = q;
    let c = d2.queue(0).wait(Duration::from_secs(10)).unwrap();
    assert_eq!((c.len(), c[0].status, c[0].tag), (1, S_OK, 7));
    assert_eq!(&b.image()[4096..8192], &pattern(2, 4096)[..]);
}

#[test]
fn inflight_mark_is_visible_while_a_request_is_in_flight() {
    use std::os::unix::fs::FileExt;
    let b = Blk::start(4 * MIB, &["--test-delay-ms", "300"]);
    let mut d = BlkDriver::connect(&b.sock, opts(1)).unwrap();
    let head = d
        .queue(0)
        .submit(
            Req {
                rtype: T_OUT,
                sector: 0,
                out: &pattern(5, 4096),
                in_len: 0,
            },
            1,
        )
        .unwrap();
    d.queue(0).kick().unwrap();
    let off = 16 + 16 * u64::from(head);
    let marked = {
        let (_, file) = d.inflight.as_ref().unwrap();
        wait_until(Duration::from_secs(5), || {
            let mut v = [0u8; 1];
            file.read_exact_at(&mut v, off).unwrap();
            (v[0] == 1).then_some(())
        })
    };
    assert!(marked.is_some(), "head {head} never marked inflight");
    let c = d.queue(0).wait(Duration::from_secs(10)).unwrap();
    assert_eq!(c[0].status, S_OK);
    let (_, file) = d.inflight.as_ref().unwrap();
    let mut v = [0u8; 1];
    file.read_exact_at(&mut v, off).unwrap();
    assert_eq!(v[0], 0, "still marked after completion");
}
