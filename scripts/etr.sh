#!/usr/bin/env bash
# The ETR reproduction in one command (docs/etr-reproduction.md): installs the missing Debian packages,
# builds etr_train (Release), trains every arm on both tasks for 3 seeds, writes the report (means over
# seeds, the claims tested) and plots the results.
#   scripts/etr.sh [--quick] [--out DIR] [--plots DIR] [other etr_train options]
# Results go to DIR (default build/etr_results; the report is DIR/report.md), the PNGs to --plots
# (default DIR/plots).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=build/etr_results
plots=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out | --plots)
      if [[ $# -lt 2 || -z "$2" ]]; then
        echo "etr.sh: bad argument $1: missing value" >&2
        exit 2
      fi
      if [[ "$1" == --out ]]; then out="$2"; else plots="$2"; fi
      shift 2
      ;;
    *)
      args+=("$1")
      shift
      ;;
  esac
done
[[ -n "$plots" ]] || plots="$out/plots"

scripts/deps.sh test python3-matplotlib
cmake --preset release >/dev/null
cmake --build --preset release --target etr_train >/dev/null
build/release/examples/etr_train --out "$out" "${args[@]}"
/usr/bin/python3 examples/etr_train/report.py "$out" "$out/report.md"
/usr/bin/python3 examples/etr_train/plot.py "$out" "$plots"
