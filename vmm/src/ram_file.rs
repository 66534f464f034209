//! The guest RAM file, created or opened so that no other local user can reach guest memory.
//!
//! - **Default path**: `/dev/shm/baton-UID/NAME.ram` (`/dev/hugepages/baton-UID/NAME.ram`
//!   with huge pages), UID being our effective uid. The per-user directory is created mode
//!   0700 if missing; if it exists it must be a directory (not a symlink) owned by us with no
//!   group or other access. The file is created relative to that checked directory's fd with
//!   O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600: whatever is at the path already (a file another
//!   user planted to read guest memory, a symlink, a crashed VMM's leftover) is an error that
//!   names the path, never reused.
//! - **`path=` given**: opened with O_NOFOLLOW, and created (O_EXCL, mode 0600) if missing. An
//!   existing file must be owned by us. This is how the incoming VMM of a live update maps the
//!   RAM of the VM it takes over: same uid, by the path the old VMM reports.
//! - **`--user UID[:GID]`** ([`set_owner`]): root creates the file before it drops to UID, as
//!   UID's: `baton-UID` is the directory, the directory and the file are given to UID:GID
//!   (fchown) when created, and every ownership check above is against UID.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Errors creating or opening the guest RAM file.
#[derive(Debug, thiserror::Error)]
pub enum RamFileError {
    /// The VM name cannot be a file name.
    #[error(
        "VM name {0:?} cannot name a guest RAM file (it must be non-empty, without '/', and not '.' or '..')"
    )]
    BadName(String),
    /// The per-user directory could not be created or opened.
    #[error("cannot create or open the guest RAM directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The per-user directory exists but others could reach what is in it.
    #[error(
        "guest RAM directory {path} {why}: refusing to put guest memory there (it must be a directory, not a symlink, owned by uid {ours} with mode 0700; remove or fix it)"
    )]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
        /// Our uid.
        ours: u32,
    },
    /// Something is at the default path already.
    #[error(
        "guest RAM file {path} already exists{what}: refusing to reuse it (another VM with this --name, a crashed VMM's leftover, or a file planted by someone else); remove it if it is stale, or choose another --name"
    )]
    Exists {
        /// The path.
        path: PathBuf,
        /// What is there, when it says more (" (a symlink)").
        what: String,
    },
    /// A given path is a symlink.
    #[error("guest RAM file {0} is a symlink: refusing to follow it (give the file's real path)")]
    Symlink(PathBuf),
    /// A given path belongs to another user.
    #[error(
        "guest RAM file {path} belongs to uid {owner}, not to us (uid {ours}): its owner could read and change the guest's memory; remove it or choose a path we own"
    )]
    NotOurs {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our uid.
        ours: u32,
    },
    /// open, fstat or fchmod failed.
    #[error("cannot open guest RAM file {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An open guest RAM file.
#[derive(Debug)]
pub struct RamFile {
    /// The file, open read-write.
    pub file: File,
    /// Its path (what a second VMM maps).
    pub path: PathBuf,
    /// Whether this call created it (and so its creator removes it at exit).
    pub created: bool,
}

/// The uid:gid RAM files are created for, when not our own (`--user`).
static OWNER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();

/// Creates and checks RAM files for `uid`:`gid` rather than for our effective uid: a VMM
/// started as root with `--user` calls this before it creates the file and drops to `uid`,
/// so that the file, its directory and a live update's incoming VMM (running as `uid`) agree.
/// Once per process; a second call is ignored.
pub fn set_owner(uid: u32, gid: u32) {
    let _ = OWNER.set((uid, gid));
}

fn our_uid() -> u32 {
    OWNER
        .get()
        .map_or_else(|| nix::unistd::geteuid().as_raw(), |o| o.0)
}

/// Gives what we just created to the [`set_owner`] uid:gid, if there is one.
fn give_to_owner(fd: &impl std::os::fd::AsFd) -> Result<(), Errno> {
    match OWNER.get() {
        Some(&(uid, gid)) => nix::unistd::fchown(
            fd.as_fd(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        ),
        None => Ok(()),
    }
}

/// Creates the file at the default path for `vm_name`, or opens or creates `given`.
pub fn open(given: Option<&Path>, vm_name: &str, hugepages: bool) -> Result<RamFile, RamFileError> {
    match given {
        Some(path) => open_given(path),
        None => create_in(base_dir(hugepages), vm_name),
    }
}

fn base_dir(hugepages: bool) -> &'static Path {
    Path::new(if hugepages {
        "/dev/hugepages"
    } else {
        "/dev/shm"
    })
}

/// This user's directory of RAM files: `/dev/shm/baton-UID` (or under /dev/hugepages).
pub fn default_dir(hugepages: bool) -> PathBuf {
    base_dir(hugepages).join(format!("baton-{}", our_uid()))
}

/// The path a VM's RAM file gets by default.
pub fn default_path(vm_name: &str, hugepages: bool) -> PathBuf {
    default_dir(hugepages).join(format!("{vm_name}.ram"))
}

/// Creates `base/baton-UID/NAME.ram`, never reusing anything already there.
fn create_in(base: &Path, vm_name: &str) -> Result<RamFile, RamFileError> {
    if vm_name.is_empty() || vm_name == "." || vm_name == ".." || vm_name.contains(['/', '\0']) {
        return Err(RamFileError::BadName(vm_name.into()));
    }
    let dir = base.join(format!("baton-{}", our_uid()));
    let dir_fd = private_dir(&dir)?;
    let name = format!("{vm_name}.ram");
    let path = dir.join(&name);
    let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
    match nix::fcntl::openat(&dir_fd, name.as_str(), flags | OFlag::O_CLOEXEC, rw_owner()) {
        Ok(fd) => created(fd, path),
        Err(Errno::EEXIST) => {
            let what = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => " (a symlink)".to_string(),
                Ok(m) if std::os::unix::fs::MetadataExt::uid(&m) != our_uid() => format!(
                    " (owned by uid {})",
                    std::os::unix::fs::MetadataExt::uid(&m)
                ),
                _ => String::new(),
            };
            Err(RamFileError::Exists { path, what })
        }
        Err(e) => Err(RamFileError::Open {
            path,
            source: e.into(),
        }),
    }
}

fn rw_owner() -> Mode {
    Mode::S_IRUSR | Mode::S_IWUSR
}

/// A file we just created: mode 0600 whatever the umask.
fn created(fd: OwnedFd, path: PathBuf) -> Result<RamFile, RamFileError> {
    let file = File::from(fd);
    if let Err(e) = nix::sys::stat::fchmod(&file, rw_owner()).and_then(|()| give_to_owner(&file)) {
        let _ = std::fs::remove_file(&path);
        return Err(RamFileError::Open {
            path,
            source: e.into(),
        });
    }
    Ok(RamFile {
        file,
        path,
        created: true,
    })
}

/// Creates `dir` mode 0700 if missing and checks that it is a directory of ours that nobody
/// else can reach; returns it open (files are created relative to this fd, so the checked
/// directory is the one used).
fn private_dir(dir: &Path) -> Result<OwnedFd, RamFileError> {
    let ours = our_uid();
    let io_err = |e: Errno| RamFileError::Dir {
        path: dir.into(),
        source: e.into(),
    };
    let unsafe_dir = |why: String| RamFileError::UnsafeDir {
        path: dir.into(),
        why,
        ours,
    };
    let made = match nix::unistd::mkdir(dir, Mode::S_IRWXU) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(e) => return Err(io_err(e)),
    };
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match nix::fcntl::open(dir, flags, Mode::empty()) {
        Ok(fd) => fd,
        // O_NOFOLLOW with O_DIRECTORY fails a symlink with either.
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let symlink = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_symlink());
            return Err(unsafe_dir(if symlink {
                "is a symlink".into()
            } else {
                "is not a directory".into()
            }));
        }
        Err(e) => return Err(io_err(e)),
    };
    if made {
        // mkdir's mode went through the umask: make it exactly 0700.
        nix::sys::stat::fchmod(&fd, Mode::S_IRWXU).map_err(io_err)?;
        give_to_owner(&fd).map_err(io_err)?;
    }
    let st = nix::sys::stat::fstat(&fd).map_err(io_err)?;
    if st.st_uid != ours {
        return Err(unsafe_dir(format!("belongs to uid {}", st.st_uid)));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "has mode {mode:04o} (group or others have access)"
        )));
    }
    Ok(fd)
}

/// Opens `path=` as given: never through a symlink, and only a file of ours; creates it if
/// missing.
fn open_given(path: &Path) -> Result<RamFile, RamFileError> {
    let open_err = |e: Errno| RamFileError::Open {
        path: path.into(),
        source: e.into(),
    };
    let flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    // Missing → create; created by someone else meanwhile → look again.
    for _ in 0..3 {
        match nix::fcntl::open(path, flags, Mode::empty()) {
            Ok(fd) => {
                let st = nix::sys::stat::fstat(&fd).map_err(open_err)?;
                let ours = our_uid();
                if st.st_uid != ours {
                    return Err(RamFileError::NotOurs {
                        path: path.into(),
                        owner: st.st_uid,
                        ours,
                    });
                }
                return Ok(RamFile {
                    file: File::from(fd),
                    path: path.into(),
                    created: false,
                });
            }
            Err(Errno::ELOOP) => return Err(RamFileError::Symlink(path.into())),
            Err(Errno::ENOENT) => {
                match nix::fcntl::open(path, flags | OFlag::O_CREAT | OFlag::O_EXCL, rw_owner()) {
                    Ok(fd) => return created(fd, path.into()),
                    Err(Errno::EEXIST) => continue,
                    Err(e) => return Err(open_err(e)),
                }
            }
            Err(e) => return Err(open_err(e)),
        }
    }
    Err(open_err(Errno::EEXIST))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A scratch base directory (standing in for /dev/shm), removed on drop.
    struct Base(PathBuf);

    impl Base {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("baton-ramfile-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Base(p)
        }

        fn user_dir(&self) -> PathBuf {
            self.0.join(format!("baton-{}", our_uid()))
        }
    }

    impl Drop for Base {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn default_file_is_0600_in_a_0700_directory_of_ours() {
        let b = Base::new("ok");
        let f = create_in(&b.0, "vm1").unwrap();
        assert!(f.created);
        assert_eq!(f.path, b.user_dir().join("vm1.ram"));
        assert_eq!(mode(&b.user_dir()), 0o700);
        assert_eq!(mode(&f.path), 0o600);
        // A second VM in the same directory.
        let g = create_in(&b.0, "vm2").unwrap();
        assert_eq!(mode(&g.path), 0o600);
        assert_eq!(default_path("x", false), default_dir(false).join("x.ram"));
        assert_eq!(
            default_dir(false),
            PathBuf::from(format!("/dev/shm/baton-{}", our_uid()))
        );
    }

    #[test]
    fn anything_at_the_default_path_is_refused_and_left_alone() {
        let b = Base::new("exists");
        create_in(&b.0, "first").unwrap();
        let planted = b.user_dir().join("vm.ram");
        std::fs::write(&planted, "planted").unwrap();
        let e = create_in(&b.0, "vm").unwrap_err();
        assert!(matches!(e, RamFileError::Exists { .. }), "{e}");
        assert!(e.to_string().contains(planted.to_str().unwrap()), "{e}");
        assert_eq!(std::fs::read_to_string(&planted).unwrap(), "planted");
        // A symlink is not followed: its target is neither created nor written.
        let target = b.0.join("target");
        let link = b.user_dir().join("link.ram");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = create_in(&b.0, "link").unwrap_err();
        assert!(e.to_string().contains("(a symlink)"), "{e}");
        assert!(!target.exists());
    }

    #[test]
    fn an_unsafe_directory_is_refused() {
        let b = Base::new("dir");
        // Group/other access.
        std::fs::create_dir(b.user_dir()).unwrap();
        std::fs::set_permissions(b.user_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = create_in(&b.0, "vm").unwrap_err();
        assert!(e.to_string().contains("has mode 0755"), "{e}");
        assert!(!b.user_dir().join("vm.ram").exists());
        // A symlink to a directory of ours.
        std::fs::remove_dir(b.user_dir()).unwrap();
        let real = b.0.join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&real, b.user_dir()).unwrap();
        let e = create_in(&b.0, "vm").unwrap_err();
        assert!(e.to_string().contains("is a symlink"), "{e}");
        assert!(!real.join("vm.ram").exists());
        // Not a directory.
        std::fs::remove_file(b.user_dir()).unwrap();
        std::fs::write(b.user_dir(), "").unwrap();
        let e = create_in(&b.0, "vm").unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        // Someone else's directory (root can make one for uid 65534).
        if our_uid() == 0 {
            std::fs::remove_file(b.user_dir()).unwrap();
            std::fs::create_dir(b.user_dir()).unwrap();
            std::fs::set_permissions(b.user_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(b.user_dir(), Some(65534), Some(65534)).unwrap();
            let e = create_in(&b.0, "vm").unwrap_err();
            assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
        }
    }

    #[test]
    fn names_that_are_not_file_names_are_refused() {
        let b = Base::new("names");
        for n in ["", ".", "..", "a/b", "../x"] {
            assert!(
                matches!(create_in(&b.0, n), Err(RamFileError::BadName(_))),
                "{n:?}"
            );
        }
    }

    #[test]
    fn a_given_path_is_created_or_reopened_if_ours() {
        let b = Base::new("given");
        let p = b.0.join("ram");
        let f = open_given(&p).unwrap();
        assert!(f.created);
        assert_eq!(mode(&p), 0o600);
        // Reopened (as the incoming VMM of a live update does): same file, not ours to remove.
        let g = open_given(&p).unwrap();
        assert!(!g.created);
        assert_eq!(
            g.file.metadata().unwrap().ino(),
            f.file.metadata().unwrap().ino()
        );
        // A symlink is refused, its target untouched.
        let link = b.0.join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = open_given(&link).unwrap_err();
        assert!(matches!(e, RamFileError::Symlink(_)), "{e}");
        // A file of another user is refused.
        if our_uid() == 0 {
            let theirs = b.0.join("theirs");
            std::fs::write(&theirs, "x").unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = open_given(&theirs).unwrap_err();
            assert!(
                matches!(e, RamFileError::NotOurs { owner: 65534, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("uid 65534"), "{e}");
            assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "x");
        }
    }
}
