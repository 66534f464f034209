//! `batonctl`: command-line client of the baton-vmm HTTP API.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use baton_protocol::api::{API_PREFIX, LiveUpdateRequest};
use clap::{Parser, Subcommand};

/// Controls a running baton-vmm through its API socket.
#[derive(Parser, Debug)]
#[command(name = "batonctl", version)]
struct Args {
    /// The VMM's API socket (--api-socket of baton-vmm).
    #[arg(long, short = 's', env = "BATON_API_SOCKET")]
    api_socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the VM's state as JSON.
    Info,
    /// Stop all vCPUs.
    Pause,
    /// Resume vCPUs.
    Resume,
    /// Stop the VM; baton-vmm exits 0.
    Shutdown,
    /// Move the VM to a new baton-vmm started with `--incoming PATH`; prints the report.
    LiveUpdate {
        /// The new VMM's --incoming socket.
        destination: PathBuf,
        /// Per-step timeout in milliseconds before rolling back (default 10000).
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
fn request(
    socket: &PathBuf,
    method: &str,
    endpoint: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {API_PREFIX}/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("malformed response from {}", socket.display()))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut body = String::new();
    let (method, endpoint) = match &args.cmd {
        Cmd::Info => ("GET", "vm.info"),
        Cmd::Pause => ("PUT", "vm.pause"),
        Cmd::Resume => ("PUT", "vm.resume"),
        Cmd::Shutdown => ("PUT", "vm.shutdown"),
        Cmd::LiveUpdate {
            destination,
            timeout_ms,
        } => {
            let abs = std::path::absolute(destination).unwrap_or_else(|_| destination.clone());
            body = serde_json::to_string(&LiveUpdateRequest {
                destination: abs.display().to_string(),
                timeout_ms: *timeout_ms,
            })
            .unwrap_or_default();
            ("PUT", "vm.live-update")
        }
    };
    match request(&args.api_socket, method, endpoint, &body) {
        Ok((200..=299, body)) => {
            if !body.is_empty() {
                println!("{body}");
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("batonctl: {endpoint} failed ({status}): {body}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("batonctl: {e}");
            ExitCode::from(1)
        }
    }
}
