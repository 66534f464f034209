//! baton-vmm booting the freestanding test guest under KVM: real binary, real /dev/kvm.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_tests::boot::baton_cmd;
use baton_tests::harness::{
    Proc, TempDir, assert_refused, bin, can_run, guest, kvm_available, result_json, run_to_end,
};
use baton_tests::local_users::{test_ram_file, vmm_user_args};

const BOOT: Duration = Duration::from_secs(30);

fn vmm(name: &str, cpus: u32, cmdline: &str) -> Command {
    let mut c = baton_cmd(cpus, "128M", cmdline);
    c.args(["--name", name]).args(vmm_user_args());
    c
}

fn unique(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

fn boot_and_pass(cpus: u32, test: &str) -> serde_json::Value {
    let name = unique(&format!("{test}{cpus}"));
    let mut p = Proc::spawn(vmm(&name, cpus, &format!("test={test}"))).unwrap();
    let ready = p.wait_line(BOOT, |l| l.contains("ready"));
    assert!(ready.is_some(), "no ready line:\n{}", p.transcript());
    assert!(
        test_ram_file(&name).exists(),
        "guest RAM is a file under /dev/shm while the VM runs"
    );
    let code = p.wait_exit(BOOT);
    assert_eq!(
        code,
        Some(0),
        "baton-vmm exits 0 on guest power-off:\n{}",
        p.transcript()
    );
    assert!(!test_ram_file(&name).exists(), "RAM file removed at exit");
    let r = result_json(&p.seen).unwrap_or_else(|| panic!("no result line:\n{}", p.transcript()));
    assert_eq!(r["result"], "pass", "{r}");
    r
}

#[test]
fn boots_with_one_vcpu_and_exits_0_on_power_off() {
    if can_run("boots_with_one_vcpu") {
        boot_and_pass(1, "boot");
    }
}

#[test]
fn boots_with_two_vcpus_and_both_report() {
    if can_run("boots_with_two_vcpus") {
        let r = boot_and_pass(2, "smp");
        assert_eq!(r["cpus_online"], 2, "{r}");
    }
}

fn api(sock: &Path, cmd: &str) -> (Option<i32>, String) {
    let mut c = Command::new(bin("batonctl"));
    c.arg("--api-socket").arg(sock).arg(cmd);
    let f = run_to_end(c, Duration::from_secs(10)).unwrap();
    (f.code, f.stdout + &f.stderr)
}

#[test]
fn api_pause_resume_info_shutdown() {
    if !can_run("api_pause_resume_info_shutdown") {
        return;
    }
    let dir = TempDir::new("api");
    let sock = dir.join("api.sock");
    let name = unique("api");
    let mut cmd = vmm(&name, 2, "test=ticks n=0 ms=20");
    cmd.arg("--api-socket").arg(&sock);
    let mut p = Proc::spawn(cmd).unwrap();
    assert!(
        p.wait_line(BOOT, |l| l.contains("tick 3")).is_some(),
        "{}",
        p.transcript()
    );

    let (code, out) = api(&sock, "info");
    assert_eq!(code, Some(0), "{out}");
    let info: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["cpus"], 2);
    assert_eq!(info["memory_bytes"], 128 << 20);
    assert_eq!(
        info["memory_path"],
        test_ram_file(&name).display().to_string()
    );

    // curl works on the same socket, as the README promises.
    if let Ok(f) = run_to_end(
        {
            let mut c = Command::new("curl");
            c.args(["-s", "--unix-socket"])
                .arg(&sock)
                .arg("http://localhost/api/v1/vm.info");
            c
        },
        Duration::from_secs(10),
    ) {
        assert!(f.stdout.contains("\"running\""), "curl: {f:?}");
    }

    assert_eq!(api(&sock, "pause").0, Some(0));
    assert!(api(&sock, "info").1.contains("\"paused\""));
    // Lines written before the pause completed may still be in the pipe: let them arrive,
    // then no tick may follow while paused.
    while p.wait_line(Duration::from_millis(50), |_| true).is_some() {}
    let quiet = p.wait_line(Duration::from_millis(400), |l| l.starts_with("tick"));
    assert!(quiet.is_none(), "guest ran while paused: {quiet:?}");
    assert_eq!(api(&sock, "resume").0, Some(0));
    let t0 = Instant::now();
    assert!(
        p.wait_line(BOOT, |l| l.starts_with("tick")).is_some(),
        "no tick after resume"
    );
    eprintln!("first tick {:?} after resume", t0.elapsed());

    assert_eq!(api(&sock, "shutdown").0, Some(0));
    assert_eq!(p.wait_exit(BOOT), Some(0));
    assert!(!sock.exists(), "API socket removed at exit");
    assert!(!test_ram_file(&name).exists());
}

#[test]
fn guest_exception_stops_the_vmm_with_the_reason() {
    if !can_run("guest_exception") {
        return;
    }
    let f = run_to_end(vmm(&unique("fault"), 1, "test=fault"), BOOT).unwrap();
    assert_ne!(f.code, Some(0), "{f:?}");
    assert!(f.code.is_some(), "baton-vmm must exit by itself: {f:?}");
    assert!(
        f.stderr.contains("triple fault") && f.stderr.contains("RIP"),
        "{}",
        f.stderr
    );
}

/// A minimal ELF64 executable (one PT_LOAD at 1 MiB) without a PVH note.
fn elf_without_pvh_note(path: &Path) {
    let mut e = vec![0u8; 0x78 + 16];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x10_0078u64.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    e[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
    e[ph + 16..ph + 24].copy_from_slice(&0x10_0078u64.to_le_bytes()); // vaddr
    e[ph + 24..ph + 32].copy_from_slice(&0x10_0078u64.to_le_bytes()); // paddr
    e[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
    e[ph + 40..ph + 48].copy_from_slice(&16u64.to_le_bytes());
    e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    e[0x78] = 0xf4; // hlt
    std::fs::write(path, e).unwrap();
}

/// Runs baton-vmm as `name`, expecting it to be refused with every needle in its message.
fn refused(mut cmd: Command, name: &str, needles: &[&str]) {
    cmd.args(["--name", name]);
    assert_refused(cmd, name, needles);
}

fn vmm_with_kernel(kernel: &Path, memory: &str) -> Command {
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--kernel")
        .arg(kernel)
        .args(["--memory", memory, "--serial", "off"]);
    c
}

#[test]
fn bad_kernels_are_named_in_the_error() {
    let dir = TempDir::new("badkernel");
    let missing = dir.join("no-such-kernel");
    refused(
        vmm_with_kernel(&missing, "size=64M"),
        &unique("k1"),
        &[missing.to_str().unwrap()],
    );
    let text = dir.join("kernel.txt");
    std::fs::write(&text, "not an elf").unwrap();
    refused(
        vmm_with_kernel(&text, "size=64M"),
        &unique("k2"),
        &[text.to_str().unwrap(), "ELF"],
    );
    if kvm_available() {
        let nopvh = dir.join("nopvh.elf");
        elf_without_pvh_note(&nopvh);
        refused(
            vmm_with_kernel(&nopvh, "size=64M"),
            &unique("k3"),
            &["PVH", nopvh.to_str().unwrap()],
        );
    }
}

#[test]
fn bad_memory_sizes_are_refused() {
    let dir = TempDir::new("badmem");
    let kernel = dir.join("k.elf");
    elf_without_pvh_note(&kernel);
    refused(
        vmm_with_kernel(&kernel, "size=0"),
        &unique("m0"),
        &["greater than zero"],
    );
    if kvm_available() {
        refused(
            vmm_with_kernel(&kernel, "size=64T"),
            &unique("mbig"),
            &["does not fit"],
        );
    }
}

#[test]
fn api_socket_in_use_is_refused() {
    let dir = TempDir::new("inuse");
    let sock = dir.join("api.sock");
    let _holder = UnixListener::bind(&sock).unwrap();
    let kernel = dir.join("k.elf");
    elf_without_pvh_note(&kernel);
    let mut c = vmm_with_kernel(&kernel, "size=64M");
    c.arg("--api-socket").arg(&sock);
    refused(
        c,
        &unique("inuse"),
        &["already in use", sock.to_str().unwrap()],
    );
    assert!(sock.exists(), "the other process's socket is left alone");
}

#[test]
fn missing_or_inaccessible_dev_kvm_is_reported() {
    if !kvm_available() || !Path::new("/usr/bin/unshare").exists() {
        baton_tests::harness::cannot_run("kvm", "needs root, /dev/kvm and unshare");
        return;
    }
    let dir = TempDir::new("nokvm");
    let kernel = dir.join("k.elf");
    elf_without_pvh_note(&kernel);
    // A private mount namespace where /dev is an empty tmpfs: /dev/kvm is missing.
    let mut c = Command::new("unshare");
    c.args([
        "-m",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && exec \"$0\" \"$@\"",
    ])
    .arg(bin("baton-vmm"))
    .arg("--kernel")
    .arg(&kernel)
    .args(["--serial", "off"]);
    refused(c, &unique("nokvm"), &["/dev/kvm"]);
    // An unprivileged user cannot open root's /dev/kvm (mode 0600).
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("baton-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--serial", "off"]);
    let f = run_to_end(c, Duration::from_secs(10)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let others_locked_out = std::fs::metadata("/dev/kvm")
        .map(|m| m.permissions().mode() & 0o006 == 0)
        .unwrap_or(false);
    if others_locked_out {
        assert_ne!(f.code, Some(0));
        assert!(f.stderr.contains("/dev/kvm"), "{}", f.stderr);
    }
}

#[test]
fn same_guest_boots_under_qemu_tcg() {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        baton_tests::harness::cannot_run("qemu", "qemu-system-x86_64 not installed");
        return;
    }
    assert!(
        guest().exists(),
        "test guest missing at {}",
        guest().display()
    );
    let mut c = Command::new(qemu);
    c.args([
        "-accel", "tcg", "-M", "pc", "-m", "128", "-smp", "2", "-display", "none",
    ])
    .args([
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-nodefaults",
    ])
    .arg("-kernel")
    .arg(guest())
    .args(["-append", "test=smp"]);
    let mut p = Proc::spawn(c).unwrap();
    assert!(
        p.wait_line(Duration::from_secs(60), |l| l.contains("ready"))
            .is_some(),
        "{}",
        p.transcript()
    );
    assert_eq!(
        p.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        p.transcript()
    );
    let r = result_json(&p.seen).unwrap_or_else(|| panic!("no result:\n{}", p.transcript()));
    assert_eq!(r["result"], "pass");
    assert_eq!(r["cpus_online"], 2);
}
