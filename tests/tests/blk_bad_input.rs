//! Hostile input to baton-blk through the host-side driver: every bad request gets IOERR or
//! UNSUPP (or, when it has no status byte, is returned with len 0), and the back-end keeps
//! serving. Plus command-line errors, socket activation and sd_notify.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

use std::os::unix::net::{UnixDatagram, UnixListener};
use std::time::Duration;

use baton_tests::blk::*;
use baton_tests::harness::{bin, wait_until};
use baton_tests::vhost_user::blk::*;
use baton_tests::vhost_user::virtq::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, RawDesc};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
const MEM: u64 = 16 * MIB;

fn connect(b: &Blk, queue_size: u16) -> BlkDriver {
    BlkDriver::connect(
        &b.sock,
        BlkOptions {
            queues: 1,
            queue_size,
            mem_size: MEM,
            slots: 8,
            ..BlkOptions::default()
        },
    )
    .unwrap()
}

/// A raw descriptor: (addr, len, flags); `next` links are filled in by `raw_chain`.
type D = (u64, u32, u16);

/// Publishes a chain of raw descriptors. `links[i]` = index (into `ds`) of the next one,
/// for descriptors with NEXT set. Returns (head, status address if any).
fn raw_chain(d: &mut BlkDriver, ds: &[D], links: &[Option<usize>]) -> u16 {
    let q = d.queue(0);
    let ids = q.vq.alloc_descs(ds.len()).unwrap();
    for (i, &(addr, len, flags)) in ds.iter().enumerate() {
        let next = links.get(i).copied().flatten().map(|j| ids[j]);
        let flags = if next.is_some() {
            flags | DESC_F_NEXT
        } else {
            flags
        };
        q.vq.write_desc(
            ids[i],
            RawDesc {
                addr,
                len,
                flags,
                next: next.unwrap_or(0),
            },
        )
        .unwrap();
    }
    let head = ids[0];
    q.vq.track(ids);
    q.vq.publish(head).unwrap();
    q.vq.kick().unwrap();
    head
}

fn seq(n: usize) -> Vec<Option<usize>> {
    (0..n).map(|i| (i + 1 < n).then_some(i + 1)).collect()
}

struct Bufs {
    hdr: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

fn bufs(d: &BlkDriver, rtype: u32, sector: u64) -> Bufs {
    let hdr = d.mem.alloc(16, 16).unwrap();
    let data = d.mem.alloc(4096, 4096).unwrap();
    let status = d.mem.alloc(1, 1).unwrap();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&rtype.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem.write(hdr, &h).unwrap();
    d.mem.write(status, &[S_UNSET]).unwrap();
    Bufs { hdr, data, status }
}

fn status(d: &BlkDriver, b: &Bufs) -> u8 {
    d.mem.read(b.status, 1).unwrap()[0]
}

/// The back-end still serves well-formed requests.
fn still_serving(d: &mut BlkDriver, seed: u64) {
    let q = d.queue(0);
    let data = pattern(seed, 4096);
    assert_eq!(
        q.write(64, &data).unwrap(),
        S_OK,
        "back-end stopped serving writes"
    );
    let (st, back) = q.read(64, 4096).unwrap();
    assert_eq!(
        (st, back == data),
        (S_OK, true),
        "back-end stopped serving reads"
    );
}

#[test]
fn requests_past_the_end_of_the_disk() {
    let b = Blk::start(MIB, &[]);
    let mut d = connect(&b, 256);
    let cap = d.capacity;
    let q = d.queue(0);
    assert_eq!(q.read(cap, 512).unwrap().0, S_IOERR);
    assert_eq!(q.read(cap - 1, 1024).unwrap().0, S_IOERR);
    assert_eq!(q.read(u64::MAX / 256, 512).unwrap().0, S_IOERR);
    assert_eq!(q.write(cap - 1, &[1u8; 1024]).unwrap(), S_IOERR);
    assert_eq!(q.read(cap - 1, 512).unwrap().0, S_OK);
    // Not a multiple of the sector size.
    assert_eq!(q.read(0, 100).unwrap().0, S_IOERR);
    still_serving(&mut d, 1);
    assert_eq!(b.image().len() as u64, MIB, "the image grew");
}

#[test]
fn write_discard_on_readonly() {
    let b = Blk::start(MIB, &["--readonly"]);
    let mut d = connect(&b, 256);
    assert!(
        d.conn().unwrap().offered & (1 << 5) != 0,
        "VIRTIO_BLK_F_RO not offered"
    );
    let q = d.queue(0);
    assert_eq!(q.write(0, &pattern(1, 4096)).unwrap(), S_IOERR);
    assert_eq!(q.ranges(T_DISCARD, &[(0, 8, 0)]).unwrap(), S_IOERR);
    assert_eq!(q.ranges(T_WRITE_ZEROES, &[(0, 8, 0)]).unwrap(), S_IOERR);
    assert_eq!(q.read(0, 4096).unwrap().0, S_OK);
    assert_eq!(q.flush().unwrap(), S_OK);
    assert!(
        b.image().iter().all(|&x| x == 0),
        "read-only image modified"
    );
}

#[test]
fn unknown_type_is_unsupp_and_bad_discard_flags() {
    let b = Blk::start(MIB, &[]);
    let mut d = connect(&b, 256);
    let q = d.queue(0);
    for t in [2, 3, 7, 9, 14, 0xffff_ffff] {
        assert_eq!(
            q.run(Req {
                rtype: t,
                sector: 0,
                out: &[],
                in_len: 0
            })
            .unwrap()
            .status,
            S_UNSUPP,
            "type {t}"
        );
    }
    // DISCARD must have no flags; WRITE_ZEROES only UNMAP.
    assert_eq!(q.ranges(T_DISCARD, &[(0, 8, 1)]).unwrap(), S_UNSUPP);
    assert_eq!(q.ranges(T_WRITE_ZEROES, &[(0, 8, 2)]).unwrap(), S_UNSUPP);
    // Out of range, truncated segment, too many segments.
    assert_eq!(q.ranges(T_DISCARD, &[(d_cap(&b), 8, 0)]).unwrap(), S_IOERR);
    let r = q
        .run(Req {
            rtype: T_DISCARD,
            sector: 0,
            out: &[0u8; 8],
            in_len: 0,
        })
        .unwrap();
    assert_eq!(r.status, S_IOERR);
    let many: Vec<_> = (0..33).map(|i| (i * 8, 8, 0)).collect();
    assert_eq!(q.ranges(T_DISCARD, &many).unwrap(), S_IOERR);
    still_serving(&mut d, 2);
}

fn d_cap(b: &Blk) -> u64 {
    b.image().len() as u64 / 512
}

#[test]
fn header_too_short_and_wrong_direction() {
    let b = Blk::start(MIB, &[]);
    let mut d = connect(&b, 256);
    // Header of 8 bytes.
    let x = bufs(&d, T_IN, 0);
    let h = raw_chain(
        &mut d,
        &[(x.hdr.0, 8, 0), (x.status.0, 1, DESC_F_WRITE)],
        &seq(2),
    );
    let done = d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    assert_eq!((status(&d, &x), done.used_len), (S_IOERR, 1));

    // T_IN whose data buffer is device-readable.
    let x = bufs(&d, T_IN, 0);
    d.mem.write(x.data, &[0xaa; 512]).unwrap();
    let h = raw_chain(
        &mut d,
        &[
            (x.hdr.0, 16, 0),
            (x.data.0, 512, 0),
            (x.status.0, 1, DESC_F_WRITE),
        ],
        &seq(3),
    );
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    assert_eq!(status(&d, &x), S_IOERR);
    assert_eq!(
        d.mem.read(x.data, 512).unwrap(),
        vec![0xaa; 512],
        "device wrote a readable buffer"
    );

    // T_OUT whose data buffer is device-writable.
    let x = bufs(&d, T_OUT, 0);
    d.mem.write(x.data, &[0xbb; 512]).unwrap();
    let h = raw_chain(
        &mut d,
        &[
            (x.hdr.0, 16, 0),
            (x.data.0, 512, DESC_F_WRITE),
            (x.status.0, 1, DESC_F_WRITE),
        ],
        &seq(3),
    );
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    assert_eq!(status(&d, &x), S_IOERR);
    assert!(
        b.image()[..512].iter().all(|&v| v == 0),
        "wrong-direction write reached the disk"
    );

    // Status descriptor device-readable: no status written, used len 0, no crash.
    let x = bufs(&d, T_FLUSH, 0);
    let h = raw_chain(&mut d, &[(x.hdr.0, 16, 0), (x.status.0, 1, 0)], &seq(2));
    let done = d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    assert_eq!((status(&d, &x), done.used_len), (S_UNSET, 0));
    still_serving(&mut d, 3);
}

#[test]
fn addresses_outside_guest_memory() {
    let b = Blk::start(MIB, &[]);
    let mut d = connect(&b, 256);
    let far = MEM + 0x10_0000;
    // Data outside memory.
    let x = bufs(&d, T_IN, 0);
    let h = raw_chain(
        &mut d,
        &[
            (x.hdr.0, 16, 0),
            (far, 4096, DESC_F_WRITE),
            (x.status.0, 1, DESC_F_WRITE),
        ],
        &seq(3),
    );
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    assert_eq!(status(&d, &x), S_IOERR);
    // Data straddling the end of memory.
    let x = bufs(&d, T_OUT, 0);
    let h = raw_chain(
        &mut d,
        &[
            (x.hdr.0, 16, 0),
            (MEM - 512, 4096, 0),
            (x.status.0, 1, DESC_F_WRITE),
        ],
        &seq(3),
    );
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    assert_eq!(status(&d, &x), S_IOERR);
    // Header outside memory.
    let x = bufs(&d, T_IN, 0);
    let h = raw_chain(
        &mut d,
        &[
            (far, 16, 0),
            (x.data.0, 512, DESC_F_WRITE),
            (x.status.0, 1, DESC_F_WRITE),
        ],
        &seq(3),
    );
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    assert_eq!(status(&d, &x), S_IOERR);
    // Status outside memory: nothing to write, the chain is still returned.
    let x = bufs(&d, T_FLUSH, 0);
    let h = raw_chain(&mut d, &[(x.hdr.0, 16, 0), (far, 1, DESC_F_WRITE)], &seq(2));
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    // Indirect table outside memory.
    let h = raw_chain(&mut d, &[(far, 64, DESC_F_INDIRECT)], &[None]);
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    still_serving(&mut d, 4);
}

#[test]
fn looping_chain_and_chain_longer_than_the_queue() {
    let b = Blk::start(MIB, &[]);
    let mut d = connect(&b, 16);
    // d0 (header) -> d1 -> d0 -> ...: a loop with no writable byte.
    let x = bufs(&d, T_OUT, 0);
    let h = raw_chain(
        &mut d,
        &[(x.hdr.0, 16, 0), (x.data.0, 512, 0)],
        &[Some(1), Some(0)],
    );
    let done = d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    assert_eq!(done.used_len, 0);
    assert!(
        b.image()[..512].iter().all(|&v| v == 0),
        "a looping chain was written"
    );

    // header -> W -> W -> back to the first W: cycles longer than the 16-entry queue.
    let x = bufs(&d, T_IN, 0);
    let h = raw_chain(
        &mut d,
        &[
            (x.hdr.0, 16, 0),
            (x.data.0, 512, DESC_F_WRITE),
            (x.status.0, 1, DESC_F_WRITE),
        ],
        &[Some(1), Some(2), Some(1)],
    );
    // The device cannot know where the status byte of a looping chain is: it returns the
    // chain (IOERR in its last writable byte) and performs no I/O.
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    let data = d.mem.read(x.data, 511).unwrap();
    assert!(
        data.iter().all(|&v| v == 0),
        "data was read into a looping chain"
    );

    // An indirect table of 32 entries (twice the queue size) that all chain forward, and an
    // indirect table whose last entry points back to its first.
    for looped in [false, true] {
        let x = bufs(&d, T_IN, 0);
        let table = d.mem.alloc(32 * 16, 16).unwrap();
        for i in 0..32u16 {
            let (addr, len, mut flags) = match i {
                0 => (x.hdr.0, 16, 0),
                31 => (x.status.0, 1, DESC_F_WRITE),
                _ => (x.data.0 + u64::from(i) * 8, 8, DESC_F_WRITE),
            };
            let next = if i < 31 { i + 1 } else { 0 };
            if i < 31 || looped {
                flags |= DESC_F_NEXT;
            }
            d.mem
                .write(
                    table.unchecked_add_(u64::from(i) * 16),
                    &RawDesc {
                        addr,
                        len,
                        flags,
                        next,
                    }
                    .to_bytes(),
                )
                .unwrap();
        }
        let h = raw_chain(&mut d, &[(table.0, 32 * 16, DESC_F_INDIRECT)], &[None]);
        d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    }
    still_serving(&mut d, 5);
}

trait AddU64 {
    fn unchecked_add_(self, v: u64) -> GuestAddress;
}
impl AddU64 for GuestAddress {
    fn unchecked_add_(self, v: u64) -> GuestAddress {
        GuestAddress(self.0 + v)
    }
}

#[test]
fn bad_head_index_in_the_avail_ring() {
    let b = Blk::start(MIB, &[]);
    let mut d = connect(&b, 16);
    let q = d.queue(0);
    // Publish a head index beyond the queue size.
    q.vq.publish(1000).unwrap();
    q.vq.kick().unwrap();
    // Then normal requests on the same queue still work.
    still_serving(&mut d, 6);
}

#[test]
fn cli_errors_are_clear_and_nonzero() {
    let dir = tmpdir("cli");
    let sock = dir.join("s.sock");
    // Missing image.
    let missing = dir.join("nope.img");
    let (code, err) = run_failing(
        &[
            os(std::path::Path::new("--socket")),
            os(&sock),
            "--image".as_ref(),
            os(&missing),
        ],
        false,
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("nope.img") && err.contains("No such file"),
        "{err}"
    );
    // Socket in a missing directory.
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let bad_sock = dir.join("no/such/dir/s.sock");
    let (code, err) = run_failing(
        &[
            "--socket".as_ref(),
            os(&bad_sock),
            "--image".as_ref(),
            os(&img),
        ],
        false,
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("does not exist"), "{err}");
    // Bad queue size.
    let (code, err) = run_failing(
        &[
            "--socket".as_ref(),
            os(&sock),
            "--image".as_ref(),
            os(&img),
            "--queue-size".as_ref(),
            "100".as_ref(),
        ],
        false,
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("queue-size"), "{err}");
    // Image without permission (as an unprivileged user when we are root).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let (code, err) = run_failing(
        &["--socket".as_ref(), os(&sock), "--image".as_ref(), os(&img)],
        root,
    );
    if code == Some(0) || err.contains("Operation not permitted") && !err.contains("image") {
        baton_tests::harness::cannot_run(
            "root",
            &format!("the permission case: cannot drop privileges here ({err})"),
        );
    } else {
        assert_ne!(code, Some(0));
        assert!(
            err.contains("Permission denied") && err.contains("disk.img"),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn socket_activation_and_sd_notify() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tmpdir("act");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.join("activated.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let lfd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new("bash"); // dash cannot name fds above 9
    // The shell moves the listening socket to fd 3 (dup2 in pre_exec could clobber std's
    // own exec-status pipe), then execs baton-blk with its own pid as LISTEN_PID.
    cmd.arg("-c")
        .arg(format!(
            "exec 3<&{lfd}; LISTEN_PID=$$ LISTEN_FDS=1 exec {} --image {}",
            bin("baton-blk").display(),
            img.display()
        ))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "warn");
    // SAFETY: fcntl is async-signal-safe; it clears FD_CLOEXEC on the child's copy only.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(lfd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("no sd_notify message");
    assert_eq!(&buf[..n], b"READY=1");
    let mut d = BlkDriver::connect(
        &sock,
        BlkOptions {
            mem_size: MEM,
            slots: 4,
            ..BlkOptions::default()
        },
    )
    .unwrap();
    assert_eq!(d.queue(0).write(0, &pattern(7, 4096)).unwrap(), S_OK);
    drop(d);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_until(Duration::from_secs(20), || child.try_wait().unwrap()).unwrap();
    assert_eq!(st.code(), Some(0));
    assert_eq!(&std::fs::read(&img).unwrap()[..4096], &pattern(7, 4096)[..]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Hostile front-ends and guests that used to livelock, kill or wedge the back-end ----

/// A guest that sets the avail index more than the ring size ahead: the ring is ignored (no
/// spinning core), GET_VRING_BASE answers within 1 s, the other queue keeps serving, SIGTERM
/// still stops the back-end. With and without EVENT_IDX (Linux negotiates it).
fn avail_index_overrun(event_idx: bool) {
    use baton_tests::hostile::{cpu_share, timed_with_watchdog};
    use baton_tests::vhost_user::frontend::F_EVENT_IDX;
    let mut b = Blk::start(MIB, &["--queues", "2"]);
    let pid = b.proc.child.id();
    let features = if event_idx {
        BLK_FEATURES
    } else {
        BLK_FEATURES & !F_EVENT_IDX
    };
    let mut d = BlkDriver::connect(
        &b.sock,
        BlkOptions {
            queues: 2,
            queue_size: 16,
            mem_size: MEM,
            slots: 8,
            features,
            ..BlkOptions::default()
        },
    )
    .unwrap();
    assert_eq!(d.conn().unwrap().features & F_EVENT_IDX != 0, event_idx);
    let q = d.queue(0);
    let bogus = q.vq.avail_idx().wrapping_add(16 + 5);
    q.vq.write_avail_idx_raw(bogus).unwrap();
    q.vq.kick().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let share = cpu_share(pid, Duration::from_secs(1));
    assert!(
        share < 0.3,
        "baton-blk uses {:.0} % of a CPU on a broken ring",
        share * 100.0
    );
    // The other queue serves.
    let data = pattern(9, 4096);
    assert_eq!(d.queue(1).write(8, &data).unwrap(), S_OK);
    assert_eq!(d.queue(1).read(8, 4096).unwrap(), (S_OK, data));
    // GET_VRING_BASE on the broken ring answers, at once.
    let (base, took) = timed_with_watchdog(pid, Duration::from_secs(5), || {
        d.conn().unwrap().stop_queue(0)
    });
    assert!(base.is_ok(), "GET_VRING_BASE failed: {base:?}");
    assert!(
        took < Duration::from_secs(1),
        "GET_VRING_BASE took {took:?}"
    );
    let t = std::time::Instant::now();
    assert!(b.signal_and_wait(libc::SIGTERM).success());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        t.elapsed()
    );
}

#[test]
fn avail_index_overrun_with_event_idx_does_not_livelock() {
    avail_index_overrun(true);
}

#[test]
fn avail_index_overrun_without_event_idx_does_not_livelock() {
    avail_index_overrun(false);
}

/// A memory table whose file is shorter than the size it declares is refused (mapping it
/// would SIGBUS at the first access past the end); the back-end serves the next front-end.
#[test]
fn memory_file_shorter_than_declared_is_refused() {
    use baton_tests::vhost_user::frontend::Connection;
    use baton_tests::vhost_user::memory::SharedMemory;
    let mut b = Blk::start(MIB, &[]);
    let mem = SharedMemory::new(MEM).unwrap();
    mem.file().set_len(MEM / 2).unwrap();
    let mut c = Connection::connect(&b.sock, 1, BLK_FEATURES, wanted_protocol(false)).unwrap();
    let e = c.set_mem_table(&mem);
    assert!(e.is_err(), "a short memory file was accepted");
    drop(c);
    assert!(b.alive(), "baton-blk died");
    let mut d = connect(&b, 16);
    still_serving(&mut d, 21);
}

/// An inflight region whose file is shorter than declared is refused too.
#[test]
fn inflight_file_shorter_than_declared_is_refused() {
    use baton_tests::vhost_user::frontend::Connection;
    use baton_tests::vhost_user::memory::SharedMemory;
    use vhost::vhost_user::message::VhostUserInflight;
    let mut b = Blk::start(MIB, &[]);
    let mem = SharedMemory::new(MEM).unwrap();
    let mut c = Connection::connect(&b.sock, 1, BLK_FEATURES, wanted_protocol(true)).unwrap();
    c.set_mem_table(&mem).unwrap();
    let fd =
        nix::sys::memfd::memfd_create(c"short", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let file = std::fs::File::from(fd);
    file.set_len(4096).unwrap();
    // One queue of 256 needs align_up(16 * 256 + 2, 64) = 4160 bytes.
    let info = VhostUserInflight {
        mmap_size: 4160,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 256,
    };
    assert!(
        c.set_inflight(&info, &file).is_err(),
        "a short inflight file was accepted"
    );
    drop(c);
    assert!(b.alive(), "baton-blk died");
    let mut d = connect(&b, 16);
    still_serving(&mut d, 22);
}

/// A front-end that truncates the memory file after SET_MEM_TABLE: the back-end's accesses to
/// the vanished pages no longer kill it (SIGBUS); it goes on serving.
#[test]
fn memory_file_truncated_after_set_mem_table_does_not_kill_the_back_end() {
    let mut b = Blk::start(MIB, &[]);
    let mut d = connect(&b, 16);
    // Buffers in the upper half of memory, filled before the cut (this process must not touch
    // them afterwards: its own mapping of them is gone too).
    d.mem.alloc(MEM / 2, 4096).unwrap();
    let x = bufs(&d, T_OUT, 0);
    assert!(x.hdr.0 >= MEM / 2);
    d.mem.file().set_len(MEM / 2).unwrap();
    let h = raw_chain(
        &mut d,
        &[
            (x.hdr.0, 16, 0),
            (x.data.0, 4096, 0),
            (x.status.0, 1, DESC_F_WRITE),
        ],
        &seq(3),
    );
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    assert!(b.alive(), "baton-blk died of SIGBUS");
    still_serving(&mut d, 23);
}

/// A request with far more segments than the seg_max the device advertises (an indirect table
/// of 1000 entries) is refused; the back-end keeps serving.
#[test]
fn request_beyond_seg_max_is_refused() {
    let b = Blk::start(MIB, &["--queue-size", "16"]);
    let mut d = connect(&b, 16);
    let seg_max = u32::from_le_bytes(
        d.conn().unwrap().config(12, 4).unwrap()[..4]
            .try_into()
            .unwrap(),
    );
    assert!(seg_max < 1000, "seg_max {seg_max}");
    // Sector 0 holds data, so that a request that was served would be seen.
    assert_eq!(d.queue(0).write(0, &pattern(26, 4096)).unwrap(), S_OK);
    let x = bufs(&d, T_IN, 0);
    let n = 1000u16;
    let table = d.mem.alloc(16 * u64::from(n), 16).unwrap();
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (x.hdr.0, 16, DESC_F_NEXT),
            i if i == n - 1 => (x.status.0, 1, DESC_F_WRITE),
            _ => (x.data.0, 512, DESC_F_WRITE | DESC_F_NEXT),
        };
        let raw = RawDesc {
            addr,
            len,
            flags,
            next: i + 1,
        };
        d.mem
            .write(GuestAddress(table.0 + 16 * u64::from(i)), &raw.to_bytes())
            .unwrap();
    }
    let h = raw_chain(
        &mut d,
        &[(table.0, 16 * u32::from(n), DESC_F_INDIRECT)],
        &[None],
    );
    d.queue(0).wait_head(h, Duration::from_secs(10)).unwrap();
    // Cut at seg_max + 2 descriptors, it is a malformed chain: IOERR in its last writable
    // byte (the device cannot know where the real status is), no I/O.
    let data = d.mem.read(x.data, 512).unwrap();
    assert!(
        data[..511].iter().all(|&v| v == 0),
        "a request past seg_max was served"
    );
    assert_eq!((data[511], status(&d, &x)), (S_IOERR, S_UNSET));
    still_serving(&mut d, 24);
}

/// A front-end that sends half a message and then nothing: dropped after the message deadline
/// (the next front-end is served), and SIGTERM is honoured meanwhile.
#[test]
fn half_a_message_does_not_wedge_the_back_end() {
    use std::io::{Read, Write};
    let mut b = Blk::start(MIB, &[]);
    // GET_FEATURES (1), version 1, announcing a 40-byte body of which 10 bytes come.
    let half = |s: &mut std::os::unix::net::UnixStream| {
        let mut m = vec![1, 0, 0, 0, 1, 0, 0, 0, 40, 0, 0, 0];
        m.extend_from_slice(&[0; 10]);
        s.write_all(&m).unwrap();
    };
    let mut s = std::os::unix::net::UnixStream::connect(&b.sock).unwrap();
    half(&mut s);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the back-end to hang up");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "dropped after {:?}",
        t.elapsed()
    );
    let mut d = connect(&b, 16);
    still_serving(&mut d, 25);
    drop(d);
    // SIGTERM while a half message is pending.
    let mut s = std::os::unix::net::UnixStream::connect(&b.sock).unwrap();
    half(&mut s);
    std::thread::sleep(Duration::from_millis(100));
    let t = std::time::Instant::now();
    assert!(b.signal_and_wait(libc::SIGTERM).success());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        t.elapsed()
    );
}

/// The socket is 0600 whatever the umask, and a front-end of another uid is refused by
/// SO_PEERCRED even where the file's mode would let it in, unless `--allow-uid` names it; the
/// same holds for the standby front-end taken while another one runs. (The
/// back-end runs as root here, with no other uid allowed; the other uid is not nobody either,
/// whom the other tests' back-ends run as.)
#[test]
fn other_users_are_kept_out_unless_allowed() {
    use baton_tests::hostile::{Attempt, vhost_user_attempt_as};
    use std::os::unix::fs::PermissionsExt;
    const OTHER: u32 = 65533;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test runs a client as uid {OTHER}: run it as root"
    );
    let b = Blk::start(MIB, &["--allow-uid", "0"]);
    baton_tests::local_users::open_dir(&b.dir).unwrap();
    let mode = std::fs::metadata(&b.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    assert_eq!(vhost_user_attempt_as(OTHER, &b.sock), Attempt::NoConnect);
    // Opened up by hand: the peer check still refuses.
    std::fs::set_permissions(&b.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(vhost_user_attempt_as(OTHER, &b.sock), Attempt::HungUp);
    let mut d = connect(&b, 16);
    // Nor is it taken as the standby front-end while one runs.
    assert_eq!(vhost_user_attempt_as(OTHER, &b.sock), Attempt::HungUp);
    still_serving(&mut d, 27);
    drop((d, b));
    let b = Blk::start(MIB, &["--allow-uid", &OTHER.to_string()]);
    baton_tests::local_users::open_dir(&b.dir).unwrap();
    std::fs::set_permissions(&b.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(vhost_user_attempt_as(OTHER, &b.sock), Attempt::Served);
    // Allowed, it is served its handshake as the standby while another front-end runs.
    let mut d = connect(&b, 16);
    assert_eq!(vhost_user_attempt_as(OTHER, &b.sock), Attempt::Served);
    still_serving(&mut d, 27);
}

/// A front-end that sends requests and never reads the replies: the vhost crate would retry a
/// reply that cannot be sent for ever (a busy loop holding the connection); the back-end drops
/// such a front-end instead, and serves the next one.
#[test]
fn a_front_end_that_does_not_read_its_replies_is_dropped() {
    use std::io::{Read, Write};
    let b = Blk::start(MIB, &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&b.sock).unwrap();
    s.set_nonblocking(true).unwrap();
    // GET_FEATURES (1), version 1, no body: each asks for a 20-byte reply.
    const REQUESTS: usize = 20_000;
    let mut sent = 0;
    for _ in 0..REQUESTS {
        if s.write_all(&baton_tests::hostile::GET_FEATURES).is_err() {
            break;
        }
        sent += 1;
    }
    // Long enough for the back-end to fill its send buffer (or to give up on us).
    std::thread::sleep(Duration::from_secs(1));
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut replies = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => replies += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(
        ended && replies / 20 < sent,
        "the back-end answered {} of {sent} requests and {}",
        replies / 20,
        if ended {
            "hung up"
        } else {
            "kept the connection"
        }
    );
    let mut d = connect(&b, 16);
    still_serving(&mut d, 29);
}
