//! baton-blk's request parsing over synthetic guest memory: the descriptor-chain walker used for
//! requests resubmitted from the inflight region (`chain::walk`), the same chain popped through
//! virtio-queue (`chain::descs_of`), and `request::parse`. Nothing may panic, and:
//! - a chain is at most `max` descriptors, and one that is not cut (no NEXT on its last
//!   descriptor) is the same from both walkers;
//! - a parsed read or write lies inside the disk, is whole sectors, and its iovecs (host
//!   addresses handed to the kernel) cover exactly its length inside guest memory;
//! - the used length (data written plus the status byte) never exceeds the chain's writable bytes.
//!
//! Input: queue size (u16, any value: the walker takes what the inflight path gives it), head
//! (u16), descriptor table address (u32), max descriptors (u8), flags (u8: bit 0 read-only),
//! serial length (u8), disk size in sectors (u32), one spare byte; then RAM0's contents
//! (see `baton_fuzz::guest`). The avail ring for the virtio-queue walk is at the start of RAM1
//! (written before either walk), its used ring 32 KiB further.
#![no_main]

use baton_blk::chain::{Desc, descs_of, walk};
use baton_blk::request::{DiskInfo, Op, S_IOERR, S_OK, S_UNSUPP, SECTOR, parse};
use baton_fuzz::guest::{RAM1, host_ranges, inside, memory};
use baton_fuzz::input::Input;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

fn clean(c: &[Desc]) -> bool {
    c.last().is_some_and(|d| !d.next)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let queue_size = inp.u16();
    let head = inp.u16();
    let table = GuestAddress(u64::from(inp.u32()));
    let max = usize::from(inp.u8());
    let flags = inp.u8();
    let serial_len = usize::from(inp.u8() % 32);
    let sectors = u64::from(inp.u32());
    let _spare = inp.u8();
    let mem = memory(inp.rest());

    // The avail ring that offers `head` to virtio-queue, written first: both walkers must see
    // the same memory (it may overlap the descriptors).
    mem.write_obj(0u16, GuestAddress(RAM1))
        .expect("avail flags");
    mem.write_obj(1u16, GuestAddress(RAM1 + 2))
        .expect("avail idx");
    mem.write_obj(head, GuestAddress(RAM1 + 4))
        .expect("avail ring[0]");

    let descs = walk(&mem, table, queue_size, head, max);
    assert!(descs.len() <= max, "walk returned more than max");
    assert!(descs.len() <= usize::from(u16::MAX));
    assert!(
        descs.iter().rev().skip(1).all(|d| d.next),
        "a descriptor inside a chain without NEXT"
    );

    // The same head through virtio-queue, when it accepts the queue size.
    let mut q = Queue::new(32768).expect("queue");
    if q.try_set_size(queue_size).is_ok()
        && q.try_set_desc_table_address(table).is_ok()
        && q.try_set_avail_ring_address(GuestAddress(RAM1)).is_ok()
        && q.try_set_used_ring_address(GuestAddress(RAM1 + 0x8000))
            .is_ok()
    {
        q.set_ready(true);
        if let Some(chain) = q.iter(&mem).ok().and_then(|mut it| it.next()) {
            assert_eq!(chain.head_index(), head);
            let popped = descs_of(chain, max);
            assert!(popped.len() <= max);
            let bytes: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
            // virtio-queue also ends a chain past 4 GiB in total (the spec forbids those).
            if clean(&descs) && clean(&popped) && bytes <= u64::from(u32::MAX) {
                assert_eq!(
                    descs, popped,
                    "walk and virtio-queue disagree on a valid chain"
                );
            }
        }
    }

    let disk = DiskInfo {
        size: sectors * SECTOR,
        readonly: flags & 1 != 0,
        serial: b"baton-fuzz-serial-0123456789abcdef"[..serial_len].to_vec(),
    };
    let req = parse(&mem, head, &descs, &disk);
    assert_eq!(req.head, head);
    assert!([S_OK, S_IOERR, S_UNSUPP].contains(&req.status));
    let writable: u64 = descs
        .iter()
        .filter(|d| d.write)
        .map(|d| u64::from(d.len))
        .sum();
    assert!(
        u64::from(req.used_len()) <= writable,
        "used length beyond the writable bytes"
    );
    if req.status != S_OK {
        assert_eq!(req.op, Op::Done);
        assert_eq!(req.written, 0);
    }
    let ranges = host_ranges(&mem);
    match &req.op {
        Op::Read | Op::Write => {
            assert!(req.len.is_multiple_of(SECTOR));
            assert!(
                req.offset
                    .checked_add(req.len)
                    .is_some_and(|e| e <= disk.size)
            );
            assert!(!(disk.readonly && req.op == Op::Write));
            let total: u64 = req.iovecs.iter().map(|v| v.iov_len as u64).sum();
            assert_eq!(total, req.len, "iovecs do not cover the request");
            for v in &req.iovecs {
                assert!(
                    inside(&ranges, v.iov_base as usize, v.iov_len),
                    "iovec {:?}+{} outside guest memory",
                    v.iov_base,
                    v.iov_len
                );
            }
            if req.op == Op::Read {
                assert!(u64::from(req.written) <= req.len);
            }
        }
        Op::Discard(r) => {
            assert!(!disk.readonly);
            assert!(
                r.iter()
                    .all(|&(o, l)| o.checked_add(l).is_some_and(|e| e <= disk.size))
            );
        }
        Op::WriteZeroes(r) => {
            assert!(!disk.readonly);
            assert!(
                r.iter()
                    .all(|&(o, l, _)| o.checked_add(l).is_some_and(|e| e <= disk.size))
            );
        }
        Op::Flush | Op::Done => {}
    }
    let _ = req.write_status(&mem);
});
