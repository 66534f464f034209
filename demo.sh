#!/usr/bin/env bash
# The main job: builds everything, boots a VM, prints a summary; the last line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
setup_packages >&2
setup_rust >&2
build_guest >&2
cargo build --release --workspace --quiet >&2
exec target/release/baton-demo
