//! DPDK's testpmd as the net benchmark's peer: the vhost PMD (`net_vhost0`, a vhost-user-net
//! back-end in server mode) forwarding to and from the TAP PMD (`net_tap0`, a TAP it creates
//! inside the benchmark's namespace) with `--forward-mode=io`, one polling lcore.
//!
//! The set-up follows DPDK 22.11's own guides: hugepages reserved at run time
//! (linux_gsg/sys_reqs, "Reserving Hugepages for DPDK Use"), a dedicated forwarding lcore with
//! one RX/TX queue per port and io forwarding (howto/pvp_reference_benchmark, "Testpmd launch"),
//! testpmd's default burst of 32 (testpmd_app_ug/run_app, `--burst`). The vhost rings are sized
//! by the front-end (the driver), so `--rxd`/`--txd` do not apply to them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::time::Duration;

use crate::harness::wait_until;
use crate::netns::Netns;

const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

/// Errors of the testpmd peer.
#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    /// `dpdk-testpmd` is not on PATH.
    #[error("dpdk-testpmd is not installed (scripts/setup.sh installs Debian's dpdk-dev)")]
    NotInstalled,
    /// Reading or writing the 2 MiB hugepage pool failed.
    #[error("2 MiB hugepages: {0}")]
    Hugepages(#[source] std::io::Error),
    /// The kernel gave fewer free hugepages than asked for.
    #[error("asked for {wanted} free 2 MiB hugepages, the kernel has {free}")]
    HugepagesShort {
        /// Pages wanted free.
        wanted: u64,
        /// Pages free after the reservation.
        free: u64,
    },
    /// This machine has a single CPU: no lcore can be dedicated to forwarding.
    #[error("testpmd needs 2 CPUs (a main and a forwarding lcore)")]
    OneCpu,
    /// Spawning testpmd failed.
    #[error("spawning dpdk-testpmd: {0}")]
    Spawn(#[source] std::io::Error),
    /// testpmd exited or did not start forwarding in time; its output.
    #[error("dpdk-testpmd did not start forwarding: {0}")]
    Start(String),
}

fn read_u64(path: &str) -> Result<u64, DpdkError> {
    std::fs::read_to_string(path)
        .map_err(DpdkError::Hugepages)?
        .trim()
        .parse()
        .map_err(|e| DpdkError::Hugepages(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// At least `pages` free 2 MiB hugepages while this lives; the pool size it found is restored on
/// drop (if it had to grow it).
#[derive(Debug)]
pub struct Hugepages {
    restore: Option<u64>,
}

impl Hugepages {
    /// Grows the 2 MiB pool until `pages` are free.
    pub fn reserve(pages: u64) -> Result<Hugepages, DpdkError> {
        let total = read_u64(NR_HUGEPAGES)?;
        let free = read_u64(FREE_HUGEPAGES)?;
        let mut guard = Hugepages { restore: None };
        if free < pages {
            guard.restore = Some(total);
            std::fs::write(NR_HUGEPAGES, (total + pages - free).to_string())
                .map_err(DpdkError::Hugepages)?;
        }
        let free = read_u64(FREE_HUGEPAGES)?;
        if free < pages {
            return Err(DpdkError::HugepagesShort {
                wanted: pages,
                free,
            });
        }
        Ok(guard)
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        if let Some(n) = self.restore {
            let _ = std::fs::write(NR_HUGEPAGES, n.to_string());
        }
    }
}

/// How testpmd is started.
#[derive(Debug, Clone)]
pub struct TestPmdOptions {
    /// The vhost-user socket testpmd listens on.
    pub socket: PathBuf,
    /// The TAP the TAP PMD creates (in the namespace).
    pub tap: String,
    /// `tso=1` on the vhost PMD (offers HOST/GUEST_TSO and CSUM) with `legacy-ol-flags=1`, so
    /// a TSO frame from the driver leaves the vhost port with TX offload flags that the TAP
    /// PMD acts on (it segments in software), and TSO/checksum TX offloads on both ports.
    pub tso: bool,
}

/// A running testpmd (interactive, commands on its stdin), killed on drop.
pub struct TestPmd {
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The TAP it created.
    pub tap: String,
    /// Its command line and set-up, for the benchmark's `peer_config`.
    pub config: String,
}

impl std::fmt::Debug for TestPmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPmd")
            .field("socket", &self.socket)
            .field("tap", &self.tap)
            .finish()
    }
}

/// Hugepages testpmd's mbuf pools take (its default pool is ~185 pages); the PVP guide gives
/// testpmd 1 GiB (`--socket-mem=1024`).
pub const HUGEPAGES: u64 = 512;

impl TestPmd {
    /// Starts testpmd in `ns` (output to `dir/testpmd.log`) and waits until it forwards and
    /// its TAP exists. Needs [`HUGEPAGES`] free 2 MiB hugepages ([`Hugepages::reserve`]).
    pub fn start(ns: &Netns, dir: &Path, o: &TestPmdOptions) -> Result<TestPmd, DpdkError> {
        if crate::netns::sh("command -v dpdk-testpmd").is_err() {
            return Err(DpdkError::NotInstalled);
        }
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        if cpus < 2 {
            return Err(DpdkError::OneCpu);
        }
        let fwd = cpus - 1;
        let mut vhost = format!("net_vhost0,iface={},queues=1", o.socket.display());
        // Interactive commands (on stdin): the TAP port's TX offloads are set per port, since
        // the vhost port does not advertise them and `--tx-offloads` applies to every port.
        let mut commands = Vec::new();
        if o.tso {
            vhost.push_str(",tso=1,legacy-ol-flags=1");
            commands.push("port stop 1".to_string());
            for off in [
                "ipv4_cksum",
                "udp_cksum",
                "tcp_cksum",
                "tcp_tso",
                "multi_segs",
            ] {
                commands.push(format!("port config 1 tx_offload {off} on"));
            }
            // The TAP PMD refuses a TSO frame when MSS + L2/L3/L4 headers exceed the port MTU
            // (its check counts the 14-byte Ethernet header, so a 1448-byte MSS with 54 bytes
            // of headers fails at MTU 1500): the TAP port gets its largest MTU, 1504.
            commands.push("port config mtu 1 1504".into());
            commands.push("port start 1".into());
        }
        commands.push("start".into());
        let eal = [
            "-l".to_string(),
            format!("0,{fwd}"),
            "-n".into(),
            "4".into(),
            "-v".into(),
            "--no-pci".into(),
            "--in-memory".into(),
            "--vdev".into(),
            vhost,
            "--vdev".into(),
            format!("net_tap0,iface={}", o.tap),
        ];
        let app = [
            "--".to_string(),
            "-i".into(),
            "--nb-cores=1".into(),
            "--rxq=1".into(),
            "--txq=1".into(),
            "--burst=32".into(),
            "--forward-mode=io".into(),
            "--disable-link-check".into(),
        ];
        let args: Vec<String> = eal.into_iter().chain(app).collect();
        let log = dir.join("testpmd.log");
        let out = std::fs::File::create(&log).map_err(DpdkError::Spawn)?;
        let err = out.try_clone().map_err(DpdkError::Spawn)?;
        // Line-buffered stdout (coreutils' stdbuf): testpmd's messages land in the log as
        // printed, interleaved with its prompt, so readiness and errors can be read from it.
        let mut c = ns.command(Path::new("stdbuf"));
        c.args(["-oL", "dpdk-testpmd"])
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err);
        let mut child = c.spawn().map_err(DpdkError::Spawn)?;
        let mut stdin = child.stdin.take();
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(format!("{}\n", commands.join("\n")).as_bytes());
        }
        let config = format!(
            "dpdk-testpmd {}, then `{}` ({HUGEPAGES} x 2 MiB hugepages reserved, --in-memory: \
             memfd hugepages); lcore 0 main (idle at the prompt), lcore {fwd} the one forwarding \
             core busy-polling both ports{}",
            args.join(" "),
            commands.join("; "),
            if cpus == 2 {
                "; on this 2-CPU machine the driver and the traffic generator share the other CPU"
            } else {
                ""
            }
        );
        let mut pmd = TestPmd {
            child,
            stdin,
            log,
            socket: o.socket.clone(),
            tap: o.tap.clone(),
            config,
        };
        // `start` prints "io packet forwarding - ports=2" once both ports run (the TAP exists).
        let up = wait_until(Duration::from_secs(30), || {
            if !matches!(pmd.child.try_wait(), Ok(None)) {
                return Some(false);
            }
            let ready =
                pmd.log_text().contains("io packet forwarding - ports=2") && pmd.socket.exists();
            ready.then_some(true)
        });
        let log = pmd.log_text();
        // A refused command prints "Error: ..." (an MTU "Frame size ... > device max ..."); a
        // failed port set-up "Fail to ...".
        let failed = log.lines().any(|l| {
            l.starts_with("Error")
                || l.starts_with("Fail to")
                || l.contains("Cause:")
                || l.contains("> device max")
        });
        if up != Some(true) || failed {
            return Err(DpdkError::Start(log));
        }
        if let Some(v) = pmd
            .log_text()
            .lines()
            .find_map(|l| l.split("RTE Version: '").nth(1))
        {
            pmd.config = format!("{} [{}]", pmd.config, v.trim_end_matches('\''));
        }
        Ok(pmd)
    }

    /// Everything it printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops forwarding (`stop` prints testpmd's forwarding statistics), quits (closing its
    /// ports) and returns its output.
    pub fn stop(mut self) -> String {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"stop\nquit\n");
        }
        let _ = wait_until(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten()
        });
        self.log_text()
    }
}

impl Drop for TestPmd {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
