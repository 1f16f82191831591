#!/usr/bin/env bash
# Builds and runs every test: ThreadSanitizer over the threaded backends (scripts/tsan.sh), each
# libFuzzer target on its seed corpus and for a short bounded time (scripts/fuzz.sh --ci), then the dev
# preset (warnings as errors) and AddressSanitizer + UndefinedBehaviorSanitizer, whose CTest summary
# ends the run. Every step runs even when an earlier one fails; the exit status is 1 if any failed.
# Installs missing Debian packages first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/deps.sh test
failed=()
times=()
# step NAME COMMAND...: runs one step, records its failure and its wall time.
step() {
  local name=$1 start=$SECONDS
  shift
  "$@" || failed+=("$name")
  times+=("$name $((SECONDS - start)) s")
}
step tsan scripts/tsan.sh
step fuzz scripts/fuzz.sh --ci
step dev cmake --workflow --preset dev
# The times so far, printed before the last step so that CTest's summary ends the run.
echo "scripts/test.sh: ${times[*]}"
step asan-ubsan cmake --workflow --preset asan-ubsan
if ((${#failed[@]})); then
  echo "scripts/test.sh: failed: ${failed[*]}" >&2
  exit 1
fi
