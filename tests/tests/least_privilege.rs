//! Least privilege: `--user UID[:GID]` makes baton-blk and baton-net-tap, started as root,
//! drop to that uid and gid with no capability once the image or TAP is open and the socket
//! bound, before the sandbox; they still serve. And the systemd units' model: baton-net-tap
//! started unprivileged attaches to a persistent TAP created for its uid. And baton-vmm with
//! `--user`: /dev/kvm, the kernel and the RAM file opened as root, the guest run as 65534.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use baton_tests::blk::*;
use baton_tests::boot::baton_cmd;
use baton_tests::harness::{Need, Proc, TempDir, bin, can_run_with, run_to_end};
use baton_tests::hostile::get_features;
use baton_tests::local_users::NOBODY;
use baton_tests::net::*;
use baton_tests::netns::{Netns, unique_tap};
use baton_tests::services::start_service;
use baton_tests::vhost_user::blk::*;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

/// The `Name:` line of /proc/PID/status, its fields.
fn status_field(pid: u32, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line.split_whitespace().map(str::to_string).collect()
}

/// Every uid and gid (real, effective, saved, fs) is `id`, no supplementary group, no
/// capability left.
fn assert_unprivileged(pid: u32, id: u32) {
    let id = id.to_string();
    assert_eq!(status_field(pid, "Uid"), [id.as_str(); 4]);
    assert_eq!(status_field(pid, "Gid"), [id.as_str(); 4]);
    assert_eq!(status_field(pid, "Groups"), Vec::<String>::new());
    for set in ["CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(pid, set), ["0000000000000000"], "{set}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), ["1"]);
}

#[test]
fn blk_user_drops_to_nobody_and_serves() {
    if !can_run_with("blk_user_drops_to_nobody_and_serves", &[Need::Root]) {
        return;
    }
    let dir = tmpdir("least-privilege");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let log = dir.join("blk.log");
    // The driver connects as root (us): it has to be allowed, the service's own uid is 65534.
    let user = NOBODY.to_string();
    let mut b = Blk::start_with_log(
        dir,
        img,
        &["--queues", "2", "--user", &user, "--allow-uid", "0"],
        Some(&log),
    );
    let pid = b.proc.child.id();
    let mut d = BlkDriver::connect(
        &b.sock,
        BlkOptions {
            queues: 2,
            mem_size: 32 * MIB,
            slots: 32,
            ..BlkOptions::default()
        },
    )
    .unwrap();
    for q in 0..2 {
        let data = pattern(q as u64 + 7, 8192);
        assert_eq!(d.queue(q).write(q as u64 * 64, &data).unwrap(), S_OK);
        assert_eq!(d.queue(q).read(q as u64 * 64, 8192).unwrap(), (S_OK, data));
        assert_eq!(d.queue(q).flush().unwrap(), S_OK);
    }
    assert_unprivileged(pid, NOBODY);
    let meta = std::fs::metadata(&b.sock).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY), "socket owner");
    drop(d);
    let st = b.signal_and_wait(libc::SIGTERM);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(st.code(), Some(0), "{text}");
    assert!(text.contains("dropped privileges"), "{text}");
    // The drop comes before the filters, which all went in (2 workers + control).
    assert!(
        text.contains("seccomp: 3 filters installed (worker, worker, control)"),
        "{text}"
    );
    assert!(!text.contains("made a forbidden"), "{text}");
}

#[test]
fn blk_user_is_refused_clearly_unless_root_and_never_root() {
    if !can_run_with("blk_user_is_refused_clearly_unless_root", &[Need::Root]) {
        return;
    }
    let dir = tmpdir("least-privilege-refused");
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let sock = dir.join("blk.sock");
    let args = [
        os("--image".as_ref()),
        os(&img),
        os("--socket".as_ref()),
        os(&sock),
        os("--user".as_ref()),
        os("65533".as_ref()),
    ];
    let (code, err) = run_failing(&args, true);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--user 65533:65533 needs the process to be started as root")
            && err.contains("it runs as uid 65534"),
        "{err}"
    );
    assert!(!sock.exists(), "refused before binding");
    for (bad, why) in [("0", "would keep root"), ("nobody", "not a numeric uid")] {
        let (code, err) = run_failing(
            &[
                os("--image".as_ref()),
                os(&img),
                os("--user".as_ref()),
                os(bad.as_ref()),
            ],
            false,
        );
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(why), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn net_tap_user_drops_to_nobody_and_serves() {
    if !can_run_with("net_tap_user_drops_to_nobody_and_serves", &[Need::Net]) {
        return;
    }
    let ns = Netns::new("lp1").unwrap();
    let dir = TempDir::new("least-privilege-net");
    let name = unique_tap("lp");
    let user = format!("{NOBODY}:{NOBODY}");
    let mut tap = NetTap::start(
        &ns,
        &dir,
        &[
            "--tap",
            &name,
            "--queues",
            "2",
            "--user",
            &user,
            "--allow-uid",
            "0",
        ],
    );
    assert!(
        tap.wait_log(
            "seccomp: 4 filters installed (signals, worker, worker, control)",
            WAIT
        ),
        "{}",
        tap.log_text()
    );
    assert!(tap.log_text().contains("dropped privileges"));
    assert_unprivileged(tap.proc.child.id(), NOBODY);
    assert_ne!(get_features(&tap.socket), 0);
    assert!(tap.wait_log("front-end gone", WAIT), "{}", tap.log_text());
    assert_ne!(get_features(&tap.socket), 0, "a second front-end");
    assert_eq!(tap.terminate(), Some(0), "{}", tap.log_text());
    assert!(!tap.log_text().contains("made a forbidden"));
}

/// What the systemd unit does: the TAP is created persistent, owned by the service's uid
/// (`ExecStartPre=+ip tuntap add ... user`), and the service runs as that uid from the start.
#[test]
fn net_tap_unprivileged_attaches_to_a_tap_made_for_its_uid() {
    if !can_run_with(
        "net_tap_unprivileged_attaches_to_a_tap_made_for_its_uid",
        &[Need::Net, Need::Program("setpriv")],
    ) {
        return;
    }
    let ns = Netns::new("lp2").unwrap();
    let dir = TempDir::new("least-privilege-unit");
    // The service binds its socket and removes it at exit: its directory is its own.
    std::os::unix::fs::chown(&dir.0, Some(NOBODY), Some(NOBODY)).unwrap();
    let name = unique_tap("lu");
    ns.exec(&format!(
        "ip tuntap add dev {name} mode tap multi_queue vnet_hdr user {NOBODY} group {NOBODY}"
    ))
    .unwrap();
    let socket = dir.join("net.sock");
    let log = dir.join("net-tap.log");
    // /dev/net/tun is 0666 on a distribution (udev), but may be 0600 on a test machine: a
    // private mount namespace gets a 0666 node of its own.
    let program = baton_tests::harness::bin("baton-net-tap");
    let script = format!(
        "mount -t tmpfs tun /dev/net && mknod -m 666 /dev/net/tun c 10 200 && \
         exec setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups --inh-caps=-all \
         --bounding-set=-all -- {} --socket {} --tap {name} --queues 2 --allow-uid 0",
        program.display(),
        socket.display()
    );
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &ns.0,
        "unshare",
        "--mount",
        "--propagation",
        "private",
    ])
    .args(["sh", "-c", &script])
    .env("RUST_LOG", "info");
    let proc = start_service(c, &socket, Some(&log)).unwrap_or_else(|e| {
        panic!(
            "baton-net-tap did not come up: {e}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let mut tap = NetTap { proc, socket, log };
    assert!(
        tap.wait_log("seccomp: 4 filters installed", WAIT),
        "{}",
        tap.log_text()
    );
    assert_unprivileged(tap.proc.child.id(), NOBODY);
    assert_ne!(get_features(&tap.socket), 0);
    assert_eq!(tap.terminate(), Some(0), "{}", tap.log_text());
    assert!(!tap.socket.exists(), "socket left behind");
    // Its own TAP, persistent: still there for the next start.
    assert!(ns.exec(&format!("ip link show {name}")).is_ok());
}

#[test]
fn vmm_user_drops_to_nobody_after_opening_kvm_and_runs_the_guest() {
    if !can_run_with(
        "vmm_user_drops_to_nobody",
        &[Need::Kvm, Need::Guest, Need::Root],
    ) {
        return;
    }
    let dir = tmpdir("vmm-user");
    let sock = dir.join("api.sock");
    let log = dir.join("vmm.log");
    let name = format!("t{}-vmm-user", std::process::id());
    let ram_dir = std::path::PathBuf::from(format!("/dev/shm/baton-{NOBODY}"));
    let ram = ram_dir.join(format!("{name}.ram"));
    let user = NOBODY.to_string();
    let mut cmd = baton_cmd(1, "128M", "test=ticks n=0 ms=20");
    cmd.args(["--name", &name, "--user", &user, "--allow-uid", "0"])
        .arg("--api-socket")
        .arg(&sock)
        .env("BATON_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let mut p = Proc::spawn(cmd).unwrap();
    let pid = p.child.id();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        p.wait_line(WAIT * 3, |l| l.contains("ready")).is_some(),
        "{}\n{}",
        p.transcript(),
        text()
    );
    assert!(
        p.wait_line(WAIT, |l| l.contains("tick 3")).is_some(),
        "the vCPU runs after the drop:\n{}\n{}",
        p.transcript(),
        text()
    );
    assert_unprivileged(pid, NOBODY);
    // The RAM file and its directory are nobody's (a live update's incoming VMM running as
    // nobody opens it); the API socket too.
    let m = std::fs::symlink_metadata(&ram).unwrap();
    assert_eq!((m.uid(), m.gid()), (NOBODY, NOBODY), "{}", ram.display());
    assert_eq!(m.mode() & 0o7777, 0o600, "{}", ram.display());
    // The directory is shared by every VMM of the uid (whichever created it chose its group;
    // at 0700 the group reaches nothing).
    let m = std::fs::symlink_metadata(&ram_dir).unwrap();
    assert_eq!(m.uid(), NOBODY, "{}", ram_dir.display());
    assert_eq!(m.mode() & 0o7777, 0o700, "{}", ram_dir.display());
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!((m.uid(), m.gid()), (NOBODY, NOBODY), "socket owner");
    // The API answers root, allowed with --allow-uid 0.
    let info = run_to_end(
        {
            let mut c = Command::new(bin("batonctl"));
            c.arg("--api-socket").arg(&sock).arg("info");
            c
        },
        WAIT,
    )
    .unwrap();
    assert_eq!(info.code, Some(0), "{info:?}");
    assert!(info.stdout.contains("\"running\""), "{info:?}");
    let shutdown = run_to_end(
        {
            let mut c = Command::new(bin("batonctl"));
            c.arg("--api-socket").arg(&sock).arg("shutdown");
            c
        },
        WAIT,
    )
    .unwrap();
    assert_eq!(shutdown.code, Some(0), "{shutdown:?}");
    assert_eq!(p.wait_exit(WAIT), Some(0), "{}", text());
    let text = text();
    assert!(text.contains("dropped privileges"), "{text}");
    assert!(!text.contains("made a forbidden"), "{text}");
    assert!(!ram.exists(), "RAM file removed at exit by nobody");
    let _ = std::fs::remove_dir(&ram_dir);
    // The API socket stays: nobody cannot remove it from root's directory.
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vmm_user_is_refused_with_incoming_and_without_root() {
    let mut c = Command::new(bin("baton-vmm"));
    c.args([
        "--incoming",
        "/nonexistent/baton-vmm-user.sock",
        "--user",
        "65534",
    ]);
    let f = run_to_end(c, WAIT).unwrap();
    assert_eq!(f.code, Some(1), "{f:?}");
    assert!(
        f.stderr
            .contains("--user 65534:65534 cannot be used with --incoming"),
        "{f:?}"
    );
    let mut c = Command::new(bin("baton-vmm"));
    c.args(["--kernel", "/nonexistent", "--user", "0"]);
    let f = run_to_end(c, WAIT).unwrap();
    assert_ne!(f.code, Some(0), "{f:?}");
    assert!(f.stderr.contains("would keep root"), "{f:?}");
}

/// The whole job with nothing as root: baton-blk drops to nobody, the VMM to nobody:kvm (it
/// reaches /dev/kvm through the group), live updates to new VMMs started as nobody:kvm, a
/// back-end restart, and the guest's verified writes lose nothing.
#[test]
fn an_unprivileged_vm_live_updates_and_survives_a_backend_restart() {
    use baton_tests::services::{Vmm, kill, start_blk, verify_blk_cont_image};
    use std::os::unix::fs::PermissionsExt;
    if !can_run_with(
        "an_unprivileged_vm_live_updates_and_survives_a_backend_restart",
        &[Need::Kvm, Need::Guest, Need::Root],
    ) {
        return;
    }
    let kvm_gid = nix::unistd::Group::from_name("kvm")
        .unwrap()
        .map(|g| g.gid.as_raw())
        .expect("a kvm group that owns /dev/kvm");
    let dir = TempDir::new("unprivileged-lu");
    std::os::unix::fs::chown(&dir.0, Some(NOBODY), Some(kvm_gid)).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let blk_sock = dir.join("blk.sock");
    let nobody = NOBODY.to_string();
    let mut blk = start_blk(&img, &blk_sock, &["--user", &nobody]).unwrap();
    // The first VMM opens /dev/kvm as root; the new ones reach it through the kvm group.
    let user = NOBODY.to_string();
    let mut c = baton_cmd(2, "128M", "test=blk-cont seconds=0 blocks=1024");
    c.arg("--disk")
        .arg(format!("socket={}", blk_sock.display()))
        .args(["--user", &user, "--allow-uid", "0"]);
    let mut vmm = Vmm::boot(c, dir.join("vmm.api")).unwrap();
    assert!(
        vmm.proc
            .wait_line(WAIT * 3, |l| l.contains("ready"))
            .is_some(),
        "{}",
        vmm.proc.transcript()
    );
    let uid = |pid: u32| status_field(pid, "Uid")[0].parse::<u32>().unwrap();
    assert_eq!(uid(blk.child.id()), NOBODY);
    assert_eq!(uid(vmm.proc.child.id()), NOBODY);
    for n in 0..2 {
        let (new, sock) =
            Vmm::incoming_as(&dir.0, n, &["--allow-uid", "0"], Some((NOBODY, kvm_gid))).unwrap();
        vmm.live_update(&sock).unwrap();
        assert_eq!(
            vmm.proc.wait_exit(WAIT),
            Some(0),
            "{}",
            vmm.proc.transcript()
        );
        vmm = new;
        assert_eq!(uid(vmm.proc.child.id()), NOBODY, "the new VMM");
        std::thread::sleep(Duration::from_millis(200));
    }
    kill(&mut blk, libc::SIGKILL);
    blk = start_blk(&img, &blk_sock, &["--user", &nobody]).unwrap();
    vmm.wait_reconnects(0, 1).unwrap();
    assert_eq!(uid(blk.child.id()), NOBODY, "the restarted back-end");
    std::thread::sleep(Duration::from_millis(300));
    vmm.proc.send(b"q").unwrap();
    assert_eq!(vmm.proc.wait_exit(WAIT * 3), Some(0));
    let r = baton_tests::harness::result_json(&vmm.proc.seen).unwrap_or_default();
    assert_eq!(r["result"], "pass", "{r}");
    for k in ["io_errors", "verify_errors", "outstanding"] {
        assert_eq!(r[k], 0, "{k}: {r}");
    }
    drop(blk);
    assert!(
        verify_blk_cont_image(&img, 1024).unwrap() > 0,
        "the image holds the writes"
    );
}
