//! baton-sock-probe: a client of UNIX sockets for the tests of who may use them, run as
//! another uid by [`baton_tests::local_users::probe_as`].
//!
//! `baton-sock-probe [--send TEXT] PATH [PATH...]` connects to every PATH in order (keeping
//! each connection open), writes TEXT to the first, reads from the first until it closes,
//! answers or stays silent for `--wait-ms`, and prints one line: `no-connect KIND: ERROR`,
//! `closed`, `answered N: TEXT` or `silent`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(name = "baton-sock-probe")]
struct Cli {
    /// Bytes to send on the first connection.
    #[arg(long, default_value = "")]
    send: String,
    /// How long to wait for an answer, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    wait_ms: u64,
    /// Sockets to connect to, in order.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    println!("{}", probe(&cli));
}

fn probe(cli: &Cli) -> String {
    let mut conns = Vec::new();
    for p in &cli.paths {
        match UnixStream::connect(p) {
            Ok(s) => conns.push(s),
            Err(e) => return format!("no-connect {:?}: {} ({e})", e.kind(), p.display()),
        }
    }
    let Some(first) = conns.first_mut() else {
        return "no-connect InvalidInput: no path".into();
    };
    // A refused peer may be closed before or while we write: the read tells.
    let _ = first.write_all(cli.send.as_bytes());
    let _ = first.set_read_timeout(Some(Duration::from_millis(cli.wait_ms)));
    let mut buf = [0u8; 256];
    match first.read(&mut buf) {
        Ok(0) => "closed".into(),
        Ok(n) => format!(
            "answered {n}: {}",
            String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).escape_debug()
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            "silent".into()
        }
        Err(e) if e.kind() == ErrorKind::ConnectionReset => "closed".into(),
        Err(e) => format!("error {:?}: {e}", e.kind()),
    }
}
