//! Connecting to a back-end: the handshake that does not depend on the guest (owner,
//! features, protocol features, queue count, configuration space), and reconnecting with it.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::VhostBackend;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vm_memory::GuestMemoryMmap;

use super::error::{ErrorClass, VhostUserError as E};
use super::features::{self, F_VERSION_1, PROTOCOL_FEATURES, blk};
use super::{REPLY_TIMEOUT, STANDBY_TIMEOUT, VhostUserDevice, deadline};
use crate::config::{DeviceConfig, DeviceKind};

impl VhostUserDevice {
    /// Connects and negotiates everything that does not depend on the guest.
    pub fn connect(cfg: DeviceConfig, mem: GuestMemoryMmap) -> Result<Self, E> {
        Self::connect_within(cfg, mem, REPLY_TIMEOUT)
    }

    /// [`VhostUserDevice::connect`], each answer awaited for at most `timeout`.
    fn connect_within(
        cfg: DeviceConfig,
        mem: GuestMemoryMmap,
        timeout: Duration,
    ) -> Result<Self, E> {
        let sock = || cfg.socket.clone();
        let queue_count = match cfg.kind {
            DeviceKind::Block => cfg.queues,
            DeviceKind::Net { .. } => cfg.queues.saturating_mul(2),
        };
        // One connect(2), no hidden retries (Frontend::connect sleeps 100 ms between five
        // tries): the callers decide how to retry (live-update window, restart backoff).
        let stream = UnixStream::connect(&cfg.socket).map_err(|e| E::Connect(sock(), e))?;
        // A back-end that accepts and then never answers (or answers short) must not hang the
        // VMM: past the deadline the connection is ended and the step fails.
        let _deadline = deadline::arm(&stream, timeout).map_err(|e| E::Deadline(sock(), e))?;
        let mut fe = Frontend::from_stream(stream, u64::from(queue_count) + 1);
        fe.set_owner().map_err(|e| E::SetOwner(sock(), e))?;
        let features = fe.get_features().map_err(|e| E::GetFeatures(sock(), e))?;
        let required = F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & required != required {
            return Err(E::MissingFeatures(sock(), required & !features));
        }
        let theirs = fe
            .get_protocol_features()
            .map_err(|e| E::GetProtocolFeatures(sock(), e))?;
        let mut protocol = theirs & PROTOCOL_FEATURES;
        if !protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) || cfg.drain {
            // The spec: GET_VRING_BASE_INFLIGHT only with INFLIGHT_SHMFD.
            protocol.remove(VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT);
        }
        fe.set_protocol_features(protocol)
            .map_err(|e| E::SetProtocolFeatures(sock(), e))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request asks for an answer, so a refusal is seen where it happens.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let (offered, queue_count) = features::offer(&cfg, features);
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = fe.get_queue_num().map_err(|e| E::GetQueueNum(sock(), e))?;
            if max < u64::from(queue_count) {
                return Err(E::TooFewQueues(sock(), max, queue_count.into()));
            }
        } else if queue_count > 2 || (cfg.kind == DeviceKind::Block && queue_count > 1) {
            return Err(E::TooFewQueues(sock(), 1, queue_count.into()));
        }
        let config_space = match &cfg.kind {
            DeviceKind::Block if protocol.contains(VhostUserProtocolFeatures::CONFIG) => {
                let buf = vec![0u8; blk::CONFIG_SIZE as usize];
                let (_, payload) = fe
                    .get_config(0, blk::CONFIG_SIZE, VhostUserConfigFlags::WRITABLE, &buf)
                    .map_err(|e| E::GetConfig(sock(), e))?;
                features::blk_config_space(&payload, cfg.queues)
            }
            _ => features::local_config_space(&cfg),
        };
        Ok(VhostUserDevice {
            fe: Some(fe),
            cfg,
            backend_features: features,
            protocol,
            offered,
            queue_count,
            config_space,
            mem,
            inflight: None,
            started: Vec::new(),
            acked: 0,
            standby: false,
        })
    }

    /// A device for a back-end that another VMM is using right now (incoming live update).
    /// `offered` and `queue_count` come from the saved state, so the guest sees exactly the
    /// device it had. The connection is made now if the back-end keeps a second front-end in
    /// standby (as baton's do: the handshake that does not touch the device is served at once,
    /// the rest waits until the old VMM hangs up), which takes it out of the blackout; else
    /// (it closes us, does not answer within [`STANDBY_TIMEOUT`], or no longer offers a
    /// feature the guest has) it is made by [`VhostUserDevice::resume`].
    pub fn handed_over(
        cfg: DeviceConfig,
        mem: GuestMemoryMmap,
        offered: u64,
        queue_count: u16,
    ) -> Self {
        let mut d = Self::waiting(cfg, mem, offered, queue_count);
        match Self::connect_within(d.cfg.clone(), d.mem.clone(), STANDBY_TIMEOUT)
            .and_then(|fresh| d.adopt_connection(fresh))
        {
            Ok(()) => {
                tracing::info!(socket = %d.cfg.socket.display(), "connected in standby");
                d.standby = true;
            }
            Err(e) => {
                tracing::info!(socket = %d.cfg.socket.display(),
                    "no standby connection ({e}): reconnecting at the switch");
            }
        }
        d
    }

    /// A device with no connection yet, as [`VhostUserDevice::handed_over`] describes it.
    fn waiting(cfg: DeviceConfig, mem: GuestMemoryMmap, offered: u64, queue_count: u16) -> Self {
        let config_space = features::local_config_space(&cfg);
        VhostUserDevice {
            fe: None,
            cfg,
            backend_features: offered,
            protocol: VhostUserProtocolFeatures::empty(),
            offered,
            queue_count,
            config_space,
            mem,
            inflight: None,
            started: Vec::new(),
            acked: 0,
            standby: false,
        }
    }

    /// Takes `fresh`'s connection and what it negotiated, if it still offers every feature the
    /// guest relies on; the guest keeps what it saw.
    fn adopt_connection(&mut self, fresh: VhostUserDevice) -> Result<(), E> {
        let missing = self.offered & !fresh.offered;
        if missing != 0 {
            return Err(E::MissingFeatures(self.cfg.socket.clone(), missing));
        }
        self.fe = fresh.fe;
        self.backend_features = fresh.backend_features;
        self.protocol = fresh.protocol;
        if fresh.config_space.len() == self.config_space.len() {
            self.config_space = fresh.config_space;
        }
        Ok(())
    }

    /// Connects again and renegotiates; the back-end must still offer every feature the guest
    /// relies on.
    ///
    /// A back-end serves one front-end at a time and may not have seen the previous one hang
    /// up yet (it then refuses us), so the whole handshake is retried with a short capped
    /// backoff for up to `window`, unless the error says retrying cannot help
    /// ([`ErrorClass::Fatal`]).
    pub(super) fn reconnect(&mut self, window: Duration) -> Result<(), E> {
        let deadline = Instant::now() + window;
        let mut delay = Duration::from_micros(100);
        let fresh = loop {
            match VhostUserDevice::connect(self.cfg.clone(), self.mem.clone()) {
                Ok(d) => break d,
                Err(e) if e.class() != ErrorClass::Fatal && Instant::now() + delay < deadline => {
                    tracing::debug!("reconnect to {}: {e}; retrying", self.cfg.socket.display());
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        };
        self.adopt_connection(fresh)
    }
}
