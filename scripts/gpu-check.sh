#!/usr/bin/env bash
# The GPU check of backend::cuda, in two steps (shared/research's device notes: the GPU machine has
# nvcc, CMake and ninja but no Debian packages and no network):
#   scripts/gpu-check.sh pack   here: copies the test dependencies (doctest, Eigen headers and their
#                               CMake configs) into .gpu-deps/ (git-ignored through .git/info/exclude)
#   scripts/gpu-check.sh        on the GPU machine, with .gpu-deps carried: configures a Release build
#                               for this GPU's architecture, builds the cuda tests and the example,
#                               runs the `gpu` tests (verbose) and the example. A few minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${1:-}" == "pack" ]]; then
  rm -rf .gpu-deps
  mkdir -p .gpu-deps/usr/include .gpu-deps/usr/lib/cmake .gpu-deps/usr/share/eigen3
  cp -r /usr/include/doctest /usr/include/eigen3 .gpu-deps/usr/include/
  cp -r /usr/lib/cmake/doctest .gpu-deps/usr/lib/cmake/
  cp -r /usr/share/eigen3/cmake .gpu-deps/usr/share/eigen3/
  # Debian's doctest config names /usr itself: make it relative to where the config lies.
  sed -i 's|^set(_IMPORT_PREFIX "/usr")|get_filename_component(_IMPORT_PREFIX "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)|' \
    .gpu-deps/usr/lib/cmake/doctest/doctestTargets.cmake
  grep -qx '/.gpu-deps/' .git/info/exclude 2>/dev/null || echo '/.gpu-deps/' >>.git/info/exclude
  echo "gpu-check: packed $(du -sh .gpu-deps | cut -f1) into .gpu-deps"
  exit 0
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
build=build/gpu
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DRESONANCE_BUILD_TESTS=ON \
  -DRESONANCE_BUILD_EXAMPLES=ON -DRESONANCE_BUILD_TOOLS=OFF -DRESONANCE_INSTALL=OFF \
  -DRESONANCE_CUDA_ARCHITECTURES="${arch:-90}" -DCMAKE_PREFIX_PATH="$PWD/.gpu-deps/usr" >/dev/null
cmake --build "$build" --target resonance_cuda_tests cuda_route
ctest --test-dir "$build" -L gpu --output-on-failure -V
"$build"/examples/cuda_route
