//! Formats that cross a baton process boundary.
//!
//! Every message that one baton process writes and another reads lives here, behind a
//! versioned header, so that two builds of baton can tell whether they understand each
//! other before acting on anything. Today this holds the API types shared by `baton-vmm`
//! and `batonctl`; the live-update state stream, the vring-state handshake and the cpr
//! channel join it.
#![deny(missing_docs)]

pub mod api;
pub mod cpr;
pub mod frame;
pub mod handshake;
pub mod state;
