#!/usr/bin/env bash
# Run ON the GPU machine from the repository root (after bench/device/prepare.sh here), e.g.
#   run(command="BENCH_COMMIT=<sha> bash bench/device/run.sh tests maxsim", carry=[".whl", ".carry"])
#   run(command="BENCH_COMMIT=<sha> TUNE_BUDGET_S=200 bash bench/device/run.sh encoder tune-maxsim", ...)
# Steps, run in the order given: tests = the whole test suite natively (no interpreter);
# maxsim | encoder = that benchmark family (encoder = whole encoder + per-op suites);
# tune-maxsim | tune-encoder | tune = the block-size sweep of bench/device/tune.py for that
# family (TUNE_BUDGET_S seconds, default 300). Every step gets what is left of DEADLINE_S
# (default 560 s, inside the device's 600-s limit; lower it with the call's timeout_s) and is
# stopped with SIGINT, so pytest and tune.py still write what they measured: logs in $OUT,
# benchmark and sweep JSON/Markdown in $OUT/results (at most 8 files come back: two steps per
# call fit). Extra pytest options go in PYTEST_ADDOPTS (e.g. "-k 'rerank and d96'").
# Exit status: the steps' statuses OR-ed (124/130 = a step ran out of time).
set -uo pipefail
[ $# -gt 0 ] || set -- tests maxsim
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
deadline=$((SECONDS + ${DEADLINE_S:-560}))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD/src:$PWD/tests:/tmp/site" || exit 1
export COLBERT_TRITON_MINILM_DIR="$PWD/.carry/minilm"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# A carried wheel can shadow the machine's packages (PYTHONPATH comes first): the references the
# benchmarks and parity tests need must still import, or they would be skipped silently.
python3 -c "import transformers, sentence_transformers, pylate; print('transformers', transformers.__version__, 'sentence-transformers', sentence_transformers.__version__, 'pylate', pylate.__version__)" \
  || echo "run.sh: WARNING: the reference packages do not import (stale .whl? re-run bench/device/prepare.sh)"

rc=0
for step in "$@"; do
  left=$((deadline - SECONDS))
  if [ "$left" -lt 90 ]; then
    echo "run.sh: no time left for $step"; rc=$((rc | 4)); continue
  fi
  echo "=== $step (${left} s left) ==="
  case "$step" in
    tests)
      timeout -s INT -k 15 "$((left - 15))" python3 -m pytest tests -q --durations=20 -p no:cacheprovider -o addopts="" \
        --timeout=300 -rs 2>&1 | tee "$OUT/tests.log" | tail -60 ;;
    maxsim|encoder)
      BENCH_RESULTS_DIR="$OUT/results" timeout -s INT -k 15 "$((left - 15))" python3 -m pytest bench -q -p no:cacheprovider \
        -k "$step" --benchmark-json="$OUT/results/pytest-benchmark-$step.json" --benchmark-disable-gc \
        2>&1 | tee "$OUT/bench-$step.log" | tail -150 ;;
    tune|tune-maxsim|tune-encoder)
      family=${step#tune}; family=${family#-}; family=${family:-all}
      budget=${TUNE_BUDGET_S:-300}; [ "$budget" -lt $((left - 60)) ] || budget=$((left - 60))
      timeout -s INT -k 15 "$((left - 15))" python3 bench/device/tune.py "$family" --budget-s "$budget" \
        --out "$OUT/results/tune-$family.json" 2>&1 | tee "$OUT/tune-$family.log" ;;
    *)
      echo "run.sh: unknown step $step"; rc=$((rc | 8)); continue ;;
  esac
  rc=$((rc | PIPESTATUS[0]))
done
echo "run.sh $*: rc=$rc"
exit $rc
