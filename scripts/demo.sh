#!/usr/bin/env bash
# Builds (Release) and runs the routing demo: 16384 tokens, 64 experts, top-2, several policies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/deps.sh demo
cmake --preset release >/dev/null
cmake --build --preset release --target route_demo >/dev/null
exec build/release/examples/route_demo "$@"
