#!/usr/bin/env bash
# Determinism soak: the conformance suite (every direction, score, capacity and drop policy, ties,
# E not a power of two, NaN/Inf rejection) on every backend of the dev build and thread counts 1, 2, 3,
# each plan compared bit for bit with serial's, over many more seeded cases than CI routes.
#   scripts/soak.sh [CASES [FIRST]]   default 10000 cases from case 0 (CI runs 400)
# Needs a dev build (cmake --workflow --preset dev). docs/reliability.md records a run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cases=${1:-10000}
first=${2:-0}
build=build/dev
[[ -x $build/tests/resonance_tests ]] || { echo "soak: build the dev preset first (cmake --workflow --preset dev)" >&2; exit 2; }
export RESONANCE_CONFORMANCE_CASES=$cases RESONANCE_CONFORMANCE_FIRST=$first
start=$(date +%s)
"$build/tests/resonance_tests" -tc='conformance:*' --no-colors
if [[ -x $build/tests/kokkos/resonance_kokkos_tests ]]; then
  "$build/tests/kokkos/resonance_kokkos_tests" -tc='*conformance cases*' --no-colors
fi
echo "soak: $cases cases from $first on every backend in $(( $(date +%s) - start )) s"
