//! `./demo.sh`: boots the test guest on baton-vmm and reports what happened. The last line
//! printed is one JSON object with the figures.

use std::time::Duration;

use baton_tests::boot::{baton_cmd, timed_boot};
use baton_tests::harness::result_json;
use serde_json::json;

fn main() -> anyhow::Result<()> {
    println!("== baton demo: booting the test guest on baton-vmm (2 vCPUs, 256 MiB)");
    let boot = timed_boot(baton_cmd(2, 256, "test=smp"), Duration::from_secs(60))?;
    for l in &boot.lines {
        println!("   guest | {l}");
    }
    let result = result_json(&boot.lines);
    let passed = result.as_ref().is_some_and(|r| r["result"] == "pass");
    println!(
        "== guest ready after {:.1} ms (exec of baton-vmm to the ready line); guest test {}; \
         baton-vmm exit code {:?}",
        boot.ready_ms,
        if passed { "passed" } else { "FAILED" },
        boot.exit_code
    );
    println!(
        "{}",
        json!({
            "guest_ready": true,
            "boot_ms": (boot.ready_ms * 10.0).round() / 10.0,
            "guest_test_passed": passed,
            "vmm_exit_code": boot.exit_code,
        })
    );
    anyhow::ensure!(passed && boot.exit_code == Some(0), "demo failed");
    Ok(())
}
