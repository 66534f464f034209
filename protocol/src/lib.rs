//! Formats that cross a baton process boundary.
//!
//! **Rule:** every message that one baton process writes and another reads is defined in this
//! crate, as a plain serde type behind a versioned header (or, for HTTP, a versioned path),
//! with a size cap and a `validate()` that runs before the message is used. Round-trip and
//! corrupt-input tests sit beside each format. No other crate defines a wire format.
//!
//! | format                          | module        | magic  | version | cap       |
//! |---------------------------------|---------------|--------|---------|-----------|
//! | HTTP API bodies (JSON)          | [`api`]       | —      | path `/api/v1` | —  |
//! | live-update hello               | [`handshake`] | `BLUH` | 1       | 64 KiB    |
//! | live-update prepare             | [`handshake`] | `BLUP` | 1       | 16 MiB    |
//! | live-update prepared            | [`handshake`] | `BLUQ` | 1       | 64 KiB    |
//! | live-update state ([`state::VmState`]) | [`state`] | `BLUS` | 1     | 16 MiB    |
//! | live-update ready               | [`handshake`] | `BLUR` | 1       | 64 KiB    |
//! | live-update commit              | [`handshake`] | `BLUC` | 1       | 64 KiB    |
//! | live-update ack                 | [`handshake`] | `BLUA` | 1       | 64 KiB    |
//! | live-update abort               | [`handshake`] | `BLUX` | 1       | 64 KiB    |
//! | cpr fd manifest (+ SCM_RIGHTS)  | [`cpr`]       | `BCPR` | 1       | 64 KiB, 64 fds |
//!
//! The live-update protocol as a whole also has a version,
//! [`handshake::LIVE_UPDATE_VERSION`] (1), exchanged in the hello; the two VMMs stop before
//! touching the guest if it differs.
//!
//! The frame layout (16-byte header: magic, version, reserved flags, payload length, CRC-32;
//! then a JSON payload) and the reader's checks are described in [`frame`]. To add a format:
//! pick a new magic, start at version 1, implement [`frame::Validate`], and add a row above.
//! To change a format incompatibly, bump its version; to stay readable by an older peer, add
//! fields only with `#[serde(default)]` and keep the version.
//!
//! Beside the formats, [`mac`] parses the text form of the MAC address a net device carries,
//! for every process that takes one on its command line.
#![deny(missing_docs)]

pub mod api;
pub mod cpr;
pub mod frame;
pub mod handshake;
pub mod mac;
pub mod state;
