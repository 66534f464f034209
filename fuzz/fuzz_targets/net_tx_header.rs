//! baton-net-tap's TX path up to the TAP write: chains popped from a synthetic split ring,
//! gathered into iovecs (`datapath::gather`, also in the RX direction), the virtio-net header
//! read from them and checked against the negotiated features (`Negotiated::check_tx_header`).
//! Nothing may panic, and:
//! - a gathered chain's byte count is the sum of its iovecs, all inside guest memory, at most
//!   `MAX_IOVS` of them;
//! - a header that passes the check is one the TAP may be given: offsets inside the frame,
//!   known flags only, checksum offload and GSO only as negotiated, GSO with a checksum and a
//!   segment size.
//!
//! Input: negotiated features (u64, limited to what baton-net-tap offers); flags (u8: bit 0
//! gather device-writable chains as RX does); a loose header (10 bytes) and frame length (u16)
//! checked on their own; the ring layout (`RingLayout`); then RAM0's contents.
#![no_main]

use baton_fuzz::guest::{RingLayout, host_ranges, inside, memory};
use baton_fuzz::input::Input;
use baton_net_tap::datapath::{MAX_IOVS, Segs, gather};
use baton_net_tap::virtio::{
    GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, Negotiated,
    OFFERED, f,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueOwnedT;

/// What an accepted header must satisfy.
fn accepted(neg: &Negotiated, hdr: &[u8; 10], frame_len: usize) {
    let field = |i: usize| usize::from(u16::from_le_bytes([hdr[i], hdr[i + 1]]));
    let (flags, gso) = (hdr[0], hdr[1]);
    assert!(field(2) <= frame_len, "hdr_len past the frame");
    assert_eq!(flags & !(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID), 0);
    if flags & HDR_F_NEEDS_CSUM != 0 {
        assert!(neg.has(f::CSUM));
        assert!(
            field(6) + field(8) + 2 <= frame_len,
            "checksum past the frame"
        );
    }
    assert_eq!(gso & GSO_ECN, 0);
    match gso {
        GSO_NONE => {}
        GSO_TCPV4 => assert!(neg.has(f::HOST_TSO4)),
        GSO_TCPV6 => assert!(neg.has(f::HOST_TSO6)),
        other => panic!("GSO type {other} accepted"),
    }
    if gso != GSO_NONE {
        assert!(flags & HDR_F_NEEDS_CSUM != 0 && field(4) > 0);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let neg = Negotiated {
        features: inp.u64() & OFFERED,
    };
    let flags = inp.u8();
    let mut loose = [0u8; 10];
    let b = inp.bytes(10);
    loose[..b.len()].copy_from_slice(b);
    let loose_len = usize::from(inp.u16());
    if neg.check_tx_header(&loose, loose_len).is_ok() {
        accepted(&neg, &loose, loose_len);
    }
    let ring = RingLayout::read(&mut inp, 1024);
    let mem = memory(inp.rest());
    let Some(mut q) = ring.queue(1024) else {
        return;
    };
    if baton_service::ring::check_avail(&q, &mem).is_err() {
        return;
    }
    let ranges = host_ranges(&mem);
    let writable = flags & 1 != 0;
    let hdr_len = neg.hdr_len();
    let Ok(iter) = q.iter(&mem) else {
        return;
    };
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(2 * MAX_IOVS + 1);
    let mut segs = Segs::default();
    for chain in iter.take(usize::from(ring.size)) {
        iovs.clear();
        let Ok(total) = gather(chain, &mem, writable, (&mut iovs, 0), &mut segs) else {
            continue;
        };
        assert!(iovs.len() <= MAX_IOVS);
        let sum: u64 = iovs.iter().map(|v| v.iov_len as u64).sum();
        assert_eq!(sum, u64::from(total), "byte count differs from the iovecs");
        for v in &iovs {
            assert!(
                inside(&ranges, v.iov_base as usize, v.iov_len),
                "iovec outside guest memory"
            );
        }
        let total = usize::try_from(total).unwrap_or(0);
        if writable || total < hdr_len {
            continue;
        }
        // The header as the TX path copies it out of the first iovecs.
        let mut hdr = [0u8; 12];
        let mut got = 0;
        for v in &iovs {
            let n = v.iov_len.min(hdr_len - got);
            // SAFETY: the iovec was just checked to lie inside guest memory, which `mem` keeps
            // mapped; `hdr` has room for `hdr_len - got >= n` more bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), hdr[got..].as_mut_ptr(), n)
            };
            got += n;
            if got == hdr_len {
                break;
            }
        }
        let head10: [u8; 10] = hdr[..10].try_into().expect("10 bytes");
        if neg.check_tx_header(&head10, total - hdr_len).is_ok() {
            accepted(&neg, &head10, total - hdr_len);
        }
    }
});
