//! The fds a supervised service stored (`FDSTORE=1`), by name, at most a fixed number: what
//! systemd keeps per service up to `FileDescriptorStoreMax=`.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// The fd store of one service.
#[derive(Debug)]
pub struct FdStore {
    max: usize,
    entries: Vec<(String, OwnedFd)>,
}

/// What [`FdStore::add`] did with the fds it was given.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Added {
    /// Kept.
    pub stored: usize,
    /// Closed: the same open file is stored already (systemd drops these too).
    pub duplicates: usize,
    /// Closed: the store was full.
    pub over_limit: usize,
}

impl FdStore {
    /// An empty store that keeps at most `max` fds.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            entries: Vec::new(),
        }
    }

    /// How many fds are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The most it keeps.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Keeps `fds` under `name` (a valid fd name): an fd that refers to an open file already
    /// kept, or that comes when the store is full, is closed.
    pub fn add(&mut self, name: &str, fds: Vec<OwnedFd>) -> Added {
        let mut added = Added::default();
        for fd in fds {
            if self.entries.iter().any(|(_, kept)| same_file(kept, &fd)) {
                added.duplicates += 1;
            } else if self.entries.len() >= self.max {
                added.over_limit += 1;
            } else {
                self.entries.push((name.to_string(), fd));
                added.stored += 1;
            }
        }
        added
    }

    /// Closes every fd kept under `name`; returns how many.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|(n, _)| n != name);
        before - self.entries.len()
    }

    /// The kept fds with their names, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = (&str, BorrowedFd<'_>)> {
        use std::os::fd::AsFd;
        self.entries.iter().map(|(n, fd)| (n.as_str(), fd.as_fd()))
    }
}

/// Whether two fds refer to the same open file description (kcmp KCMP_FILE), as systemd
/// checks; where kcmp is not available, every fd counts as distinct.
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    let pid = libc::c_long::from(std::process::id());
    // SAFETY: kcmp only compares two fds of this process; no memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a.as_raw_fd()),
            libc::c_long::from(b.as_raw_fd()),
        )
    };
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        OwnedFd::from(a)
    }

    #[test]
    fn keeps_by_name_up_to_the_limit_without_duplicates() {
        let mut s = FdStore::new(3);
        let a = fd();
        let dup = a.try_clone().unwrap();
        assert_eq!(
            s.add("tap-q0", vec![a]),
            Added {
                stored: 1,
                ..Added::default()
            }
        );
        assert_eq!(
            s.add("tap-q0", vec![dup]),
            Added {
                duplicates: 1,
                ..Added::default()
            },
            "a dup of a kept fd is the same open file"
        );
        assert_eq!(
            s.add("tap-q1", vec![fd(), fd(), fd()]),
            Added {
                stored: 2,
                over_limit: 1,
                ..Added::default()
            }
        );
        assert_eq!(s.len(), 3);
        let names: Vec<&str> = s.entries().map(|(n, _)| n).collect();
        assert_eq!(names, ["tap-q0", "tap-q1", "tap-q1"]);
        assert_eq!(s.remove("tap-q1"), 2);
        assert_eq!(s.remove("nothing"), 0);
        assert_eq!(s.len(), 1);
        assert_eq!(s.add("tap-q1", vec![fd()]).stored, 1);
        let mut none = FdStore::new(0);
        assert_eq!(none.add("x", vec![fd()]).over_limit, 1);
        assert!(none.is_empty());
    }
}
