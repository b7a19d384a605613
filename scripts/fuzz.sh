#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, libFuzzer) for a bounded time
# on its seed corpus, on the stable toolchain. Fails if any target finds a
# crash, a hang or an allocation past the memory limit; the log then names
# the input libFuzzer saved under fuzz/artifacts/<target>/ and shows its hex
# dump, so it can be reproduced from the log alone.
#
#   scripts/fuzz.sh               every target
#   scripts/fuzz.sh TARGET...     only these targets
#
# Time: the whole step, build included, stays within FUZZ_BUDGET seconds
# (default 540): what the build leaves is shared out among the targets,
# at most FUZZ_SECONDS (default 60) and at least 20 s each.
#
# Reproduce a saved input with
#   cargo fuzz run -s none -a TARGET fuzz/artifacts/TARGET/crash-...
#
# `-s none`: no sanitizer, so no nightly toolchain is needed (the targets
# are safe Rust; libFuzzer's coverage instrumentation works on stable).
# `-a`: debug assertions and overflow checks on, as in tests.
# New inputs the fuzzer finds go to a scratch directory, never into the
# committed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

budget=${FUZZ_BUDGET:-540}
most=${FUZZ_SECONDS:-60}
least=20
[ "$most" -ge "$least" ] || least=$most
# Per-input limits: a run longer than this is a hang; RSS above this (or a
# single allocation above it) is an unbounded allocation.
timeout_secs=20
rss_limit_mb=1024

# scripts/setup.sh installs it; this is for a run without setup.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

start=$(date +%s)
echo "fuzz: building the targets"
cargo fuzz build -s none -a
built=$(($(date +%s) - start))

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
# Each run also spends a few seconds starting and loading its corpus.
seconds=$(((budget - built) / ${#targets[@]} - 5))
[ "$seconds" -le "$most" ] || seconds=$most
[ "$seconds" -ge "$least" ] || seconds=$least
echo "fuzz: built in $built s; ${#targets[@]} targets, $seconds s each"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in "${targets[@]}"; do
    mkdir -p "$scratch/$target" "fuzz/artifacts/$target" "fuzz/corpus/$target"
    log=$scratch/$target.log
    echo "fuzz: $target for ${seconds} s"
    touch "$scratch/$target.start"
    status=0
    cargo fuzz run -s none -a "$target" "$scratch/$target" "$root/fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout="$timeout_secs" -rss_limit_mb="$rss_limit_mb" \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^#[0-9]+[[:space:]]+DONE|^stat::number_of_executed_units|^stat::peak_rss_mb' "$log" | sed "s/^/fuzz: $target: /" || true
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        echo "fuzz: $target FAILED (exit $status); what libFuzzer reported:"
        grep -E -A3 "panicked at|ERROR: libFuzzer|^SUMMARY|Test unit written" "$log" | head -n 40 || true
        echo "fuzz: $target: the end of its log:"
        tail -n 80 "$log"
        find "fuzz/artifacts/$target" -type f -newer "$scratch/$target.start" | while read -r input; do
            echo "fuzz: $target: saved input $input ($(stat -c %s "$input") bytes):"
            od -A x -t x1z -v "$input" | head -n 256
        done
    fi
done

echo "fuzz: done in $(($(date +%s) - start)) s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: no target found a crash, hang or unbounded allocation"
