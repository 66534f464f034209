#!/usr/bin/env bash
# ./bench.sh net: baton-net-tap through the host-side vhost-user driver, against two peers in the
# same run (tests/tests/net_bench.rs):
#   dpdk-testpmd       DPDK 22.11's vhost PMD + TAP PMD, --forward-mode=io, one dedicated polling
#                      lcore, 2 MiB hugepages (reserved for the run, restored after), driven by
#                      the same driver on the same TAP traffic (tests/src/dpdk.rs);
#   TAP syscall floor  one thread writing / reading the same frames on a TAP directly.
# 64-byte frames (pps), 1514-byte frames and 64 KiB TSO frames (Gbit/s), each direction, all
# inside a network namespace the benchmark creates; BATON_BENCH_SECONDS (default 2) per case
# and peer. Needs root (TAP devices, namespaces, hugepages). Two JSON lines per case:
#   {"bench":"net-tx-64","unit":"pps","ours":N,"peer":"dpdk-testpmd","peer_value":N|null,
#    "ratio":N|null,"peer_config":"...","peer_failure":null|"why testpmd cannot do this case"}
#   {"bench":"net-tx-64",...,"peer":"TAP syscall floor","peer_value":N,"ratio":N,"peer_config":"..."}
# (ratio > 1 = baton better).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --quiet -p baton-tests --test net_bench -- --ignored --nocapture --test-threads=1 2>/dev/null \
    | grep '^{"bench"'
