//! The HTTP API on a UNIX socket: `vm.info`, `vm.pause`, `vm.resume`, `vm.shutdown`.
//!
//! tiny_http serves HTTP/1.1 on a listener we bind ourselves (so that an address in use is
//! reported before the VM is built).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use baton_protocol::api::{API_PREFIX, ApiError, LiveUpdateRequest};
use std::io::Read as _;
use tiny_http::{Header, Method, Response, Server};

use crate::vm::Vm;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another process serves on the path.
    #[error("API socket {0} is already in use by another process")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("API socket path {0} exists and is not a socket")]
    NotSocket(PathBuf),
    /// bind() failed.
    #[error("cannot bind API socket {0}: {1}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// A bound API socket, removed when dropped.
pub struct ApiSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl ApiSocket {
    /// Binds `path`. A stale socket file (nobody listening) is replaced; a live one is refused.
    pub fn bind(path: &Path) -> Result<Self, ApiServerError> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiServerError::NotSocket(path.into()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ApiServerError::InUse(path.into()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|e| ApiServerError::Bind(path.into(), e))?;
        Ok(ApiSocket {
            listener: Some(listener),
            path: path.into(),
        })
    }

    /// Serves requests for `vm` on a thread of its own until the process exits.
    pub fn serve(&mut self, vm: Arc<Vm>) -> Result<(), ApiServerError> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let server = Server::from_listener(listener, None)
            .map_err(|e| ApiServerError::Bind(self.path.clone(), std::io::Error::other(e)))?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for mut req in server.incoming_requests() {
                    let mut body_in = String::new();
                    let _ =
                        std::io::Read::take(req.as_reader(), MAX_BODY).read_to_string(&mut body_in);
                    let (status, body, then) = handle(&vm, req.method(), req.url(), &body_in);
                    let mut resp = Response::from_string(body).with_status_code(status);
                    if let Ok(h) = Header::from_bytes("Content-Type", "application/json") {
                        resp.add_header(h);
                    }
                    let _ = req.respond(resp);
                    // Only now: either one ends the process, and the answer must reach the
                    // client first.
                    match then {
                        Then::Nothing => {}
                        Then::Shutdown => vm.shutdown(),
                        Then::Moved => vm.finish_live_update(),
                    }
                }
            })
            .map_err(|e| ApiServerError::Bind(self.path.clone(), e))?;
        Ok(())
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

/// Largest request body read.
const MAX_BODY: u64 = 64 << 10;

/// What to do once the answer is sent.
enum Then {
    Nothing,
    /// `vm.shutdown`: stop the VM (the process exits).
    Shutdown,
    /// A successful live update: this VMM stops.
    Moved,
}

/// Routes one request; returns (status, JSON body, what to do after answering).
fn handle(vm: &Arc<Vm>, method: &Method, url: &str, body: &str) -> (u16, String, Then) {
    let (status, body) = route(vm, method, url, body);
    let then = match (status, url.rsplit('/').next()) {
        (204, Some("vm.shutdown")) => Then::Shutdown,
        (200, Some("vm.live-update")) => Then::Moved,
        _ => Then::Nothing,
    };
    (status, body, then)
}

fn route(vm: &Arc<Vm>, method: &Method, url: &str, body: &str) -> (u16, String) {
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
        (Method::Get, "vm.info") => (200, serde_json::to_string(&vm.info()).unwrap_or_default()),
        (Method::Put, "vm.pause") => {
            if vm.pause() {
                (204, String::new())
            } else {
                error(500, "vCPUs did not stop")
            }
        }
        (Method::Put, "vm.resume") => {
            vm.resume();
            (204, String::new())
        }
        (Method::Put, "vm.shutdown") => (204, String::new()),
        (Method::Put, "vm.live-update") => {
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
            match vm.live_update(std::path::Path::new(&req.destination), timeout) {
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
