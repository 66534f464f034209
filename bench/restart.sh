#!/usr/bin/env bash
# ./bench.sh restart: time from a restarted baton-blk being ready (its sd_notify READY=1) to the
# guest's next completed write seen in the image from the host, p50/p99/max over 20 SIGKILLs at
# random moments: baton-vmm (test guest blk-cont, depth 8, KVM) against QEMU (Linux guest under
# TCG, dd oflag=direct, vhost-user-blk-pci with -chardev reconnect-ms=1) on the same baton-blk,
# plus the guest error count (guest result line and a host check of every block). One JSON line
# per figure. BATON_RESTARTS / BATON_RESTART_QEMU_RESTARTS / BATON_RESTART_QEMU_RECONNECT_MS
# change the counts and QEMU's reconnect interval (default 20 / 20 / 1). The Linux guest comes
# from tests/linux-guest/build.sh (cached in the target dir, or $BATON_LINUX_GUEST).
# Called by ./bench.sh (release build).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release
G=tests/guest/target/x86_64-unknown-none/release/baton-test-guest
if [[ ! -x $T/baton-vmm || ! -x $T/baton-blk || ! -x $T/batonctl || ! -x $T/baton-restart-bench ]]; then
    cargo build --release --quiet -p baton-vmm -p baton-blk -p baton-tools
fi
if [[ ! -f $G ]]; then
    (cd tests/guest && cargo build --release --quiet)
fi
[[ -r /dev/kvm ]] || { echo "bench/restart.sh: /dev/kvm is not accessible" >&2; exit 1; }
# The VMM logs every reconnect attempt at warn level; keep stderr to errors.
export RUST_LOG=${RUST_LOG:-error}
exec "$T/baton-restart-bench" --restarts "${BATON_RESTARTS:-20}" \
    --qemu-restarts "${BATON_RESTART_QEMU_RESTARTS:-20}" \
    --qemu-reconnect-ms "${BATON_RESTART_QEMU_RECONNECT_MS:-1}"
