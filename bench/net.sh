#!/usr/bin/env bash
# ./bench.sh net: baton-net-tap through the host-side vhost-user driver vs. one thread reading or
# writing the same frames on a TAP directly. 64-byte frames (pps), 1514-byte frames and 64 KiB
# TSO frames (Gbit/s), each direction; a few seconds per case, all inside a network namespace
# the benchmark creates. Needs root (TAP devices, namespaces). One JSON line per case.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --quiet -p baton-tests --test net_bench -- --ignored --nocapture --test-threads=1 2>/dev/null \
    | grep '^{"bench"'
