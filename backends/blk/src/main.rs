//! baton-blk: vhost-user-blk back-end over a raw image that outlives its front-ends.
//!
//! Structure: `device` (virtio-blk state, config space) + `request` (chain parsing) +
//! `engine`/`disk` (io_uring or sync I/O) + `vring` (queue workers) + `inflight` (the
//! INFLIGHT_SHMFD region) + `handler` (vhost-user requests of one connection) + `server`
//! (accept loop, socket activation, sd_notify, signals).

mod chain;
mod cli;
mod device;
mod disk;
mod engine;
mod handler;
mod inflight;
mod request;
mod server;
mod vring;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

fn run() -> anyhow::Result<()> {
    let args = cli::Args::parse();
    args.validate().map_err(anyhow::Error::msg)?;
    let sig = server::signals()?;
    let dev = Arc::new(device::Device::new(&args)?);
    let (listener, _bound) = baton_service::listener(args.socket.as_deref())?;
    dev.spawn_workers().context("cannot start queue threads")?;
    tracing::info!(
        image = %args.image.display(),
        size = dev.disk().size(),
        block_device = dev.disk().is_block_device(),
        readonly = dev.disk().readonly(),
        queues = args.queues,
        engine = ?args.io_engine,
        inline = ?dev.disk().inline(),
        "ready"
    );
    baton_service::notify_ready();
    server::run(
        dev,
        listener,
        sig,
        &baton_service::PeerPolicy::new(&args.allow_uid),
    )?;
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Err(e) = run() {
        eprintln!("baton-blk: error: {e:#}");
        std::process::exit(1);
    }
}
