//! baton-net-tap's control queue end to end (`Device::process_ctrl`, what the worker runs on a
//! control-queue kick): a synthetic split ring of control commands (class, command, data, ack
//! byte) over synthetic guest memory, with the negotiated features applied as SET_FEATURES does.
//! Nothing may panic, every run must end (libFuzzer `-timeout`), and no command may select a
//! queue-pair count the device does not have. The device has no TAP queue (opening one needs
//! CAP_NET_ADMIN), so it has only the control queue.
//!
//! Input: negotiated features (u64, limited to what baton-net-tap offers); the ring layout
//! (`RingLayout`); then RAM0's contents.
#![no_main]

use std::sync::atomic::Ordering;

use baton_fuzz::guest::{RingLayout, memory};
use baton_fuzz::input::Input;
use baton_net_tap::device::{Device, NetConfig, lock};
use baton_net_tap::virtio::OFFERED;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let features = inp.u64() & OFFERED;
    let ring = RingLayout::read(&mut inp, 1024);
    let mem = memory(inp.rest());
    let dev = Device::new(
        NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            pairs: 0,
        },
        Vec::new(),
    )
    .expect("device");
    dev.set_features(features)
        .expect("features without TAP queues");
    dev.mem.lock().expect("memory lock").replace(mem);
    {
        let mut v = lock(&dev.ctrl);
        if !ring.program(&mut v.queue) {
            return;
        }
        // As SET_VRING_ADDR does: the used index restarts where the driver's used ring says.
        let m = dev.mem.memory();
        if let Ok(idx) = v.queue.used_idx(&*m, Ordering::Acquire) {
            v.queue.set_next_used(idx.0);
        }
        v.started = true;
        v.enabled = true;
    }
    let before = dev.active_pairs.load(Ordering::Acquire);
    dev.process_ctrl();
    let after = dev.active_pairs.load(Ordering::Acquire);
    assert!(
        after == before || (1..=dev.pairs.len()).contains(&after),
        "a control command selected {after} queue pairs of {}",
        dev.pairs.len()
    );
    dev.process_ctrl();
    dev.stop_all();
});
