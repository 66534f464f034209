#!/usr/bin/env bash
# The main job: builds everything, boots a VM, prints a summary; the last line is one JSON object.
# --linux: the same scenario with Linux as the guest, in the nested KVM rig
# (tests/nested/demo-linux.sh; under TCG: correctness, not timings).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
setup_packages >&2
if [[ ${1:-} == --linux ]]; then
    cargo build --release --workspace --quiet >&2
    exec bash tests/nested/demo-linux.sh
fi
setup_rust >&2
build_guest >&2
cargo build --release --workspace --quiet >&2
exec target/release/baton-demo
