#!/usr/bin/env bash
# Run ON the GPU machine from the repository root (after bench/device/prepare.sh here):
#   run(command="BENCH_COMMIT=<sha> bash bench/device/run.sh tests", carry=[".whl", ".carry"])
#   ... then "bash bench/device/run.sh maxsim" and "... encoder" (each fits one 10-minute call)
# What it does: tests = the whole test suite natively (no interpreter); maxsim / encoder = that
# benchmark family; all = tests and both families; tune [maxsim|encoder|all] = the block-size
# sweep of bench/device/tune.py (TUNE_BUDGET_S seconds, default 420). Logs, benchmark and
# sweep JSON/Markdown and pytest-benchmark JSON land under $OUT; the short table comes last.
set -uo pipefail
what=${1:-all}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD/src:$PWD/tests:/tmp/site" || exit 1
export COLBERT_TRITON_MINILM_DIR="$PWD/.carry/minilm"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest tests -q --durations=20 -p no:cacheprovider -o addopts="" --timeout=300 \
    -rs 2>&1 | tee "$OUT/tests.log" | tail -60
  rc=$((rc | PIPESTATUS[0]))
fi
if [ "$what" = tune ]; then
  python3 bench/device/tune.py "${2:-all}" --budget-s "${TUNE_BUDGET_S:-420}" \
    --out "$OUT/results/tune-${2:-all}.json" 2>&1 | tee "$OUT/tune.log"
  rc=$((rc | PIPESTATUS[0]))
fi
for family in maxsim encoder; do
  if [ "$what" = "$family" ] || [ "$what" = all ]; then
    BENCH_RESULTS_DIR="$OUT/results" python3 -m pytest bench -q -p no:cacheprovider -k "$family" \
      --benchmark-json="$OUT/results/pytest-benchmark-$family.json" --benchmark-disable-gc \
      ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench-$family.log" | tail -150
    rc=$((rc | PIPESTATUS[0]))
  fi
done
echo "run.sh $what: rc=$rc"
exit $rc
