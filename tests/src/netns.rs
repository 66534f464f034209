//! Network namespaces for tests, the demo and benchmarks: every frame baton sends in them
//! stays inside a namespace this process created (addresses 10.213.x.x only).
//!
//! Commands return `anyhow::Result` (a test unwraps, a binary uses `?`); a failed command's
//! error carries its output.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

/// Runs `sh -c cmd`; returns stdout+stderr, or an error with it if the command failed.
pub fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("sh").args(["-c", cmd]).output()?;
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "`{cmd}` failed: {s}");
    Ok(s)
}

impl Netns {
    /// Creates `baton-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> anyhow::Result<Netns> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("baton-{tag}-{}-{n}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(&format!("ip netns add {name}"))?;
        let ns = Netns(name);
        ns.exec("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> anyhow::Result<String> {
        sh(&format!("ip netns exec {} sh -c '{cmd}'", self.0))
    }

    /// Creates a persistent multi-queue TAP `name` with `addr` (CIDR) inside the namespace.
    pub fn persistent_tap(&self, name: &str, addr: &str) -> anyhow::Result<()> {
        self.exec(&format!(
            "ip tuntap add dev {name} mode tap multi_queue vnet_hdr && ip addr add {addr} dev {name} && ip link set {name} up"
        ))
        .map(|_| ())
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it opens live there). The
    /// thread panics if it cannot enter the namespace: `join` returns that as an error.
    pub fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let nsf = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it affects only this thread.
            let r = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Why root networking (namespaces, TAPs) cannot be used here, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, TAP devices)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if sh("ip netns list").is_err() {
        return Some("`ip netns` does not work here (is iproute2 installed?)".into());
    }
    None
}

/// A TAP name unique to this process and call (at most 15 bytes, as Linux requires).
pub fn unique_tap(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag: String = tag.chars().take(4).collect();
    format!("bt{tag}{}{n}", std::process::id() % 100_000)
}
