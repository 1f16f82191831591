#!/usr/bin/env bash
# ThreadSanitizer over the threaded backends (docs/reliability.md, "Threads"): configures, builds and runs
# the tsan preset in build/tsan (the tests of backend::tbb in task arenas of 1 to 4 threads, several caller
# threads at once, and the kokkos tests). Installs missing Debian packages first. Fails on any TSan report.
#   scripts/tsan.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/deps.sh test
start=$(date +%s)
cmake --workflow --preset tsan
echo "tsan: configured, built and tested in $(( $(date +%s) - start )) s"
