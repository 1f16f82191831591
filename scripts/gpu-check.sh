#!/usr/bin/env bash
# The GPU check of backend::cuda, in two steps (shared/research's device notes: the GPU machine has
# nvcc, CMake and ninja but no Debian packages and no network):
#   scripts/gpu-check.sh pack   here: copies the test dependencies (doctest, Eigen headers and their
#                               CMake configs) into .gpu-deps/ (git-ignored through .git/info/exclude)
#   scripts/gpu-check.sh        on the GPU machine, with .gpu-deps carried: configures a Release build
#                               for this GPU's architecture, builds the cuda tests, the example and
#                               bench_gpu, runs the `gpu` tests (verbose) and the example, then the GPU
#                               benchmark (bench_gpu, under a minute on an H100-class GPU) into
#                               $OUT/bench_gpu.json ($OUT when set, else build/gpu), PyTorch's figures on
#                               the same GPU where python3 has torch, and the markdown report of both
#                               (report.md beside them). A few minutes.
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
cmake --build "$build" --target resonance_cuda_tests cuda_route bench_gpu
ctest --test-dir "$build" -L gpu --output-on-failure -V
"$build"/examples/cuda_route

# The benchmark; then torch on the same GPU (n/a without torch or CUDA) and the report of both.
out="${OUT:-$build}"
mkdir -p "$out"
"$build"/bench/gpu/bench_gpu --json "$out/bench_gpu.json"
if command -v python3 >/dev/null; then
  python3 bench/gpu/torch_side_by_side.py --json "$out/torch.json"
  python3 bench/gpu/report.py "$out/bench_gpu.json" --torch "$out/torch.json" | tee "$out/report.md"
fi
