#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, after seeding the corpora and
# building all targets once. Fails on any crash, timeout or out-of-memory; prints each
# target's executions. CI runs `tests/fuzz/run.sh 15`; hours: `tests/fuzz/run.sh 3600`.
#
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz (installed
# here when missing). No sanitizer (`-s none`): tollgate forbids unsafe code, and without
# AddressSanitizer a target runs several times faster; panics, overflow checks and debug
# assertions are what it catches. New corpus entries accumulate in tests/fuzz/corpus/<target>,
# crashes in tests/fuzz/artifacts/<target> (both git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-15}
shift || true
fuzz=(cargo +nightly fuzz)
dir=tests/fuzz

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain; run: rustup toolchain install nightly --profile minimal" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi

"$dir/seed.sh"
"${fuzz[@]}" build --fuzz-dir "$dir" -s none

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir "$dir")
fi
logs=$dir/logs
mkdir -p "$logs"
failed=()
for target in "${targets[@]}"; do
  dict=()
  [ -f "$dir/corpus/$target.dict" ] && dict=("-dict=$dir/corpus/$target.dict")
  status=0
  "${fuzz[@]}" run --fuzz-dir "$dir" -s none "$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
    -print_final_stats=1 "${dict[@]}" >"$logs/$target.log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$target.log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$target.log" | tail -1)
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $target FAILED (exit $status) after ${execs:-?} executions; log $logs/$target.log" >&2
    grep -E '^(==|SUMMARY|thread|artifact_prefix|Test unit written)|panicked|Running:' "$logs/$target.log" | tail -20 >&2 || true
    failed+=("$target")
  else
    printf 'fuzz: %-14s %12s executions in %ss (%s/s), corpus %s\n' "$target" "${execs:-?}" \
      "$seconds" "${rate:-?}" "$(ls "$dir/corpus/$target" | wc -l)"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes, timeouts or out-of-memory in: ${failed[*]} (inputs in $dir/artifacts/)" >&2
  exit 1
fi
