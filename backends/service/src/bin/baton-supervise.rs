//! baton-supervise: restarts a back-end forever, keeping its listening socket and the fds it
//! stores (systemd's socket activation and fd store) where systemd is not the service manager.
//! See `baton_service::supervise`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = baton_service::supervise::Args::parse();
    match baton_service::supervise::run(args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("baton-supervise: error: {e}");
            ExitCode::FAILURE
        }
    }
}
