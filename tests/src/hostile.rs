//! What tests of hostile input check about a back-end process: that it does not spin, and
//! that it answers a request in time (a watchdog kills it otherwise, so that a livelocked
//! back-end fails the test instead of hanging it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// CPU time (user + system) of process `pid` so far, from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the ')'.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Share of one CPU that process `pid` used over `window`.
pub fn cpu_share(pid: u32, window: Duration) -> f64 {
    let before = cpu_time(pid);
    std::thread::sleep(window);
    (cpu_time(pid).saturating_sub(before)).as_secs_f64() / window.as_secs_f64()
}

/// Runs `f` (a request to the back-end `pid`) and returns its result and how long it took. If
/// it has not returned after `kill_after`, the back-end is SIGKILLed so that `f` fails.
pub fn timed_with_watchdog<T>(
    pid: u32,
    kill_after: Duration,
    f: impl FnOnce() -> T,
) -> (T, Duration) {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let pid = i32::try_from(pid).unwrap_or(i32::MAX);
    let dog = std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < kill_after {
            if d.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill(2) on the back-end's pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let t = Instant::now();
    let r = f();
    let took = t.elapsed();
    done.store(true, Ordering::Release);
    let _ = dog.join();
    (r, took)
}
