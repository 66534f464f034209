//! baton-blk under QEMU (TCG) with a real Linux guest (Debian cloud kernel + busybox initramfs
//! from tests/linux-guest/build.sh): the guest writes patterns and discards, the host checks
//! the image, then a second QEMU connects to the same running baton-blk and reads the same data.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code: panics are failures

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton_tests::blk::*;
use baton_tests::harness;
use baton_tests::harness::{Need, can_run_with, wait_until};
use baton_tests::linux_guest;

const MIB: usize = 1 << 20;

/// What the Linux guest on QEMU needs (scripts/setup.sh installs it).
const QEMU_TOOLS: &[Need] = &[
    Need::Program("qemu-system-x86_64"),
    Need::Program("cpio"),
    Need::Program("apt-get"),
    Need::Program("dpkg-deb"),
    Need::Program("busybox"),
];

fn qemu_cmd(guest: &(PathBuf, PathBuf), chardev: &str, script: &str) -> Command {
    let mut cmd = linux_guest::qemu(guest, 512, 2, script);
    cmd.arg("-chardev")
        .arg(chardev)
        .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=2"]);
    cmd
}

fn run_qemu(guest: &(PathBuf, PathBuf), sock: &Path, script: &str) -> String {
    let cmd = qemu_cmd(
        guest,
        &format!("socket,id=c0,path={}", sock.display()),
        script,
    );
    let f = harness::run_to_end(cmd, Duration::from_secs(240)).expect("run qemu");
    format!("{}\n{}", f.stdout, f.stderr)
}

/// The value after `KEY ` on the console (lines may carry terminal escapes before the key).
fn line_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    let k = format!("{key} ");
    out.lines()
        .find_map(|l| l.find(&k).map(|i| l[i + k.len()..].trim()))
}

/// The 1 KiB pattern the guest builds: "baton-blk-00000-" ... 64 times 16 bytes.
fn guest_pattern() -> Vec<u8> {
    let p: Vec<u8> = (0..64)
        .flat_map(|i| format!("baton-blk-{i:05}-").into_bytes())
        .collect();
    assert_eq!(p.len(), 1024);
    p
}

const WRITE_SCRIPT: &str = r#"
dev=/dev/vda
[ -b $dev ] || { echo "NO-BLOCK-DEVICE"; ls -l /dev /sys/block; exit 1; }
echo "SIZE $(blockdev --getsize64 $dev)"
echo "SERIAL $(cat /sys/block/vda/serial 2>/dev/null)"
echo "MQ $(ls /sys/block/vda/mq | wc -l)"
echo "RO $(cat /sys/block/vda/ro)"
i=0; while [ $i -lt 64 ]; do printf "baton-blk-%05d-" $i; i=$((i+1)); done > /tmp/p
dd if=/tmp/p of=$dev bs=1024 seek=100 conv=fsync 2>/dev/null || echo "WRITE1-FAILED"
i=0; while [ $i -lt 1024 ]; do cat /tmp/p; i=$((i+1)); done > /tmp/big
dd if=/tmp/big of=$dev bs=65536 seek=128 conv=fsync 2>/dev/null || echo "WRITE2-FAILED"
blkdiscard -o 16777216 -l 1048576 $dev && echo "DISCARD-OK"
sync
echo 3 > /proc/sys/vm/drop_caches
echo "SUM1 $(dd if=$dev bs=1024 skip=100 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "SUM2 $(dd if=$dev bs=65536 skip=128 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "SUMP $(md5sum < /tmp/p | cut -d' ' -f1)"
echo "ZERO $(dd if=$dev bs=65536 skip=256 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "ZREF $(dd if=/dev/zero bs=65536 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
"#;

const READ_SCRIPT: &str = r#"
dev=/dev/vda
[ -b $dev ] || { echo "NO-BLOCK-DEVICE"; exit 1; }
echo "SUM1 $(dd if=$dev bs=1024 skip=100 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "SUM2 $(dd if=$dev bs=65536 skip=128 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "ZERO $(dd if=$dev bs=65536 skip=256 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
"#;

#[test]
fn linux_guest_writes_discards_and_a_second_qemu_reads_back() {
    if !can_run_with(
        "linux_guest_writes_discards_and_a_second_qemu_reads_back",
        QEMU_TOOLS,
    ) {
        return;
    }
    let guest = match linux_guest::build() {
        Ok(g) => g,
        Err(r) => panic!("building the Linux test guest failed: {r}"),
    };
    // 64 MiB image filled with 0xAA so that discarded ranges are visible as zeroes.
    let dir = tmpdir("qemu");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0xaau8; 64 * MIB]).unwrap();
    let mut b = Blk::start_on(dir, img, &["--queues", "2", "--serial", "baton-qemu"]);

    let out = run_qemu(&guest, &b.sock, WRITE_SCRIPT);
    assert!(
        out.contains("BATON-GUEST-EXIT"),
        "guest did not finish:\n{out}"
    );
    assert_eq!(line_value(&out, "SIZE"), Some("67108864"), "{out}");
    assert_eq!(line_value(&out, "SERIAL"), Some("baton-qemu"), "{out}");
    assert_eq!(line_value(&out, "MQ"), Some("2"), "{out}");
    assert_eq!(line_value(&out, "RO"), Some("0"), "{out}");
    assert!(out.contains("DISCARD-OK"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
    assert_eq!(line_value(&out, "SUM1"), line_value(&out, "SUMP"), "{out}");
    assert_eq!(line_value(&out, "ZERO"), line_value(&out, "ZREF"), "{out}");

    // The host sees exactly what the guest wrote.
    let image = b.image();
    let p = guest_pattern();
    assert_eq!(&image[100 * 1024..101 * 1024], &p[..], "first pattern");
    for k in 0..1024 {
        let off = 128 * 65536 + k * 1024;
        assert_eq!(&image[off..off + 1024], &p[..], "big pattern, KiB {k}");
    }
    assert!(
        image[16 * MIB..17 * MIB].iter().all(|&v| v == 0),
        "discarded range not zero"
    );
    assert!(
        image[17 * MIB..18 * MIB].iter().all(|&v| v == 0xaa),
        "discard went too far"
    );
    assert!(b.alive(), "baton-blk died with the first QEMU");

    // A second QEMU on the same running baton-blk reads the same data.
    let out2 = run_qemu(&guest, &b.sock, READ_SCRIPT);
    assert!(
        out2.contains("BATON-GUEST-EXIT"),
        "second guest did not finish:\n{out2}"
    );
    for k in ["SUM1", "SUM2", "ZERO"] {
        assert_eq!(line_value(&out2, k), line_value(&out, k), "{k}\n{out2}");
    }
    assert!(b.alive());
    assert_eq!(b.signal_and_wait(libc::SIGTERM).code(), Some(0));
}

/// 200 blocks of 4 KiB, block i = "blk%012d-" for i, repeated 256 times; progress lines
/// "W <i>" every 25 blocks; then every block is read back and compared in the guest.
const RESTART_SCRIPT: &str = r#"
dev=/dev/vda
[ -b $dev ] || { echo "NO-BLOCK-DEVICE"; exit 1; }
blk() { u=$(printf "blk%012d-" $1); s=$u; for k in 1 2 3 4 5 6 7 8; do s="$s$s"; done; printf "%s" "$s"; }
echo START
i=0
while [ $i -lt 200 ]; do
    blk $i | dd of=$dev bs=4096 seek=$i count=1 conv=fsync 2>/dev/null || echo "WRITE-FAILED $i"
    i=$((i+1))
    [ $((i % 25)) = 0 ] && echo "W $i"
done
sync
echo 3 > /proc/sys/vm/drop_caches
bad=0
i=0
while [ $i -lt 200 ]; do
    a=$(dd if=$dev bs=4096 skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1)
    b=$(blk $i | md5sum | cut -d' ' -f1)
    [ "$a" = "$b" ] || { echo "MISMATCH $i"; bad=1; }
    i=$((i+1))
done
[ $bad = 0 ] && echo VERIFY-OK
"#;

#[test]
fn backend_killed_and_restarted_under_a_running_guest() {
    if !can_run_with(
        "backend_killed_and_restarted_under_a_running_guest",
        QEMU_TOOLS,
    ) {
        return;
    }
    let guest = match linux_guest::build() {
        Ok(g) => g,
        Err(r) => panic!("building the Linux test guest failed: {r}"),
    };
    let dir = tmpdir("restart");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 16 * MIB]).unwrap();
    // The first back-end holds each batch 50 ms after marking it inflight (and logs it), so
    // that the kill below lands with requests in flight: the next one must resubmit them.
    let alog = std::env::temp_dir().join(format!("baton-blk-restart-a-{}.log", std::process::id()));
    let mut a = Blk::start_with_log(
        dir.clone(),
        img.clone(),
        &["--queues", "2", "--test-delay-ms", "50"],
        Some(&alog),
    );
    let chardev = format!("socket,id=c0,path={},reconnect-ms=100", a.sock.display());
    let mut q = harness::Proc::spawn(qemu_cmd(&guest, &chardev, RESTART_SCRIPT)).unwrap();
    let w = q.wait_line(Duration::from_secs(180), |l| l.contains("W 50"));
    assert!(
        w.is_some(),
        "guest did not start writing:\n{}",
        q.transcript()
    );
    // Crash the back-end while it holds a batch: "W 50" is printed between two I/Os, so wait
    // for the next "holding" line of its log first.
    let holds = || {
        std::fs::read_to_string(&alog)
            .unwrap_or_default()
            .matches("holding a batch")
            .count()
    };
    let n0 = holds();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while holds() == n0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    a.proc.child.kill().unwrap();
    a.proc.child.wait().unwrap();
    std::fs::remove_file(&a.sock).unwrap();
    let log = std::env::temp_dir().join(format!("baton-blk-restart-{}.log", std::process::id()));
    let mut b = Blk::start_with_log(dir.clone(), img.clone(), &["--queues", "2"], Some(&log));
    let end = q.wait_line(Duration::from_secs(240), |l| l.contains("BATON-GUEST-EXIT"));
    let out = q.transcript();
    assert!(
        end.is_some(),
        "guest did not finish after the back-end restart:\n{out}"
    );
    assert!(out.contains("W 200"), "{out}");
    assert!(
        !out.contains("FAILED") && !out.contains("MISMATCH"),
        "{out}"
    );
    assert!(out.contains("VERIFY-OK"), "{out}");
    let blog = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&alog);
    assert!(
        blog.contains("resubmitting requests left inflight"),
        "the restarted back-end resubmitted nothing (QEMU's inflight region unused?):\n{blog}"
    );
    let _ = q.wait_exit(Duration::from_secs(30));
    let image = b.image();
    for i in 0..200usize {
        let unit = format!("blk{i:012}-");
        let expect = unit.repeat(256);
        assert_eq!(
            &image[i * 4096..(i + 1) * 4096],
            expect.as_bytes(),
            "block {i}"
        );
    }
    assert_eq!(b.signal_and_wait(libc::SIGTERM).code(), Some(0));
    drop(a); // removes the directory
}

/// The host-side driver also drives qemu-storage-daemon's vhost-user-blk export (the peer
/// of the benchmark): writes, reads, flush and discard verified against the image.
#[test]
fn host_driver_against_qemu_storage_daemon() {
    use baton_tests::vhost_user::blk::*;
    let ok = Command::new("sh")
        .arg("-c")
        .arg("command -v qemu-storage-daemon >/dev/null")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        baton_tests::harness::cannot_run("qemu", "qemu-storage-daemon is not installed");
        return;
    }
    let dir = tmpdir("qsd");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 8 * MIB]).unwrap();
    let sock = dir.join("qsd.sock");
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!("driver=file,node-name=f0,filename={},cache.direct=off", img.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ));
    let _qsd = harness::Proc::spawn(cmd).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || sock.exists().then_some(())).is_some(),
        "qsd did not listen"
    );
    let opts = BlkOptions {
        queues: 2,
        mem_size: 32 << 20,
        slots: 16,
        ..BlkOptions::default()
    };
    let mut d = BlkDriver::connect(&sock, opts).unwrap();
    assert_eq!(d.capacity, (8 * MIB / 512) as u64);
    for qi in 0..2 {
        let data = pattern(qi as u64 + 10, 8192);
        let sector = qi as u64 * 64;
        assert_eq!(d.queue(qi).write(sector, &data).unwrap(), S_OK);
        let (st, back) = d.queue(qi).read(sector, 8192).unwrap();
        assert_eq!((st, back == data), (S_OK, true));
    }
    assert_eq!(d.queue(0).flush().unwrap(), S_OK);
    let image = std::fs::read(&img).unwrap();
    assert_eq!(&image[..8192], &pattern(10, 8192)[..]);
    assert_eq!(&image[64 * 512..64 * 512 + 8192], &pattern(11, 8192)[..]);
    let _ = std::fs::remove_dir_all(&dir);
}
