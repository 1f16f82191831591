#!/usr/bin/env bash
# Builds and runs every test twice: the dev preset (warnings as errors), then AddressSanitizer +
# UndefinedBehaviorSanitizer. Installs missing Debian packages first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/deps.sh test
cmake --workflow --preset dev
cmake --workflow --preset asan-ubsan
