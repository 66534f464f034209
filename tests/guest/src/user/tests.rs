//! The tests selected by `test=NAME` on the command line, and the JSON result line.
//!
//! | test | what it does |
//! |---|---|
//! | `boot` (default) | nothing beyond booting |
//! | `smp` | every CPU adds [`smp::JOB_INCREMENTS`] to a shared atomic counter |
//! | `ticks n=N ms=M` | prints `tick K` every M ms (sleeping on the APIC timer), N times; 0 = forever |
//! | `idle` | halts forever with CPL3 `hlt` (the #GP idle gate), for VMM pause/resume/shutdown tests |
//! | `fault` | reads an unmapped address: the exception report and a triple fault |

use core::fmt;
use core::sync::atomic::Ordering;

use super::pvh::cmdline_value;
use super::serial::JsonStr;
use super::{Machine, blktests, iotests, nettests, smp, sys, time};
use crate::println;

/// An address above the 4 GiB identity map: reading it page-faults.
const UNMAPPED: u64 = 0x10_0000_0000;

/// Runs the test named on the command line and prints its result line.
pub fn run(m: &Machine) {
    let name = cmdline_value(m.cmdline, "test").unwrap_or("boot");
    match name {
        "boot" => report(m, name, Ok(()), format_args!("")),
        "smp" => test_smp(m),
        "ticks" => test_ticks(m),
        "idle" => loop {
            sys::hlt();
        },
        "blk" => blktests::test_blk(m),
        "blk-cont" => blktests::test_blk_cont(m),
        "blk-lat" => blktests::test_blk_lat(m),
        "virtio-bad" => blktests::test_virtio_bad(m),
        "net" => nettests::test_net(m),
        "net-cont" => nettests::test_net_cont(m),
        "io-cont" => iotests::test_io_cont(m),
        "fault" => {
            println!("baton-test-guest: fault test: reading unmapped address {UNMAPPED:#x}");
            // SAFETY: deliberately not safe: the read page-faults and the kernel's exception
            // handler stops the VM, so no value is ever produced.
            let value = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
            report(
                m,
                name,
                Err("read of an unmapped address returned"),
                format_args!(",\"value\":{value}"),
            );
        }
        _ => report(m, name, Err("unknown test"), format_args!("")),
    }
}

/// Prints the result line: `{"test":…,"result":"pass"|"fail"[,"reason":…],…}`.
pub fn report(m: &Machine, name: &str, result: Result<(), &str>, extra: fmt::Arguments) {
    struct Reason<'a>(Result<(), &'a str>);
    impl fmt::Display for Reason<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                Ok(()) => f.write_str("\"pass\""),
                Err(reason) => write!(f, "\"fail\",\"reason\":\"{}\"", JsonStr(reason)),
            }
        }
    }
    println!(
        "{{\"test\":\"{}\",\"result\":{},\"cpus\":{},\"mem_mib\":{},\"boot_ms\":{}.{:03},\"tsc_khz\":{},\"cmdline\":\"{}\"{}}}",
        JsonStr(name),
        Reason(result),
        m.cpus,
        m.mem_mib,
        m.boot_us / 1000,
        m.boot_us % 1000,
        time::tsc_hz() / 1000,
        JsonStr(m.cmdline),
        extra,
    );
}

fn test_smp(m: &Machine) {
    let aps = m.cpus - 1;
    let start = sys::rdtsc();
    let done = smp::run_on_aps(aps, 5_000_000);
    smp::run_job();
    // Wait for stragglers' increments to land (they finished, so this is just ordering).
    let counter = smp::COUNTER.load(Ordering::Acquire);
    let expected = m.cpus as u64 * smp::JOB_INCREMENTS;
    let us = time::tsc_to_us(sys::rdtsc() - start);
    let result = if done != aps as u64 {
        Err("not every AP finished its job")
    } else if counter != expected {
        Err("shared counter mismatch")
    } else {
        Ok(())
    };
    report(
        m,
        "smp",
        result,
        format_args!(
            ",\"cpus_online\":{},\"ap_jobs_done\":{done},\"counter\":{counter},\"expected\":{expected},\"job_us\":{us}",
            m.cpus
        ),
    );
}

fn test_ticks(m: &Machine) {
    let n: u64 = cmdline_value(m.cmdline, "n")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let ms: u64 = cmdline_value(m.cmdline, "ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let start = sys::rdtsc();
    let period = time::us_to_tsc(ms * 1000);
    let mut next = start;
    let mut k = 1u64;
    while n == 0 || k <= n {
        next += period;
        let now = sys::rdtsc();
        if now > next {
            // Late by more than a period (the VM was paused): restart the cadence from now
            // instead of printing a burst of overdue ticks.
            next = now + period;
        }
        time::sleep_until(next);
        println!("tick {k}");
        k += 1;
    }
    let elapsed_us = time::tsc_to_us(sys::rdtsc() - start);
    report(
        m,
        "ticks",
        Ok(()),
        format_args!(",\"n\":{n},\"ms\":{ms},\"elapsed_us\":{elapsed_us}"),
    );
}
