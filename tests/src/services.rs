//! baton's processes as the demo, benchmarks and tests drive them: back-ends, a VMM with its
//! API, live updates and back-end restarts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Proc, bin, run_to_end, wait_until};
use crate::local_users::{backend_user_args, start_as_test_user, test_user};
use crate::netns::Netns;

/// How long any one step may take.
pub const STEP: Duration = Duration::from_secs(30);

/// Starts a service: `cmd` with its stderr appended to `log` (`None`: `<socket>.log`, see
/// [`log_file`]), after removing a stale `socket`; waits until `socket` exists. An error if
/// the process exits first or the socket does not appear within [`STEP`]. Every service the
/// tests, the demo and the benchmarks start goes through here.
pub fn start_service(mut cmd: Command, socket: &Path, log: Option<&Path>) -> anyhow::Result<Proc> {
    let _ = std::fs::remove_file(socket);
    let name = Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    cmd.stderr(match log {
        Some(l) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(l)?,
        None => log_file(socket)?,
    });
    let mut p = Proc::spawn(cmd).map_err(|e| anyhow::anyhow!("cannot run {name}: {e}"))?;
    let up = wait_until(STEP, || {
        if socket.exists() {
            return Some(true);
        }
        p.child.try_wait().ok().flatten().map(|_| false)
    });
    match up {
        Some(true) => Ok(p),
        Some(false) => anyhow::bail!("{name} exited before creating {}", socket.display()),
        None => anyhow::bail!("{name} did not create {}", socket.display()),
    }
}

/// The `baton-blk` command line serving `image` at `socket`, dropping to the test user
/// ([`backend_user_args`]).
pub fn blk_command(image: &Path, socket: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin("baton-blk"));
    c.arg("--socket")
        .arg(socket)
        .arg("--image")
        .arg(image)
        .args(extra)
        .args(backend_user_args(extra));
    c
}

/// Starts `baton-blk` on `image` at `socket` and waits for the socket.
pub fn start_blk(image: &Path, socket: &Path, extra: &[&str]) -> anyhow::Result<Proc> {
    start_service(blk_command(image, socket, extra), socket, None)
}

/// Creates a sparse image of `size` bytes at `image` and starts `baton-blk` on it.
pub fn start_blk_on_new_image(
    image: &Path,
    size: u64,
    socket: &Path,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    std::fs::File::create(image)?.set_len(size)?;
    start_blk(image, socket, extra)
}

/// Starts `qemu-storage-daemon` exporting `image` (a raw file) as a writable vhost-user-blk
/// back-end with `queues` queues at `socket`, and waits for the socket. With `iops`, requests
/// beyond that rate wait in qemu-storage-daemon (a throttle group), so that some are always in
/// flight. It runs as the test user, as the VMMs that connect to it do (and so the image is
/// given to that user). An error (not a skip) when qemu-storage-daemon is not installed:
/// `scripts/setup.sh` installs it.
pub fn start_qsd_blk(
    image: &Path,
    socket: &Path,
    queues: u16,
    iops: Option<u32>,
) -> anyhow::Result<Proc> {
    let mut c = Command::new("qemu-storage-daemon");
    if let Some(u) = test_user() {
        std::os::unix::fs::chown(image, Some(u.uid), Some(u.gid))?;
    }
    start_as_test_user(&mut c, &[], false);
    c.arg("--blockdev").arg(format!(
        "driver=file,node-name=f0,filename={}",
        image.display()
    ));
    let node = match iops {
        Some(n) => {
            c.arg("--object")
                .arg(format!("throttle-group,id=tg0,x-iops-total={n}"))
                .arg("--blockdev")
                .arg("driver=throttle,node-name=t0,throttle-group=tg0,file=f0");
            "t0"
        }
        None => "f0",
    };
    c.arg("--export").arg(format!(
        "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues={queues}",
        socket.display()
    ));
    start_service(c, socket, None)
        .map_err(|e| anyhow::anyhow!("{e} (scripts/setup.sh installs qemu-storage-daemon)"))
}

/// The `baton-net-tap --socket SOCKET ARGS` command line, run inside `ns`, dropping to the
/// test user once its TAP is open ([`backend_user_args`]).
pub fn net_tap_command(ns: &Netns, socket: &Path, args: &[&str]) -> Command {
    let mut c = ns.command(&bin("baton-net-tap"));
    c.arg("--socket")
        .arg(socket)
        .args(args)
        .args(backend_user_args(args));
    c
}

/// Starts `baton-net-tap` inside `ns` on TAP `tap` and waits for the socket.
pub fn start_net_tap(ns: &Netns, tap: &str, socket: &Path) -> anyhow::Result<Proc> {
    start_service(net_tap_command(ns, socket, &["--tap", tap]), socket, None)
}

/// Starts `baton-net-tap --tap TAP EXTRA` inside `ns` under `baton-supervise`, which binds the
/// socket at `socket`, keeps the TAP queues the service stores, and restarts it whenever it
/// dies; waits until the TAP exists. baton-net-tap drops to the test user once its TAP queue
/// is open, still letting root in (whose VMMs and drivers connect). Stop it with SIGTERM
/// (dropping the [`Proc`] does); kill the service itself ([`service_pid`]) to restart it.
pub fn start_supervised_net_tap(
    ns: &Netns,
    tap: &str,
    socket: &Path,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    let user = test_user().map(|u| u.uid);
    let mut args = extra.to_vec();
    if user.is_some() && !extra.contains(&"--allow-uid") {
        args.extend(["--allow-uid", "0"]);
    }
    start_supervised_net_tap_as(ns, tap, socket, &args, user)
}

/// [`start_supervised_net_tap`] with baton-net-tap dropping to `user` (`--user`) once its TAP
/// queue is open; baton-supervise lets that uid reach the socket and the notify socket.
pub fn start_supervised_net_tap_as(
    ns: &Netns,
    tap: &str,
    socket: &Path,
    extra: &[&str],
    user: Option<u32>,
) -> anyhow::Result<Proc> {
    let mut c = ns.command(&bin("baton-supervise"));
    c.arg("--socket").arg(socket);
    if let Some(uid) = user {
        c.args(["--allow-uid", &uid.to_string()]);
    }
    c.arg("--")
        .arg(bin("baton-net-tap"))
        .args(["--tap", tap])
        .args(extra);
    if let Some(uid) = user {
        c.args(["--user", &uid.to_string()]);
    }
    let p = start_service(c, socket, None)?;
    let sys = format!("/sys/class/net/{tap}");
    wait_until(STEP, || {
        (socket.exists() && ns.exec(&format!("test -e {sys}")).is_ok()).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("baton-supervise / baton-net-tap did not come up"))?;
    Ok(p)
}

/// The pid of the service a `baton-supervise` runs now (its child), if one runs.
pub fn service_pid(supervisor: &Proc) -> Option<i32> {
    let sup = i32::try_from(supervisor.child.id()).ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        let ppid: i32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == sup).then_some(pid)
    })
}

/// `<path>.log`, appended to: where a service's stderr goes.
pub fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    let mut p = path.as_os_str().to_owned();
    p.push(".log");
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)?)
}

/// Sends `sig` to a child and waits for it to exit.
pub fn kill(p: &mut Proc, sig: i32) -> Option<i32> {
    // SAFETY: kill(2) on our own, not yet reaped, child.
    unsafe { libc::kill(i32::try_from(p.child.id()).unwrap_or(0), sig) };
    p.wait_exit(STEP)
}

/// A baton-vmm process and its API socket.
pub struct Vmm {
    /// The process (stdin piped to the guest's UART).
    pub proc: Proc,
    /// Its API socket.
    pub api: PathBuf,
}

/// `batonctl ARGS` against `api`: (exit code, stdout, stderr).
pub fn batonctl(api: &Path, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let mut c = Command::new(bin("batonctl"));
    c.arg("--api-socket").arg(api).args(args);
    let f = run_to_end(c, Duration::from_secs(120))?;
    Ok((f.code, f.stdout, f.stderr))
}

impl Vmm {
    /// Boots `cmd` (a baton-vmm command line without `--api-socket`) with the API at `api`.
    pub fn boot(mut cmd: Command, api: PathBuf) -> anyhow::Result<Vmm> {
        cmd.arg("--api-socket").arg(&api);
        Ok(Vmm {
            proc: Proc::spawn_with_stdin(cmd)?,
            api,
        })
    }

    /// A `baton-vmm --incoming` in `dir`, numbered `n`; returns it and its incoming socket.
    pub fn incoming(dir: &Path, n: usize) -> anyhow::Result<(Vmm, PathBuf)> {
        Self::incoming_with(dir, n, &[])
    }

    /// [`Vmm::incoming`] with `extra` options (e.g. `--serial`).
    pub fn incoming_with(dir: &Path, n: usize, extra: &[&str]) -> anyhow::Result<(Vmm, PathBuf)> {
        Self::incoming_as(dir, n, extra, None)
    }

    /// [`Vmm::incoming_with`], run as `user` (uid, gid) when given, else as the test user
    /// ([`start_as_test_user`]): a new VMM takes `--user` only when it boots, so an
    /// unprivileged one is started as its user.
    pub fn incoming_as(
        dir: &Path,
        n: usize,
        extra: &[&str],
        user: Option<(u32, u32)>,
    ) -> anyhow::Result<(Vmm, PathBuf)> {
        let sock = dir.join(format!("incoming{n}.sock"));
        let api = dir.join(format!("vmm{n}.api"));
        let mut c = Command::new(bin("baton-vmm"));
        c.arg("--incoming").arg(&sock).arg("--api-socket").arg(&api);
        c.args(extra);
        if let Some((uid, gid)) = user {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        } else {
            start_as_test_user(&mut c, extra, true);
        }
        c.stderr(log_file(&api)?);
        let vmm = Vmm {
            proc: Proc::spawn_with_stdin(c)?,
            api,
        };
        wait_until(STEP, || sock.exists().then_some(()))
            .ok_or_else(|| anyhow::anyhow!("incoming VMM did not listen"))?;
        Ok((vmm, sock))
    }

    /// `vm.info` as JSON.
    pub fn info(&self) -> anyhow::Result<serde_json::Value> {
        let (_, out, err) = batonctl(&self.api, &["info"])?;
        serde_json::from_str(out.trim()).map_err(|e| anyhow::anyhow!("vm.info: {e}: {err}"))
    }

    /// Moves the VM to the VMM listening on `dest`; returns the report.
    pub fn live_update(&self, dest: &Path) -> anyhow::Result<serde_json::Value> {
        let (code, out, err) = batonctl(&self.api, &["live-update", &dest.display().to_string()])?;
        anyhow::ensure!(code == Some(0), "live update failed: {err}");
        Ok(serde_json::from_str(out.trim())?)
    }

    /// Waits until device `dev` has reconnected `n` times and is connected; returns how long
    /// that took.
    pub fn wait_reconnects(&self, dev: usize, n: u64) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        wait_until(STEP, || {
            let i = self.info().ok()?;
            let d = &i["devices"][dev];
            (d["reconnects"] == n && d["backend"] == "connected").then_some(())
        })
        .ok_or_else(|| anyhow::anyhow!("device {dev} did not reconnect"))?;
        Ok(t0.elapsed())
    }
}

/// Marker word 2 of every block the guest's `blk-cont`/`io-cont` writes ("baton-bk").
pub const BLK_CONT_MARKER: u64 = 0x6261_746f_6e2d_626b;

/// The sequence number of a 4 KiB block written by the guest's `blk-cont`/`io-cont` (word 0,
/// little endian), if the block carries the marker.
pub fn blk_cont_seq(block: &[u8]) -> Option<u64> {
    let word = |i: usize| -> Option<u64> {
        let mut w = [0u8; 8];
        w.copy_from_slice(block.get(i * 8..i * 8 + 8)?);
        Some(u64::from_le_bytes(w))
    };
    (word(2)? == BLK_CONT_MARKER).then(|| word(0)).flatten()
}

/// The highest sequence number among the first `blocks` 4 KiB blocks of an image the guest's
/// `blk-cont`/`io-cont` writes, if it wrote any yet: it grows while the guest writes.
pub fn blk_cont_max_seq(img: &Path, blocks: usize) -> Option<u64> {
    let data = std::fs::read(img).ok()?;
    data.chunks_exact(4096)
        .take(blocks)
        .filter_map(blk_cont_seq)
        .max()
}

/// Checks every 4 KiB block of an image the guest's `blk-cont`/`io-cont` wrote: either never
/// written, or a block that names its own sector and a sequence number that maps to it.
/// Returns how many blocks were written.
pub fn verify_blk_cont_image(img: &Path, blocks: usize) -> anyhow::Result<u64> {
    let data = std::fs::read(img)?;
    let mut written = 0;
    for (b, block) in (0u64..).zip(data.chunks_exact(4096).take(blocks)) {
        if block.iter().all(|&x| x == 0) {
            continue;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&block[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        let (seq, sector, marker) = (word(0), word(1), word(2));
        anyhow::ensure!(marker == BLK_CONT_MARKER, "block {b}: no marker");
        anyhow::ensure!(sector == b * 8, "block {b}: names sector {sector}");
        anyhow::ensure!(
            seq % blocks as u64 == b,
            "block {b}: sequence number {seq} belongs elsewhere"
        );
        written += 1;
    }
    Ok(written)
}
