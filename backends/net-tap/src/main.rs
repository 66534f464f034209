//! baton-net-tap: vhost-user-net back-end service over a TAP device that outlives its front-ends.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use baton_net_tap::cli::{Args, default_mac};
use baton_net_tap::device::{Device, NetConfig};
use baton_net_tap::{seccomp, server, store, tap::Tap};
use baton_service::access::{AllowList, SocketPolicy};
use baton_service::sandbox::{FsRule, Sandbox};
use clap::Parser;

fn run(args: Args) -> anyhow::Result<()> {
    // What the service manager passed: the listening socket, the TAP queues it kept for us.
    baton_service::privilege::check_can_drop(args.service.user)?;
    let mut passed = baton_service::ListenFds::from_env();
    let taps = if args.tap_fd.is_empty() {
        let name = args.tap.as_deref().unwrap_or_default();
        store::open_queues(name, usize::from(args.queues), &mut passed)?
    } else {
        if args.queues != 1 && usize::from(args.queues) != args.tap_fd.len() {
            bail!(
                "--queues {} does not match the {} --tap-fd given",
                args.queues,
                args.tap_fd.len()
            );
        }
        args.tap_fd
            .iter()
            .map(|fd| Tap::from_inherited_fd(passed.release(*fd)))
            .collect::<Result<Vec<_>, _>>()?
    };
    let name = taps
        .first()
        .map(|t| t.name().to_string())
        .unwrap_or_default();
    let pairs = u16::try_from(taps.len()).context("too many queues")?;
    let cfg = NetConfig {
        mac: args.mac.unwrap_or_else(|| default_mac(&name)),
        mtu: args.mtu,
        pairs,
    };
    let allow = AllowList::for_user(&args.service.allow_uid, args.service.user);
    let (listener, bound) =
        baton_service::listener_from(&mut passed, args.socket.as_deref(), &allow)?;
    drop(passed);
    // TAP queues open (and stored), socket bound: nothing left that needs root. No thread runs
    // yet, and no filter is installed.
    baton_service::privilege::drop_after_setup(
        args.service.user,
        args.socket.as_deref().filter(|_| bound),
    )?;
    let dev = Device::new(cfg, taps).context("creating the device")?;
    dev.set_poll(std::time::Duration::from_micros(args.poll_us));
    let peers = SocketPolicy::new(allow, args.socket.as_deref());
    let socket = args.socket.filter(|_| bound);
    let sandbox = Arc::new(Sandbox::new("baton-net-tap", &args.sandbox)?);
    // TAP queues open, socket bound: the only file system access left is removing our socket.
    let rules: Vec<FsRule> = socket.iter().map(|s| FsRule::remove_file(s)).collect();
    sandbox.restrict_fs(&rules)?;
    server::handle_signals(dev.clone(), socket, &sandbox)?;
    dev.spawn_workers(&sandbox)?;
    tracing::info!(tap = %name, queues = pairs, "serving");
    baton_service::notify_ready();
    sandbox.enter(&seccomp::control())?;
    sandbox.report();
    server::serve(dev, listener, peers)?;
    Ok(())
}

fn main() -> ExitCode {
    baton_service::ratelimit::init_logging();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton-net-tap: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
