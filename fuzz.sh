#!/usr/bin/env bash
# Fuzzes baton's parsers of untrusted input (cargo-fuzz + libFuzzer, nightly; see fuzz/README.md).
#
#   ./fuzz.sh [TARGET|all] [SECONDS]   build, then fuzz TARGET (default: all, one after another)
#                                      for SECONDS each (default 60)
#   ./fuzz.sh --smoke                  build, then run every target once over each of its seeds
#   ./fuzz.sh --seeds                  regenerate fuzz/corpus/ (fuzz/examples/gen_seeds.rs)
#   ./fuzz.sh --list                   the targets
#
# Installs what it needs: the nightly toolchain (rustup) and cargo-fuzz (cargo install).
# Every input runs under a time limit (-timeout), so a hang or livelock is a finding too.
# The seeds in fuzz/corpus/<target>/ are only read; what the fuzzer learns goes to
# fuzz/target/corpus/<target>/ (kept between runs, not committed). Findings are written to
# fuzz/artifacts/<target>/ and listed at the end; the exit status is 1 if there are any.
set -euo pipefail
cd "$(dirname "$0")"

TOOLCHAIN=${BATON_FUZZ_TOOLCHAIN:-nightly}
TIMEOUT=${BATON_FUZZ_TIMEOUT:-10} # seconds per input
FUZZ=(cargo "+$TOOLCHAIN" fuzz)
BIN=fuzz/target/x86_64-unknown-linux-gnu/release

setup() {
    if ! command -v rustup >/dev/null; then
        echo "fuzz.sh: rustup is needed (https://rustup.rs)" >&2
        exit 2
    fi
    rustup toolchain list | grep -q "^$TOOLCHAIN" ||
        rustup toolchain install "$TOOLCHAIN" --profile minimal
    cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
}

targets() {
    sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^baton-fuzz$' || true
}

# Largest input per target: room for its seeds and for growth, small enough to stay fast.
max_len() {
    case "$1" in
    protocol_*) echo 131072 ;;
    cpr_manifest) echo 65536 ;;
    vhost_user_stream) echo 16384 ;;
    *) echo 8192 ;;
    esac
}

build() {
    echo "== building the fuzz targets (nightly, cargo-fuzz, ASan)"
    "${FUZZ[@]}" build --fuzz-dir fuzz
}

findings() { # target -> finding files, one per line
    ls -1 "fuzz/artifacts/$1"/{crash,timeout,leak,oom}-* 2>/dev/null || true
}

FOUND=()
report() {
    if ((${#FOUND[@]})); then
        echo "== FINDINGS (reproduce: $BIN/<target> <file>; minimise: cargo +$TOOLCHAIN fuzz tmin --fuzz-dir fuzz <target> <file>):"
        printf '  %s\n' "${FOUND[@]}"
        exit 1
    fi
    echo "== no findings"
}

fuzz_one() { # target seconds
    local t=$1 secs=$2 before after f
    local work=fuzz/target/corpus/$t
    mkdir -p "$work" "fuzz/artifacts/$t"
    before=$(findings "$t")
    echo "== fuzzing $t for ${secs}s"
    set +e
    "$BIN/$t" "$work" "fuzz/corpus/$t" -artifact_prefix="fuzz/artifacts/$t/" \
        -max_total_time="$secs" -timeout="$TIMEOUT" -max_len="$(max_len "$t")" \
        -print_final_stats=1 2>&1 | grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|==[0-9]+==|SUMMARY|.*(panicked|Test unit written|ERROR: libFuzzer))' 
    set -e
    after=$(findings "$t")
    for f in $after; do
        grep -qxF "$f" <<<"$before" || FOUND+=("$f")
    done
}

smoke_one() { # target
    local t=$1 seeds
    seeds=(fuzz/corpus/"$t"/*)
    printf '== %-20s %3d seeds: ' "$t" "${#seeds[@]}"
    if "$BIN/$t" -timeout="$TIMEOUT" -max_len="$(max_len "$t")" "${seeds[@]}" >"fuzz/target/smoke-$t.log" 2>&1; then
        echo ok
    else
        echo "FAILED (fuzz/target/smoke-$t.log)"
        grep -E 'panicked|SUMMARY|ERROR|Running: ' "fuzz/target/smoke-$t.log" | tail -5 >&2 || true
        FOUND+=("$t (smoke; log: fuzz/target/smoke-$t.log)")
    fi
}

case "${1:-all}" in
--list)
    targets
    ;;
--seeds)
    setup
    cargo "+$TOOLCHAIN" run --manifest-path fuzz/Cargo.toml --example gen_seeds
    ;;
--smoke)
    setup
    build
    for t in $(targets); do smoke_one "$t"; done
    report
    ;;
-h | --help)
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
    ;;
*)
    target=${1:-all}
    secs=${2:-60}
    all=$(targets)
    if [[ $target != all ]] && ! grep -qx "$target" <<<"$all"; then
        echo "fuzz.sh: no target '$target'; targets: $(echo $all)" >&2
        exit 2
    fi
    setup
    build
    if [[ $target == all ]]; then
        for t in $all; do fuzz_one "$t" "$secs"; done
    else
        fuzz_one "$target" "$secs"
    fi
    report
    ;;
esac
