#!/usr/bin/env bash
# bench/frontend.sh: guest-visible block request latency through the VMM's vhost-user front-end.
# The test guest runs `test=blk-lat` (sequential 4 KiB reads, queue depth 1) with completion by
# polling and by MSI-X interrupt, on baton-vmm and on QEMU -accel kvm (vhost-user-blk-pci), both
# on the same baton-blk process, in the same run. One JSON line per case and statistic:
#   {"bench":"frontend-blk-read-4k-lat-poll","unit":"us","ours":N,"peer":"qemu-kvm","peer_value":N,"ratio":N,"stat":"median",...}
# plus "-p99" lines and the notify write alone ("frontend-blk-notify-lat"); ratio = QEMU / baton
# (> 1 = baton faster). Under PVM the guest's CPL3 drivers run natively but every interrupt
# entry is emulated: the irq figures are dominated by that, on both VMMs.
# BATON_BENCH_REPEAT sets the boots per platform and mode (default 5, median reported),
# BATON_FRONTEND_N the reads per boot (default 5000). Called by ./bench.sh (release build).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release
G=tests/guest/target/x86_64-unknown-none/release/baton-test-guest
if [[ ! -x $T/baton-vmm || ! -x $T/baton-blk || ! -x $T/baton-frontend-bench ]]; then
    cargo build --release --quiet -p baton-vmm -p baton-blk -p baton-tools --bin baton-vmm \
        --bin baton-blk --bin baton-frontend-bench
fi
if [[ ! -f $G ]]; then
    (cd tests/guest && cargo build --release --quiet)
fi
[[ -r /dev/kvm ]] || { echo "bench/frontend.sh: /dev/kvm is not accessible" >&2; exit 1; }
exec "$T/baton-frontend-bench" --repeat "${BATON_BENCH_REPEAT:-5}" --n "${BATON_FRONTEND_N:-5000}"
