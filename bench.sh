#!/usr/bin/env bash
# ./bench.sh [NAME...]: runs baton's benchmarks (all of them without a name). Each prints one JSON
# line per case: {"bench": ..., "unit": ..., "ours": N, "peer": NAME, "peer_value": N, "ratio": N}
# (ratio > 1 means baton is better). Run on a quiet machine: the numbers share its two cores.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
setup_packages
setup_bench_packages
setup_rust
build_guest
cargo build --release --workspace --quiet
names=("$@")
((${#names[@]})) || names=($(ls bench/*.sh | xargs -n1 basename | sed 's/\.sh$//'))
for n in "${names[@]}"; do
    [[ -f bench/$n.sh ]] || { echo "no benchmark named '$n' (have: $(ls bench | sed 's/\.sh$//' | tr '\n' ' '))" >&2; exit 2; }
    echo "== bench $n" >&2
    bash "bench/$n.sh"
done
