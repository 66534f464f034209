//! Descriptor chains as the request parser sees them: from virtio-queue's iterator (chains
//! popped from the avail ring) or from our own walker (heads resubmitted from the inflight
//! region, which are no longer in the avail ring).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// One descriptor of a chain, as the parser needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
    /// NEXT flag (on the last descriptor it means the chain was cut: loop, too long, unreadable).
    pub next: bool,
}

/// The descriptors of a chain popped from the avail ring (virtio-queue walks it, following
/// indirect tables), at most `max` of them: a longer chain comes back cut (the last one keeps
/// NEXT), so that an indirect table of 65 535 entries costs no more than the `seg_max` the
/// device advertises.
pub fn descs_of<M>(chain: DescriptorChain<M>, max: usize) -> Vec<Desc>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let mut out: Vec<Desc> = chain
        .take(max.saturating_add(1))
        .map(|d| Desc {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
            next: d.has_next(),
        })
        .collect();
    if out.len() > max {
        out.truncate(max);
        if let Some(l) = out.last_mut() {
            l.next = true;
        }
    }
    out
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Walks the chain starting at `head` in the descriptor table (for resubmitting inflight
/// heads, which are not in the avail ring any more). Same rules as virtio-queue: at most
/// `queue_size` descriptors (or the indirect table's length), one level of indirection; and,
/// as [`descs_of`], at most `max`.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    max: usize,
) -> Vec<Desc> {
    let mut out: Vec<Desc> = Vec::new();
    let (mut table, mut size, mut idx, mut ttl, mut indirect) =
        (table, queue_size, head, queue_size, false);
    let cut = |out: &mut Vec<Desc>| {
        if let Some(l) = out.last_mut() {
            l.next = true;
        }
    };
    loop {
        if idx >= size || ttl == 0 || out.len() >= max {
            cut(&mut out);
            break;
        }
        let mut raw = [0u8; 16];
        let ok = table
            .checked_add(16 * u64::from(idx))
            .is_some_and(|a| mem.read_slice(&mut raw, a).is_ok());
        if !ok {
            cut(&mut out);
            break;
        }
        let addr = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & F_INDIRECT != 0 {
            if indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                cut(&mut out);
                break;
            }
            table = GuestAddress(addr);
            size = u16::try_from(len / 16).unwrap_or(0);
            (idx, ttl, indirect) = (0, size, true);
            continue;
        }
        out.push(Desc {
            addr: GuestAddress(addr),
            len,
            write: flags & F_WRITE != 0,
            next: flags & F_NEXT != 0,
        });
        ttl -= 1;
        if flags & F_NEXT == 0 {
            break;
        }
        idx = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(addr: u64, len: u32, write: bool, next: bool) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            write,
            next,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn walk_follows_chains_and_stops_loops() {
        let m = mem();
        let table = GuestAddress(0x8000);
        let put = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&b, GuestAddress(table.0 + 16 * i)).unwrap();
        };
        put(0, 0x1000, 16, F_NEXT, 2);
        put(2, 0x3000, 1, F_WRITE, 0);
        let c = walk(&m, table, 8, 0, 64);
        assert_eq!(
            c,
            vec![d(0x1000, 16, false, true), d(0x3000, 1, true, false)]
        );
        // A loop is cut at the queue size, with NEXT left on the last descriptor.
        put(2, 0x3000, 1, F_WRITE | F_NEXT, 0);
        let c = walk(&m, table, 8, 0, 64);
        assert_eq!(c.len(), 8);
        assert!(c.last().unwrap().next);
        // Head out of range, and an indirect table inside an indirect table.
        assert!(walk(&m, table, 8, 9, 64).is_empty());
        put(4, 0x9000, 32, F_INDIRECT, 0);
        put(0x100, 0x9000, 32, F_INDIRECT, 0); // 0x9000 = table + 16 * 0x100
        assert!(walk(&m, table, 8, 4, 64).is_empty());
        // A long indirect table is cut at `max` (seg_max + 2), not at its own length.
        put(5, 0x20000, 16 * 1000, F_INDIRECT, 0); // 0x20000 = table + 16 * 0x1800
        for i in 0..1000u64 {
            put(
                0x1800 + i,
                0x1000,
                512,
                F_NEXT,
                u16::try_from(i + 1).unwrap(),
            );
        }
        let c = walk(&m, table, 8, 5, 10);
        assert_eq!(c.len(), 10);
        assert!(
            c.last().unwrap().next,
            "a cut chain keeps NEXT on its last descriptor"
        );
    }
}
