#!/usr/bin/env bash
# Installs the Debian 12 packages a task needs when any is missing (see shared research/env.md).
#   scripts/deps.sh demo   compiler, CMake, Ninja, xsimd and oneTBB (the demo routes on backend::cpu)
#   scripts/deps.sh test   + Eigen, doctest, Google Benchmark, NumPy (CLI reference test),
#                          Kokkos (Trilinos 13.2: Kokkos 3.4, Serial), Open MPI 4.1 (the mpi component;
#                          its CTest entries set OMPI_ALLOW_RUN_AS_ROOT* themselves, as CI runs as root)
#   scripts/deps.sh MODE PACKAGE...   MODE's packages plus the Debian packages named (e.g. python3-matplotlib)
set -euo pipefail

packages=(g++ cmake ninja-build libxsimd-dev libtbb-dev)
if [[ "${1:-test}" == "test" ]]; then
  packages+=(libeigen3-dev doctest-dev libbenchmark-dev python3-numpy
              libtrilinos-kokkos-dev trilinos-dev libopenmpi-dev openmpi-bin)
fi
packages+=("${@:2}")

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "resonance: installing ${missing[*]}" >&2
sudo=()
[[ $(id -u) -ne 0 ]] && sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
