//! The one rule for a test that cannot run here (unit tests of every crate and the integration
//! tests share it).

/// A test cannot run here (`kind`: `kvm`, `root`, `net`, `qemu`, `io_uring`, …; `why`: what is
/// missing). That is a failure — this panics — unless `BATON_ALLOW_SKIP` lists the kind
/// (comma-separated, or `all`), as a developer may allow on a laptop; CI allows none. An allowed
/// skip prints `SKIP <test>: <why>` and is appended to `$BATON_SKIP_LOG` (if set), which
/// `./test.sh` counts. Returns `why`, for callers that print it and return.
pub fn cannot_run(kind: &str, why: &str) -> String {
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map_or_else(|| "a test".to_string(), str::to_string);
    let allowed = std::env::var("BATON_ALLOW_SKIP").unwrap_or_default();
    let ok = allowed
        .split(',')
        .map(str::trim)
        .any(|k| k == kind || k == "all");
    assert!(
        ok,
        "{test} cannot run here: {why} (a {kind} prerequisite; set BATON_ALLOW_SKIP={kind} to skip it instead)"
    );
    eprintln!("SKIP {test}: {why}");
    if let Some(log) = std::env::var_os("BATON_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}\t{kind}\t{why}");
        }
    }
    why.to_string()
}
