#!/usr/bin/env bash
# Builds and runs every test: the dev preset (warnings as errors), then AddressSanitizer +
# UndefinedBehaviorSanitizer, then ThreadSanitizer over the threaded backends (scripts/tsan.sh), then
# each libFuzzer target on its seed corpus and for a short bounded time (scripts/fuzz.sh --ci).
# Installs missing Debian packages first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/deps.sh test
cmake --workflow --preset dev
cmake --workflow --preset asan-ubsan
scripts/tsan.sh
scripts/fuzz.sh --ci
