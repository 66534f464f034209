//! virtio-blk requests: parsing a descriptor chain into a [`Request`] with host iovecs, and
//! writing the status back. Independent of vhost-user: it only sees guest memory and a chain.
//!
//! Every malformed chain (too-short header, wrong direction, address outside guest memory,
//! a loop or a chain longer than the queue, out-of-range sectors) becomes a request whose
//! status is already decided (IOERR or UNSUPP); nothing here panics on guest input.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::Desc;
use crate::disk::IoVec;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get device ID (serial).
pub const T_GET_ID: u32 = 8;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;
/// Status codes.
pub const S_OK: u8 = 0;
/// I/O error.
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;
/// Length of the device ID.
pub const ID_BYTES: usize = 20;
/// Write-zeroes flag: the range may be unmapped.
pub const WZ_UNMAP: u32 = 1;
/// Limits advertised in the config space.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Max sectors per discard/write-zeroes segment.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// What a request does, after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into `iovecs`.
    Read,
    /// Write `iovecs` at `offset`.
    Write,
    /// fdatasync.
    Flush,
    /// Discard ranges (byte offset, length).
    Discard(Vec<(u64, u64)>),
    /// Zero ranges (byte offset, length, unmap).
    WriteZeroes(Vec<(u64, u64, bool)>),
    /// Nothing left to do: the status is already final (errors, GET_ID).
    Done,
}

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    /// Descriptor head index (what goes into the used ring).
    pub head: u16,
    /// Operation.
    pub op: Op,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Data buffers (host addresses inside guest memory).
    pub iovecs: Vec<IoVec>,
    /// Total data bytes.
    pub len: u64,
    /// Where the status byte goes; `None` when the chain has no writable byte for it.
    pub status_addr: Option<GuestAddress>,
    /// Status to write.
    pub status: u8,
    /// Bytes written into guest memory, status byte excluded.
    pub written: u32,
    /// Still executing when its ring was suspended (GET_VRING_BASE without draining): it is
    /// completed only if the front-end that restarts the ring lists it inflight.
    pub suspended: bool,
}

impl Request {
    fn fail(&mut self, status: u8) {
        self.op = Op::Done;
        self.status = status;
        self.written = 0;
    }

    /// Marks the request failed with IOERR (used by engines).
    pub fn set_ioerr(&mut self) {
        self.fail(S_IOERR);
    }

    /// Value for the used ring's `len`.
    pub fn used_len(&self) -> u32 {
        if self.status_addr.is_some() {
            self.written.saturating_add(1)
        } else {
            0
        }
    }

    /// Writes the status byte into guest memory. Returns false if it could not be written.
    pub fn write_status(&self, mem: &GuestMemoryMmap) -> bool {
        match self.status_addr {
            Some(a) => mem.write_obj(self.status, a).is_ok(),
            None => false,
        }
    }
}

/// What the parser needs to know about the disk.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    /// Capacity in bytes.
    pub size: u64,
    /// Read-only.
    pub readonly: bool,
    /// Serial (GET_ID), at most [`ID_BYTES`] used.
    pub serial: Vec<u8>,
}

type Seg = (GuestAddress, u64);

/// Parses a chain. Never fails: errors end up in the request's status.
pub fn parse(mem: &GuestMemoryMmap, head: u16, descs: &[Desc], disk: &DiskInfo) -> Request {
    let mut readable: Vec<Seg> = Vec::new();
    let mut writable: Vec<Seg> = Vec::new();
    let count = descs.len();
    let mut malformed = descs.last().is_some_and(|d| d.next);
    for d in descs {
        let seg = (d.addr, u64::from(d.len));
        if d.write {
            writable.push(seg);
        } else {
            // A readable descriptor after a writable one: the chain is malformed.
            malformed |= !writable.is_empty();
            readable.push(seg);
        }
    }
    let mut req = Request {
        head,
        op: Op::Done,
        offset: 0,
        iovecs: Vec::new(),
        len: 0,
        status_addr: None,
        status: S_IOERR,
        written: 0,
        suspended: false,
    };
    // The status byte is the last byte of the last writable descriptor.
    if let Some(last) = writable.last_mut() {
        if last.1 > 0 {
            req.status_addr = last.0.checked_add(last.1 - 1);
            last.1 -= 1;
        }
    }
    if count == 0 || malformed {
        // Empty, looping, too long, or unreadable descriptor: IOERR if we know where.
        tracing::debug!(head, count, "malformed descriptor chain");
        return req;
    }
    let mut hdr = [0u8; 16];
    if !read_segs(mem, &readable, 0, &mut hdr) {
        tracing::debug!(head, "request header too short or unreadable");
        return req;
    }
    let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let data_out = skip(&readable, 16);
    let data_in: Vec<Seg> = writable.iter().copied().filter(|s| s.1 > 0).collect();
    req.status = S_OK;
    match rtype {
        T_IN | T_OUT => {
            let (data, other) = if rtype == T_IN {
                (data_in, data_out)
            } else {
                (data_out, data_in)
            };
            if !other.is_empty() {
                tracing::debug!(head, "data descriptor with the wrong direction");
                return fail(req, S_IOERR);
            }
            if rtype == T_OUT && disk.readonly {
                return fail(req, S_IOERR);
            }
            let len: u64 = data.iter().map(|s| s.1).sum();
            let Some(offset) = sector.checked_mul(SECTOR) else {
                return fail(req, S_IOERR);
            };
            if len % SECTOR != 0 || offset.checked_add(len).is_none_or(|end| end > disk.size) {
                tracing::debug!(head, sector, len, "request outside the disk");
                return fail(req, S_IOERR);
            }
            match to_iovecs(mem, &data) {
                Some(iovecs) => req.iovecs = iovecs,
                None => return fail(req, S_IOERR),
            }
            req.offset = offset;
            req.len = len;
            if rtype == T_IN {
                req.written = u32::try_from(len).unwrap_or(u32::MAX);
                req.op = Op::Read;
            } else {
                req.op = Op::Write;
            }
        }
        T_FLUSH => req.op = Op::Flush,
        T_GET_ID => {
            let len: u64 = data_in.iter().map(|s| s.1).sum();
            let n = usize::try_from(len).unwrap_or(usize::MAX).min(ID_BYTES);
            let mut id = [0u8; ID_BYTES];
            let sn = disk.serial.len().min(ID_BYTES);
            id[..sn].copy_from_slice(&disk.serial[..sn]);
            if !write_segs(mem, &data_in, &id[..n]) {
                return fail(req, S_IOERR);
            }
            req.written = u32::try_from(n).unwrap_or(0);
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if disk.readonly {
                return fail(req, S_IOERR);
            }
            let len: u64 = data_out.iter().map(|s| s.1).sum();
            if len == 0 || len % 16 != 0 || len / 16 > u64::from(MAX_DISCARD_SEG) {
                return fail(req, S_IOERR);
            }
            let mut ranges = Vec::new();
            for i in 0..len / 16 {
                let mut s = [0u8; 16];
                if !read_segs(mem, &data_out, i * 16, &mut s) {
                    return fail(req, S_IOERR);
                }
                let sec = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
                let num = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
                let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
                let bad_flags = if rtype == T_DISCARD {
                    flags != 0
                } else {
                    flags & !WZ_UNMAP != 0
                };
                if bad_flags {
                    return fail(req, S_UNSUPP);
                }
                let off = sec.checked_mul(SECTOR);
                let l = u64::from(num) * SECTOR;
                match off {
                    Some(o)
                        if num <= MAX_DISCARD_SECTORS
                            && o.checked_add(l).is_some_and(|e| e <= disk.size) =>
                    {
                        ranges.push((o, l, flags & WZ_UNMAP != 0));
                    }
                    _ => return fail(req, S_IOERR),
                }
            }
            req.op = if rtype == T_DISCARD {
                Op::Discard(ranges.into_iter().map(|(o, l, _)| (o, l)).collect())
            } else {
                Op::WriteZeroes(ranges)
            };
        }
        _ => return fail(req, S_UNSUPP),
    }
    req
}

fn fail(mut req: Request, status: u8) -> Request {
    req.fail(status);
    req
}

/// The segments after the first `n` bytes.
fn skip(segs: &[Seg], mut n: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    for &(a, l) in segs {
        if n >= l {
            n -= l;
            continue;
        }
        match a.checked_add(n) {
            Some(a2) => out.push((a2, l - n)),
            None => out.push((a, 0)),
        }
        n = 0;
    }
    out.retain(|s| s.1 > 0);
    out
}

fn read_segs(mem: &GuestMemoryMmap, segs: &[Seg], from: u64, buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for (a, l) in skip(segs, from) {
        if done == buf.len() {
            break;
        }
        let n = usize::try_from(l)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        let Some(dst) = buf.get_mut(done..done + n) else {
            return false;
        };
        if mem.read_slice(dst, a).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

fn write_segs(mem: &GuestMemoryMmap, segs: &[Seg], buf: &[u8]) -> bool {
    let mut done = 0usize;
    for &(a, l) in segs {
        if done == buf.len() {
            break;
        }
        let n = usize::try_from(l)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        let Some(src) = buf.get(done..done + n) else {
            return false;
        };
        if mem.write_slice(src, a).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Host iovecs for guest segments; `None` if any byte is outside guest memory.
fn to_iovecs(mem: &GuestMemoryMmap, segs: &[Seg]) -> Option<Vec<IoVec>> {
    let mut out = Vec::with_capacity(segs.len());
    for &(a, l) in segs {
        let l = usize::try_from(l).ok()?;
        for s in GuestMemoryBackend::get_slices(mem, a, l) {
            let s = s.ok()?;
            out.push(IoVec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            });
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn info(readonly: bool) -> DiskInfo {
        DiskInfo {
            size: 1 << 20,
            readonly,
            serial: b"sn".to_vec(),
        }
    }

    fn hdr(m: &GuestMemoryMmap, t: u32, sector: u64) -> GuestAddress {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(0x1000)).unwrap();
        GuestAddress(0x1000)
    }

    fn d(addr: u64, len: u32, write: bool, next: bool) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            write,
            next,
        }
    }

    #[test]
    fn read_request() {
        let m = mem();
        let h = hdr(&m, T_IN, 2);
        let r = parse(
            &m,
            3,
            &[
                d(h.0, 16, false, true),
                d(0x2000, 4096, true, true),
                d(0x3000, 1, true, false),
            ],
            &info(false),
        );
        assert_eq!(
            (r.op.clone(), r.offset, r.len, r.used_len(), r.head),
            (Op::Read, 1024, 4096, 4097, 3)
        );
        assert_eq!(r.status_addr, Some(GuestAddress(0x3000)));
        assert_eq!(r.iovecs.len(), 1);
    }

    #[test]
    fn errors() {
        let m = mem();
        let i = info(false);
        // Short header.
        let r = parse(
            &m,
            0,
            &[d(0x1000, 8, false, true), d(0x3000, 1, true, false)],
            &i,
        );
        assert_eq!((r.op.clone(), r.status), (Op::Done, S_IOERR));
        // Wrong direction.
        let h = hdr(&m, T_IN, 0);
        let r = parse(
            &m,
            0,
            &[
                d(h.0, 16, false, true),
                d(0x2000, 512, false, true),
                d(0x3000, 1, true, false),
            ],
            &i,
        );
        assert_eq!(r.status, S_IOERR);
        // Past the end, outside memory, unknown type, readonly write, bad discard flags.
        let h = hdr(&m, T_IN, 2048);
        let r = parse(
            &m,
            0,
            &[
                d(h.0, 16, false, true),
                d(0x2000, 512, true, true),
                d(0x3000, 1, true, false),
            ],
            &i,
        );
        assert_eq!(r.status, S_IOERR);
        let h = hdr(&m, T_IN, 0);
        let r = parse(
            &m,
            0,
            &[
                d(h.0, 16, false, true),
                d(MEM - 256, 512, true, true),
                d(0x3000, 1, true, false),
            ],
            &i,
        );
        assert_eq!(r.status, S_IOERR);
        let h = hdr(&m, 77, 0);
        assert_eq!(
            parse(
                &m,
                0,
                &[d(h.0, 16, false, true), d(0x3000, 1, true, false)],
                &i
            )
            .status,
            S_UNSUPP
        );
        let h = hdr(&m, T_OUT, 0);
        let r = parse(
            &m,
            0,
            &[
                d(h.0, 16, false, true),
                d(0x2000, 512, false, true),
                d(0x3000, 1, true, false),
            ],
            &info(true),
        );
        assert_eq!(r.status, S_IOERR);
        let h = hdr(&m, T_DISCARD, 0);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        m.write_slice(&seg, GuestAddress(0x2000)).unwrap();
        let r = parse(
            &m,
            0,
            &[
                d(h.0, 16, false, true),
                d(0x2000, 16, false, true),
                d(0x3000, 1, true, false),
            ],
            &i,
        );
        assert_eq!(r.status, S_UNSUPP);
        // Cut chain (last descriptor still has NEXT): IOERR in the last writable byte.
        let h = hdr(&m, T_IN, 0);
        let r = parse(
            &m,
            0,
            &[d(h.0, 16, false, true), d(0x3000, 1, true, true)],
            &i,
        );
        assert_eq!(
            (r.op.clone(), r.status, r.status_addr),
            (Op::Done, S_IOERR, Some(GuestAddress(0x3000)))
        );
    }
}
