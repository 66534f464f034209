//! What baton's fuzz targets share: the input formats they decode (so that `examples/gen_seeds.rs`
//! writes seeds in exactly the format the targets read), synthetic guest memory with split rings
//! laid out from the input, the frame round-trip checks, and the vhost-user front-end that
//! replays a fuzzed message stream over a socket.
//!
//! Every format here is total: any byte string decodes to *something* (missing bytes read as
//! zero), so libFuzzer never wastes inputs on a parse failure of the harness itself.

pub mod frames;
pub mod guest;
pub mod input;
pub mod vu;

use std::os::fd::AsRawFd;

/// Number of open file descriptors of this process (for leak checks).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// An anonymous shared-memory file of `len` bytes whose first bytes are `init`.
pub fn memfd(name: &str, len: u64, init: &[u8]) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .expect("memfd_create");
    let f = std::fs::File::from(fd);
    f.set_len(len).expect("ftruncate memfd");
    if !init.is_empty() {
        f.write_all_at(init, 0).expect("write memfd");
    }
    f
}

/// `/proc/self/fd/N` for a file (a path that re-opens it).
pub fn fd_path(f: &std::fs::File) -> std::path::PathBuf {
    format!("/proc/self/fd/{}", f.as_raw_fd()).into()
}

/// Ignores SIGPIPE (libFuzzer's `main` is not Rust's, which would have done it).
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}
