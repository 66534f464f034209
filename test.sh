#!/usr/bin/env bash
# Installs what baton's tests need on a fresh Debian (bookworm) machine, then runs the whole suite.
# Run as root: it uses apt-get and creates TAP devices and network namespaces.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
setup_packages
setup_rust

echo "== building the test guest (x86_64-unknown-none)"
build_guest

echo "== building every binary (the integration tests start baton-vmm, batonctl, baton-blk, baton-net-tap)"
cargo build --workspace --release --bins

echo "== cargo test (unit, integration: real processes, sockets, QEMU, KVM)"
cargo test --workspace --release --no-fail-fast -- --test-threads=2 "$@"
