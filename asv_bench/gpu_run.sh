#!/usr/bin/env bash
# One bounded GPU run of gpulora (at most ~8 minutes): install, the CuPy test suite, the GPU benchmark.
#
# Needs, already installed (no network is used): a CUDA GPU, CuPy (cuda13), numba-cuda, PyTorch, pytest,
# hypothesis, setuptools. Writes under $OUT (default ./gpu-results):
#   stages.txt   one line per shell stage: name, exit code, seconds
#   install.log, tests.log, tests.txt (its last lines), bench.log
#   gpu.json     every measurement (device, versions, ceilings, feature map, products, stage breakdown,
#                comparison)
#   gpu.md       the same as a markdown section; put it into BENCHMARKS.md with
#                python asv_bench/gpu_report.py "$OUT" --update BENCHMARKS.md
#
# Usage: asv_bench/gpu_run.sh [--dry-run] [--skip-install] [--skip-tests] [--budget SECONDS]
#   --dry-run      no GPU needed: NumPy at toy sizes (checks the script), no install, no CuPy tests
#   --budget S     seconds for the benchmark stages together (default 220)
# Each stage runs under its own `timeout`: install 60 s, tests 150 s, benchmark budget + 30 s, report 20 s
# (480 s in all with the default budget).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0 install=1 tests=1 budget=220
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --skip-install) install=0 ;;
    --skip-tests) tests=0 ;;
    --budget)
      [[ $# -ge 2 && "$2" =~ ^[0-9]+$ && "$2" -gt 0 ]] || { echo "gpu_run: --budget needs a positive integer" >&2; exit 2; }
      budget=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_run: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $dry -eq 1 ]]; then install=0; tests=0; fi

OUT=${OUT:-./gpu-results}
mkdir -p "$OUT" || { echo "gpu_run: cannot create $OUT" >&2; exit 2; }
: > "$OUT/stages.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout imports even if the install failed
export PYTHONUNBUFFERED=1
py=${PYTHON:-python}
status=0

stage() {  # stage NAME LIMIT COMMAND...: run under a timeout, log, record exit code and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc ${limit}s-limit $((SECONDS - t0))s" >> "$OUT/stages.txt"
  echo "gpu_run: $name: exit $rc in $((SECONDS - t0)) s (limit $limit s)"
  [[ $rc -eq 0 ]] || status=1
  return 0
}

if [[ $install -eq 1 ]]; then
  stage install 60 "$py" -m pip install --no-deps --no-build-isolation --no-index -e .
fi
if [[ $tests -eq 1 ]]; then
  stage tests 150 "$py" -m pytest -q -m gpu -p no:cacheprovider tests
  tail -n 15 "$OUT/tests.log" > "$OUT/tests.txt"
fi
dry_flag=()
[[ $dry -eq 1 ]] && dry_flag=(--dry-run)
stage bench $((budget + 30)) "$py" asv_bench/gpu_bench.py --out "$OUT" --budget "$budget" "${dry_flag[@]}"
stage report 20 "$py" asv_bench/gpu_report.py "$OUT"
[[ -s "$OUT/report.log" ]] && cp "$OUT/report.log" "$OUT/gpu.md"
echo "gpu_run: results in $OUT (gpu.json, gpu.md); total $SECONDS s"
exit $status
