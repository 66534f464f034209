//! The Linux test guest for the back-ends (Debian's cloud kernel and a busybox initramfs from
//! tests/linux-guest/build.sh, which runs the shell script passed base64 in `baton.script=`
//! and powers off), and the QEMU/TCG command line that boots it with guest RAM shared the way
//! a vhost-user back-end needs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{repo_root, target_dir};

/// The guest's (vmlinuz, initramfs.gz): from `$BATON_LINUX_GUEST`, or built once into the
/// target directory (cached; concurrent builders wait for each other on a lock file).
pub fn build() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("BATON_LINUX_GUEST")
        .map_or_else(|| target_dir().join("linux-guest"), PathBuf::from);
    let (k, i) = (dir.join("vmlinuz"), dir.join("initramfs.gz"));
    let script = repo_root().join("tests/linux-guest/build.sh");
    let out = Command::new("flock")
        .arg(dir.with_extension("lock"))
        .arg("bash")
        .arg(&script)
        .arg(&dir)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", script.display()))?;
    anyhow::ensure!(
        out.status.success() && k.exists() && i.exists(),
        "building the Linux guest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((k, i))
}

/// Standard base64 (the guest decodes the script with busybox base64).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, sh) in [18u32, 12, 6, 0].iter().enumerate() {
            s.push(if i <= c.len() {
                char::from(T[usize::try_from((n >> sh) & 63).unwrap_or(0)])
            } else {
                '='
            });
        }
    }
    s
}

/// QEMU under TCG booting the guest with `script`: `mem_mib` of RAM in a shared memfd (so a
/// vhost-user back-end can map it), `cpus` vCPUs, console on stdio, no default devices, no
/// reboot. The caller adds the devices.
pub fn qemu(guest: &(PathBuf, PathBuf), mem_mib: u32, cpus: u32, script: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "tcg",
        "-m",
        &format!("{mem_mib}M"),
        "-smp",
        &cpus.to_string(),
    ])
    .args(["-nographic", "-serial", "stdio", "-monitor", "none"])
    .args(["-no-reboot", "-nodefaults"])
    .args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
        "-machine",
        "memory-backend=mem",
    ])
    .arg("-kernel")
    .arg(Path::new(&guest.0))
    .arg("-initrd")
    .arg(Path::new(&guest.1))
    .arg("-append")
    .arg(format!(
        "console=ttyS0 quiet panic=-1 baton.script={}",
        base64(script.as_bytes())
    ));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
