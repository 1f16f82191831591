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
scripts/tsan.sh || failed+=(tsan)
scripts/fuzz.sh --ci || failed+=(fuzz)
cmake --workflow --preset dev || failed+=(dev)
cmake --workflow --preset asan-ubsan || failed+=(asan-ubsan)
if ((${#failed[@]})); then
  echo "scripts/test.sh: failed: ${failed[*]}" >&2
  exit 1
fi
