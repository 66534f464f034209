//! The TAP queues kept in the service manager's fd store, so that they stay attached while no
//! baton-net-tap runs: the kernel then queues the frames that arrive (up to the TAP's
//! `txqueuelen` per queue) instead of dropping them, and the next instance reads them.
//!
//! Each queue fd is stored once, when first opened, as `tap-q<i>` (`FDSTORE=1`, see
//! `baton_service::sd`); the next instance gets them back after the listening socket
//! (`LISTEN_FDNAMES`) and uses those that are queues of the same TAP with our flags. One that
//! is not (the TAP was deleted and made again, `--tap` or `--queues` changed) is closed and
//! removed from the store (`FDSTOREREMOVE=1`), and a new queue is opened and stored in its
//! place. A queue keeps its attachment: one the previous instance had detached stays so until
//! the guest enables its pair again (see `device`).

use std::collections::BTreeSet;
use std::os::fd::AsFd;

use baton_service::ListenFds;
use baton_service::sd;

use crate::tap::{Tap, TapError};

/// The prefix of the stored queue fds' names.
pub const FDNAME_PREFIX: &str = "tap-q";

/// The name queue `i`'s fd is stored under.
pub fn fd_name(i: usize) -> String {
    format!("{FDNAME_PREFIX}{i}")
}

/// The queue index a stored fd's name gives, if it is one of ours.
fn queue_of(name: &str) -> Option<usize> {
    name.strip_prefix(FDNAME_PREFIX)?.parse().ok()
}

/// Opens `queues` queues of TAP `name`, taking those the service manager kept from `passed`
/// and opening (and storing, when there is a store) the others. One per queue pair, in order.
pub fn open_queues(
    name: &str,
    queues: usize,
    passed: &mut ListenFds,
) -> Result<Vec<Tap>, TapError> {
    crate::tap::check_name(name)?;
    let mut slots: Vec<Option<Tap>> = (0..queues).map(|_| None).collect();
    // Names to remove from the store: fds that are not (or no longer) queues of ours.
    let mut dropped = BTreeSet::new();
    for (fdname, fd) in passed.take(|n| queue_of(n).is_some()) {
        let Some(slot) = queue_of(&fdname)
            .and_then(|q| slots.get_mut(q))
            .filter(|s| s.is_none())
        else {
            tracing::warn!("stored fd {fdname} is not one of {queues} queues: closing it");
            dropped.insert(fdname);
            continue;
        };
        match Tap::adopt(fd, name) {
            Ok(tap) => *slot = Some(tap),
            Err(e) => {
                tracing::warn!("stored fd {fdname}: {e}: closing it, opening a new queue");
                dropped.insert(fdname);
            }
        }
    }
    let reused = slots.iter().flatten().count();
    if reused > 0 {
        tracing::info!(
            tap = name,
            "{reused} of {queues} TAP queues kept by the service manager"
        );
    }
    let store = sd::fd_store_available();
    if store {
        for n in &dropped {
            if let Err(e) = sd::remove_stored_fds(n) {
                tracing::warn!("FDSTOREREMOVE {n}: {e}");
            }
        }
    }
    let mut taps = Vec::with_capacity(queues);
    for (q, slot) in slots.into_iter().enumerate() {
        let (tap, held) = match slot {
            Some(t) => (t, !dropped.contains(&fd_name(q))),
            None => (Tap::open_queue(name, q)?, false),
        };
        if store && !held {
            match sd::store_fds(&fd_name(q), &[tap.as_fd()]) {
                Ok(_) => tracing::info!(queue = q, "TAP queue stored in the service manager"),
                Err(e) => tracing::warn!(queue = q, "cannot store the TAP queue: {e}"),
            }
        }
        taps.push(tap);
    }
    Ok(taps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(fd_name(3), "tap-q3");
        assert_eq!(queue_of("tap-q3"), Some(3));
        assert_eq!(queue_of("tap-q"), None);
        assert_eq!(queue_of("tap-qx"), None);
        assert_eq!(queue_of("socket"), None);
        assert!(sd::fdname_is_valid(&fd_name(63)));
    }
}
