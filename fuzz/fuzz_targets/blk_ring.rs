//! A whole split ring processed by baton-blk's queue worker (`vring::process`, the function the
//! worker thread runs after a kick) end to end: `Vring::start` (used index, inflight reconcile
//! and resubmission), the avail-index check, popping chains (virtio-queue, indirect tables),
//! resubmitted heads walked by `chain::walk`, parsing, the synchronous I/O engine on an
//! in-memory disk (a memfd), status bytes, the used ring, EVENT_IDX and the inflight region.
//! Nothing may panic, and every run must end: the target runs with a libFuzzer `-timeout`, so a
//! livelock on a hostile ring is a finding. After a run that did not give up on the ring, no
//! request may be left marked inflight.
//!
//! Input: byte 0 = device queue size (4 << (b % 9), 4..=1024); byte 1 = flags (bit 0 EVENT_IDX,
//! bit 1 inflight region, bit 2 read-only disk, bit 3 write-through, bit 4 after the ring
//! started, a new memory table keeps only RAM0's first 4 KiB); disk size in sectors (u16);
//! the ring layout (`RingLayout`, 9 bytes); with bit 1, the inflight region's length (u16) and
//! contents (a previous back-end's leftovers); then RAM0's contents.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use baton_blk::cli::{Args, IoEngineKind};
use baton_blk::device::Device;
use baton_blk::engine::Engine;
use baton_blk::inflight::InflightRegion;
use baton_blk::request::SECTOR;
use baton_blk::vring::process;
use baton_fuzz::guest::{RingLayout, memory, shrunk};
use baton_fuzz::input::Input;
use baton_fuzz::{fd_path, memfd};
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

/// Guest memory left by the front-end's second memory table (flag bit 4).
const SHRUNK: usize = 0x1000;

fn disk() -> &'static std::fs::File {
    static DISK: OnceLock<std::fs::File> = OnceLock::new();
    DISK.get_or_init(|| memfd("baton-fuzz-disk", 0, &[]))
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let max: u16 = 4 << (inp.u8() % 9);
    let flags = inp.u8();
    let sectors = u64::from(inp.u16());
    let ring = RingLayout::read(&mut inp, max);
    let inflight_bytes = if flags & 2 != 0 {
        let n = usize::from(inp.u16());
        inp.bytes(n)
    } else {
        &[]
    };
    let mem = Arc::new(memory(inp.rest()));

    let image = disk();
    image.set_len(sectors * SECTOR).expect("disk size");
    let path = fd_path(image);
    let qs = max.to_string();
    let mut argv = vec![
        "baton-blk",
        "--image",
        path.to_str().expect("path"),
        "--queue-size",
        &qs,
        "--io-engine",
        "sync",
    ];
    if flags & 4 != 0 {
        argv.push("--readonly");
    }
    let args = Args::try_parse_from(argv).expect("arguments");
    let dev = Device::new(&args).expect("device");
    if flags & 8 != 0 {
        assert!(dev.set_config(32, &[0]));
    }
    let ctl = dev.queues()[0].clone();
    let mut st = ctl.lock();
    if !ring.program(&mut st.queue) {
        return;
    }
    st.queue.set_event_idx(flags & 1 != 0);
    st.mem = Some(mem.clone());
    st.enabled = true;
    let _region = if flags & 2 != 0 {
        let (region, file, _) = InflightRegion::create(1, ring.size).expect("inflight region");
        file.write_all_at(inflight_bytes, 0)
            .expect("inflight contents");
        st.inflight = region.queue(0);
        Some(region)
    } else {
        None
    };
    if !st.start() {
        return;
    }
    if flags & 16 != 0 {
        // The front-end's next SET_MEM_TABLE, while the ring runs, keeps only the first 4 KiB.
        st.mem = Some(Arc::new(shrunk(&mem, SHRUNK)));
    }
    let mut engine = Engine::new(IoEngineKind::Sync, max);
    process(&mut st, &dev, &mut engine);
    if let (false, true, Some(inf)) = (st.broken, st.resubmit.is_empty(), &st.inflight) {
        let left = inf.pending();
        assert!(left.is_empty(), "requests left marked inflight: {left:?}");
    }
    // A second kick with nothing new.
    process(&mut st, &dev, &mut engine);
    st.stop();
});
