//! A slow disk outside baton-blk for tests and benchmarks: `tests/slowfs.py`, a FUSE file
//! system whose one file delays every read and write.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::blk::pattern;
use crate::harness::{Proc, repo_root, wait_until};

/// `tests/slowfs.py` mounted on `<dir>/mnt` over `<dir>/backing.img`: the file
/// [`SlowDisk::image`] takes `delay_ms` per request. Unmounted on drop.
pub struct SlowDisk {
    proc: Proc,
    /// The mount point.
    pub mnt: PathBuf,
    /// The regular file behind it (to check from the host what reached the disk).
    pub backing: PathBuf,
}

impl SlowDisk {
    /// Mounts a disk of `size` bytes, filled with [`pattern`] (4 KiB block `s` holds
    /// `pattern(s, 4096)`) if `patterned`, else zeroes. Panics if it does not come up
    /// (python3-fusepy missing: `scripts/setup.sh` installs it).
    pub fn mount(dir: &Path, size: u64, delay_ms: u32, patterned: bool) -> SlowDisk {
        let backing = dir.join("backing.img");
        if patterned {
            let data: Vec<u8> = (0..size / 4096).flat_map(|s| pattern(s, 4096)).collect();
            std::fs::write(&backing, data).expect("writing the backing file");
        } else {
            std::fs::File::create(&backing)
                .and_then(|f| f.set_len(size))
                .expect("creating the backing file");
        }
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("creating the mount point");
        let mut c = Command::new("/usr/bin/python3");
        c.arg(repo_root().join("tests/slowfs.py"))
            .arg(&backing)
            .arg(&mnt)
            .arg(delay_ms.to_string());
        let proc = Proc::spawn(c).expect("running tests/slowfs.py");
        let img = mnt.join("disk.img");
        assert!(
            wait_until(Duration::from_secs(10), || img.exists().then_some(())).is_some(),
            "slowfs did not mount (python3-fusepy installed? scripts/setup.sh installs it)"
        );
        SlowDisk { proc, mnt, backing }
    }

    /// The slow file.
    pub fn image(&self) -> PathBuf {
        self.mnt.join("disk.img")
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = self.proc.child.kill();
    }
}
