#!/usr/bin/env bash
# libFuzzer runs of the targets in fuzz/ (fuzz_npy, fuzz_route, fuzz_export; docs/reliability.md, "Fuzzing").
#   scripts/fuzz.sh --ci [SECONDS]  configure and build the fuzz preset (build/fuzz), then its CTest tests:
#                                   each target's seed corpus, then SECONDS of fuzzing (default 20)
#   scripts/fuzz.sh [SECONDS]       a soak: each target in turn for SECONDS (default 600), one process at
#                                   a time; new inputs go to build/fuzz/soak/<target>/, never into the
#                                   seed corpus. RESONANCE_FUZZ_RUNS=N runs N inputs per target instead;
#                                   RESONANCE_FUZZ_TARGETS="fuzz_route ..." soaks only those targets.
# Installs missing Debian packages first (clang, its libFuzzer runtime, the test dependencies). Prints the
# executions and findings of each target; exits 1 when a target found something (its reproducer is in
# build/fuzz/fuzz/artifacts/ for --ci, build/fuzz/soak/artifacts/ for a soak).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ci=0
if [[ ${1:-} == --ci ]]; then
  ci=1
  shift
fi
seconds=${1:-}
runs=${RESONANCE_FUZZ_RUNS:-}
if [[ -n $seconds && ! $seconds =~ ^[0-9]+$ ]] || [[ -n $runs && ! $runs =~ ^[0-9]+$ ]] || (($# > 1)); then
  echo "usage: scripts/fuzz.sh [--ci] [seconds-per-target]   (RESONANCE_FUZZ_RUNS=N: N inputs per target)" >&2
  exit 2
fi

scripts/deps.sh test clang libclang-rt-14-dev
build=build/fuzz
read -r -a targets <<<"${RESONANCE_FUZZ_TARGETS:-fuzz_npy fuzz_route fuzz_export}"
for t in "${targets[@]}"; do
  [[ -d fuzz/corpus/$t ]] || { echo "fuzz: no target $t (fuzz_npy, fuzz_route, fuzz_export)" >&2; exit 2; }
done
start=$(date +%s)

# The executions a libFuzzer log reports (its -print_final_stats line), or "?" when it stopped early.
execs_in() { awk '/stat::number_of_executed_units:/ { n = $2 } END { print (n == "" ? "?" : n) }' "$1"; }

if ((ci)); then
  cmake --preset fuzz -DRESONANCE_FUZZ_SECONDS="${seconds:-20}" >/dev/null
  cmake --build --preset fuzz
  status=0
  mkdir -p "$build/fuzz/artifacts"
  touch "$build/fuzz/artifacts/.since"
  ctest --preset fuzz || status=1
  # CTest keeps every test's output in its log: one block per test, from its "Test:" line.
  log=$build/Testing/Temporary/LastTest.log
  for t in "${targets[@]}"; do
    awk -v t="fuzz.$t" '$0 ~ "^[0-9]+/[0-9]+ Test: " t "$" { on = 1; next } /^[0-9]+\/[0-9]+ Test: / { on = 0 } on' \
      "$log" >"$build/$t.ci.log"
    findings=$(find "$build/fuzz/artifacts" -name "$t-*" -newer "$build/fuzz/artifacts/.since" | wc -l)
    echo "fuzz: $t: $(execs_in "$build/$t.ci.log") executions, $findings findings"
  done
  echo "fuzz: --ci finished in $(($(date +%s) - start)) s"
  exit $status
fi

cmake --preset fuzz >/dev/null
cmake --build --preset fuzz
soak=$build/soak
mkdir -p "$soak/artifacts"
status=0
for t in "${targets[@]}"; do
  mkdir -p "$soak/$t"
  limit=(-max_total_time="${seconds:-600}")
  [[ -n $runs ]] && limit=(-runs="$runs")
  dict=()
  [[ $t == fuzz_npy ]] && dict=(-dict=fuzz/npy.dict)
  before=$(find "$soak/artifacts" -name "$t-*" | wc -l)
  t0=$(date +%s)
  "$build/fuzz/$t" "${limit[@]}" -timeout=30 -rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 \
    -artifact_prefix="$soak/artifacts/$t-" "${dict[@]}" "$soak/$t" "fuzz/corpus/$t" >"$soak/$t.log" 2>&1 || status=1
  findings=$(($(find "$soak/artifacts" -name "$t-*" | wc -l) - before))
  echo "fuzz: $t: $(execs_in "$soak/$t.log") executions in $(($(date +%s) - t0)) s, $findings findings," \
    "corpus $(find "$soak/$t" -type f | wc -l) inputs (log: $soak/$t.log)"
done
echo "fuzz: soak finished in $(($(date +%s) - start)) s"
exit $status
