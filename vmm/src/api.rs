//! The HTTP API on a UNIX socket: `vm.info`, `vm.pause`, `vm.resume`, `vm.shutdown`,
//! `vm.live-update`.
//!
//! The socket is bound before the VM is built (so that an address in use is reported before
//! anything is created), mode 0600, and only peers of the [`AllowList`] get through (see
//! [`baton_service::access`]); requests are served one at a time on a thread of their own
//! ([`crate::http`]), the `api` thread of [`crate::sandbox::kinds`]. A live update runs on the
//! `migration-out` thread ([`crate::migration::Outgoing`]); this thread waits for its report.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton_protocol::api::{API_PREFIX, ApiError, LiveUpdateRequest};

use crate::http;
use crate::migration::Outgoing;
use crate::sandbox::{Sandbox, SandboxError, kinds};
use crate::vm::Vm;
use baton_service::access::{self, AllowList, BindError};

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket could not be bound (in use, not a socket, ...).
    #[error("API socket: {0}")]
    Bind(#[from] BindError),
    /// The server thread could not be started.
    #[error("cannot start the API thread for {0}: {1}")]
    Thread(PathBuf, #[source] SandboxError),
}

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound API socket, removed when dropped.
pub struct ApiSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    allow: AllowList,
}

impl ApiSocket {
    /// Binds `path` (mode 0600, reachable by `allow`). A stale socket file (nobody listening)
    /// is replaced; a live one, or anything that is not a socket, is refused.
    pub fn bind(path: &Path, allow: &AllowList) -> Result<Self, ApiServerError> {
        let listener = access::bind_private(path, allow)?;
        Ok(ApiSocket {
            listener: Some(listener),
            path: path.into(),
            allow: allow.clone(),
        })
    }

    /// Serves requests for `vm` on a thread of its own (an `api` thread of `sandbox`) until
    /// the process exits; live updates go to `outgoing`.
    pub fn serve(
        &mut self,
        vm: Arc<Vm>,
        outgoing: Outgoing,
        sandbox: &Arc<Sandbox>,
    ) -> Result<(), ApiServerError> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let (path, allow) = (self.path.clone(), self.allow.clone());
        sandbox
            .spawn("api".into(), None, kinds::api(), move |gate| {
                if gate.enter() {
                    serve(&listener, &allow, &path, &vm, &outgoing);
                }
            })
            .map_err(|e| ApiServerError::Thread(self.path.clone(), e))?;
        Ok(())
    }
}

/// The API thread: one request per connection, from allowed peers only.
fn serve(
    listener: &UnixListener,
    allow: &AllowList,
    path: &Path,
    vm: &Arc<Vm>,
    outgoing: &Outgoing,
) {
    loop {
        let mut conn = match access::accept(listener, allow, path) {
            Ok((conn, _peer)) => conn,
            Err(e) => {
                // EMFILE and the like: wait for a descriptor to come free.
                tracing::warn!("API socket {}: accept: {e}", path.display());
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = conn.set_write_timeout(Some(REQUEST_TIMEOUT));
        let req = match http::read_request(&mut conn) {
            Ok(r) => r,
            Err(e) => {
                if let Some(status) = e.status() {
                    let (status, body) = error(status, e.to_string());
                    let _ = http::write_response(&mut conn, status, &body);
                }
                continue;
            }
        };
        crate::sandbox::violation_point("api");
        let (status, body, then) = handle(vm, outgoing, &req.method, &req.path, &req.body);
        let _ = http::write_response(&mut conn, status, &body);
        // Closed before either of these ends the process: the client sees the whole answer.
        drop(conn);
        match then {
            Then::Nothing => {}
            Then::Shutdown => vm.shutdown(),
            Then::Moved => vm.finish_live_update(),
        }
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn error(status: u16, msg: impl Into<String>) -> (u16, String) {
    let body = serde_json::to_string(&ApiError { error: msg.into() }).unwrap_or_default();
    (status, body)
}

/// What to do once the answer is sent.
enum Then {
    Nothing,
    /// `vm.shutdown`: stop the VM (the process exits).
    Shutdown,
    /// A successful live update: this VMM stops.
    Moved,
}

/// Routes one request; returns (status, JSON body, what to do after answering).
fn handle(
    vm: &Arc<Vm>,
    outgoing: &Outgoing,
    method: &str,
    url: &str,
    body: &str,
) -> (u16, String, Then) {
    let (status, body) = route(vm, outgoing, method, url, body);
    let then = match (status, url.rsplit('/').next()) {
        (204, Some("vm.shutdown")) => Then::Shutdown,
        (200, Some("vm.live-update")) => Then::Moved,
        _ => Then::Nothing,
    };
    (status, body, then)
}

fn route(vm: &Arc<Vm>, outgoing: &Outgoing, method: &str, url: &str, body: &str) -> (u16, String) {
    let Some(endpoint) = url
        .strip_prefix(API_PREFIX)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return error(
            404,
            format!("unknown path {url} (the API lives under {API_PREFIX})"),
        );
    };
    match (method, endpoint) {
        ("GET", "vm.info") => (200, serde_json::to_string(&vm.info()).unwrap_or_default()),
        ("PUT", "vm.pause") => {
            if vm.pause() {
                (204, String::new())
            } else {
                error(500, "vCPUs did not stop")
            }
        }
        ("PUT", "vm.resume") => {
            vm.resume();
            (204, String::new())
        }
        ("PUT", "vm.shutdown") => (204, String::new()),
        ("PUT", "vm.live-update") => {
            let req: LiveUpdateRequest = match serde_json::from_str(body) {
                Ok(r) => r,
                Err(e) => {
                    return error(400, format!("body must be {{\"destination\": PATH}}: {e}"));
                }
            };
            let timeout = req.timeout_ms.map_or(
                crate::migration::STEP_TIMEOUT,
                std::time::Duration::from_millis,
            );
            match outgoing.live_update(std::path::Path::new(&req.destination), timeout) {
                Ok(report) => (200, serde_json::to_string(&report).unwrap_or_default()),
                Err(e) => error(500, e.to_string()),
            }
        }
        (_, "vm.info" | "vm.pause" | "vm.resume" | "vm.shutdown" | "vm.live-update") => {
            error(405, format!("{method} not allowed on {endpoint}"))
        }
        _ => error(404, format!("unknown endpoint {endpoint}")),
    }
}
