//! baton-vmm boots a bzImage through the Linux 64-bit boot protocol: a synthetic bzImage whose
//! 64-bit entry checks, at CPL0 and in a handful of instructions, what the protocol promises
//! (long mode, RSI = the zero page with the "HdrS" header, an e820 map, the command line
//! pointer), and bad bzImages refused with the reason. Linux itself boots from a bzImage in
//! the nested rig (tests/nested.rs).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use baton_tests::harness::{Need, TempDir, assert_refused, bin, can_run_with, run_to_end};

/// The 64-bit entry's code (assembled from, GNU as syntax):
/// ```text
/// mov $0x3f8,%dx; mov $'L',%al; out %al,(%dx)          # "L": we run
/// movabs $0x100000000,%rax; shr $32,%rax; cmp $1,%al   # a 64-bit register: long mode
/// jne fail
/// cmpl $0x53726448,0x202(%rsi); jne fail               # RSI = zero page, hdr.header "HdrS"
/// cmpb $3,0x1e8(%rsi); jb fail                         # e820_entries >= 3
/// mov 0x228(%rsi),%eax; mov (%rax),%al; out %al,(%dx)  # first byte of the command line
/// mov $0x600,%dx; mov $0x34,%al; out %al,(%dx); hlt    # ACPI S5: power off
/// fail: ud2                                            # no IDT: a triple fault
/// ```
const ENTRY_64: [u8; 65] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4c, 0xee, 0x48, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
    0x00, 0x48, 0xc1, 0xe8, 0x20, 0x3c, 0x01, 0x75, 0x26, 0x81, 0xbe, 0x02, 0x02, 0x00, 0x00, 0x48,
    0x64, 0x72, 0x53, 0x75, 0x1a, 0x80, 0xbe, 0xe8, 0x01, 0x00, 0x00, 0x03, 0x72, 0x11, 0x8b, 0x86,
    0x28, 0x02, 0x00, 0x00, 0x8a, 0x00, 0xee, 0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0x0f,
    0x0b,
];

const SETUP_SECTS: u8 = 1;
const PAYLOAD: u32 = 0x1000;

/// A bzImage: boot sector + one setup sector carrying the setup header, then a 4 KiB
/// "protected-mode kernel" with [`ENTRY_64`] at offset 0x200.
fn bzimage(version: u16, cmdline_size: u32) -> Vec<u8> {
    let setup = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut f = vec![0u8; setup + PAYLOAD as usize];
    let mut put = |off: usize, bytes: &[u8]| f[off..off + bytes.len()].copy_from_slice(bytes);
    put(0x1f1, &[SETUP_SECTS]);
    put(0x1f4, &(PAYLOAD / 16).to_le_bytes()); // syssize
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x202, b"HdrS");
    put(0x206, &version.to_le_bytes());
    put(0x211, &[1]); // loadflags: LOADED_HIGH
    put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(0x238, &cmdline_size.to_le_bytes());
    put(0x260, &0x10_0000u32.to_le_bytes()); // init_size
    put(setup + 0x200, &ENTRY_64);
    f
}

fn vmm(kernel: &Path, name: &str, cmdline: &str) -> Command {
    let mut c = Command::new(bin("baton-vmm"));
    c.arg("--kernel").arg(kernel).args([
        "--memory",
        "size=64M",
        "--serial",
        "stdio",
        "--cmdline",
        cmdline,
        "--name",
        name,
    ]);
    c.args(baton_tests::local_users::vmm_user_args());
    c
}

fn unique(tag: &str) -> String {
    format!("bz{}-{tag}", std::process::id())
}

#[test]
fn a_bzimage_is_entered_in_long_mode_with_the_zero_page() {
    if !can_run_with(
        "a_bzimage_is_entered_in_long_mode_with_the_zero_page",
        &[Need::Kvm],
    ) {
        return;
    }
    let dir = TempDir::new("bzimage");
    let k = dir.join("vmlinuz");
    std::fs::write(&k, bzimage(0x020f, 2047)).unwrap();
    let f = run_to_end(
        vmm(&k, &unique("ok"), "Zero page ok"),
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(f.code, Some(0), "{f:?}");
    assert!(f.stdout.contains("LZ"), "the entry code's output: {f:?}");
}

#[test]
fn bad_bzimages_are_named_in_the_error() {
    let dir = TempDir::new("badbz");
    let old = dir.join("old");
    std::fs::write(&old, bzimage(0x0204, 0)).unwrap();
    let name = unique("old");
    assert_refused(
        vmm(&old, &name, ""),
        &name,
        &[old.to_str().unwrap(), "2.04", "64-bit"],
    );

    let cut = dir.join("cut");
    std::fs::write(&cut, &bzimage(0x020f, 2047)[..0x800]).unwrap();
    let name = unique("cut");
    assert_refused(
        vmm(&cut, &name, ""),
        &name,
        &[cut.to_str().unwrap(), "truncated"],
    );

    if !can_run_with("bad_bzimages_are_named_in_the_error", &[Need::Kvm]) {
        return;
    }
    // These fail while loading, after the VM exists: nothing may be left behind either.
    let good = dir.join("good");
    std::fs::write(&good, bzimage(0x020f, 16)).unwrap();
    let name = unique("long");
    assert_refused(
        vmm(&good, &name, "a command line longer than sixteen bytes"),
        &name,
        &["command line", "at most 16"],
    );
    let big = dir.join("initrd");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let name = unique("initrd");
    let mut c = vmm(&good, &name, "");
    c.arg("--initramfs").arg(&big);
    assert_refused(c, &name, &[big.to_str().unwrap(), "does not fit"]);
}
