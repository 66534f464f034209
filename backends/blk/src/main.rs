//! baton-blk: vhost-user-blk back-end over a raw image that outlives its front-ends.
//!
//! Structure: `device` (virtio-blk state, config space) + `request` (chain parsing) +
//! `engine`/`disk` (io_uring or sync I/O) + `vring` (queue workers, tracked in the framework's
//! `baton_service::inflight` region) + `handler` (the device core as a `baton_service::vhost`
//! device; the request handler, connection and accept loops are the framework's) + `server`
//! (shutdown on SIGTERM) + `seccomp` (each thread kind's allowlist; the sandbox itself is
//! `baton_service::sandbox`).

use baton_blk::{cli, device, seccomp, server};

use std::sync::Arc;

use baton_service::access::{AllowList, SocketPolicy};
use baton_service::privilege;
use baton_service::sandbox::Sandbox;
use clap::Parser;

fn run() -> anyhow::Result<()> {
    let args = cli::Args::parse();
    args.validate().map_err(anyhow::Error::msg)?;
    privilege::check_can_drop(args.service.user)?;
    let sig = server::signals()?;
    let dev = Arc::new(device::Device::new(&args)?);
    let peers = SocketPolicy::new(
        AllowList::for_user(&args.service.allow_uid, args.service.user),
        args.socket.as_deref(),
    );
    let (listener, bound) = baton_service::listener(args.socket.as_deref(), &peers.allow)?;
    // The image is open, the socket bound: nothing left that needs root. No thread runs yet,
    // and no filter is installed.
    privilege::drop_after_setup(args.service.user, args.socket.as_deref().filter(|_| bound))?;
    let sandbox = Arc::new(Sandbox::new("baton-blk", &args.sandbox)?);
    // No file system access at all from here: the image is open, the socket bound (and left in
    // place at exit: the next instance replaces it).
    sandbox.restrict_fs(&[])?;
    dev.spawn_workers(&sandbox)?;
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
    sandbox.enter(&seccomp::control())?;
    sandbox.report();
    server::run(dev, listener, sig, &peers)?;
    Ok(())
}

fn main() {
    baton_service::ratelimit::init_logging();
    if let Err(e) = run() {
        eprintln!("baton-blk: error: {e:#}");
        std::process::exit(1);
    }
}
