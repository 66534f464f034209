//! The live-update state stream (`baton_protocol::state`): one `VmState` frame, as the old VMM
//! sends it, read with `read_frame` (decode, then `validate()`). Nothing may panic; a state that
//! is accepted must round-trip, and everything the new VMM does with an accepted state before
//! handing it to KVM (raw structure conversions, the prepare/state consistency check) must work.
//!
//! Input: byte 0 = mode (bit 0: read with `handshake::recv_state`, which also accepts an abort;
//! bit 1: wrap the payload in an abort frame instead); the rest is the JSON payload. The frame
//! header is always right (length, CRC-32), so every input reaches the JSON decoder.
#![no_main]

use baton_fuzz::frames::{frame, round_trip};
use baton_fuzz::input::Input;
use baton_protocol::frame::{Validate, read_frame};
use baton_protocol::handshake::{ABORT_KIND, HandshakeError, Prepare, recv_state};
use baton_protocol::state::{MAX_STATE_LEN, STATE_KIND, VmState, validate_devices};
use libfuzzer_sys::fuzz_target;

fn use_state(s: &VmState) {
    assert!(s.validate().is_ok());
    round_trip(&STATE_KIND, s);
    // What the restore path does with it.
    for v in &s.vcpus {
        let _ = v.regs.get();
        let _ = v.sregs.get();
        let _ = kvm_bindings::kvm_fpu::from(&v.fpu);
        let _ = v.xcrs.get();
        let _ = v.lapic.get();
        let _ = v.vcpu_events.get();
        let _ = v.debugregs.as_ref().map(|d| d.get());
        assert!(v.xsave.len() <= baton_protocol::state::MAX_XSAVE_LEN);
    }
    let _ = s.irqchip.pic_master.get();
    let _ = s.irqchip.pic_slave.get();
    let _ = s.irqchip.ioapic.get();
    let _ = s.pit.pit.get();
    let _ = kvm_bindings::kvm_clock_data::from(&s.clock);
    assert!(validate_devices(&s.config, &s.devices).is_ok());
    let prepare = Prepare {
        config: s.config.clone(),
        devices: s.devices.clone(),
    };
    assert!(
        prepare.validate().is_ok(),
        "a valid state makes an invalid prepare"
    );
    assert!(prepare.check_state(s).is_ok());
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let payload = inp.rest();
    let kind = if mode & 2 != 0 {
        ABORT_KIND
    } else {
        STATE_KIND
    };
    let wire = frame(&kind, payload);
    if mode & 1 != 0 {
        match recv_state(&mut wire.as_slice()) {
            Ok(s) => use_state(&s),
            Err(HandshakeError::Aborted(reason)) => {
                assert!(
                    !reason.is_empty() && reason.len() <= baton_protocol::handshake::MAX_TEXT_LEN
                );
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    } else {
        match read_frame::<_, VmState>(&mut wire.as_slice(), &STATE_KIND, MAX_STATE_LEN) {
            Ok(s) => use_state(&s),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
